"""Stage-2 classifiers: the distilled student against an independent implementation of G2SD's
models_vit.py forward, the MAE-layout teacher, initialisation from stage 1, loading, and the timm export."""
import argparse
import math
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F

from g2sd_cache.common.checkpoint import rng_state, save_checkpoint
from g2sd_cache.models.classifier import (CLASSIFIER_PRESETS, DistilledViT, build_student, build_teacher, init_from_stage1,
                                   layer_decay_groups, load_classifier, timm_distilled_model, to_timm_distilled)
from g2sd_cache.common.errors import UserError
from g2sd_cache.cli.export import export_encoder
from g2sd_cache.models.mae import build_student as build_stage1_student

MICRO = "test_vit_micro_patch16"
STAGE1_MICRO = "test_vit_micro_patch16_dec32d1b"


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every tensor (norms, biases, tokens, positions) non-trivial values, so no term can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # LayerNorm gains around 1
            p.copy_(scale + 0.2 * torch.randn(p.shape, generator=g))


def _blocks(state: dict, x: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    """Pre-norm ViT blocks from raw weights (LayerNorm eps 1e-6, exact GELU), written out by hand."""
    for i in range(depth):
        p = lambda name: state[f"blocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, x.shape[-1:], p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        n, t, d = h.shape
        qkv = (h @ p("attn.qkv.weight").T + p("attn.qkv.bias")).view(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(n, t, d)
        x = x + out @ p("attn.proj.weight").T + p("attn.proj.bias")
        h = F.layer_norm(x, x.shape[-1:], p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        x = x + F.gelu(h @ p("mlp.fc1.weight").T + p("mlp.fc1.bias")) @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
    return x


def _patches(state: dict, imgs: torch.Tensor, patch: int) -> torch.Tensor:
    return F.conv2d(imgs, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch) \
        .flatten(2).transpose(1, 2)


def official_distilled_forward(state: dict, imgs: torch.Tensor, patch: int, depth: int, heads: int):
    """G2SD models_vit.py, distillation=True, global_pool=False: cls + pos, then the dist token appended at the
    END with no position; blocks; norm; head(x[:, 0]) and head_dist(x[:, -1])."""
    x = _patches(state, imgs, patch)
    n = x.shape[0]
    x = torch.cat([state["cls_token"].expand(n, -1, -1), x], dim=1) + state["pos_embed"]
    x = torch.cat([x, state["dist_token"].expand(n, -1, -1)], dim=1)
    x = _blocks(state, x, depth, heads)
    x = F.layer_norm(x, x.shape[-1:], state["norm.weight"], state["norm.bias"], eps=1e-6)
    cls = x[:, 0] @ state["head.weight"].T + state["head.bias"]
    dist = x[:, -1] @ state["head_dist.weight"].T + state["head_dist.bias"]
    return cls, dist


def mae_global_pool_forward(state: dict, imgs: torch.Tensor, patch: int, depth: int, heads: int):
    """MAE models_vit.py, global_pool=True: mean of the patch tokens (cls excluded), fc_norm, head."""
    x = _patches(state, imgs, patch)
    n = x.shape[0]
    x = torch.cat([state["cls_token"].expand(n, -1, -1), x], dim=1) + state["pos_embed"]
    x = _blocks(state, x, depth, heads)[:, 1:].mean(dim=1)
    x = F.layer_norm(x, x.shape[-1:], state["fc_norm.weight"], state["fc_norm.bias"], eps=1e-6)
    return x @ state["head.weight"].T + state["head.bias"]


def test_distilled_student_equals_the_official_forward():
    shape = CLASSIFIER_PRESETS[MICRO]
    student = build_student(MICRO, num_classes=7, img_size=64)
    _randomise(student, seed=1)
    imgs = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    want_cls, want_dist = official_distilled_forward(student.state_dict(), imgs, 16, shape.depth, shape.num_heads)

    assert isinstance(student, DistilledViT)
    student.train()
    cls, dist = student(imgs)
    torch.testing.assert_close(cls, want_cls, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(dist, want_dist, atol=2e-5, rtol=1e-5)
    student.eval()
    torch.testing.assert_close(student(imgs), (want_cls + want_dist) / 2, atol=2e-5, rtol=1e-5)
    assert student.pos_embed.shape[1] == 1 + 16  # the dist token has no position row of its own


def test_random_teacher_is_mae_finetuned_layout():
    shape = CLASSIFIER_PRESETS[MICRO]
    teacher, info = build_teacher("random:5", MICRO, num_classes=4, img_size=32)
    assert info.layout == "avg" and info.source == "random:5" and not teacher.training
    assert {"fc_norm.weight", "head.weight"} <= set(teacher.state_dict()) and "norm.weight" not in teacher.state_dict()
    _randomise(teacher, seed=3)
    imgs = torch.randn(2, 3, 32, 32)
    want = mae_global_pool_forward(teacher.state_dict(), imgs, 16, shape.depth, shape.num_heads)
    torch.testing.assert_close(teacher(imgs), want, atol=2e-5, rtol=1e-5)
    fingerprint = build_teacher("random:5", MICRO, num_classes=4, img_size=32)[1].sha256
    assert fingerprint == info.sha256 != build_teacher("random:6", MICRO, num_classes=4, img_size=32)[1].sha256


def test_heads_initialised_as_g2sd():
    """main_finetune_dis.py draws head.weight with std 2e-5; head_dist and the dist token keep timm's ViT
    initialisation (trunc-normal std 0.02); biases zero."""
    student = build_student(MICRO, num_classes=1000, seed=3)
    assert student.head.weight.std().item() == pytest.approx(2e-5, rel=0.05)
    assert student.head_dist.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(student.head.bias) == 0 and torch.count_nonzero(student.head_dist.bias) == 0
    assert 0.005 < student.dist_token.std().item() < 0.04
    same = build_student(MICRO, num_classes=1000, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), same.state_dict().values()))


def _stage1_run(tmp_path, img_size=64):
    """A stage-1 run folder as `g2sd-cache train` writes it (whole student + optimizer-free extras)."""
    stage1 = build_stage1_student(STAGE1_MICRO, target_dim=32, img_size=img_size, seed=9)
    with torch.no_grad():
        for p in stage1.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # trained-looking, and the positions no longer sin-cos
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run, {"model": stage1.state_dict(), "step": 3, "rng": rng_state(), "student": STAGE1_MICRO,
                          "target_dim": 32, "img_size": img_size, "config": {"epochs": 1, "scale": (0.2, 1.0)}})
    return run, stage1.encoder_state_dict()


@pytest.mark.parametrize("source", ["run", "export", "mae"])
def test_init_from_stage1(tmp_path, source):
    run, encoder = _stage1_run(tmp_path)
    path = run
    if source == "export":
        path = tmp_path / "encoder.pth"
        export_encoder(str(run), str(path))
    elif source == "mae":
        path = tmp_path / "mae.pth"
        torch.save({"model": encoder, "args": argparse.Namespace(model="x")}, path)
    student = build_student(MICRO, num_classes=5, img_size=64)
    fresh = {k: v.clone() for k, v in student.state_dict().items()}
    init_from_stage1(student, path)
    state = student.state_dict()
    for k, v in encoder.items():
        assert torch.equal(state[k], v), k
    for k in ("head.weight", "head_dist.weight", "dist_token"):
        assert torch.equal(state[k], fresh[k]), k


def test_init_resamples_positions_and_plain_student_drops_norm(tmp_path):
    run, encoder = _stage1_run(tmp_path, img_size=64)
    student = build_student(MICRO, num_classes=5, img_size=32)  # 2x2 grid from a 4x4 one
    init_from_stage1(student, run)
    assert student.pos_embed.shape == (1, 5, 48)
    assert torch.equal(student.pos_embed[:, 0], encoder["pos_embed"][:, 0])  # cls row kept as is
    grid = encoder["pos_embed"][:, 1:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2)  # util/pos_embed.py's resize
    want = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    torch.testing.assert_close(student.pos_embed[:, 1:], want, atol=1e-6, rtol=1e-6)

    plain = build_student(MICRO, num_classes=5, img_size=64, distilled=False)
    init_from_stage1(plain, run)
    assert torch.equal(plain.blocks[1].mlp.fc2.weight, encoder["blocks.1.mlp.fc2.weight"])
    assert torch.equal(plain.fc_norm.weight, torch.ones(48))  # MAE: fresh fc_norm, the encoder's norm dropped
    plain.train()
    assert plain(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_init_errors(tmp_path):
    run, _ = _stage1_run(tmp_path)
    with pytest.raises(UserError, match="width 48.*pick the matching arch"):
        init_from_stage1(build_student("vit_tiny_patch16", 5, img_size=32), run)
    with pytest.raises(UserError, match="does not exist"):
        init_from_stage1(build_student(MICRO, 5), tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="without checkpoint.pt"):
        init_from_stage1(build_student(MICRO, 5), tmp_path / "empty")
    torch.save({"model": {"head.weight": torch.zeros(3, 4)}}, tmp_path / "head_only.pth")
    with pytest.raises(UserError, match="holds no ViT encoder"):
        init_from_stage1(build_student(MICRO, 5), tmp_path / "head_only.pth")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_untrusted_pickles_are_refused(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    with open(bad, "wb") as f:
        pickle.dump({"model": _Payload()}, f, protocol=2)
    with pytest.raises(UserError, match="holds objects other than tensors.*print.*could run code") as e:
        load_classifier(bad, "--teacher")
    assert "\n" not in str(e.value)
    assert "must never run" not in capsys.readouterr().out


def test_teacher_file_checks(tmp_path):
    teacher, _ = build_teacher("random:1", MICRO, num_classes=4, img_size=32)
    good = tmp_path / "mae_finetuned.pth"
    torch.save({"model": teacher.state_dict(), "args": argparse.Namespace(nb_classes=4)}, good)
    loaded, info = build_teacher(str(good), MICRO, num_classes=4, img_size=32)
    assert info.layout == "avg" and info.arch == MICRO and info.num_classes == 4 and info.img_size == 32
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), teacher(x))

    with pytest.raises(UserError, match="classifies into 4 classes but the data has 10") as e:
        build_teacher(str(good), MICRO, num_classes=10, img_size=32)
    assert "\n" not in str(e.value)
    headless = {k: v for k, v in teacher.state_dict().items() if not k.startswith("head")}
    torch.save({"model": headless}, tmp_path / "pretrain.pth")
    with pytest.raises(UserError, match="has no classifier head") as e:
        build_teacher(str(tmp_path / "pretrain.pth"), MICRO, num_classes=4, img_size=32)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="is not a vit_base_patch16"):
        build_teacher(str(good), "vit_base_patch16", num_classes=4, img_size=32)
    with pytest.raises(UserError, match="trained at 32 px"):
        build_teacher(str(good), MICRO, num_classes=4, img_size=64)


@pytest.mark.parametrize("layout", ["g2sd", "deit", "token"])
def test_load_classifier_recognises_layouts(tmp_path, layout):
    student = build_student(MICRO, num_classes=6, img_size=32)
    _randomise(student, seed=4)
    student.eval()
    x = torch.randn(2, 3, 32, 32)
    want = student(x)
    if layout == "g2sd":
        state = student.state_dict()
    elif layout == "deit":
        state = to_timm_distilled(student)
    else:
        plain = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=2, num_classes=6).eval()
        state, want = plain.state_dict(), plain(x)
    torch.save(state, tmp_path / "c.pth")
    model, info = load_classifier(tmp_path / "c.pth", "evaluate")
    assert info.layout == layout and info.arch == MICRO and info.img_size == 32 and not model.training
    torch.testing.assert_close(model(x), want, atol=0, rtol=0)


