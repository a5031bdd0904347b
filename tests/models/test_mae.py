"""MAE teacher and G2SD student: presets, seeded random teachers, official checkpoint layout, targets."""
import argparse

import pytest
import torch
import torch.nn.functional as F

from g2sd_cache.common.errors import UserError
from g2sd_cache.models.mae import (LN_EPS, STUDENT_PRESETS, TEACHER_PRESETS, build_student, build_teacher,
                               load_student_state, weights_sha256)

MICRO = "test_mae_micro_patch16"
MICRO_STUDENT = "test_vit_micro_patch16_dec32d1b"
SIZE = 64  # micro teacher at 64 px: L = 16 patches, 17 tokens



def _mask(n, length, keep, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.bool)
    for i in range(n):
        mask[i, torch.randperm(length, generator=g)[:keep]] = False
    return mask


def _imgs(n, size=SIZE, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def micro():
    return build_teacher("random:3", MICRO, SIZE)


def test_teacher_presets_match_the_issue():
    expect = {  # encoder width, depth, heads; patch
        "mae_vit_base_patch16": (768, 12, 12, 16),
        "mae_vit_large_patch16": (1024, 24, 16, 16),
        "mae_vit_huge_patch14": (1280, 32, 16, 14),
    }
    for name, (width, depth, heads, patch) in expect.items():
        s = TEACHER_PRESETS[name]
        assert (s.embed_dim, s.depth, s.num_heads, s.patch_size) == (width, depth, heads, patch), name
        assert (s.decoder_embed_dim, s.decoder_depth, s.decoder_num_heads) == (512, 8, 16), name
        assert s.mlp_ratio == 4.0
    with pytest.raises(UserError, match="unknown teacher arch"):
        build_teacher("random", "mae_vit_gigantic", SIZE)


def test_teacher_modules_use_eps_1e6_and_timm_blocks(micro):
    teacher, _ = micro
    from timm.models.vision_transformer import Block
    assert len(teacher.blocks) == 2 and len(teacher.decoder_blocks) == 4
    assert all(isinstance(b, Block) for b in [*teacher.blocks, *teacher.decoder_blocks])
    norms = [m for m in teacher.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == LN_EPS == 1e-6 for m in norms)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training


def test_random_teacher_is_deterministic_and_its_sha256_stable(micro):
    teacher, info = micro
    again, info2 = build_teacher("random:3", MICRO, SIZE)
    assert info.source == "random:3" and info.arch == MICRO
    assert info.sha256 == info2.sha256 == weights_sha256(teacher.state_dict())
    assert len(info.sha256) == 64
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    # a different seed differs; 'random' is 'random:0'; the global RNG is neither used nor disturbed
    assert build_teacher("random:4", MICRO, SIZE)[1].sha256 != info.sha256
    torch.manual_seed(123)
    before = torch.get_rng_state()
    r0, i0 = build_teacher("random", MICRO, SIZE)
    assert torch.equal(torch.get_rng_state(), before)
    assert i0.source == "random:0" and i0.sha256 == build_teacher("random:0", MICRO, SIZE)[1].sha256
    # the fingerprint sees every byte: change one weight
    sd = teacher.state_dict()
    sd["decoder_norm.weight"] = sd["decoder_norm.weight"].clone()
    sd["decoder_norm.weight"][0] += 1e-3
    assert weights_sha256(sd) != info.sha256
    with pytest.raises(UserError, match="non-negative integer"):
        build_teacher("random:x", MICRO, SIZE)


def _official_keys(depth, decoder_depth):
    """The key layout of facebookresearch/mae's MaskedAutoencoderViT (e.g. mae_visualize_vit_base.pth)."""
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
            "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed", "decoder_norm.weight",
            "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    keys |= {f"blocks.{i}.{k}" for i in range(depth) for k in block}
    keys |= {f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in block}
    return keys


@pytest.mark.slow
def test_official_layout_checkpoint_of_vit_base_loads_and_gives_identical_targets(tmp_path):
    """mae_vit_base_patch16 (110 M parameters) once: the real key names and shapes of the official files."""
    teacher, info = build_teacher("random:1", "mae_vit_base_patch16", 224)
    sd = teacher.state_dict()
    assert set(sd) == _official_keys(12, 8)
    shapes = {"cls_token": (1, 1, 768), "pos_embed": (1, 197, 768), "mask_token": (1, 1, 512),
              "decoder_pos_embed": (1, 197, 512), "patch_embed.proj.weight": (768, 3, 16, 16),
              "decoder_embed.weight": (512, 768), "decoder_pred.weight": (768, 512),
              "blocks.0.attn.qkv.weight": (2304, 768), "decoder_blocks.7.mlp.fc1.weight": (2048, 512)}
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    path = tmp_path / "mae_visualize_vit_base.pth"
    torch.save({"model": sd}, path)
    del sd
    loaded, info2 = build_teacher(str(path), "mae_vit_base_patch16", 224)
    assert info2.sha256 == info.sha256
    assert info2.source == str(path.resolve())
    imgs, mask = _imgs(1, 224), _mask(1, 196, 49)
    a = teacher.targets(imgs, mask, 4)
    b = loaded.targets(imgs, mask, 4)
    assert a.shape == (1, 197, 512)
    assert torch.equal(a, b)


def test_micro_checkpoint_layouts(tmp_path, micro):
    teacher, info = micro
    sd = teacher.state_dict()
    assert set(sd) == _official_keys(2, 4)
    imgs, mask = _imgs(2), _mask(2, 16, 4)
    ref = teacher.targets(imgs, mask, 4)

    # under 'model' (the official layout), bare, and MAE's own training checkpoint (with args/optimizer)
    for name, obj in [("model.pth", {"model": sd}), ("bare.pth", dict(sd)),
                      ("checkpoint-799.pth", {"model": sd, "optimizer": {"state": {}}, "epoch": 799,
                                              "args": argparse.Namespace(model="mae_vit_base_patch16")})]:
        torch.save(obj, tmp_path / name)
        t, i = build_teacher(str(tmp_path / name), MICRO, SIZE)
        assert i.sha256 == info.sha256, name
        assert torch.equal(t.targets(imgs, mask, 4), ref), name
    # fp16-saved weights load (converted to fp32), fingerprint changes with the values
    torch.save({"model": {k: v.half() for k, v in sd.items()}}, tmp_path / "half.pth")
    t, i = build_teacher(str(tmp_path / "half.pth"), MICRO, SIZE)
    assert all(v.dtype == torch.float32 for v in t.state_dict().values())
    assert (t.targets(imgs, mask, 4) - ref).abs().max() < 0.05


def _one_line_user_error(fn) -> str:
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def test_encoder_only_checkpoint_names_decoder_keys_and_full_files(tmp_path, micro):
    sd = micro[0].state_dict()
    enc = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": enc}, path)
    msg = _one_line_user_error(lambda: build_teacher(str(path), MICRO, SIZE))
    assert "encoder-only" in msg
    assert "decoder_embed.weight" in msg or "mask_token" in msg
    assert "decoder" in msg and "_full" in msg and "visualize" in msg
    assert "mae_pretrain_vit_base.pth" in msg


def test_checkpoint_key_and_shape_errors(tmp_path, micro):
    sd = micro[0].state_dict()
    cases = {
        "unexpected": ({**sd, "head.weight": torch.zeros(3)}, ["unexpected keys head.weight", "missing keys none"]),
        "missing": ({k: v for k, v in sd.items() if k != "blocks.1.norm1.bias"}, ["missing keys blocks.1.norm1.bias"]),
        "shape": ({**sd, "norm.weight": torch.ones(65)}, ["norm.weight", "(65,)", "(64,)"]),
        # an encoder-only file with an extra key is a mismatch, not the encoder-only message
        "mixed": ({**{k: v for k, v in sd.items() if not k.startswith("decoder")}, "x": torch.zeros(1)},
                  ["unexpected keys x", "decoder_embed.weight"]),
    }
    for name, (state, needles) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save({"model": state}, path)
        msg = _one_line_user_error(lambda: build_teacher(str(path), MICRO, SIZE))
        for needle in needles:
            assert needle in msg, (name, msg)
    # a checkpoint of another arch: shapes differ
    other = build_teacher("random", MICRO, 32)[0].state_dict()  # 32 px: pos_embed has 5 tokens
    torch.save({"model": other}, tmp_path / "other.pth")
    msg = _one_line_user_error(lambda: build_teacher(str(tmp_path / "other.pth"), MICRO, SIZE))
    assert "pos_embed" in msg and "--arch" in msg
    # many missing keys are summarised, not all listed
    torch.save({"model": {"cls_token": sd["cls_token"]}}, tmp_path / "few.pth")
    msg = _one_line_user_error(lambda: build_teacher(str(tmp_path / "few.pth"), MICRO, SIZE))
    assert "more)" in msg and len(msg) < 600


def test_bad_checkpoint_files(tmp_path):
    msg = _one_line_user_error(lambda: build_teacher(str(tmp_path / "nope.pth"), MICRO, SIZE))
    assert "does not exist" in msg and "nope.pth" in msg
    (tmp_path / "garbage.pth").write_bytes(b"\x00\x01 this is not a torch file" * 10)
    msg = _one_line_user_error(lambda: build_teacher(str(tmp_path / "garbage.pth"), MICRO, SIZE))
    assert "garbage.pth" in msg
    torch.save([1, 2, 3], tmp_path / "list.pth")
    msg = _one_line_user_error(lambda: build_teacher(str(tmp_path / "list.pth"), MICRO, SIZE))
    assert "not an MAE checkpoint" in msg
    torch.save({"model": {"a": 1}}, tmp_path / "nontensor.pth")
    _one_line_user_error(lambda: build_teacher(str(tmp_path / "nontensor.pth"), MICRO, SIZE))
    # a directory is not a checkpoint
    assert str(tmp_path) in _one_line_user_error(lambda: build_teacher(str(tmp_path), MICRO, SIZE))


def test_targets_are_layernormed_all_tokens(micro):
    teacher, _ = micro
    imgs, mask = _imgs(3), _mask(3, 16, 4)
    for layer in (1, 4):
        y = teacher.targets(imgs, mask, layer)
        assert y.shape == (3, 17, 32) and y.dtype == torch.float32
        assert y.mean(-1).abs().max() < 1e-5
        assert (y.var(-1, unbiased=False) - 1).abs().max() < 1e-3
    # layer k really is after k decoder blocks: targets of different layers differ
    assert not torch.allclose(teacher.targets(imgs, mask, 1), teacher.targets(imgs, mask, 4))
    # the definition: LN(no affine, eps 1e-6) of decoder block k's output
    h = teacher.forward_decoder(teacher.forward_encoder(teacher.visible_input(imgs, mask), mask), mask, depth=2)
    ref = F.layer_norm(h, (32,), eps=1e-6)
    assert torch.allclose(teacher.targets(imgs, mask, 2), ref, atol=1e-6)
    # batch-independent: one view alone gives the same target as in a batch
    assert torch.allclose(teacher.targets(imgs[1:2], mask[1:2], 4), teacher.targets(imgs, mask, 4)[1:2], atol=1e-5)
    # hidden pixels do not influence the target; visible ones do
    patch = 16
    hidden = int(mask[0].nonzero()[0])
    visible = int((~mask[0]).nonzero()[0])
    g = SIZE // patch
    for idx, should_change in [(hidden, False), (visible, True)]:
        x = imgs.clone()
        r, c = divmod(idx, g)
        x[0, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] += 5.0
        changed = not torch.allclose(teacher.targets(x, mask, 4)[0], teacher.targets(imgs, mask, 4)[0], atol=1e-6)
        assert changed == should_change, idx


def _mae_reference_targets(model, imgs, mask, depth, seed):
    """facebookresearch/mae's forward with a *shuffled* visible order (ids_shuffle / ids_restore),
    written out here to check the ascending-order implementation against it."""
    n, length = mask.shape
    g = torch.Generator().manual_seed(seed)
    ids_shuffle = []
    for i in range(n):
        vis = (~mask[i]).nonzero()[:, 0]
        hid = mask[i].nonzero()[:, 0]
        ids_shuffle.append(torch.cat([vis[torch.randperm(len(vis), generator=g)],
                                      hid[torch.randperm(len(hid), generator=g)]]))
    ids_shuffle = torch.stack(ids_shuffle)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    keep = int((~mask[0]).sum())
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:, :]
    d = x.shape[-1]
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    cls = model.cls_token + model.pos_embed[:, :1, :]
    x = torch.cat([cls.expand(n, -1, -1), x], dim=1)
    for blk in model.blocks:
        x = blk(x)
    x = model.norm(x)
    x = model.decoder_embed(x)
    mask_tokens = model.mask_token.repeat(n, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + model.decoder_pos_embed
    for blk in model.decoder_blocks[:depth]:
        x = blk(x)
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def test_ascending_visible_order_equals_maes_shuffled_order(micro):
    teacher, _ = micro
    imgs, mask = _imgs(4, seed=2), _mask(4, 16, 4, seed=2)
    ours = teacher.targets(imgs, mask, 4)
    for seed in range(3):
        ref = _mae_reference_targets(teacher, imgs, mask, 4, seed)
        assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (ours - ref).abs().max()
    # and at ViT-B's geometry (L = 196, 49 visible) with a bigger random teacher's decoder
    from g2sd_cache.models.mae import MAETeacher, ViTShape
    torch.manual_seed(0)
    t = MAETeacher(ViTShape(16, 64, 1, 2, 32, 2, 2), 224).eval()
    imgs, mask = _imgs(2, 224, seed=3), _mask(2, 196, 49, seed=3)
    with torch.no_grad():
        assert torch.allclose(t.targets(imgs, mask, 2), _mae_reference_targets(t, imgs, mask, 2, 0), atol=1e-4)


def _conv_encoder(model, imgs, mask):
    """The encoder as MAE computes it: the stride-p conv over the whole image, then the visible tokens."""
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    ids = (~mask).nonzero()[:, 1].view(len(mask), -1)
    x = torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(len(x), -1, -1), x], dim=1)
    for block in model.blocks:
        x = block(x)
    return model.norm(x)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_visible_patch_forward_equals_the_image_forward():
    """Stored uint8 visible patches -> normalise -> linear embed equals the image -> conv path (fp32)."""
    from g2sd_cache.models.mae import MAETeacher, ViTShape
    from g2sd_cache.data.views import normalize, normalize_patches, visible_patches
    torch.manual_seed(0)
    teacher = MAETeacher(ViTShape(16, 64, 2, 2, 32, 2, 2), 224).eval()
    student = build_student("test_vit_micro_patch16_dec32d1b", 32, 224, seed=1)
    g = torch.Generator().manual_seed(5)
    pixels = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8, generator=g)
    mask = _mask(3, 196, 49, seed=5)
    patches = normalize_patches(visible_patches(pixels, mask, 16))        # what train feeds from the cache
    imgs = normalize(pixels)
    assert patches.shape == (3, 49, 16 * 16 * 3)
    with torch.no_grad():
        for model in (teacher, student):
            assert _rel(model.forward_encoder(patches, mask), _conv_encoder(model, imgs, mask)) <= 1e-5
        ref = F.layer_norm(teacher.forward_decoder(_conv_encoder(teacher, imgs, mask), mask, depth=2), (32,), eps=1e-6)
        assert _rel(teacher.targets_visible(patches, mask, 2), ref) <= 1e-5
        assert _rel(teacher.targets(imgs, mask, 2), ref) <= 1e-5
        pred_ref = student.head(student.forward_decoder(_conv_encoder(student, imgs, mask), mask))
        assert _rel(student.forward_visible(patches, mask), pred_ref) <= 1e-5
        assert torch.equal(student(imgs, mask), student.forward_visible(patches, mask))


