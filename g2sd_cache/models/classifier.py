"""Stage-2 (specific distillation) classifiers, built from timm's VisionTransformer.

- **Student** (`DistilledViT`): a cls-token ViT classifier plus DeiT's distillation token with its own head
  `head_dist`. As in G2SD's `models_vit.py`, the dist token is added *after* the position embedding and has
  no position row of its own. In training mode the forward returns `(cls_logits, dist_logits)`; in eval mode
  the average of the two, which is what G2SD evaluates and reports.
  G2SD appends the dist token at the end of the sequence; we put it second (after cls), where timm's
  `VisionTransformerDistilled` keeps it. Attention is permutation-equivariant, so this is the same function
  (equal up to float summation order), and it makes the timm export bit-exact: timm's distilled ViT with a
  zero position row for the dist token computes exactly our forward (`to_timm_distilled`).
  A classifier head cannot be folded into a plain `vit_small_patch16_224` instead: the dist token takes part
  in every attention layer, so dropping it changes all other tokens.
- **Plain student** (fine-tuning without a teacher, MAE's recipe): timm's ViT with global average pooling
  and `fc_norm`; the encoder's final `norm` is dropped, as MAE's fine-tuning does.
- **Teacher**: any classifier `load_classifier` recognises; G2SD's is MAE's fine-tuned ViT-B
  (`mae_finetuned_vit_base.pth`: global pool + `fc_norm` + `head`), i.e. timm's ViT with global_pool='avg'.

Initialisation follows G2SD's `main_finetune_dis.py`: the encoder comes from the stage-1 student (position
embedding resampled bicubically if the grid differs), `head.weight` is drawn with std 2e-5, and the dist token
and `head_dist` keep timm's ViT initialisation (trunc-normal std 0.02, zero bias).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm

from g2sd_cache.common.errors import UserError
from g2sd_cache.models.mae import random_teacher_seed, seeded, weights_sha256
from g2sd_cache.models.weights import encoder_of, read_state_dict

HEAD_INIT_STD = 2e-5  # main_finetune_dis.py: trunc_normal_(model.head.weight, std=2e-5)


@dataclass(frozen=True)
class EncoderShape:
    """A ViT encoder's size. `deit_name`: timm's distilled ViT of this size (the export's model), if any."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    deit_name: str = ""


# Names as G2SD's models_vit.py factories (SD.sh: --model vit_small_patch16 --teacher_model vit_base_patch16).
CLASSIFIER_PRESETS: dict[str, EncoderShape] = {
    "vit_tiny_patch16": EncoderShape(16, 192, 12, 3, "deit_tiny_distilled_patch16_224"),
    "vit_small_patch16": EncoderShape(16, 384, 12, 6, "deit_small_distilled_patch16_224"),
    "vit_base_patch16": EncoderShape(16, 768, 12, 12, "deit_base_distilled_patch16_224"),
    "vit_large_patch16": EncoderShape(16, 1024, 24, 16),
    "vit_huge_patch14": EncoderShape(14, 1280, 32, 16),
    # The stage-1 micro student's encoder (test_vit_micro_patch16_dec32d1b), for tests and quick runs only.
    "test_vit_micro_patch16": EncoderShape(16, 48, 2, 2),
}


def _shape(arch: str) -> EncoderShape:
    if arch not in CLASSIFIER_PRESETS:
        raise UserError(f"unknown classifier arch '{arch}'; choose one of: {', '.join(CLASSIFIER_PRESETS)}")
    return CLASSIFIER_PRESETS[arch]


def _vit_args(shape: EncoderShape, num_classes: int, img_size: int, drop_path_rate: float) -> dict:
    """G2SD's models_vit.py: mlp_ratio 4, qkv_bias, LayerNorm eps 1e-6 (timm's default norm)."""
    return dict(img_size=img_size, patch_size=shape.patch_size, embed_dim=shape.embed_dim, depth=shape.depth,
                num_heads=shape.num_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=num_classes,
                drop_path_rate=drop_path_rate)


class DistilledViT(VisionTransformer):
    """G2SD's specific-distillation student. Tokens: [cls, dist, patches]; only cls and patches get positions.

    forward(x: [N, 3, H, W]) -> training: (cls_logits [N, C], dist_logits [N, C]); eval: their mean [N, C].
    """

    def __init__(self, shape: EncoderShape, num_classes: int, img_size: int = 224, drop_path_rate: float = 0.0):
        if num_classes < 1:
            raise ValueError("a distilled classifier needs num_classes >= 1")
        super().__init__(**_vit_args(shape, num_classes, img_size, drop_path_rate), global_pool="token")
        self.num_prefix_tokens = 2  # cls, dist: timm's pooling and intermediates skip both
        self.dist_token = nn.Parameter(torch.zeros(1, 1, shape.embed_dim))
        self.head_dist = nn.Linear(shape.embed_dim, num_classes)
        trunc_normal_(self.dist_token, std=0.02)
        init_weights_vit_timm(self.head_dist)
        trunc_normal_(self.head.weight, std=HEAD_INIT_STD)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, L, D] patch embeddings -> [N, 2 + L, D]: positions added to cls and patches, then dist inserted."""
        n = x.shape[0]
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1) + self.pos_embed
        x = torch.cat([x[:, :1], self.dist_token.expand(n, -1, -1), x[:, 1:]], dim=1)
        return self.pos_drop(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """x: [N, 2 + L, D] normed tokens."""
        cls_feat, dist_feat = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (cls_feat + dist_feat) / 2
        logits, dist_logits = self.head(cls_feat), self.head_dist(dist_feat)
        return (logits, dist_logits) if self.training else (logits + dist_logits) / 2


def build_student(arch: str, num_classes: int, img_size: int = 224, distilled: bool = True,
                  drop_path_rate: float = 0.0, seed: int = 0) -> VisionTransformer:
    """The stage-2 student before initialisation from stage 1: `DistilledViT` (with a teacher), or MAE's
    global-pool classifier (plain fine-tuning). The random initialisation is a function of `seed` alone."""
    shape = _shape(arch)

    def build() -> VisionTransformer:
        if distilled:
            return DistilledViT(shape, num_classes, img_size, drop_path_rate)
        model = VisionTransformer(**_vit_args(shape, num_classes, img_size, drop_path_rate), global_pool="avg")
        trunc_normal_(model.head.weight, std=HEAD_INIT_STD)
        return model
    return seeded(seed, build)


def init_from_stage1(model: VisionTransformer, path: str | Path, flag: str = "--init") -> None:
    """Load the stage-1 encoder from `path` (an export, a stage-1 run folder, or an MAE checkpoint) into
    `model`; everything the encoder lacks (heads, dist token, fc_norm) keeps its fresh initialisation."""
    encoder = encoder_of(read_state_dict(path, flag), flag, path)
    found = _shape_of(encoder)
    want = (model.patch_embed.patch_size[0], model.embed_dim, len(model.blocks))
    if found[:3] != want:
        raise UserError(f"{flag} {path} is a ViT with patch {found[0]}, width {found[1]}, depth {found[2]}; the "
                        f"student has patch {want[0]}, width {want[1]}, depth {want[2]}: pick the matching arch")
    if not isinstance(model, DistilledViT) and isinstance(model.fc_norm, nn.LayerNorm):
        encoder = {k: v for k, v in encoder.items() if not k.startswith("norm.")}  # MAE: global pool drops `norm`
    grid = model.patch_embed.grid_size
    if tuple(found[3]) != tuple(grid):  # G2SD's interpolate_pos_embed: plain bicubic, cls row kept
        encoder["pos_embed"] = resample_abs_pos_embed(encoder["pos_embed"], list(grid), list(found[3]),
                                                      num_prefix_tokens=1, antialias=False)
    result = model.load_state_dict(encoder, strict=False)
    fresh = {k for k in model.state_dict() if k.startswith(("head", "dist_token", "fc_norm"))}
    if result.unexpected_keys or set(result.missing_keys) - fresh:
        raise UserError(f"{flag} {path} does not fit the student: missing {sorted(set(result.missing_keys) - fresh)}, "
                        f"unexpected {sorted(result.unexpected_keys)}")


def layer_decay_groups(model: VisionTransformer, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups with BEiT's layer-wise lr decay, by G2SD's / MAE's rules (util/lr_decay.py):
    layer 0 = cls_token, pos_embed, patch_embed; layer i+1 = blocks.i; everything else (final norm, heads,
    dist token, fc_norm) the top layer, depth + 1, with scale 1; scale = layer_decay ** (depth + 1 - layer).
    No weight decay for 1-D tensors and `model.no_weight_decay()` (timm: positions, cls and dist tokens).
    Each group carries 'lr_scale': the trainer sets group lr = scheduled lr * lr_scale.
    (timm's param_groups_layer_decay differs in one place: it puts the final `norm` with the last block.)"""
    top = len(model.blocks) + 1
    no_decay = set(model.no_weight_decay())
    groups: dict[tuple[int, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(("cls_token", "pos_embed", "patch_embed.")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = top
        decay = 0.0 if param.ndim == 1 or name in no_decay else weight_decay
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": decay,
                                                   "lr_scale": layer_decay ** (top - layer)})
        group["params"].append(param)
    return list(groups.values())


def _shape_of(state: dict[str, torch.Tensor], prefix_tokens: int = 1) -> tuple[int, int, int, tuple[int, int]]:
    """(patch size, width, depth, position grid) of the ViT whose tensors are `state`."""
    patch = state["patch_embed.proj.weight"].shape[-1]
    width = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    side = math.isqrt(state["pos_embed"].shape[1] - prefix_tokens)
    return patch, width, depth, (side, side)


def arch_of(state: dict[str, torch.Tensor]) -> str | None:
    """The preset whose patch size, width and depth match `state` (the head count is not in the weights)."""
    patch, width, depth, _ = _shape_of(state)
    for name, s in CLASSIFIER_PRESETS.items():
        if (s.patch_size, s.embed_dim, s.depth) == (patch, width, depth):
            return name
    return None


@dataclass(frozen=True)
class ClassifierInfo:
    """What a loaded classifier is: recorded next to whatever it produced (logits cache, metrics)."""

    arch: str
    layout: str          # "g2sd" (dist token, no dist position), "deit" (timm distilled), "avg" (MAE), "token"
    num_classes: int
    img_size: int
    source: str          # "random:SEED" or the resolved path
    sha256: str


def _layout(state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(layout, prefix tokens with a position row), read from the keys and the position table's length."""
    rows = state["pos_embed"].shape[1]
    if "dist_token" in state:
        with_dist_row = math.isqrt(rows - 2) ** 2 == rows - 2
        return ("deit", 2) if with_dist_row else ("g2sd", 1)
    return ("avg" if "fc_norm.weight" in state else "token"), 1


def _build(arch: str, layout: str, num_classes: int, img_size: int) -> nn.Module:
    shape = _shape(arch)
    if layout == "g2sd":
        return DistilledViT(shape, num_classes, img_size)
    if layout == "deit":
        return timm_distilled_model(arch, num_classes, img_size)
    return VisionTransformer(**_vit_args(shape, num_classes, img_size, 0.0), global_pool=layout)


def load_classifier(path: str | Path, flag: str, arch: str | None = None, num_classes: int | None = None,
                    img_size: int | None = None) -> tuple[nn.Module, ClassifierInfo]:
    """A trained ViT classifier from a weight file or run folder, in eval mode with gradients off.

    Recognised layouts: MAE fine-tuned (global pool, `fc_norm`), cls-token ViT (`norm`), G2SD student
    (`dist_token`, `head_dist`), timm distilled ViT (our export). `arch` is inferred from the weights when
    None. `num_classes` / `img_size`, when given, must match the file (one-line UserError otherwise)."""
    state = read_state_dict(path, flag)
    if "head.weight" not in state:
        raise UserError(f"{flag} {path} has no classifier head (no head.weight): pass a fine-tuned classifier "
                        f"such as MAE's mae_finetuned_vit_base.pth, not a pre-trained encoder")
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state or "cls_token" not in state:
        raise UserError(f"{flag} {path} is not a ViT classifier (no pos_embed / patch_embed / cls_token)")
    layout, prefix = _layout(state)
    patch, _, _, grid = _shape_of(state, prefix)
    found_arch = arch_of(state)
    if arch is None:
        if found_arch is None:
            raise UserError(f"{flag} {path}: no known ViT has its patch size, width and depth; pass its arch")
        arch = found_arch
    elif found_arch != arch:
        raise UserError(f"{flag} {path} is not a {arch} (its weights look like {found_arch or 'another ViT'})")
    classes = state["head.weight"].shape[0]
    if num_classes is not None and classes != num_classes:
        raise UserError(f"{flag} {path} classifies into {classes} classes but the data has {num_classes}; "
                        f"pass a classifier fine-tuned on the same classes")
    size = grid[0] * patch
    if img_size is not None and img_size != size:
        raise UserError(f"{flag} {path} was trained at {size} px but {img_size} px was asked for")
    model = _build(arch, layout, classes, size)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{flag} {path} does not match a {layout}-layout {arch}: missing {missing[:4] or 'none'}, "
                        f"unexpected {unexpected[:4] or 'none'}")
    model.load_state_dict({k: state[k].float() for k in expected})
    model.eval().requires_grad_(False)
    source = str(Path(path).resolve())
    return model, ClassifierInfo(arch, layout, classes, size, source, weights_sha256(model.state_dict()))


def build_teacher(spec: str, arch: str, num_classes: int, img_size: int = 224) -> tuple[nn.Module, ClassifierInfo]:
    """The fine-tuned teacher: a checkpoint (see `load_classifier`) or `random[:SEED]`, a seeded random
    MAE-layout classifier for trials and tests. Eval mode, gradients off; run it in fp32 (G2SD does)."""
    seed = random_teacher_seed(spec)
    if seed is not None:
        model = seeded(seed, lambda: _build(arch, "avg", num_classes, img_size))
        model.eval().requires_grad_(False)
        return model, ClassifierInfo(arch, "avg", num_classes, img_size, f"random:{seed}",
                                     weights_sha256(model.state_dict()))
    return load_classifier(spec, "--teacher", arch, num_classes, img_size)


def timm_distilled_model(arch: str, num_classes: int, img_size: int = 224) -> VisionTransformerDistilled:
    """timm's distilled ViT of `arch`'s size (what `deit_*_distilled_patch16_224` builds), randomly initialised."""
    shape = _shape(arch)
    return VisionTransformerDistilled(**_vit_args(shape, num_classes, img_size, 0.0))


def to_timm_distilled(model: DistilledViT) -> dict[str, torch.Tensor]:
    """The student as a state dict for timm's `VisionTransformerDistilled` (e.g. `timm.create_model(
    'deit_small_distilled_patch16_224', num_classes=C)`), strict keys, identical eval logits: the dist token's
    position row is zero, so timm's [cls, dist, patches] + pos_embed equals our forward bit for bit."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pos = state["pos_embed"]
    state["pos_embed"] = torch.cat([pos[:, :1], torch.zeros_like(pos[:, :1]), pos[:, 1:]], dim=1)
    return state
