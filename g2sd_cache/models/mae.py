"""MAE teacher and G2SD student, built from timm's ViT blocks.

Both are masked autoencoders with the same skeleton (MAE, He et al. 2022):

    visible patches [N, n_keep, p*p*3] -> linear embed + pos (+cls) -> encoder blocks -> norm
    decoder_embed   ->  fill mask tokens, + decoder_pos  ->  decoder blocks

Both consume only the *visible* patches of a view (what the cache stores as uint8, see data/views.py):
the hidden 3/4 of an image are never embedded. `forward(imgs, mask)` / `targets(imgs, mask, k)` take a
normalised image and cut its visible patches first; the trainer calls `forward_visible` / `targets_visible`.

The *teacher* stops after its first k decoder blocks; G2SD's target is LayerNorm (no affine,
eps 1e-6) of that hidden state for all tokens, cls first. The *student* runs its light decoder to
the end and applies an MLP head (Linear-GELU-Linear) to the teacher's decoder width directly to the
last decoder block's output: no `decoder_norm` in between, as in the official G2SD student
(pengzhiliang/G2SD models_mae.py: `forward_decoder` returns the raw block output, L254-276, and
`decoderfeature_pred` is applied to it, L303), so the student has no `decoder_norm` at all.

Visible patches are kept in ascending patch order. Attention is permutation-equivariant, so this
computes the same function as MAE's shuffled order, and it makes a view a pure function of its
boolean mask: the cached mask is all that replay needs.

Presets are data (`TEACHER_PRESETS`, `STUDENT_PRESETS`); `build_teacher` / `build_student` are the
only factories. Parameter names follow the official MAE checkpoints so they load with strict keys.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block

from g2sd_cache.common.checkpoint import load_untrusted
from g2sd_cache.common.errors import UserError
from g2sd_cache.data.views import visible_index, visible_patches

LN_EPS = 1e-6
Norm = partial(nn.LayerNorm, eps=LN_EPS)


@dataclass(frozen=True)
class ViTShape:
    """Widths and depths of a masked autoencoder. `timm_name` is the timm ViT the encoder exports to."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_ratio: float = 4.0
    timm_name: str = ""


TEACHER_PRESETS: dict[str, ViTShape] = {
    "mae_vit_base_patch16": ViTShape(16, 768, 12, 12, 512, 8, 16),
    "mae_vit_large_patch16": ViTShape(16, 1024, 24, 16, 512, 8, 16),
    "mae_vit_huge_patch14": ViTShape(14, 1280, 32, 16, 512, 8, 16),
    # A micro teacher for tests and quick benchmarks only: same code path, ~0.1 M parameters.
    "test_mae_micro_patch16": ViTShape(16, 64, 2, 2, 32, 4, 2),
    # The same with a 128-wide decoder (targets [T, 128]): a closer proxy for the spectrum of ViT-B's 512-wide
    # targets when pretrained (`--teacher pretrained-micro`), at ~0.9 M parameters.
    "test_mae_micro_dec128_patch16": ViTShape(16, 64, 2, 2, 128, 4, 4),
}

# G2SD students: decoder heads = width / 32, as in MAE's 512-wide, 16-head decoder.
STUDENT_PRESETS: dict[str, ViTShape] = {
    "mae_vit_tiny_patch16_dec128d4b": ViTShape(16, 192, 12, 3, 128, 4, 4, timm_name="vit_tiny_patch16_224"),
    "mae_vit_small_patch16_dec256d4b": ViTShape(16, 384, 12, 6, 256, 4, 8, timm_name="vit_small_patch16_224"),
    "mae_vit_small_patch16_dec128d4b": ViTShape(16, 384, 12, 6, 128, 4, 4, timm_name="vit_small_patch16_224"),
    "mae_vit_small_patch16_dec512d4b": ViTShape(16, 384, 12, 6, 512, 4, 16, timm_name="vit_small_patch16_224"),
    # A micro student for tests and quick benchmarks only (no timm counterpart to export to).
    "test_vit_micro_patch16_dec32d1b": ViTShape(16, 48, 2, 2, 32, 1, 1),
}
DEFAULT_STUDENT = "mae_vit_small_patch16_dec256d4b"

