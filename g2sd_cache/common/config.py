"""The one configuration mechanism of every command: a frozen dataclass holds the defaults, a `--config` YAML
file overrides them, flags override the file; and `config.yaml` beside each output saves the result.

The parser is the meeting point (timm's train.py `_parse_args` does the same): `set_dataclass_defaults` gives
every flag its dataclass default (so `--help` prints it with `%(default)s`, and nowhere else writes it),
`set_file_defaults` lays a --config file's values over those, and argparse lays the flags given over both.
`config_from_args` then builds the frozen config from the parsed namespace.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from g2sd_cache.common.errors import UserError

T = TypeVar("T")


def to_yaml(cfg: Any, extra: dict | None = None) -> str:
    data = dataclasses.asdict(cfg)
    if extra:
        data.update(extra)
    return yaml.safe_dump(data, sort_keys=False)


def read_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read config {path}: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of option names to values")
    return data


def field_defaults(cls: type) -> dict[str, Any]:
    """{field: default} of a config dataclass (a default_factory is called; a field without a default is None)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None
    return out


def check_keys(data: dict, cls: type, path: str | Path) -> None:
    """Refuse unknown keys in a user's --config file with the list of valid ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"config {path}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")


def set_dataclass_defaults(parser: argparse.ArgumentParser, cls: type, required: tuple[str, ...] = ()) -> None:
    """Every flag of `parser` named after a field of `cls` defaults to the field's default; the `required` fields
    default to None (given neither as a flag nor in --config, `config_from_args` names them)."""
    parser.set_defaults(**field_defaults(cls))
    parser.set_defaults(**{name: None for name in required})


def set_file_defaults(parser: argparse.ArgumentParser, cls: type, path: str,
                      keys: Callable[[dict, str], dict] | None = None) -> None:
    """Lay the --config file at `path` over the dataclass defaults of `parser` (flags still override it).
    `keys(values, path)` screens the file's mapping (default: refuse keys that are not fields of `cls`)."""
    values = read_yaml(path)
    if keys is None:
        check_keys(values, cls, path)
    else:
        values = keys(values, path)
    parser.set_defaults(**values)


def config_from_args(cls: type[T], args: argparse.Namespace, required: tuple[str, ...] = ()) -> T:
    """The frozen config `cls` from parsed arguments (one field each); a `required` field left unset is one line."""
    missing = [f"--{name.replace('_', '-')}" for name in required if getattr(args, name, None) in (None, "")]
    if missing:
        raise UserError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (on the command line "
                        f"or in --config)")
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
