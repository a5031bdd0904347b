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
import types
import typing
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


def _allowed(hint: Any) -> tuple[set[type], bool]:
    """The plain types a field's annotation allows (bool, int, float, str) and whether None is allowed."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return {a for a in args if a in (bool, int, float, str)}, type(None) in args


def _value_problem(value: Any, allowed: set[type], optional: bool) -> str | None:
    """Why `value` (from YAML) does not fit a field of types `allowed`, or None when it does."""
    if value is None:
        return None if optional else "it may not be empty (null)"
    if bool in allowed:   # strict: YAML true/false only; "false", "no" or 0 would read as a choice the user did not make
        return None if isinstance(value, bool) else "write true or false (unquoted)"
    if isinstance(value, bool):
        return "true/false is not a number or a name"
    if int in allowed and isinstance(value, int):
        return None
    if float in allowed:
        if isinstance(value, (int, float)):
            return None
        if isinstance(value, str):   # PyYAML reads `1e-3` (no dot) as a string: accept what float() reads exactly
            try:
                float(value)
                return None
            except ValueError:
                pass
        return "it must be a number"
    if int in allowed:
        return "it must be a whole number" + (f" (not {value!r})" if isinstance(value, float) else "")
    if str in allowed:
        return None if isinstance(value, str) else "it must be a text value"
    return None


def check_values(data: dict, cls: type, path: str | Path | None) -> dict:
    """Refuse a --config value whose type does not fit its option, in one line: `steps: 4.9` (a whole number is
    meant), `log_samples: "false"` (a string, which would read as true), `seed: null`. Returns `data` with
    numeric strings of float options (`blr: 1e-3`, which PyYAML reads as text) converted to floats."""
    hints = typing.get_type_hints(cls)
    where = f"config {path}" if path else "options"
    out = dict(data)
    for f in dataclasses.fields(cls):
        if f.name not in data or f.name not in hints:
            continue
        allowed, optional = _allowed(hints[f.name])
        value = data[f.name]
        problem = _value_problem(value, allowed, optional)
        if problem:
            shown = "null" if value is None else repr(value)
            raise UserError(f"{where}: {f.name}: {shown} is not valid: {problem}")
        if isinstance(value, str) and float in allowed and str not in allowed:
            out[f.name] = float(value)
    return out
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
    parser.set_defaults(**check_values(values, cls, path))


def config_from_args(cls: type[T], args: argparse.Namespace, required: tuple[str, ...] = ()) -> T:
    """The frozen config `cls` from parsed arguments (one field each); a `required` field left unset is one line."""
    missing = [f"--{name.replace('_', '-')}" for name in required if getattr(args, name, None) in (None, "")]
    if missing:
        raise UserError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (on the command line "
                        f"or in --config)")
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
