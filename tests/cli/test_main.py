"""The command line on its own: every command and every flag documented, flags in groups, configs built
from the arguments (a --config file below the flags), and user mistakes as one line with exit status 2."""
import argparse
import dataclasses

import pytest

from g2sd_cache.cli import main as cli
from g2sd_cache.cli import train as train_command
from g2sd_cache.common.config import config_from_args
from g2sd_cache.generic.extract import ExtractConfig
from g2sd_cache.generic.train import TrainConfig


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_and_every_flag_has_help():
    commands = _subparsers(cli.build_parser())
    assert {"demo", "extract", "train", "export", "inspect", "verify"} <= set(commands)
    for name, parser in commands.items():
        assert parser.description, name
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, (name, action.option_strings)


def test_train_and_extract_flags_come_in_groups():
    commands = _subparsers(cli.build_parser())
    titles = {g.title for g in commands["train"]._action_groups}
    assert {"data", "model", "optimisation", "run", "performance"} <= titles
    assert {"data", "teacher and views", "storage", "performance"} <= {g.title for g in commands["extract"]._action_groups}


def test_configs_are_built_from_the_arguments_with_a_file_below_the_flags(tmp_path, monkeypatch):
    args = cli.parse(["extract", "--data", "d", "--out", "o", "--teacher", "random", "--views", "3", "--pixels", "none"])
    cfg = config_from_args(ExtractConfig, args)
    assert (cfg.views, cfg.pixels, cfg.codec) == (3, "none", "fp16")
    assert {f.name for f in dataclasses.fields(ExtractConfig)} <= set(vars(args))   # every field is a flag
    got = []
    monkeypatch.setattr("g2sd_cache.generic.train.train", lambda c: got.append(c) or {"steps": 0})
    (tmp_path / "c.yaml").write_text("cache: /c\nepochs: 5\nbatch_size: 8\n")
    args = cli.parse(["train", "--config", str(tmp_path / "c.yaml"), "--out", "r", "--epochs", "2"])
    assert train_command.run(args) == 0
    assert (got[0].cache, got[0].epochs, got[0].batch_size, got[0].out) == ("/c", 2, 8, "r")
    assert got[0].blr == TrainConfig(out="x").blr                                  # untouched: the default


@pytest.mark.parametrize("argv,match", [
    (["train", "--out", "r"], "give --cache"),
    (["train", "--cache", "c"], "--out is required"),
    (["inspect", "/nowhere/cache"], "not a g2sd-cache cache"),
])
def test_user_mistakes_are_one_line_and_exit_2(argv, match, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err and err.startswith(f"g2sd-cache {argv[0]}: error:")
