"""`--teacher pretrained-micro[:SEED]`: a micro MAE teacher whose features have learned structure, for the evidence.

A random teacher's features are a poor proxy for the spectrum a target codec exploits, and no real MAE
checkpoint fits a CPU benchmark. So this pretrains the micro teacher for a CPU minute or two with MAE's own
objective (He et al. 2022; facebookresearch/mae models_mae.forward_loss): predict the pixels of the *masked*
patches, each normalised by its own mean and variance (norm_pix_loss), mean squared error over masked
patches only. The images are natural photographs shipped with scikit-image (`skimage.data`, the `bench`
extra), and every step draws fresh random crops, flips and masks of them with MAE's view recipe.

Everything is a pure function of (recipe, seed): the crops come from a Philox stream keyed by (seed, step),
the initialisation from torch's generator seeded with the seed, and the run is single-threaded, so two builds
give the same weights. The result is kept per machine under ~/.cache/g2sd-cache/teachers/, named by a hash
of the recipe, the seed and the library versions, and written atomically (temporary file, then rename).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from g2sd_cache.common.errors import UserError
from g2sd_cache.data.views import ViewGeometry, normalize, patchify, render_view, sample_view, visible_patches

SPEC = "pretrained-micro"
CACHE_DIR = Path(os.environ.get("G2SD_CACHE_HOME", Path.home() / ".cache" / "g2sd-cache")) / "teachers"
# skimage.data's photographs that ship inside the wheel (no download); drawings and binary masks left out
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket")


@dataclass(frozen=True)
class PretrainRecipe:
    """How the pretrained micro teacher is made (its hash names the file it is kept in)."""

    arch: str = "test_mae_micro_patch16"
    img_size: int = 96
    steps: int = 800
    batch_size: int = 64
    lr: float = 1.5e-3          # AdamW, betas (0.9, 0.95), weight decay 0.05, cosine to 0 after 5 % warm-up (MAE's)
    mask_ratio: float = 0.75
    images: tuple[str, ...] = PHOTOS
    image_side: int = 256       # photographs downscaled to this longer side first


def parse_spec(spec: str) -> int | None:
    """The seed of `pretrained-micro` / `pretrained-micro:SEED`, None for any other teacher spec."""
    if spec != SPEC and not spec.startswith(SPEC + ":"):
        return None
    seed = spec.partition(":")[2] or "0"
    if not seed.isdigit():
        raise UserError(f"--teacher {spec}: the seed after '{SPEC}:' must be a non-negative integer")
    return int(seed)


def photographs(names: tuple[str, ...] = PHOTOS, side: int = 256) -> list:
    """The named skimage.data images as PIL RGB images, the longer side at most `side` px."""
    try:
        import skimage.data
    except ImportError:
        raise UserError(f"--teacher {SPEC} pretrains on scikit-image's photographs: pip install scikit-image "
                        f"(or the package's [bench] extra)") from None
    from PIL import Image
    out = []
    for name in names:
        a = np.asarray(getattr(skimage.data, name)())
        a = np.stack([a] * 3, axis=-1) if a.ndim == 2 else a[..., :3]
        img = Image.fromarray(a.astype(np.uint8)).convert("RGB")
        img.thumbnail((side, side), Image.Resampling.BICUBIC)   # crops of ~100 px need no more: rendering stays cheap
        out.append(img)
    return out


def mae_pixel_loss(model, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's pre-training loss. imgs: [N, 3, H, W] normalised; mask: [N, L] bool (True = hidden).
    Predicts every patch from the visible ones, target = the patch normalised by its own mean and variance
    (eps 1e-6), MSE per patch, averaged over the hidden patches. Patches in HWC order, as everywhere here."""
    p = model.shape.patch_size
    latent = model.forward_encoder(visible_patches(imgs, mask, p).flatten(2), mask)
    pred = model.decoder_pred(model.decoder_norm(model.forward_decoder(latent, mask)))[:, 1:]
    target = patchify(imgs, p).flatten(2)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def batch(images: list, recipe: PretrainRecipe, seed: int, step: int, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step` of the run: random crops (MAE's RandomResizedCrop + flip) and masks of random images,
    a pure function of (seed, step). Returns normalised imgs [B, 3, S, S] and masks [B, L]."""
    g = ViewGeometry(img_size=recipe.img_size, patch_size=patch_size, mask_ratio=recipe.mask_ratio)
    which = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, step, 0x707265]))).integers(
        0, len(images), recipe.batch_size)
    views = [sample_view(seed, step * recipe.batch_size + i, 0, images[j].size, g) for i, j in enumerate(which)]
    pixels = torch.stack([render_view(images[j], v.crop, v.flip, g.img_size) for j, v in zip(which, views)])
    return normalize(pixels), torch.from_numpy(np.stack([v.mask for v in views]))


def pretrain(recipe: PretrainRecipe, seed: int, images: list, log=None) -> dict[str, torch.Tensor]:
    """Pretrain the micro teacher on `images` (PIL RGB; single-threaded, so deterministic); returns its state dict."""
    from g2sd_cache.models.mae import TEACHER_PRESETS, MAETeacher
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MAETeacher(TEACHER_PRESETS[recipe.arch], recipe.img_size)
        model.train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=recipe.lr,
                                betas=(0.9, 0.95), weight_decay=0.05)
        warm = max(1, recipe.steps // 20)
        for step in range(recipe.steps):
            lr = recipe.lr * (step + 1) / warm if step < warm else \
                recipe.lr * 0.5 * (1 + np.cos(np.pi * (step - warm) / max(1, recipe.steps - warm)))
            for group in opt.param_groups:
                group["lr"] = lr
            imgs, mask = batch(images, recipe, seed, step, model.shape.patch_size)
            loss = mae_pixel_loss(model, imgs, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log and (step % 100 == 0 or step == recipe.steps - 1):
                log(f"pretrain {SPEC}:{seed} step {step + 1}/{recipe.steps} loss {loss.item():.4f}")
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


RECIPE = PretrainRecipe()     # what `--teacher pretrained-micro` builds for the micro teacher (img_size set per use)
# ... and for its 128-wide-decoder variant (--arch test_mae_micro_dec128_patch16): the same recipe, ~5x the
# compute per step (about 5 minutes of an idle core), targets 128 wide instead of 32
WIDE_RECIPE = PretrainRecipe(arch="test_mae_micro_dec128_patch16")


def recipe_key(recipe: PretrainRecipe, seed: int) -> str:
    """Names the kept file: the recipe, the seed and the versions whose arithmetic the weights depend on."""
    import PIL
    import torchvision
    text = json.dumps({**dataclasses.asdict(recipe), "seed": seed, "torch": torch.__version__,
                       "torchvision": torchvision.__version__, "pillow": PIL.__version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pretrained_state(seed: int, arch: str, img_size: int, log=print) -> dict[str, torch.Tensor]:
    """The pretrained micro teacher's weights for (arch, img_size, seed): from this machine's cache, or made
    now (a minute or two of one core; about 5 for the 128-wide decoder) and kept there."""
    recipes = {r.arch: r for r in (RECIPE, WIDE_RECIPE)}
    if arch not in recipes:
        raise UserError(f"--teacher {SPEC} is made for two micro teachers; pass --arch {' or '.join(recipes)}")
    recipe = recipes[arch]
    recipe = dataclasses.replace(recipe, img_size=img_size)
    path = CACHE_DIR / f"{SPEC}-{recipe_key(recipe, seed)}.pt"
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:   # a damaged file of ours: made again below
            pass
    log(f"pretraining the {SPEC} teacher ({recipe.arch}, seed {seed}, {recipe.steps} steps, once per machine) -> {path}")
    state = pretrain(recipe, seed, photographs(recipe.images, recipe.image_side), log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return state
