"""Named choices registered once: name -> "module:attr", imported only when one is used.

Config validation, CLI options and error messages take their names from the registry, so a
choice is typed in one place, and `wsiseg --help` stays instant (nothing heavy is imported).
An entry may also carry one plain fact that is read without importing anything (an export
format's file name): `("module:attr", detail)`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from wsiseg.errors import WsisegError


class Choices(Mapping[str, str]):
    """A read-only mapping of choice names to "module:attr" entries, in registration order."""

    def __init__(self, what: str, entries: Mapping[str, str | tuple[str, Any]]) -> None:
        self.what = what
        self._entries: dict[str, str] = {}
        self._details: dict[str, Any] = {}
        for name, entry in entries.items():
            self._entries[name], self._details[name] = (entry, None) if isinstance(entry, str) else entry

    def __getitem__(self, name: str) -> str:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> tuple[str, ...]:
        """The names in registration order (what config validation and CLI options offer)."""
        return tuple(self._entries)

    def check(self, name: str) -> None:
        """A WsisegError naming the valid choices unless `name` is one."""
        if name not in self._entries:
            raise WsisegError(f"unknown {self.what} {name!r}: use one of {', '.join(self._entries)}")

    def detail(self, name: str) -> Any:
        """The plain fact registered with `name` (None when it has none); nothing is imported."""
        self.check(name)
        return self._details[name]

    def load(self, name: str) -> Any:
        """The object registered as `name`, imported now."""
        self.check(name)
        module, attribute = self._entries[name].split(":")
        return getattr(importlib.import_module(module), attribute)


def either(names: Iterable[str]) -> str:
    """Names as prose: "a, b or c"."""
    words = list(names)
    return " or ".join(filter(None, (", ".join(words[:-1]), words[-1])))
