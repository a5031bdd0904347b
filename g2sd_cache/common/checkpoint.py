"""Training checkpoints: written atomically and durably, read back without trusting the file.

One file, RUN/checkpoint.pt, replaced in place by `fsutil.atomic_write` (temporary, fsync, rename, fsync
of the folder), so a crash, a power cut or a full disk during a save leaves the previous checkpoint intact
and a reader never sees half a file.

Run folders are handed around (to export, to resume elsewhere), so a checkpoint is untrusted input: it is
read with `torch.load(weights_only=True)`, which refuses any pickled object other than tensors and plain
containers (a pickle that would call `os.system` is refused, never run). Everything a checkpoint holds is
therefore kept in that form, the random generators' states included (`rng_state`).
"""
from __future__ import annotations

import argparse
import errno
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from g2sd_cache.common.errors import UserError
from g2sd_cache.common.fsutil import atomic_write, free_bytes, is_out_of_space

CHECKPOINT = "checkpoint.pt"
# The entries `g2sd-cache train` writes into every checkpoint (export reads the first five, --resume all):
# a file without one of them is not ours, and is refused in one line instead of a KeyError later.
# What every stage-1 checkpoint holds about its student (enough to export it), and what a resume also needs.
STUDENT_KEYS = ("model", "student", "target_dim", "img_size", "step")
RESUME_KEYS = STUDENT_KEYS + ("optimizer", "scaler", "epoch", "position", "global_batch", "rng", "config", "world")


def save_checkpoint(run: Path, state: dict) -> Path:
    """Replace RUN/checkpoint.pt with `state` (tensors and plain values only: `load_checkpoint` refuses
    anything else). A full disk is a one-line UserError; the previous checkpoint, if any, stays as it was."""
    path = Path(run) / CHECKPOINT
    return save_torch_file(path, state, "free space, then continue with --resume" if path.exists() else
                           "free space, then rerun the same command (no checkpoint of this run was saved yet)",
                           what="checkpoint")


def save_torch_file(path: Path, obj, then: str, what: str | None = None) -> Path:
    """torch.save `obj` to `path` atomically (no temporary left on failure). A full disk, a read-only folder or
    one we may not write is a one-line UserError that says whether an earlier `path` is still there and, in
    `then`, what to do next."""
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as e:   # torch.save wraps the OSError of a failed write in a RuntimeError
        cause = _os_error(e)
        if cause is None or not (is_out_of_space(e) or cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM)):
            raise
        kept = f"the previous {what or path.name} is intact" if existed else "nothing was written"
        if is_out_of_space(e):
            free = free_bytes(path.parent)
            why = "no space left on the device" + (f" ({free / 2**20:.0f} MiB free)" if free is not None else "")
        else:
            why = f"{cause.strerror.lower()} (a read-only or protected folder)"
        raise UserError(f"cannot write {path}: {why}; {kept}: {then}") from e


def _os_error(e: BaseException | None) -> OSError | None:
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def load_untrusted(path: Path, what: str) -> object:
    """The content of a torch file a user hands us, loaded weights-only: tensors, plain values and
    `argparse.Namespace` (the official MAE / G2SD training scripts pickle their arguments beside the weights).
    Anything else is refused in one line naming it, and never unpickled. `what` says what the file is for."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:   # weights_only refused a global: an object that could run code
        raise UserError(f"{what} {path} holds objects other than tensors and plain values ({_refused_global(e)}); "
                        f"it is not loaded, since unpickling it could run code") from e
    except Exception as e:                # corrupt, truncated, not a torch file
        raise UserError(f"cannot read {what} {path}: {type(e).__name__}: {_first_line(e)}") from e


def load_checkpoint(run: Path, hint: str = "pass the --out folder of a `g2sd-cache train` run",
                    required: tuple[str, ...] = STUDENT_KEYS) -> dict:
    """RUN/checkpoint.pt as a dict, loaded weights-only. `required`: the entries the caller needs (default:
    its student; RESUME_KEYS for a resume); a file without them is a one-line UserError."""
    path = Path(run) / CHECKPOINT
    if not path.is_file():
        raise UserError(f"{run} has no {CHECKPOINT}; {hint}")
    ckpt = load_untrusted(path, "checkpoint")
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a g2sd-cache training checkpoint (it holds a {type(ckpt).__name__}, "
                        f"not a dict); {hint}")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a g2sd-cache training checkpoint: it lacks {', '.join(missing)}; {hint}")
    return ckpt


def _refused_global(e: BaseException) -> str:
    """The line of torch's weights-only refusal that names the object (the rest is advice to load unsafely)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    return f"it pickles {found.group(1)}" if found else _first_line(e)


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__


def rng_state() -> dict:
    """Every random generator's state as tensors, ints and lists (loadable weights-only)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "internal": list(internal), "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
