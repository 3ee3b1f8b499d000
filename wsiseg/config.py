"""The YAML configuration: reading, the reference dialect's normalising step, and every check.

`load_config(path)` reads a YAML file, fills defaults, resolves paths and checks everything
up front, raising one `WsisegError` that lists every problem at once (unknown or misspelt keys
with a "did you mean", wrong types, class counts that disagree, crop sizes the backbone cannot
take, missing files). Relative input paths are resolved against the config file's folder
(falling back to the current folder); `logging.output_dir` is relative to the current folder.
`dataset.json: sample:hgsc_nest` selects the built-in labelled demo data set. The keys, their
types, defaults and bounds are the dataclasses of `wsiseg.config_types`.

A file in the reference project's dialect (`model.pfm_name`, `training.learning_rate`,
`finetune_mode: {type, rank, alpha}`, ...) is first read onto the native keys by
`wsiseg.config_reference.normalise` (its table says what each reference key becomes); the
validator below is the same for both. `read_config` also returns what those keys were read as.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from wsiseg.config_reference import drop_counterparts, get_path, nested_home, normalise, reference_keys, set_path
from wsiseg.config_types import AUGMENTATIONS, LOSS_OPTIONS, REQUIRED, SCHEMA, SECTIONS, Key
from wsiseg.errors import WsisegError
from wsiseg.train.choices import LOSSES
from wsiseg.train.dataset_json import read_dataset_json, resolve_path

DEMO_DATASET = "sample:hgsc_nest"



def defaults(section: str) -> dict[str, Any]:
    """The default of every key of a section that has one (the one place defaults live)."""
    table = LOSS_OPTIONS if section == "training.loss" else SCHEMA[section]
    return {key: copy.deepcopy(spec.default) for key, spec in table.items() if spec.default is not REQUIRED}


@dataclass
class _Problems:
    items: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.items.append(message)


def _suggest(name: str, known: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping", bool: "true/false"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _check_value(where: str, key: Key, value: Any, problems: _Problems) -> Any:
    """Check one value against its key; returns the (possibly coerced) value."""
    if value is None:
        if not key.nullable:
            problems.add(f"{where} must not be empty")
        return value
    if isinstance(value, bool) and bool not in key.types:
        problems.add(f"{where} must be {_type_name(key.types)}, got {value!r}")
        return value
    if float in key.types and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    if float in key.types and isinstance(value, int):
        value = float(value)
    if not isinstance(value, key.types):
        problems.add(f"{where} must be {_type_name(key.types)}, got {value!r}")
        return value
    if key.choices is not None and isinstance(value, str) and value not in key.choices and value.lower() in key.choices:
        value = value.lower()  # SGD, AdamW, Cosine: the reference writes names in any case
    if key.choices is not None and value not in key.choices:
        problems.add(f"{where} is {value!r}; choose one of {', '.join(map(str, key.choices))}{_suggest(value, key.choices)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if key.minimum is not None and value < key.minimum:
            problems.add(f"{where} is {value}; it must be at least {key.minimum}")
        if key.maximum is not None and value > key.maximum:
            problems.add(f"{where} is {value}; it must be at most {key.maximum}")
    return value


def _fill_section(name: str, given: Any, problems: _Problems, aliases: dict[str, str],
                  unreadable: set[str]) -> dict[str, Any]:
    """One section with defaults filled; `aliases` names native keys after the reference keys they came from,
    `unreadable` holds native keys whose reference value was refused already (not reported missing again)."""

    schema = SCHEMA[name]
    if given is None:
        given = {}
    if not isinstance(given, dict):
        problems.add(f"section '{name}' must be a mapping of keys, got {given!r}")
        given = {}
    reference = reference_keys()
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key not in schema and key in reference.get(name, ()):
            problems.add(f"{name}.{key} must be a mapping of its keys, got {value!r}")
            continue
        if key not in schema:
            home = [section for section, keys in SCHEMA.items() if key in keys and section != name]
            home += [section for section, keys in reference.items() if key in keys and section != name]
            known = (*schema, *reference.get(name, ()))
            nested = nested_home(key)
            if home:
                hint = f" (it belongs in section '{home[0]}')"
            elif nested:
                hint = f" (it belongs in '{nested}')"
            else:
                hint = _suggest(key, known)
            problems.add(f"unknown key '{name}.{key}'{hint}")
            continue
        path = f"{name}.{key}"
        where = f"{aliases[path]} (read as {path})" if path in aliases else path
        out[key] = _check_value(where, schema[key], value, problems)
    for key, spec in schema.items():
        if key in out:
            continue
        if spec.default is REQUIRED and f"{name}.{key}" not in unreadable:
            problems.add(f"missing required key '{name}.{key}'")
        elif spec.default is not REQUIRED:
            out[key] = copy.deepcopy(spec.default)
    return out


def _check_loss(loss: Any, problems: _Problems) -> dict[str, Any]:
    if not isinstance(loss, dict):
        return {}
    out: dict[str, Any] = {}
    terms = 0
    for key, value in loss.items():
        if key in LOSSES:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                problems.add(f"training.loss.{key} is a weight and must be a number >= 0, got {value!r}")
                continue
            out[key] = float(value)
            terms += value > 0
        elif key in LOSS_OPTIONS:
            out[key] = _check_value(f"training.loss.{key}", LOSS_OPTIONS[key], value, problems)
        else:
            problems.add(f"unknown loss 'training.loss.{key}'{_suggest(key, (*LOSSES, *LOSS_OPTIONS))}; "
                         f"losses: {', '.join(LOSSES)}")
    if not terms:
        problems.add("training.loss has no loss with a weight > 0; e.g. {cross_entropy: 1.0, dice: 1.0}")
    for key, spec in LOSS_OPTIONS.items():
        out.setdefault(key, spec.default)
    return out


def _check_augmentations(augmentations: Any, problems: _Problems) -> dict[str, float]:
    if not isinstance(augmentations, dict):
        return {}
    out: dict[str, float] = {}
    for key, value in augmentations.items():
        if key not in AUGMENTATIONS:
            problems.add(f"unknown augmentation 'training.augmentations.{key}'{_suggest(key, AUGMENTATIONS)}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            problems.add(f"training.augmentations.{key} is a probability and must be within 0..1, got {value!r}")
        else:
            out[key] = float(value)
    return out


def _check_dataset(config: dict[str, Any], json_path: Path | None, splits: tuple[str, ...], problems: _Problems) -> None:
    dataset = config["dataset"]
    index = None
    if json_path is not None:
        try:
            index = read_dataset_json(json_path)
        except WsisegError as error:
            problems.add(str(error))
    names = dataset.get("class_names")
    if names is not None and not all(isinstance(n, str) for n in names):
        problems.add("dataset.class_names must be a list of strings")
    counts: dict[str, int] = {}
    if isinstance(dataset.get("num_classes"), int):
        counts["dataset.num_classes"] = dataset["num_classes"]
    if isinstance(names, list):
        counts["dataset.class_names"] = len(names)
    if isinstance(config["model"].get("num_classes"), int):
        counts["model.num_classes"] = config["model"]["num_classes"]
    if index is not None:
        if index.num_classes is not None:
            counts[f"num_classes in {index.path.name}"] = index.num_classes
        if index.class_names is not None:
            counts[f"class_names in {index.path.name}"] = len(index.class_names)
            if names is None:
                names = dataset["class_names"] = list(index.class_names)
    if len(set(counts.values())) > 1:
        problems.add("the number of classes disagrees: " + ", ".join(f"{k} = {v}" for k, v in counts.items())
                     + "; make them equal")
    elif not counts:
        problems.add("dataset.num_classes is missing; set it (or dataset.class_names)")
    elif dataset.get("num_classes") is None:
        dataset["num_classes"] = next(iter(counts.values()))
    num_classes = dataset.get("num_classes")
    if isinstance(num_classes, int) and dataset.get("class_names") is None:
        dataset["class_names"] = ["background" if i == 0 else f"class_{i}" for i in range(num_classes)]
    if isinstance(num_classes, int) and 0 <= dataset["ignore_index"] < num_classes:
        problems.add(f"dataset.ignore_index {dataset['ignore_index']} is a real class (0..{num_classes - 1}); use 255")
    if index is None:
        return
    for split in splits:
        entries = index.entries(split)
        if not entries:
            problems.add(f"split '{split}' of {index.path} is empty; add image_path/mask_path entries")
            continue
        missing = [str(e[k]) for e in entries for k in ("image", "mask") if e[k] is not None and not e[k].is_file()]
        no_mask = sum(e["mask"] is None for e in entries)
        if no_mask and split in ("train", "val"):
            problems.add(f"{no_mask} entries of split '{split}' in {index.path} have no mask_path")
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            problems.add(f"{len(missing)} files of split '{split}' are missing: {', '.join(missing[:3])}{more}")


def _check_model(config: dict[str, Any], problems: _Problems, aliases: dict[str, str]) -> None:
    model = config["model"]
    name = model.get("name")
    if not isinstance(name, str):
        return
    try:
        from wsiseg.models.registry import get_spec

        spec = get_spec(name)
    except WsisegError as error:
        problems.add(str(error))
        return
    emb_dim = model.get("emb_dim")
    if isinstance(emb_dim, int) and emb_dim != spec.embed_dim:
        problems.add(f"model.emb_dim is {emb_dim} but {name} has embed dim {spec.embed_dim} (read from the model); "
                     f"set it to {spec.embed_dim} or remove it")
    multiple = int(getattr(spec, "input_multiple", 1) or 1)
    sizes = {"model.input_size": model.get("input_size"), "training.crop_size": config["training"].get("crop_size")}
    for where, size in sizes.items():
        if isinstance(size, int) and size % multiple:
            lower = max(multiple, size // multiple * multiple)
            shown = f"{aliases[where]} (read as {where})" if where in aliases else where
            problems.add(f"{shown} {size} is not a multiple of {multiple} (the input multiple of {name}); "
                         f"use {lower} or {lower + multiple}")


def _check_training(training: dict[str, Any], problems: _Problems) -> None:
    if training.get("optimizer") == "sgd" and training.get("nesterov") and not training.get("momentum"):
        problems.add("training.nesterov needs training.momentum > 0 with SGD; set a momentum (e.g. 0.9) or "
                     "nesterov: false")


class ReadConfig(NamedTuple):
    """A completed config and what each reference-dialect key of the file was read as."""

    config: dict[str, Any]
    reference_keys: list[str]


def check_config(raw: Any, base_dir: Path | str = ".", source: str = "config",
                 splits: tuple[str, ...] = ("train", "val"), check_files: bool = True) -> ReadConfig:
    """Normalise the reference dialect, fill defaults and check a config mapping (one WsisegError for all problems)."""

    base_dir = Path(base_dir)
    problems = _Problems()
    if not isinstance(raw, dict):
        raise WsisegError(f"{source} must be a YAML mapping with sections {', '.join(SCHEMA)}")
    normalised = normalise(raw)
    problems.items.extend(normalised.problems)
    raw, aliases = normalised.raw, normalised.aliases
    for section in raw:
        if section not in SCHEMA:
            problems.add(f"unknown section '{section}'{_suggest(section, tuple(SCHEMA))}")
    config = {name: _fill_section(name, raw.get(name), problems, aliases, normalised.unreadable) for name in SCHEMA}
    training = config["training"]
    training["loss"] = _check_loss(training.get("loss"), problems)
    training["augmentations"] = _check_augmentations(training.get("augmentations"), problems)
    _check_training(training, problems)
    if training.get("crop_size") is None and isinstance(config["model"].get("input_size"), int):
        training["crop_size"] = config["model"]["input_size"]
    json_path = None
    json_value = config["dataset"].get("json")
    if isinstance(json_value, str):
        if json_value == DEMO_DATASET:
            from wsiseg.train.demo_data import demo_dataset_json

            json_path = demo_dataset_json()
        else:
            json_path = resolve_path(json_value, base_dir)
        config["dataset"]["json"] = str(json_path)
    weights = config["model"].get("pfm_weights_path")
    if isinstance(weights, str):
        weights_path = resolve_path(weights, base_dir)
        config["model"]["pfm_weights_path"] = str(weights_path)
        if check_files and not weights_path.exists():
            problems.add(f"model.pfm_weights_path {weights_path} does not exist; download the weights and point "
                         "to the local file, or set it to null")
    _check_dataset(config, json_path if check_files else None, splits if check_files else (), problems)
    _check_model(config, problems, aliases)
    if problems.items:
        count = len(problems.items)
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems.items, 1))
        raise WsisegError(f"{source} has {count} problem{'s' if count > 1 else ''}: {listed}")
    return ReadConfig(config, normalised.notes)


def validate_config(raw: Any, base_dir: Path | str = ".", source: str = "config",
                    splits: tuple[str, ...] = ("train", "val"), check_files: bool = True) -> dict[str, Any]:
    """Fill defaults and check a config mapping of either dialect; raises one WsisegError listing every problem."""
    return check_config(raw, base_dir, source, splits, check_files).config


def apply_options(raw: dict[str, Any], options: Sequence[str]) -> dict[str, Any]:
    """`key.path=value` overrides (the value parsed as YAML) applied to a raw config mapping, in order."""
    import yaml


    for option in options:
        path, sep, text = option.partition("=")
        parts = path.strip().split(".")
        if not sep or not all(parts):
            raise WsisegError(f"--options {option!r} is not key.path=value (e.g. training.learning_rate=0.01)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            reason = str(error).replace("\n", " ")
            raise WsisegError(f"--options {option!r}: the value is not valid YAML ({reason})") from None
        mapping = raw
        for part in parts[:-1]:
            if not isinstance(mapping.get(part), dict):
                if part in mapping:
                    raise WsisegError(f"--options {option!r}: {part} is {mapping[part]!r}, not a section of keys")
                mapping[part] = {}
            mapping = mapping[part]
        mapping[parts[-1]] = value
        drop_counterparts(raw, ".".join(parts))
    return raw


def read_yaml(path: Path | str) -> dict[str, Any]:
    """The raw mapping of a YAML config file (WsisegError when it is missing or not YAML)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise WsisegError(f"config file {path} does not exist; pass the path of a YAML config (see configs/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = str(error).replace("\n", " ")
        raise WsisegError(f"config file {path} is not valid YAML: {reason}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise WsisegError(f"config {path} must be a YAML mapping with sections {', '.join(SCHEMA)}")
    return raw


def read_config(path: Path | str, splits: tuple[str, ...] = ("train", "val"), check_files: bool = True,
                options: Sequence[str] = ()) -> ReadConfig:
    """Read, complete and check a YAML config file of either dialect, with `--options` overrides."""
    path = Path(path)
    raw = apply_options(read_yaml(path), options)
    return check_config(raw, path.resolve().parent, f"config {path}", splits, check_files)


def load_config(path: Path | str, splits: tuple[str, ...] = ("train", "val"), check_files: bool = True,
                options: Sequence[str] = ()) -> dict[str, Any]:
    """Read, complete and check a YAML config file (see the module docstring)."""
    return read_config(path, splits, check_files, options).config


def dump_config(config: dict[str, Any], path: Path | str) -> None:
    """Write a completed config as YAML (loadable again by `load_config`)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))


def migrate_config(path: Path | str, out: Path | str | None = None, overwrite: bool = False) -> str:
    """The native YAML equivalent of a (reference) config file; written to `out` when given.

    Only the keys the file sets are written (defaults stay implicit). Relative input paths are
    rewritten relative to the folder of `out`, so they keep pointing at the same files.
    """
    import os

    import yaml

    from wsiseg.outputs import atomic_file, check_writable

    path = Path(path)
    raw = read_yaml(path)
    result = normalise(raw)
    base = path.resolve().parent
    validate_config(raw, base, f"config {path}", check_files=False)
    native = result.raw
    target = Path(out).resolve().parent if out is not None else Path.cwd()
    for where in ("dataset.json", "model.pfm_weights_path"):
        value = get_path(native, where)
        if isinstance(value, str) and not value.startswith("sample:") and not Path(value).expanduser().is_absolute():
            set_path(native, where, os.path.relpath(resolve_path(value, base), target))
    header = f"# native wsiseg config migrated from {path.name}\n"
    if result.notes:
        header += "".join(f"#   {note}\n" for note in result.notes)
    text = header + yaml.safe_dump(native, sort_keys=False)
    if out is not None:
        out = Path(out)
        check_writable(out, overwrite)
        with atomic_file(out) as partial:
            Path(partial).write_text(text)
    return text