def test_student_forward_shape_and_seeded_init():
    s = build_student(MICRO_STUDENT, target_dim=32, img_size=SIZE, seed=0)
    imgs, mask = _imgs(2), _mask(2, 16, 4)
    out = s(imgs, mask)
    assert out.shape == (2, 17, 32) and out.dtype == torch.float32
    out.mean().backward()
    assert s.blocks[0].attn.qkv.weight.grad is not None
    again = build_student(MICRO_STUDENT, target_dim=32, img_size=SIZE, seed=0)
    other = build_student(MICRO_STUDENT, target_dim=32, img_size=SIZE, seed=1)
    k = "blocks.0.attn.qkv.weight"
    assert torch.equal(again.state_dict()[k], build_student(MICRO_STUDENT, 32, SIZE, 0).state_dict()[k])
    assert not torch.equal(again.state_dict()[k], other.state_dict()[k])
    # a real student preset at 224: [N, 197, 512] for a ViT-B teacher's decoder width
    assert STUDENT_PRESETS["mae_vit_small_patch16_dec256d4b"].embed_dim == 384
    small = build_student("mae_vit_tiny_patch16_dec128d4b", target_dim=512, img_size=224)
    with torch.no_grad():
        assert small(_imgs(1, 224), _mask(1, 196, 49)).shape == (1, 197, 512)
    with pytest.raises(UserError, match="unknown student"):
        build_student("vit_nope", 32)


