"""configs/: the official G2SD generic-distillation recipes as `train --config` files, every value sourced."""
import dataclasses
import re
from pathlib import Path

import pytest

import g2sd_cache.generic.train
from g2sd_cache.cli import train as train_command
from g2sd_cache.cli.main import parse
from g2sd_cache.common.config import check_keys, read_yaml
from g2sd_cache.generic.train import TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SOURCE = re.compile(r"#.*\b(GD\.sh|main_distill\.py|engine_distill\.py|models_mae\.py|lr_sched\.py) L\d+")
RECIPES = {"g2sd_vit_small_from_vit_base.yaml": "mae_vit_small_patch16_dec256d4b",
           "g2sd_vit_tiny_from_vit_base.yaml": "mae_vit_tiny_patch16_dec128d4b"}


def _parsed(path: Path, monkeypatch, *flags: str) -> TrainConfig:
    """The TrainConfig that `g2sd-cache train --config path --data d --out o [flags]` hands to train()."""
    got = []
    monkeypatch.setattr(g2sd_cache.generic.train, "train", lambda cfg: got.append(cfg) or {"steps": 0})
    assert train_command.run(parse(["train", "--config", str(path), "--data", "d", "--out", "o", *flags])) == 0
    return got[0]


def test_the_recipes_are_there():
    assert sorted(p.name for p in CONFIGS.glob("g2sd_*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_config_sets_what_it_says_with_a_source_for_every_value(name, monkeypatch):
    path = CONFIGS / name
    values = read_yaml(path)
    check_keys(values, TrainConfig, path)
    cfg = _parsed(path, monkeypatch)
    assert {k: getattr(cfg, k) for k in values} == values
    dataclasses.replace(cfg, cache="c").validate()          # a valid configuration once a cache is given
    for line in path.read_text().splitlines():               # every option names the official file and line
        if line and not line.startswith(("#", " ")):
            assert SOURCE.search(line), line
    # the official figures (GD.sh / main_distill.py / engine_distill.py), independent of the file's comments
    assert cfg.student == RECIPES[name] and cfg.arch == "mae_vit_base_patch16"
    assert cfg.batch_size * cfg.accum_iter * 8 == 4096 and cfg.blr == 1.5e-4 and cfg.min_lr == 2.5e-6
    assert (cfg.epochs, cfg.warmup_epochs, cfg.weight_decay, cfg.clip_grad) == (300, 10, 0.05, None)
    assert (cfg.beta, cfg.loss_tokens, cfg.target_layer, cfg.mask_ratio, cfg.img_size) == (2.0, "all", 4, 0.75, 224)
    # flags still override the file
    short = _parsed(path, monkeypatch, "--epochs", "1", "--batch-size", "8")
    assert (short.epochs, short.batch_size, short.accum_iter, short.min_lr) == (1, 8, 2, 2.5e-6)
