"""What each command module of the CLI gives the entry point (cli/main.py): its parser, what runs it, and the
config dataclass that holds its defaults and reads its --config file."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Command:
    name: str
    add: Callable[[argparse._SubParsersAction], argparse.ArgumentParser]   # adds the sub-parser, returns it
    run: Callable[[argparse.Namespace], int]                               # exit status
    config: type | None = None          # the frozen config dataclass: flag defaults and --config keys
    file_keys: Callable[[dict, str], dict] | None = None   # screens a --config mapping (default: fields only)
