"""Saving and loading the frozen per-stage configurations as YAML (`config.yaml` beside each output)."""
from __future__ import annotations

import dataclasses
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
