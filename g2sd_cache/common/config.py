"""Saving and loading the frozen per-stage configurations as YAML (`config.yaml` beside each output)."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

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