def test_export_to_timm_distilled_is_bit_exact():
    student = build_student(MICRO, num_classes=6, img_size=64)
    _randomise(student, seed=7)
    student.eval()
    timm_model = timm_distilled_model(MICRO, 6, 64)
    timm_model.load_state_dict(to_timm_distilled(student), strict=True)
    timm_model.eval()
    x = torch.randn(4, 3, 64, 64)
    assert torch.equal(timm_model(x), student(x))
    assert torch.count_nonzero(timm_model.pos_embed[0, 1]) == 0


def test_export_loads_into_timm_deit_small_by_name():
    student = build_student("vit_small_patch16", num_classes=10, img_size=32)
    _randomise(student, seed=8)
    student.eval()
    deit = timm.create_model("deit_small_distilled_patch16_224", pretrained=False, num_classes=10, img_size=32)
    deit.load_state_dict(to_timm_distilled(student), strict=True)
    deit.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(deit(x), student(x))


def official_layer_decay(model, weight_decay: float, layer_decay: float, no_weight_decay: set) -> dict:
    """G2SD / MAE util/lr_decay.py rules, per parameter name -> (lr scale, weight decay)."""
    num_layers = len(model.blocks) + 1
    out = {}
    for name, p in model.named_parameters():
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            layer = 0
        elif name.startswith("blocks"):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = num_layers
        decay = 0.0 if p.ndim == 1 or name in no_weight_decay else weight_decay
        out[name] = (layer_decay ** (num_layers - layer), decay)
    return out