# Keys of the student's encoder, which is exactly a timm VisionTransformer with num_classes=0.
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def _preset(table: dict[str, ViTShape], name: str, what: str) -> ViTShape:
    if name not in table:
        raise UserError(f"unknown {what} '{name}'; choose one of: {', '.join(table)}")
    return table[name]


class MaskedAutoencoder(nn.Module):
    """Encoder over visible patches plus a decoder that fills mask tokens (MAE's layout)."""

    def __init__(self, shape: ViTShape, img_size: int = 224):
        super().__init__()
        self.shape = shape
        self.img_size = img_size
        self.patch_embed = PatchEmbed(img_size, shape.patch_size, 3, shape.embed_dim)
        num_patches = self.patch_embed.num_patches
        self.num_patches = num_patches
        grid = self.patch_embed.grid_size

        self.cls_token = nn.Parameter(torch.zeros(1, 1, shape.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, shape.embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(shape.embed_dim, shape.num_heads, shape.mlp_ratio, qkv_bias=True, norm_layer=Norm)
            for _ in range(shape.depth))
        self.norm = Norm(shape.embed_dim)

        self.decoder_embed = nn.Linear(shape.embed_dim, shape.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, shape.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, shape.decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(shape.decoder_embed_dim, shape.decoder_num_heads, shape.mlp_ratio, qkv_bias=True, norm_layer=Norm)
            for _ in range(shape.decoder_depth))
        self.decoder_norm = Norm(shape.decoder_embed_dim)
        self._init_weights(grid)

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1

    def _init_weights(self, grid: tuple[int, int]) -> None:
        """MAE's initialisation: fixed 2-D sin-cos positions (cls slot zero), xavier linears."""
        for pos in (self.pos_embed, self.decoder_pos_embed):
            table = build_sincos2d_pos_embed(list(grid), dim=pos.shape[-1])
            pos.data[0, 1:].copy_(table)
            pos.data[0, 0].zero_()
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def visible_input(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs: [N, 3, H, W] normalised; mask: [N, L] bool (True = hidden).
        returns: [N, n_keep, p*p*3], the visible patches flattened in HWC order (what `forward_encoder` takes)."""
        return visible_patches(imgs, mask, self.shape.patch_size).flatten(2)

    def embed_visible(self, patches: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """patches: [N, n_keep, p*p*3] normalised visible patches (ascending patch order, HWC inside);
        mask: [N, L]. returns: [N, 1 + n_keep, D] tokens with their positions, cls first.

        Only the visible patches are embedded: a linear map with the stride-p conv's weights, reordered to
        the patches' HWC layout, is that conv applied to each patch (same weights, same state dict)."""
        proj = self.patch_embed.proj
        weight = proj.weight.permute(0, 2, 3, 1).flatten(1)          # [D, 3, p, p] -> [D, p*p*3] (HWC)
        x = F.linear(patches, weight, proj.bias)
        x = x + self.pos_embed[0, 1:][visible_index(mask, patches.shape[1])]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_encoder(self, patches: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """patches: [N, n_keep, p*p*3] normalised visible patches (see `visible_input`); mask: [N, L].
        returns: [N, 1 + n_keep, D] encoder output (cls first)."""
        x = self.embed_visible(patches, mask)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """latent: [N, 1 + n_keep, D]; mask: [N, L]. Runs the first `depth` decoder blocks (all if None).
        returns: [N, 1 + L, Dd] hidden state before `decoder_norm`."""
        x = self.decoder_embed(latent)
        n, length = mask.shape
        ids = visible_index(mask, x.shape[1] - 1).unsqueeze(-1).expand(-1, -1, x.shape[-1])
        patches = self.mask_token.to(x.dtype).expand(n, length, -1).scatter(1, ids, x[:, 1:])
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        blocks = self.decoder_blocks if depth is None else self.decoder_blocks[:depth]
        for block in blocks:
            x = block(x)
        return x


class MAETeacher(MaskedAutoencoder):
    """The frozen MAE teacher; `decoder_pred` is kept only so official checkpoints load strictly."""

    def __init__(self, shape: ViTShape, img_size: int = 224):
        super().__init__(shape, img_size)
        self.decoder_pred = nn.Linear(shape.decoder_embed_dim, shape.patch_size ** 2 * 3)
        nn.init.xavier_uniform_(self.decoder_pred.weight)
        nn.init.zeros_(self.decoder_pred.bias)

    @torch.no_grad()
    def targets(self, imgs: torch.Tensor, mask: torch.Tensor, target_layer: int) -> torch.Tensor:
        """G2SD's target: LN(z_t) of decoder block `target_layer`, for every token.
        imgs: [N, 3, H, W] normalised; mask: [N, L]. returns: [N, 1 + L, Dd] float32."""
        return self.targets_visible(self.visible_input(imgs, mask), mask, target_layer)

    @torch.no_grad()
    def targets_visible(self, patches: torch.Tensor, mask: torch.Tensor, target_layer: int) -> torch.Tensor:
        """`targets` from the visible patches alone: patches [N, n_keep, p*p*3] normalised; mask [N, L].
        The LayerNorm is taken in float32 even when the blocks ran under autocast."""
        hidden = self.forward_decoder(self.forward_encoder(patches, mask), mask, depth=target_layer)
        return F.layer_norm(hidden.float(), hidden.shape[-1:], eps=LN_EPS)


class G2SDStudent(MaskedAutoencoder):
    """The G2SD student: MAE encoder + light decoder + MLP head to the teacher's decoder width.

    The head reads the raw output of the last decoder block. The official student also owns a
    `decoder_norm` that it never applies; ours drops it, so the state dict holds only what the forward
    uses (and DDP needs no `find_unused_parameters`). Checkpoints written before this change carry
    `decoder_norm.*`: `load_student_state` says so, or refuses them."""

    def __init__(self, shape: ViTShape, target_dim: int, img_size: int = 224):
        super().__init__(shape, img_size)
        del self.decoder_norm
        self.head = nn.Sequential(nn.Linear(shape.decoder_embed_dim, target_dim), nn.GELU(),
                                  nn.Linear(target_dim, target_dim))
        for m in self.head:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: normalised images [N, 3, H, W], or their visible patches [N, n_keep, p*p*3] (what the trainer
        passes: DDP calls `forward`); mask: [N, L]. returns: [N, 1 + L, target_dim] predictions."""
        return self.forward_visible(self.visible_input(x, mask) if x.dim() == 4 else x, mask)

    def forward_visible(self, patches: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """patches: [N, n_keep, p*p*3] normalised visible patches; mask: [N, L].
        returns: [N, 1 + L, target_dim] predictions (the trainer's forward: no image is ever built)."""
        hidden = self.forward_decoder(self.forward_encoder(patches, mask), mask)
        return self.head(hidden)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm VisionTransformer(num_classes=0) names."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(ENCODER_PREFIXES)}


# Keys of a student whose head reads decoder_norm's output: not G2SD's head, which reads the last decoder block
# directly (models_mae.py); this student has no decoder_norm.
OLD_HEAD_PREFIX = "decoder_norm."


def load_student_state(student: G2SDStudent, state_dict: Mapping[str, torch.Tensor], *,
                       refuse_old_head: bool = False) -> list[str]:
    """Load a student's state dict (a run checkpoint's "model") with strict keys; returns notes for the user.

    A checkpoint with `decoder_norm.*` (a head that read normalised decoder output, OLD_HEAD_PREFIX) does not fit
    this student: by default those keys are dropped with a note (fine for exporting the encoder, which they do
    not touch); with `refuse_old_head` (resuming training) it is refused, since the head was trained on
    normalised inputs and the optimizer state holds the dropped parameters. Any other mismatch is a UserError."""
    state = dict(state_dict)
    notes = []
    old = sorted(k for k in state if k.startswith(OLD_HEAD_PREFIX))
    if old:
        if refuse_old_head:
            raise UserError(f"this checkpoint comes from a student whose head read decoder_norm's output ({_few(old)}), "
                            f"not the official G2SD head; it cannot be resumed: start a new run (export still works)")
        for k in old:
            del state[k]
        notes.append(f"dropped {', '.join(old)}: the checkpoint predates the official G2SD head (no decoder_norm); "
                     f"the encoder is unaffected, its trained head was fed normalised decoder output")
    check_same_tensors(state, student.state_dict(), "the checkpoint does not match this student")
    student.load_state_dict(state)
    return notes


def build_student(name: str, target_dim: int, img_size: int = 224, seed: int = 0) -> G2SDStudent:
    """The one factory for students; the initialisation is a function of `seed` alone."""
    shape = _preset(STUDENT_PRESETS, name, "student")
    return seeded(seed, lambda: G2SDStudent(shape, target_dim, img_size))


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Fingerprint of a teacher's weights: sha256 over names, dtypes, shapes and bytes, in key order.
    Independent of the container file, so the same weights always fingerprint the same."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class TeacherInfo:
    """What the manifest records about a teacher."""

    arch: str
    source: str          # "random:SEED", "pretrained-micro:SEED" or the checkpoint path
    sha256: str


def random_teacher_seed(spec: str) -> int | None:
    """The seed of a `--teacher random` / `random:SEED` spec (a seeded random teacher), None for a checkpoint path."""
    if spec != "random" and not spec.startswith("random:"):
        return None
    seed_text = spec.partition(":")[2] or "0"
    if not seed_text.isdigit():
        raise UserError(f"--teacher {spec}: the seed after 'random:' must be a non-negative integer")
    return int(seed_text)


def build_teacher(spec: str, arch: str, img_size: int = 224) -> tuple[MAETeacher, TeacherInfo]:
    """`spec` is a checkpoint path in the official MAE layout, `random` / `random:SEED`, or `pretrained-micro[:SEED]`
    (models/pretrain.py: the micro teacher pretrained with MAE's loss on photographs, made once per machine).
    Returns the teacher in eval mode with gradients off, and its fingerprint."""
    from g2sd_cache.models.pretrain import parse_spec, pretrained_state
    shape = _preset(TEACHER_PRESETS, arch, "teacher arch")
    seed = random_teacher_seed(spec)
    pretrained_seed = parse_spec(spec)
    if pretrained_seed is not None:
        teacher = MAETeacher(shape, img_size)
        teacher.load_state_dict(pretrained_state(pretrained_seed, arch, img_size))
        source = f"pretrained-micro:{pretrained_seed}"
    elif seed is not None:
        teacher = seeded(seed, lambda: MAETeacher(shape, img_size))
        source = f"random:{seed}"
    else:
        teacher = MAETeacher(shape, img_size)
        teacher.load_state_dict(load_mae_checkpoint(spec, teacher, arch))
        source = str(Path(spec).resolve())
    teacher.eval().requires_grad_(False)
    return teacher, TeacherInfo(arch, source, weights_sha256(teacher.state_dict()))


def load_mae_checkpoint(path: str, model: nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """Read an official MAE checkpoint (state dict under 'model') and check it matches `model` exactly."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"teacher checkpoint {path} does not exist; pass the path of an MAE .pth file or 'random'")
    ckpt = load_untrusted(p, "teacher checkpoint")
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not an MAE checkpoint: expected a dict with a 'model' state dict")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    # Only a file whose *sole* difference is the missing decoder is an encoder-only release; with unexpected
    # keys too (a fine-tuned classifier, another model) the mismatch message below names both lists.
    if missing and not unexpected and all(k.startswith(("decoder", "mask_token")) for k in missing):
        raise UserError(
            f"{p.name} is an encoder-only MAE checkpoint (missing decoder keys: {_few(missing)}); G2SD needs the "
            f"decoder: use the official mae_pretrain_vit_*_full.pth or mae_visualize_vit_*.pth files, which carry it")
    check_same_tensors(state, expected, f"{p.name} does not match {arch}", shape_hint="; check --arch")
    return {k: state[k].float() for k in expected}


def check_same_tensors(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str,
                       shape_hint: str = "") -> None:
    """Strict: `state` has exactly the keys of `expected`, each with its shape; otherwise one UserError
    beginning with `what` (the missing and unexpected keys, or the first tensor of another shape)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise UserError(f"{what}: missing keys {_few(missing) or 'none'}, unexpected keys {_few(unexpected) or 'none'}")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise UserError(f"{what}: {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}{shape_hint}")


def seeded(seed: int, build):
    """`build()` under torch's global RNG seeded with `seed`, the caller's RNG state left as it was: a model's
    initialisation as a function of `seed` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