# --- the student against the official G2SD student ----------------------------------------------------

def _ln(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"], eps=1e-6)


def _linear(x, sd, prefix):
    return x @ sd[prefix + "weight"].T + sd[prefix + "bias"]


def _official_block(x, sd, prefix, heads):
    """models_mae.py's Block / Attention / Mlp (pre-norm, qkv with bias, scale head_dim**-0.5, exact GELU)."""
    n, t, c = x.shape
    qkv = _linear(_ln(x, sd, prefix + "norm1."), sd, prefix + "attn.qkv.")
    q, k, v = qkv.reshape(n, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
    x = x + _linear((attn @ v).transpose(1, 2).reshape(n, t, c), sd, prefix + "attn.proj.")
    hidden = F.gelu(_linear(_ln(x, sd, prefix + "norm2."), sd, prefix + "mlp.fc1."))
    return x + _linear(hidden, sd, prefix + "mlp.fc2.")


def _official_student_forward(sd, shape, imgs, noise, keep, decoder_norm=False):
    """pengzhiliang/G2SD models_mae.py, student path of MaskedAutoencoderViT.forward with supervise_all
    (main_distill.py's default): random_masking by argsort of `noise` (visible tokens in shuffled order),
    encoder blocks + norm, decoder_embed, mask tokens unshuffled by ids_restore, + decoder_pos_embed, every
    decoder block, then decoderfeature_pred = Mlp(fc1, GELU, fc2) on the raw output of the last block.
    Plain tensor ops on the state dict; `decoder_norm=True` is the head this project used to have."""
    n, p = imgs.shape[0], shape.patch_size
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    length = x.shape[1]
    x = x + sd["pos_embed"][:, 1:]
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([(sd["cls_token"] + sd["pos_embed"][:, :1]).expand(n, -1, -1), x], dim=1)
    for i in range(shape.depth):
        x = _official_block(x, sd, f"blocks.{i}.", shape.num_heads)
    x = _linear(_ln(x, sd, "norm."), sd, "decoder_embed.")
    patches = torch.cat([x[:, 1:], sd["mask_token"].expand(n, length - keep, -1)], dim=1)
    patches = torch.gather(patches, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([x[:, :1], patches], dim=1) + sd["decoder_pos_embed"]
    for i in range(shape.decoder_depth):
        x = _official_block(x, sd, f"decoder_blocks.{i}.", shape.decoder_num_heads)
    if decoder_norm:
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6)
    return _linear(F.gelu(_linear(x, sd, "head.0.")), sd, "head.2.")   # decoderfeature_pred.fc1 / .fc2


def _mask_from_noise(noise, keep):
    """The official boolean mask (True = removed) for `noise`: the `keep` smallest noise values stay visible."""
    mask = torch.ones_like(noise, dtype=torch.bool)
    mask.scatter_(1, torch.argsort(noise, dim=1)[:, :keep], False)
    return mask


def test_student_forward_equals_the_official_g2sd_student():
    """ViT-Tiny student at 224 px, 4 decoder blocks, 512-wide head (a ViT-B teacher's decoder): same weights,
    same mask, fp32 -> the same predictions for all 197 tokens, within 1e-5 relative."""
    name = "mae_vit_tiny_patch16_dec128d4b"
    student = build_student(name, target_dim=512, img_size=224, seed=5).eval()
    with torch.no_grad():  # biases start at 0 and LayerNorm weights at 1: perturb them so that they count
        for p in student.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    sd = {k: v.detach() for k, v in student.state_dict().items()}
    imgs = _imgs(2, 224, seed=4)
    noise = torch.rand(2, 196, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = student(imgs, _mask_from_noise(noise, 49))
        ref = _official_student_forward(sd, STUDENT_PRESETS[name], imgs, noise, 49)
        old = _official_student_forward(sd, STUDENT_PRESETS[name], imgs, noise, 49, decoder_norm=True)
    assert ours.shape == ref.shape == (2, 197, 512)
    rel = float((ours - ref).norm() / ref.norm())
    assert rel <= 1e-5, rel
    assert float((old - ref).norm() / ref.norm()) > 0.1   # a decoder_norm before the head is another model
    assert not any(k.startswith(("decoder_norm", "decoder_pred")) for k in student.state_dict())


def test_load_student_state_notes_or_refuses_old_checkpoints():
    student = build_student(MICRO_STUDENT, 32, SIZE, seed=0)
    other = build_student(MICRO_STUDENT, 32, SIZE, seed=1)
    state = other.state_dict()
    assert load_student_state(student, state) == []
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())
    # a checkpoint from before the head fix: decoder_norm.* dropped with one note, or refused for a resume
    old = dict(state, **{"decoder_norm.weight": torch.ones(32), "decoder_norm.bias": torch.zeros(32)})
    notes = load_student_state(build_student(MICRO_STUDENT, 32, SIZE), old)
    assert len(notes) == 1 and "decoder_norm.bias, decoder_norm.weight" in notes[0] and "\n" not in notes[0]
    with pytest.raises(UserError, match="cannot be resumed"):
        load_student_state(student, old, refuse_old_head=True)
    # anything else that does not fit is named
    with pytest.raises(UserError, match="missing keys head.2.bias"):
        load_student_state(student, {k: v for k, v in state.items() if k != "head.2.bias"})
    with pytest.raises(UserError, match="unexpected keys decoder_pred.weight"):
        load_student_state(student, dict(state, **{"decoder_pred.weight": torch.zeros(1)}))
    with pytest.raises(UserError, match=r"head.2.weight has shape \(16, 32\)"):
        load_student_state(student, dict(state, **{"head.2.weight": torch.zeros(16, 32)}))
