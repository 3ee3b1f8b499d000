"""Named choices registered once: name -> "module:attr", imported only when one is used.

Config validation, CLI options and error messages take their names from the registry, so a
choice is typed in one place, and `wsiseg --help` stays instant (nothing heavy is imported).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from wsiseg.errors import WsisegError


class Choices(Mapping[str, str]):
    """A read-only mapping of choice names to "module:attr" entries, in registration order."""

    def __init__(self, what: str, entries: dict[str, str]) -> None:
        self.what = what
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> str:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, name: str) -> None:
        """A WsisegError naming the valid choices unless `name` is one."""
        if name not in self._entries:
            raise WsisegError(f"unknown {self.what} {name!r}: use one of {', '.join(self._entries)}")

    def load(self, name: str) -> Any:
        """The object registered as `name`, imported now."""
        self.check(name)
        module, attribute = self._entries[name].split(":")
        return getattr(importlib.import_module(module), attribute)
