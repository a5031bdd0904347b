"""The `g2sd-cache` command: which commands there are, and how a command line becomes a config.

Each command's module in cli/ adds its flags and runs it (cli/extract.py, cli/train.py, ...). Parsing is timm's
train.py `_parse_args` for sub-commands: the flags default to the command's config dataclass, a `--config` YAML
file is laid over those defaults (`common.config.set_file_defaults`), then argparse lays the flags over both.
Nothing below cli/ sees argparse.
"""
from __future__ import annotations

import argparse
import sys

from g2sd_cache.cli import demo, evaluate, export, extract, finetune, inspect, train, verify
from g2sd_cache.common.config import set_file_defaults
from g2sd_cache.common.errors import UserError

COMMANDS = {c.name: c for c in (demo.COMMAND, extract.COMMAND, train.COMMAND, export.COMMAND, inspect.COMMAND,
                                 verify.COMMAND, finetune.FINETUNE, finetune.EXTRACT_LOGITS, evaluate.COMMAND)}


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="g2sd-cache", description="G2SD distillation from a cache of MAE teacher "
                                     "targets: extract once, train students without the teacher.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser, {name: command.add(sub) for name, command in COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line: dataclass defaults, then the --config file (if the command takes one), then the
    flags. A bad --config file raises UserError."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, subparsers = _parsers()
    command = COMMANDS.get(argv[0]) if argv else None
    if command is not None and command.config is not None:
        first = argparse.ArgumentParser(add_help=False)
        first.add_argument("--config")
        path = first.parse_known_args(argv[1:])[0].config
        if path:
            set_file_defaults(subparsers[command.name], command.config, path, command.file_keys)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv[0] if argv else "?"
    try:
        args = parse(argv)
        return COMMANDS[args.command].run(args)
    except UserError as e:
        print(f"g2sd-cache {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"g2sd-cache {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
