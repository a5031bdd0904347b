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


# Seeds feed numpy's SeedSequence (no negatives) and torch.manual_seed (below 2^63 here, to stay an int64).
MAX_SEED = 2**63 - 1


def check_seed(seed: int, flag: str = "--seed") -> None:
    """One line for a seed no generator takes (every config's validate calls it)."""
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{flag} {seed}: must be a whole number from 0 to 2^63 - 1")


def read_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_bytes().decode())
    except UnicodeDecodeError as e:
        raise UserError(f"config {path} is not a UTF-8 text file (byte {e.start} is not text); pass a YAML file of "
                        f"option: value lines") from e
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
