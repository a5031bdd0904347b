"""The specific stage's data plan: every mixed training batch as a pure function of (seed, epoch, group).

    epoch order   = permutation of the images keyed by (seed, epoch)
    group g       = order[g*G : (g+1)*G]          G = group_size, the official per-GPU batch (128)
    sample        = SampleAugmenter(image, key (seed, epoch, index))      (sd_augment)
    mixing        = draw_mix(key (seed, epoch, g)) applied to the group   (sd_mix)

An unreadable image (truncated, not an image, a bomb) is replaced inside its group by the next readable image
of the group (positions p+1, p+2, ... wrapping), augmented with the unreadable image's own key and labelled with
the substitute's class; the group keeps its size, so the mixing pairs and every other sample are unchanged and a
logits cache made with the same images agrees. `MixedGroup.unreadable` lists what was replaced; the trainer
decides (--on-error) whether that stops the run.

An epoch has floor(N / G) groups (the rest of the images sit the epoch out, like the official
`drop_last`). Nothing depends on the number of GPUs, DataLoader workers or the order in which groups are
computed: a trainer with W ranks can take groups [s*W, (s+1)*W) at global step s, rank r the r-th of them,
and split a group into micro-batches for gradient accumulation; any worker may compute any group. A teacher
run once over the groups of an epoch (the logits cache) therefore saw exactly the inputs the student sees
when it replays that epoch.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np
import PIL
import timm
import torch
import torchvision

from g2sd_cache.common.errors import UserError
from g2sd_cache.data.labelled import LabelledFolder
from g2sd_cache.data.sources import FolderSource, open_source
from g2sd_cache.specific.augment import AugmentRecipe, SampleAugmenter
from g2sd_cache.specific.mix import MixParams, MixRecipe, apply_mix, draw_mix

ORDER_TAG, MIX_TAG = 0x6F7264, 0x6D6978  # keep the order and mixing keys apart from each other and the samples


@dataclass(frozen=True)
class SDRecipe:
    """Everything besides the seed and the data that decides the plan."""

    augment: AugmentRecipe = field(default_factory=AugmentRecipe)
    mix: MixRecipe = field(default_factory=MixRecipe)
    group_size: int = 128  # SD.sh: --batch_size 128 per GPU; timm mixes within that batch


@dataclass(frozen=True)
class MixedGroup:
    """One mixing group as the student (and the teacher) sees it.

    images: [G, 3, S, S] float32, normalised, augmented, erased, mixed; targets: [G, C] float32 soft labels
    (mixed and smoothed); labels: [G] int64 the images' own classes; indices: [G] int64 image indices;
    crc32c: [G] int64 the crc32c of each image's bytes as read (a logits cache records them)."""

    epoch: int
    group: int
    images: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    mix: MixParams
    crc32c: torch.Tensor | None = None
    unreadable: tuple[tuple[str, str], ...] = ()   # (image key, error) of the images replaced in this group


