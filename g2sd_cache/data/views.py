"""Views: the crop, flip and mask that one training sample sees, sampled and replayed.

A view is a pure function of (seed, image index, view index): its random numbers come from a
Philox counter-based generator keyed by that triple, never from a shared stream, so extract,
every trainer rank and worker, and a resumed run all regenerate the same view on their own.

Rendering follows MAE's recipe exactly: `resized_crop` of the PIL RGB image to the output size
with bicubic interpolation, then the horizontal flip, then `to_tensor` and ImageNet mean/std.
`render_view` returns uint8 pixels (cheap to ship between processes); `normalize` is the one
function that turns them into the network's input, used by extract and train alike, so a cached
target and a replayed view see bit-identical inputs.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import PIL
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from g2sd_cache.common.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewGeometry:
    """Everything that decides what a view looks like; recorded in the cache manifest."""

    img_size: int = 224
    patch_size: int = 16
    mask_ratio: float = 0.75
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5

    def check(self) -> None:
        """One-line refusals of a geometry no view can have: no patch, or no visible patch."""
        if self.img_size < self.patch_size or self.img_size % self.patch_size:
            raise UserError(f"--img-size {self.img_size}: must be a positive multiple of the patch size "
                            f"{self.patch_size}")
        if not 0 <= self.mask_ratio < 1:
            raise UserError(f"--mask-ratio {self.mask_ratio}: must be in [0, 1)")
        if self.num_visible < 1:
            raise UserError(f"--mask-ratio {self.mask_ratio} at --img-size {self.img_size} leaves no visible patch of "
                            f"{self.num_patches}; lower the mask ratio or raise the image size")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_visible(self) -> int:
        """MAE's rule: int(L * (1 - mask_ratio)) patches stay visible (49 of 196)."""
        return int(self.num_patches * (1 - self.mask_ratio))


@dataclass(frozen=True)
class View:
    """One sampled view. crop = (top, left, height, width) in source pixels; mask: [L] bool, True = hidden."""

    crop: tuple[int, int, int, int]
    flip: bool
    mask: np.ndarray


def view_rng(seed: int, index: int, view: int) -> np.random.Generator:
    """A Philox generator keyed by (seed, image index, view index) and nothing else."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, index, view])))


def crop_box(rng: np.random.Generator, width: int, height: int,
             scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box, torchvision's rule (ten tries, then a central crop), drawn from `rng`.
    returns (top, left, height, width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_mask(rng: np.random.Generator, num_patches: int, num_visible: int) -> np.ndarray:
    """MAE's random masking: a uniform random subset of `num_visible` patches stays visible.
    returns [num_patches] bool, True = hidden."""
    mask = np.ones(num_patches, dtype=bool)
    mask[rng.permutation(num_patches)[:num_visible]] = False
    return mask


def sample_view(seed: int, index: int, view: int, image_size: tuple[int, int], geometry: ViewGeometry) -> View:
    """The view (seed, index, view) of an image of `image_size` = (width, height)."""
    rng = view_rng(seed, index, view)
    crop = crop_box(rng, image_size[0], image_size[1], geometry.scale, geometry.ratio)
    flip = bool(rng.random() < geometry.flip_p)
    return View(crop, flip, random_mask(rng, geometry.num_patches, geometry.num_visible))


def decode_image(data: bytes | str) -> Image.Image:
    """Bytes or a path -> PIL RGB image, fully decoded (so truncated files fail here, not later).

    Grayscale images of more than 8 bits (16-bit PNG/TIFF: PIL modes I;16*, I) are scaled to 8 bits
    (value >> 8), not clipped: PIL's own convert("RGB") clips them at 255, turning them white. Floating-point
    images have no defined range and are refused (listed as unreadable)."""
    img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    img.load()
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.int64)
        img = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8))
    elif img.mode == "F":
        raise ValueError("a floating-point image (PIL mode F) has no defined value range; convert it to 8 bits")
    return img.convert("RGB")


def render_view(img: Image.Image, crop: tuple[int, int, int, int], flip: bool, img_size: int) -> torch.Tensor:
    """MAE's crop and flip of a PIL RGB image. returns [3, img_size, img_size] uint8."""
    out = TF.resized_crop(img, *crop, [img_size, img_size], InterpolationMode.BICUBIC)
    if flip:
        out = TF.hflip(out)
    return TF.pil_to_tensor(out)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 network input: `to_tensor` (/255) then ImageNet mean/std,
    the same arithmetic as torchvision's to_tensor + Normalize, on whatever device `pixels` is on."""
    x = pixels.float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def visible_index(mask: torch.Tensor, n_keep: int | None = None) -> torch.Tensor:
    """Indices of the visible patches of each row, ascending.

    mask: [N, L] bool, True = hidden, the same number of visible patches in every row.
    n_keep: that number, when the caller knows it (then nothing here waits for the device).
    returns: [N, n_keep] int64.
    """
    if n_keep is None:
        counts = (~mask).sum(dim=1)
        if mask.shape[0] and not bool((counts == counts[0]).all()):
            raise ValueError("every mask row must keep the same number of visible patches")
        n_keep = int(counts[0]) if mask.shape[0] else 0
    # A stable sort puts the visible (False) patches first, in ascending order: no nonzero(), no sync.
    return torch.argsort(mask.to(torch.uint8), dim=1, stable=True)[:, :n_keep]


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p, p, C]: patches in row-major order, each in HWC order (MAE's patchify)."""
    n, c, h, w = pixels.shape
    p = patch_size
    x = pixels.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p, p, c)


def visible_patches(pixels: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The patches a masked view shows: pixels [N, C, H, W] (any dtype), mask [N, L] (True = hidden)
    -> [N, n_keep, p, p, C], visible patches in ascending patch order, HWC inside each patch.
    This is what the cache stores (uint8, as rendered) and what teacher and student consume."""
    ids = visible_index(mask)
    patches = patchify(pixels, patch_size)
    return patches[torch.arange(patches.shape[0], device=ids.device)[:, None], ids]


def normalize_patches(patches: torch.Tensor) -> torch.Tensor:
    """uint8 [N, n_keep, p, p, 3] -> float32 [N, n_keep, p*p*3] network input: the arithmetic of
    `normalize`, element for element (so a patch normalises bit-identically to its image), channel last."""
    x = patches.float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)
    std = torch.tensor(IMAGENET_STD, device=x.device)
    return x.sub_(mean).div_(std).flatten(2)


def replay_versions() -> dict:
    """The library versions whose image arithmetic a replayed view depends on (recorded in the manifest)."""
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__}