@pytest.mark.parametrize("distilled", [True, False])
def test_layer_decay_groups_follow_g2sd_rules(distilled):
    student = build_student(MICRO, num_classes=5, distilled=distilled)
    groups = layer_decay_groups(student, weight_decay=0.05, layer_decay=0.75)
    names = {id(p): n for n, p in student.named_parameters()}
    got = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    want = official_layer_decay(student, 0.05, 0.75, {"cls_token", "pos_embed", "dist_token"})
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name]), name
    assert got["blocks.0.attn.qkv.weight"] == pytest.approx((0.75 ** 2, 0.05))
    if distilled:
        assert got["dist_token"] == (1.0, 0.0) and got["norm.weight"] == (1.0, 0.0)


def test_the_optimizer_step_uses_each_groups_layer_decay_scale():
    """After one step of the trainer's optimizer_step, every group's lr is lr x 0.75 ** (depth + 1 - layer)
    (from the official rules above), and the weights moved by it: AdamW's first step moves a parameter
    without weight decay by lr x scale per element (m / sqrt(v) = sign of the gradient)."""
    from g2sd_cache.common.dist import DistEnv
    from g2sd_cache.training.trainer import Trainer
    student = build_student(MICRO, num_classes=5, img_size=32, distilled=True)
    _randomise(student)
    trainer = Trainer(student, layer_decay_groups(student, weight_decay=0.05, layer_decay=0.75),
                      DistEnv(0, 1, 0, torch.device("cpu")), "fp32", None)
    optimizer = trainer.optimizer
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    cls, dist = student(torch.randn(2, 3, 32, 32))
    (cls.square().mean() + dist.square().mean()).backward()
    trainer.optimizer_step(1e-3)
    want = official_layer_decay(student, 0.05, 0.75, {"cls_token", "pos_embed", "dist_token"})
    names = {id(p): n for n, p in student.named_parameters()}
    depth = len(student.blocks)
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert group["lr"] == pytest.approx(1e-3 * want[names[id(p)]][0]), names[id(p)]
    for name, layer in (("blocks.0.norm1.bias", 1), (f"blocks.{depth - 1}.mlp.fc2.bias", depth), ("head.bias", depth + 1)):
        moved = (dict(student.named_parameters())[name].detach() - before[name]).abs()
        assert moved.max().item() == pytest.approx(1e-3 * 0.75 ** (depth + 1 - layer), rel=1e-3), name