class SDPlan:
    """plan.batch(epoch, group) -> MixedGroup; plan.num_groups groups per epoch."""

    def __init__(self, data: LabelledFolder, recipe: SDRecipe, seed: int):
        g = recipe.group_size
        if g < 2 or g % 2:
            raise UserError(f"the mixing group size must be even and at least 2 (mixup pairs sample i with "
                            f"sample G-1-i), got {g}")
        if len(data) < g:
            raise UserError(f"{data.source.root} has {len(data)} images, fewer than one mixing group of {g}; "
                            f"add images or lower the group size")
        self.data, self.recipe, self.seed = data, recipe, seed
        self.augmenter = SampleAugmenter(recipe.augment, seed)
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def num_groups(self) -> int:
        return len(self.data) // self.recipe.group_size

    def order(self, epoch: int) -> np.ndarray:
        """[num_groups, G] int64: the image indices of every group of `epoch`."""
        if self._order is None or self._order[0] != epoch:
            rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([self.seed, epoch, ORDER_TAG])))
            g = self.recipe.group_size
            perm = rng.permutation(len(self.data))[: self.num_groups * g]
            self._order = (epoch, perm.reshape(self.num_groups, g))
        return self._order[1]

    def mix_params(self, epoch: int, group: int) -> MixParams:
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([self.seed, epoch, group, MIX_TAG])))
        return draw_mix(self.recipe.mix, rng, self.recipe.augment.img_size)

    def sample(self, epoch: int, index: int) -> torch.Tensor:
        """Image `index` as augmented in `epoch`, before mixing: [3, S, S] float32."""
        return self.augmenter(self.data.image(index), epoch, index)

    def batch(self, epoch: int, group: int) -> MixedGroup:
        if not 0 <= group < self.num_groups:
            raise IndexError(f"group {group} of an epoch of {self.num_groups} groups")
        indices = [int(i) for i in self.order(epoch)[group]]
        decoded, crcs, unreadable = {}, {}, []
        for i in indices:
            try:
                decoded[i], crcs[i] = self.data.image_and_crc(i)
            except UserError:   # a changed image (its recorded crc32c differs) is not an unreadable one
                raise
            except Exception as e:   # truncated, not an image, a bomb: replaced below, reported to the trainer
                unreadable.append((self.data.source.keys[i], f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        used = [self._readable_at(indices, p, decoded) for p in range(len(indices))]
        images = torch.stack([self.augmenter(decoded[u], epoch, i) if u is not None else self._blank()
                              for u, i in zip(used, indices)])
        sources = [u if u is not None else i for u, i in zip(used, indices)]
        labels = torch.tensor([self.data.labels[i] for i in sources], dtype=torch.int64)
        params = self.mix_params(epoch, group)
        mixed, targets = apply_mix(images, labels, params, self.data.num_classes, self.recipe.mix.label_smoothing)
        return MixedGroup(epoch, group, mixed, targets, labels, torch.tensor(sources, dtype=torch.int64), params,
                          torch.tensor([crcs.get(i, -1) for i in sources], dtype=torch.int64), tuple(unreadable))

    @staticmethod
    def _readable_at(indices: list[int], p: int, decoded: dict) -> int | None:
        """The image that stands at position p: its own if readable, else the next readable one of the group."""
        n = len(indices)
        return next((indices[(p + d) % n] for d in range(n) if indices[(p + d) % n] in decoded), None)

    def _blank(self) -> torch.Tensor:
        """A group with no readable image at all (the trainer refuses it): zeros of the right shape."""
        s = self.recipe.augment.img_size
        return torch.zeros(3, s, s)

    def describe(self) -> dict:
        """What a logits cache must record to be replayed by this plan (see `check_same_plan`); JSON-normal
        (tuples as lists), so a description read back from a manifest compares equal."""
        description = {"seed": self.seed, "recipe": dataclasses.asdict(self.recipe), "num_images": len(self.data),
                       "classes": list(self.data.classes), "listing": self.data.source.fingerprint,
                       "versions": replay_versions()}
        return json.loads(json.dumps(description))


class EpochGroups(torch.utils.data.Dataset):
    """The groups of one epoch as a map-style dataset (use `DataLoader(..., batch_size=None)`)."""

    def __init__(self, plan: SDPlan, epoch: int):
        self.plan, self.epoch = plan, epoch

    def __len__(self) -> int:
        return self.plan.num_groups

    def __getitem__(self, group: int) -> MixedGroup:
        return self.plan.batch(self.epoch, group)


def replay_versions() -> dict:
    """Libraries whose draw order or image arithmetic a replayed group depends on."""
    return {"timm": timm.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__}


def check_same_plan(stored: dict, current: dict, what: str) -> None:
    """Refuse a logits cache (`what`) written for another plan: one line naming what differs."""
    differ = [k for k in ("seed", "recipe", "num_images", "classes", "listing", "versions")
              if stored.get(k) != current.get(k)]
    if differ:
        raise UserError(f"{what} was extracted for another stage-2 plan ({', '.join(differ)} differ); rerun "
                        f"extract-logits with this data and these settings, or train without it")


def open_plan(data: str, recipe: SDRecipe, seed: int) -> SDPlan:
    """The stage-2 plan over `data`, which must be a class-folder tree (the plan needs random access)."""
    source = open_source(data)
    if not isinstance(source, FolderSource):
        raise UserError(f"--data {data}: stage-2 training needs an image folder with one sub-folder per class "
                        f"(the plan draws any image of any epoch at random); webdataset tars are accepted for --val")
    return SDPlan(LabelledFolder.of(source), recipe, seed)


class UnreadableImages:
    """The trainer's side of unreadable images (`--on-error`): `fail` stops at the first one naming it; `skip`
    keeps each group's substitute (see the module docstring) and lists every image once. A group with no
    readable image at all stops the run either way."""

    def __init__(self, on_error: str, data: str):
        self.on_error, self.data = on_error, data
        self.seen: dict[str, str] = {}

    def check(self, group: MixedGroup) -> list[str]:
        """Notes to print for images not seen before; raises UserError as the policy says."""
        if not group.unreadable:
            return []
        key, error = group.unreadable[0]
        if len(group.unreadable) == group.images.shape[0]:
            raise UserError(f"every image of mixing group {group.group} (epoch {group.epoch}) of --data {self.data} is "
                            f"unreadable (e.g. {key}: {error}); replace or remove them")
        if self.on_error == "fail":
            raise UserError(f"image {key} of --data {self.data} cannot be read ({error}); replace or remove it, or "
                            f"pass --on-error skip to use another image of its mixing group in its place")
        notes = []
        for key, error in group.unreadable:
            if key not in self.seen:
                self.seen[key] = error
                notes.append(f"note: image {key} cannot be read ({error}); another image of its mixing group is used "
                             f"in its place (--on-error skip)")
        return notes
