"""`g2sd-cache export`: timm (strict) and MAE (`{'model': ...}`) layouts of the student encoder."""
from functools import partial

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from g2sd_cache.common.checkpoint import save_checkpoint
from g2sd_cache.cli.main import main as cli_main
from g2sd_cache.common.errors import UserError
from g2sd_cache.cli.export import export_encoder
from g2sd_cache.models.mae import STUDENT_PRESETS, build_student

NAME = "mae_vit_tiny_patch16_dec128d4b"


def _run(tmp_path, student, extra=None):
    """A run folder whose checkpoint holds `student` (the keys export reads)."""
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run, {"model": dict(student.state_dict(), **(extra or {})), "student": NAME, "target_dim": 512,
                          "img_size": 224, "step": 7})
    return run


def _mae_finetune_model(global_pool: bool) -> nn.Module:
    """The model MAE's main_finetune.py builds for this encoder (facebookresearch/mae models_vit.py): timm's
    VisionTransformer with qkv_bias and LayerNorm(eps=1e-6), a 1000-class head, and under global pooling a
    new `fc_norm` in place of the deleted `norm`."""
    s = STUDENT_PRESETS[NAME]
    norm_layer = partial(nn.LayerNorm, eps=1e-6)
    model = VisionTransformer(img_size=224, patch_size=s.patch_size, embed_dim=s.embed_dim, depth=s.depth,
                              num_heads=s.num_heads, mlp_ratio=s.mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                              num_classes=1000, global_pool="token")
    if global_pool:
        model.fc_norm = norm_layer(s.embed_dim)
        del model.norm
    return model


def test_export_mae_loads_into_maes_finetuning_model_with_only_the_head_missing(tmp_path):
    student = build_student(NAME, 512, 224, seed=3)
    run = _run(tmp_path, student)
    info = export_encoder(str(run), str(tmp_path / "mae.pth"), "mae")
    assert info["format"] == "mae" and info["notes"] == [] and info["step"] == 7
    ckpt = torch.load(tmp_path / "mae.pth", map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model"}
    encoder = student.encoder_state_dict()
    assert set(ckpt["model"]) == set(encoder)
    for global_pool in (True, False):
        model = _mae_finetune_model(global_pool)
        msg = model.load_state_dict(ckpt["model"], strict=False)
        # main_finetune.py asserts exactly these missing keys; `norm` is unused under global pooling
        if global_pool:
            assert set(msg.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
            assert sorted(msg.unexpected_keys) == ["norm.bias", "norm.weight"]
        else:
            assert set(msg.missing_keys) == {"head.weight", "head.bias"} and msg.unexpected_keys == []
        loaded = model.state_dict()
        for k, v in encoder.items():
            if k in loaded:
                assert torch.equal(loaded[k], v), k
    # the timm export holds the same tensors, bare
    export_encoder(str(run), str(tmp_path / "timm.pth"))
    bare = torch.load(tmp_path / "timm.pth", map_location="cpu", weights_only=True)
    assert set(bare) == set(encoder) and all(torch.equal(bare[k], ckpt["model"][k]) for k in bare)


def test_export_cli_formats_and_old_checkpoints(tmp_path, capsys):
    student = build_student(NAME, 512, 224, seed=3)
    old = {"decoder_norm.weight": torch.ones(128), "decoder_norm.bias": torch.zeros(128)}
    run = _run(tmp_path, student, extra=old)   # written before the head fix: a note, and the same encoder
    assert cli_main(["export", str(run), "--out", str(tmp_path / "e.pth"), "--format", "mae"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("note: dropped decoder_norm.bias, decoder_norm.weight") and "main_finetune.py" in out[1]
    got = torch.load(tmp_path / "e.pth", weights_only=True)["model"]
    assert all(torch.equal(got[k], v) for k, v in student.encoder_state_dict().items())
    with pytest.raises(SystemExit):   # argparse: not a format
        cli_main(["export", str(run), "--out", str(tmp_path / "x.pth"), "--format", "onnx"])
    with pytest.raises(UserError, match="--format onnx"):
        export_encoder(str(run), str(tmp_path / "x.pth"), "onnx")
    assert "--format" in capsys.readouterr().err


def test_a_student_trained_at_another_crop_size_exports_with_the_timm_call_that_loads_it(tmp_path, capsys):
    import timm
    student = build_student(NAME, 512, img_size=96)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run, {"model": student.state_dict(), "student": NAME, "target_dim": 512, "img_size": 96,
                          "step": 1})
    info = export_encoder(str(run), str(tmp_path / "enc.pth"))
    assert info["timm_call"] == "timm.create_model('vit_tiny_patch16_224', num_classes=0, img_size=96)"
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=96, pretrained=False)
    model.load_state_dict(torch.load(tmp_path / "enc.pth", weights_only=True), strict=True)
    assert cli_main(["export", str(run), "--out", str(tmp_path / "e2.pth")]) == 0
    assert "img_size=96" in capsys.readouterr().out