def test_the_stage2_step_applies_layer_decay_to_every_group():
    """FineTuner.step (what finetune runs) leaves every group at lr x 0.75 ** (depth + 1 - layer) and moves a
    no-decay parameter of block 0 by that lr (AdamW's first step: lr x sign of the gradient)."""
    from g2sd_cache.common.dist import DistEnv
    from g2sd_cache.specific.config import FinetuneConfig
    from g2sd_cache.specific.plan import MixedGroup
    from g2sd_cache.specific.step import FineTuner
    cfg = FinetuneConfig(data="d", out="o", init="i", arch=MICRO, img_size=32, group_size=4, device="cpu")
    tuner = FineTuner(cfg, 5, None, DistEnv(0, 1, 0, torch.device("cpu")), load_init=False)
    _randomise(tuner.student)
    before = tuner.student.blocks[0].norm1.bias.detach().clone()
    g = torch.Generator().manual_seed(0)
    group = MixedGroup(0, 0, torch.randn(4, 3, 32, 32, generator=g), torch.softmax(torch.randn(4, 5, generator=g), 1),
                       torch.arange(4), torch.arange(4), None)
    tuner.step([group], [None], lr=1e-3)
    want = official_layer_decay(tuner.student, 0.05, 0.75, set(tuner.student.no_weight_decay()))
    names = {id(p): n for n, p in tuner.student.named_parameters()}
    for pg in tuner.optimizer.param_groups:
        for p in pg["params"]:
            assert pg["lr"] == pytest.approx(1e-3 * want[names[id(p)]][0]), names[id(p)]
    depth = len(tuner.student.blocks)
    moved = (tuner.student.blocks[0].norm1.bias.detach() - before).abs().max().item()
    assert moved == pytest.approx(1e-3 * 0.75 ** depth, rel=1e-3)
