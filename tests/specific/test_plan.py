"""The stage-2 data plan: G2SD's augmentation and mixing, as a pure function of (seed, epoch, group)."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment, _RAND_INCREASING_TRANSFORMS, posterize
from timm.data.mixup import Mixup
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader
from torchvision.transforms import RandomHorizontalFlip

from g2sd_cache.common.errors import UserError
from g2sd_cache.data.labelled import LabelledFolder
from g2sd_cache.specific.augment import (AugmentRecipe, SampleAugmenter, build_train_transform, posterize_any_bits,
                                   seeded_global_rngs)
from g2sd_cache.specific.mix import MixParams, MixRecipe, apply_mix, cutmix_box, draw_mix
from g2sd_cache.specific.plan import EpochGroups, SDPlan, SDRecipe, check_same_plan
from g2sd_cache.data.synthetic import make_image_folder, synthetic_image

SMALL = SDRecipe(augment=AugmentRecipe(img_size=32), group_size=4)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> LabelledFolder:
    """14 images in 3 class folders: 3 groups of 4 per epoch, 2 images sit each epoch out."""
    root = make_image_folder(tmp_path_factory.mktemp("sd") / "train", 14, seed=4, classes=3, vary_size=True)
    return LabelledFolder.scan(str(root))


def test_train_transform_is_g2sds_recipe():
    """util/datasets.py -> create_transform(input_size 224, bicubic, rand-m9-mstd0.5-inc1, reprob 0.25 pixel x1)."""
    steps = build_train_transform(AugmentRecipe()).transforms
    crop = next(s for s in steps if isinstance(s, RandomResizedCropAndInterpolation))
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((0.75, 4 / 3))
    assert str(crop.interpolation).lower().endswith("bicubic")
    assert next(s for s in steps if isinstance(s, RandomHorizontalFlip)).p == 0.5
    ra = next(s for s in steps if isinstance(s, RandAugment))
    assert ra.num_layers == 2 and ra.choice_weights is None
    assert [op.name for op in ra.ops] == list(_RAND_INCREASING_TRANSFORMS)
    for op in ra.ops:
        assert (op.prob, op.magnitude, op.magnitude_std) == (0.5, 9, 0.5)
        assert op.hparams["translate_const"] == int(224 * 0.45) and op.hparams["img_mean"] == (124, 116, 104)
    erase = next(s for s in steps if isinstance(s, RandomErasing))
    assert erase.probability == 0.25 and erase.per_pixel and (erase.min_count, erase.max_count) == (1, 1)
    assert not any(type(s).__name__ == "ColorJitter" for s in steps)


def test_posterize_keeps_zero_bits_working():
    img = synthetic_image(3, (40, 30))
    assert posterize_any_bits(img, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    for bits in (1, 4, 8):
        assert np.array_equal(np.asarray(posterize_any_bits(img, bits)), np.asarray(posterize(img, bits)))
    ra = next(s for s in build_train_transform(AugmentRecipe()).transforms if isinstance(s, RandAugment))
    assert [op.aug_fn is posterize_any_bits for op in ra.ops].count(True) == 1  # PosterizeIncreasing


def test_sample_is_a_function_of_its_key_and_leaves_global_rngs_alone():
    augment = SampleAugmenter(AugmentRecipe(img_size=32), seed=7)
    img = synthetic_image(5, (90, 70))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    a = augment(img, epoch=2, index=5)
    draws = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert draws == (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99)  # the caller's global state must not matter either
    assert torch.equal(a, augment(img, epoch=2, index=5))
    assert torch.equal(a, SampleAugmenter(AugmentRecipe(img_size=32), seed=7)(img, 2, 5))
    others = [augment(img, 3, 5), augment(img, 2, 6), SampleAugmenter(AugmentRecipe(img_size=32), 8)(img, 2, 5)]
    assert not any(torch.equal(a, o) for o in others)


def test_seeded_global_rngs_restores_states_after_errors():
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    with pytest.raises(RuntimeError):
        with seeded_global_rngs(1, 2, 3):
            random.random(), np.random.rand(), torch.rand(3)
            raise RuntimeError("inside")
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])


def _timm_mix(images, labels, raw_lam: float, cutmix: bool, box_centre, monkeypatch):
    """timm's Mixup (G2SD's settings) on a copy of `images`, its draws forced: (lambda, cutmix) as drawn before
    the box, and the box centre (cy, cx)."""
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                  label_smoothing=0.1, num_classes=5)
    monkeypatch.setattr(mixup, "_params_per_batch", lambda: (raw_lam, cutmix))
    centre = iter(box_centre)
    monkeypatch.setattr(np.random, "randint", lambda low, high, size=None: next(centre))
    return mixup(images.clone(), labels.clone())


@pytest.mark.parametrize("case", ["mixup", "cutmix", "cutmix_clipped", "none"])
def test_apply_mix_equals_timm_mixup(case, monkeypatch):
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 4, 2, 2, 1, 3])
    original = images.clone()
    raw, centre = {"mixup": (0.3173, ()), "none": (1.0, ()), "cutmix": (0.61, (13, 20)),
                   "cutmix_clipped": (0.2, (30, 2))}[case]
    if case.startswith("cutmix"):
        box, lam = cutmix_box(raw, 32, 32, *centre)
        params = MixParams(lam, True, box)
    else:
        params = MixParams(raw, False)
    want_x, want_y = _timm_mix(images, labels, raw, params.cutmix, centre, monkeypatch)
    got_x, got_y = apply_mix(images, labels, params, 5, 0.1)
    assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y)
    assert torch.equal(images, original)
    if case == "cutmix_clipped":
        assert params.box[0] > 0 and params.box[1] == 32 and params.box[2] == 0  # clipped at two borders


def test_draw_mix_distribution():
    recipe, lams, cut = MixRecipe(), [], []
    for group in range(3000):
        p = draw_mix(recipe, np.random.Generator(np.random.Philox(group)), 32)
        assert 0.0 <= p.lam <= 1.0 and (p.box is not None) == p.cutmix
        if p.cutmix:
            y0, y1, x0, x1 = p.box
            assert p.lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 32 ** 2)
        else:
            lams.append(p.lam)
        cut.append(p.cutmix)
    assert np.mean(cut) == pytest.approx(0.5, abs=0.04)           # switch_prob 0.5
    assert np.mean(lams) == pytest.approx(0.5, abs=0.03)          # Beta(0.8, 0.8) mean
    assert np.var(lams) == pytest.approx(1 / (4 * 2.6), abs=0.02)  # Beta(a, a) variance 1 / (4 (2a + 1))
    assert draw_mix(MixRecipe(mixup_alpha=0, cutmix_alpha=0), np.random.Generator(np.random.Philox(0)), 32) \
        == MixParams(1.0, False)


def test_epoch_order_is_a_permutation_cut_into_groups(labelled):
    plan = SDPlan(labelled, SMALL, seed=3)
    assert plan.num_groups == 3
    order = plan.order(0)
    assert order.shape == (3, 4) and len(set(order.ravel())) == 12 and order.max() < 14
    assert not np.array_equal(order, plan.order(1))
    assert np.array_equal(order, SDPlan(labelled, SMALL, seed=3).order(0))


def _groups(plan: SDPlan, epoch: int, groups) -> dict:
    return {g: plan.batch(epoch, g) for g in groups}


def _same(a, b) -> bool:
    return (torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets) and torch.equal(a.labels, b.labels)
            and torch.equal(a.indices, b.indices) and a.mix == b.mix)


def test_mixed_groups_do_not_depend_on_world_size_workers_or_order(labelled):
    """Same (seed, epoch) -> the same mixed groups: one rank in order; 3 'ranks' (fresh plans, groups r::3,
    visited backwards); a DataLoader with 2 worker processes."""
    reference = _groups(SDPlan(labelled, SMALL, seed=11), 1, range(3))
    for rank in range(3):
        mine = _groups(SDPlan(labelled, SMALL, seed=11), 1, reversed(range(rank, 3, 3)))
        assert all(_same(mine[g], reference[g]) for g in mine)
    loader = DataLoader(EpochGroups(SDPlan(labelled, SMALL, seed=11), 1), batch_size=None, num_workers=2)
    for g, batch in enumerate(loader):
        assert batch.group == g and _same(batch, reference[g])
    assert not _same(SDPlan(labelled, SMALL, seed=11).batch(2, 0), reference[0])
    assert not _same(SDPlan(labelled, SMALL, seed=12).batch(1, 0), reference[0])


def test_group_contents(labelled):
    plan = SDPlan(labelled, SMALL, seed=0)
    batch = plan.batch(0, 0)
    assert batch.images.shape == (4, 3, 32, 32) and batch.images.dtype == torch.float32
    assert batch.targets.shape == (4, 3) and torch.allclose(batch.targets.sum(1), torch.ones(4))
    assert batch.labels.tolist() == [labelled.labels[i] for i in batch.indices.tolist()]
    unmixed = torch.stack([plan.sample(0, i) for i in batch.indices.tolist()])
    want_x, want_y = apply_mix(unmixed, batch.labels, batch.mix, 3, 0.1)
    assert torch.equal(batch.images, want_x) and torch.equal(batch.targets, want_y)
    with pytest.raises(IndexError):
        plan.batch(0, 3)


def test_plan_errors(labelled, tmp_path):
    with pytest.raises(UserError, match="must be even"):
        SDPlan(labelled, SDRecipe(group_size=3), seed=0)
    with pytest.raises(UserError, match="fewer than one mixing group of 128"):
        SDPlan(labelled, SDRecipe(), seed=0)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (20, 20)).save(flat / "a.png")
    with pytest.raises(UserError, match="not in a class sub-folder"):
        LabelledFolder.scan(str(flat))


def test_plan_description_survives_json_and_detects_another_plan(labelled):
    import json
    plan = SDPlan(labelled, SMALL, seed=0)
    stored = json.loads(json.dumps(plan.describe()))
    check_same_plan(stored, plan.describe(), "logits cache X")
    other = SDPlan(labelled, SDRecipe(augment=AugmentRecipe(img_size=32, re_prob=0.0), group_size=4), seed=0)
    with pytest.raises(UserError, match="another stage-2 plan \\(recipe differ\\)") as e:
        check_same_plan(stored, other.describe(), "logits cache X")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="seed"):
        check_same_plan(stored, SDPlan(labelled, SMALL, seed=1).describe(), "logits cache X")


@pytest.mark.parametrize("name", ["finetune_vit_small.yaml", "finetune_vit_tiny.yaml"])
def test_recipe_configs_agree_with_the_modules(name):
    """configs/ documents the official recipe; the modules' defaults must be the same values."""
    import pathlib

    import yaml

    from g2sd_cache.models.classifier import CLASSIFIER_PRESETS, HEAD_INIT_STD

    cfg = yaml.safe_load((pathlib.Path(__file__).parents[2] / "configs" / name).read_text())
    aug, mix = AugmentRecipe(), MixRecipe()
    assert (cfg["img_size"], cfg["auto_augment"], cfg["reprob"], cfg["remode"], cfg["recount"]) == \
        (aug.img_size, aug.auto_augment, aug.re_prob, aug.re_mode, aug.re_count)
    assert (cfg["mixup"], cfg["cutmix"], cfg["mixup_prob"], cfg["mixup_switch_prob"], cfg["smoothing"]) == \
        (mix.mixup_alpha, mix.cutmix_alpha, mix.prob, mix.switch_prob, mix.label_smoothing)
    assert cfg["group_size"] == SDRecipe().group_size == cfg["batch_size"]
    assert cfg["head_init_std"] == HEAD_INIT_STD and cfg["arch"] in CLASSIFIER_PRESETS
    assert cfg["teacher_arch"] in CLASSIFIER_PRESETS
