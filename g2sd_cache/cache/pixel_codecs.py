"""How a cache stores the views' visible patches: `visible` (exact uint8), `lossless` (exact, filtered and compressed:
cache/lossless.py), `jpeg` (teacher-consistent lossy) or `none`.

`jpeg`: the n_keep visible patches of a view are tiled into one image (a grid of ceil(sqrt(n_keep)) columns,
unused cells black; 49 patches of 16 px -> one 112 x 112 image) and encoded as one baseline JPEG at
`quality`, chroma not subsampled (4:4:4). Extract encodes the patches and *decodes them again before the
teacher sees them*: the teacher's input is the decoded JPEG, so the stored bytes decode to exactly the
pixels the teacher was given, and teacher and student still see the same pixels. The JPEG loss is a
change of the training distribution (like a JPEG-compressed dataset), not a mismatch between the two.

Why this layout: a patch of 16 px is two 8 x 8 DCT blocks wide, so no block straddles two patches (which
are not neighbours in the image), and 4:4:4 keeps chroma blocks inside a patch too; one image per view
amortises the JPEG headers (~600 B) over 49 patches. The decoder is libjpeg-turbo through
`torchvision.io.decode_jpeg` with its default integer IDCT (exact integer arithmetic, so the same bytes
decode to the same pixels on every CPU); a GPU decoder (nvjpeg) is another IDCT, so the cache records
which decoder produced the teacher's pixels and the reader uses that one.
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from g2sd_cache.cache.lossless import LOSSLESS_ARRAY

# torchvision 0.29 announces that its image codecs move to TorchCodec; they are the ones this format is defined by
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

PIXEL_MODES = ("visible", "lossless", "jpeg", "none")
JPEG_DECODERS = ("cpu", "cuda")    # libjpeg-turbo, nvjpeg
JPEG_ARRAY = "jpeg"        # the array a jpeg cache stores (variable-length bytes, one JPEG per view)
BYTES_ARRAYS = {"jpeg": JPEG_ARRAY, "lossless": LOSSLESS_ARRAY}   # modes that store one blob per view: their array
DEFAULT_QUALITY = 90


def grid(n_keep: int) -> tuple[int, int]:
    """(rows, cols) of the tile grid for n_keep patches: as square as possible."""
    cols = max(1, math.ceil(math.sqrt(n_keep)))
    return math.ceil(n_keep / cols), cols


def tile(patches: np.ndarray) -> np.ndarray:
    """uint8 [n_keep, p, p, 3] -> [rows*p, cols*p, 3]: patch i at cell (i // cols, i % cols), the rest black."""
    n, p = patches.shape[0], patches.shape[1]
    rows, cols = grid(n)
    cells = np.zeros((rows * cols, p, p, 3), dtype=np.uint8)
    cells[:n] = patches
    return cells.reshape(rows, cols, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * p, cols * p, 3)


def untile(image: torch.Tensor, n_keep: int, p: int) -> torch.Tensor:
    """[3, rows*p, cols*p] (decode_jpeg's CHW) -> [n_keep, p, p, 3], the inverse of `tile`."""
    _, h, w = image.shape
    rows, cols = h // p, w // p
    x = image.reshape(3, rows, p, cols, p).permute(1, 3, 2, 4, 0).reshape(rows * cols, p, p, 3)
    return x[:n_keep]


def encode_jpeg(patches: np.ndarray, quality: int) -> bytes:
    """uint8 [n_keep, p, p, 3] -> the bytes of one baseline 4:4:4 JPEG of the tiled patches."""
    buf = io.BytesIO()
    Image.fromarray(tile(np.ascontiguousarray(patches))).save(buf, format="JPEG", quality=quality, subsampling=0,
                                                              optimize=True)
    return buf.getvalue()


def decode_jpegs(blobs: list, n_keep: int, p: int, device: str = "cpu") -> torch.Tensor:
    """JPEG bytes of B views -> uint8 [B, n_keep, p, p, 3] on `device` ("cpu": libjpeg-turbo, "cuda": nvjpeg)."""
    if not blobs:
        return torch.empty(0, n_keep, p, p, 3, dtype=torch.uint8, device=device)
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return torch.stack([untile(im, n_keep, p) for im in images])


def jpeg_round_trip(patches: torch.Tensor, quality: int) -> tuple[torch.Tensor, list[bytes]]:
    """uint8 [V, n_keep, p, p, 3] -> (the decoded patches the teacher is given, the JPEG bytes stored).
    Both come from the same bytes, so what the cache returns equals what the teacher saw, bit for bit."""
    blobs = [encode_jpeg(v.numpy(), quality) for v in patches]
    return decode_jpegs(blobs, patches.shape[1], patches.shape[2]), blobs
