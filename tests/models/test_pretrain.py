"""The pretrained micro teacher (`--teacher pretrained-micro[:SEED]`): MAE's loss, deterministic, learns, kept per machine.

Tiny runs on the project's synthetic images (the real recipe pretrains on scikit-image's photographs)."""
import dataclasses

import pytest
import torch

from tests.common.helpers import MICRO_TEACHER
from g2sd_cache.common.errors import UserError
from g2sd_cache.data.synthetic import synthetic_image
from g2sd_cache.models import pretrain as pt
from g2sd_cache.models.mae import TEACHER_PRESETS, MAETeacher, build_teacher

TINY = pt.PretrainRecipe(img_size=64, steps=40, batch_size=16)


@pytest.fixture(scope="module")
def images():
    return [synthetic_image(i, (160, 120)) for i in range(6)]


@pytest.fixture(scope="module")
def trained(images):
    return pt.pretrain(TINY, 0, images)


def held_out_loss(images, state) -> float:
    """MAE's loss of a teacher (untrained if `state` is None: seed 0's initialisation) on 64 crops no step drew."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MAETeacher(TEACHER_PRESETS[MICRO_TEACHER], 64)
    if state is not None:
        model.load_state_dict(state)
    imgs, mask = pt.batch(images, dataclasses.replace(TINY, batch_size=64), 999, 0, 16)
    with torch.no_grad():
        return pt.mae_pixel_loss(model, imgs, mask).item()


def test_mae_pixel_loss_is_normalised_pixel_mse_on_masked_patches_only():
    """Against a direct transcription of MAE's forward_loss (norm_pix_loss): einsum patchify, per-patch mean and
    var, MSE per patch, mean over the masked ones; and a prediction changed only on visible patches changes nothing."""
    torch.manual_seed(1)
    model = MAETeacher(TEACHER_PRESETS[MICRO_TEACHER], 64).eval()
    imgs = torch.randn(3, 3, 64, 64)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    for i in range(3):
        mask[i, torch.randperm(16)[:12]] = True
    got = pt.mae_pixel_loss(model, imgs, mask)
    x = imgs.reshape(3, 3, 4, 16, 4, 16)
    target = torch.einsum("nchpwq->nhwpqc", x).reshape(3, 16, 16 * 16 * 3)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    from g2sd_cache.data.views import visible_patches
    latent = model.forward_encoder(visible_patches(imgs, mask, 16).flatten(2), mask)
    pred = model.decoder_pred(model.decoder_norm(model.forward_decoder(latent, mask)))[:, 1:]
    want = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(got, want, rtol=1e-6)
    only_hidden = (((pred - target) ** 2).mean(-1) * mask).sum() / 36
    assert torch.allclose(got, only_hidden, rtol=1e-6)          # 36 = 3 x 12 masked patches


def test_pretraining_lowers_the_reconstruction_loss(images, trained):
    before, after = held_out_loss(images, None), held_out_loss(images, trained)
    assert after < 0.85 * before, (before, after)


def test_pretraining_is_deterministic_given_its_seed(images, trained):
    again = pt.pretrain(TINY, 0, images)
    assert trained.keys() == again.keys()
    assert all(torch.equal(trained[k], again[k]) for k in trained)
    other = pt.pretrain(dataclasses.replace(TINY, steps=2), 1, images)
    assert not torch.equal(other["blocks.0.attn.qkv.weight"], trained["blocks.0.attn.qkv.weight"])


def test_the_teacher_spec_builds_once_per_machine_and_loads_after(images, tmp_path, monkeypatch):
    monkeypatch.setattr(pt, "CACHE_DIR", tmp_path / "teachers")
    monkeypatch.setattr(pt, "RECIPE", dataclasses.replace(TINY, steps=3))
    monkeypatch.setattr(pt, "photographs", lambda names, side: images)
    first, info = build_teacher("pretrained-micro:2", MICRO_TEACHER, 64)
    kept = list((tmp_path / "teachers").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith("pretrained-micro-") and kept[0].suffix == ".pt"
    assert info.source == "pretrained-micro:2"
    monkeypatch.setattr(pt, "pretrain", lambda *a, **k: pytest.fail("pretrained again instead of loading"))
    second, again = build_teacher("pretrained-micro:2", MICRO_TEACHER, 64)
    assert again.sha256 == info.sha256
    _, random = build_teacher("random:2", MICRO_TEACHER, 64)
    assert random.sha256 != info.sha256
    with pytest.raises(UserError, match="pass --arch test_mae_micro_patch16 or test_mae_micro_dec128_patch16"):
        build_teacher("pretrained-micro", "mae_vit_base_patch16", 224)
    with pytest.raises(UserError, match="non-negative integer"):
        build_teacher("pretrained-micro:x", MICRO_TEACHER, 64)


WIDE = "test_mae_micro_dec128_patch16"


def test_the_wide_variant_is_deterministic_given_its_seed_and_kept_apart(images, tmp_path, monkeypatch):
    """The 128-wide-decoder variant: the same seed gives the same weights, another seed others; built through
    `--teacher pretrained-micro --arch test_mae_micro_dec128_patch16`, it is kept in its own file and gives
    128-wide targets."""
    tiny = dataclasses.replace(TINY, arch=WIDE, steps=3, batch_size=4)
    a, b, c = pt.pretrain(tiny, 0, images), pt.pretrain(tiny, 0, images), pt.pretrain(tiny, 1, images)
    assert a["decoder_embed.weight"].shape == (128, 64)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["decoder_blocks.0.attn.qkv.weight"], c["decoder_blocks.0.attn.qkv.weight"])

    monkeypatch.setattr(pt, "CACHE_DIR", tmp_path / "teachers")
    monkeypatch.setattr(pt, "RECIPE", dataclasses.replace(TINY, steps=2, batch_size=4))
    monkeypatch.setattr(pt, "WIDE_RECIPE", tiny)
    monkeypatch.setattr(pt, "photographs", lambda names, side: images)
    wide, _ = build_teacher("pretrained-micro:0", WIDE, 64)
    assert all(torch.equal(wide.state_dict()[k], a[k]) for k in a)      # the wide recipe at seed 0, nothing else
    build_teacher("pretrained-micro:0", MICRO_TEACHER, 64)
    assert len(list((tmp_path / "teachers").iterdir())) == 2
    imgs, mask = pt.batch(images, tiny, 5, 0, 16)
    with torch.no_grad():
        assert wide.targets(imgs, mask, 4).shape == (4, 17, 128)
