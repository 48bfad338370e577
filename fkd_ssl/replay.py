"""Replaying stored views for a student: which views an epoch uses, and the dataset that renders them.

Epoch ``e`` takes K of an image's R stored slots from a permutation seeded by ``(seed, image, e // (R // K))``,
so no view repeats before all were used (docs/distill.md).  Items are :class:`ReplayBatch`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from .data.image_io import read_uint8
from .errors import ConfigError
from .views import PARAM_FIELDS, ViewConfig, render_views, sample_views

_SIGMA = PARAM_FIELDS.index("blur_sigma")
#: fresh (online) views use slots from here on, so they never coincide with stored ones
FRESH_SLOT_BASE = 1 << 30


class ReplayBatch(NamedTuple):
    """K replayed views of an image (an item of :class:`ReplayDataset`; collated: a leading ``B``)."""

    views: torch.Tensor  # uint8 (K, 3, S, S) at the student's size
    targets: torch.Tensor  # float32 (K, D) stored targets, or (K, 0) without
    image: int  # the image's index in the dataset
    slots: torch.Tensor  # int64 (K,) the views' slots
    teacher_views: torch.Tensor  # uint8 (K, 3, S_t, S_t) at the teacher's size, or (0,) without


# ----------------------------------------------------------------------------- view selection


def cycle_epochs(views_per_image: int, k: int) -> int:
    """Epochs of fresh views a store of R views per image gives at K views per step (R // K)."""
    if k > views_per_image:
        raise ConfigError(f"--crops-per-image {k} is more than the store's {views_per_image} views per image")
    return views_per_image // k


def select_slots(seed: int, image: int, epoch: int, views_per_image: int, k: int) -> np.ndarray:
    """int64 (K,): the stored view slots image ``image`` uses in epoch ``epoch`` (see module doc)."""
    per_cycle = cycle_epochs(views_per_image, k)
    cycle, j = divmod(int(epoch), per_cycle)
    perm = np.random.default_rng([int(seed), int(image), cycle, 0x51075]).permutation(views_per_image)
    return perm[j * k:(j + 1) * k].astype(np.int64)


def reuse_warning(views_per_image: int, k: int, epochs: int) -> str | None:
    """The one warning to print when ``epochs`` is more than the store's fresh views allow."""
    per_cycle = cycle_epochs(views_per_image, k)
    if epochs <= per_cycle:
        return None
    return (f"warning: the store holds {views_per_image} views per image, so {k} per step give {per_cycle} epochs "
            f"of unseen views; epochs {per_cycle + 1}-{epochs} reuse them in new orders "
            f"(generate more views with gen_targets.py --views-per-image to avoid it)")


# ----------------------------------------------------------------------------- sources


class StoreViews:
    """Stored views: ``take(image, epoch) -> (slots (K,), params float32 (K, P), targets float32 (K, D) | None)``."""

    needs_size = False

    def __init__(self, store, k: int, seed: int, read_targets: bool = True):
        self.store, self.k, self.seed, self.read_targets = store, k, seed, read_targets
        cycle_epochs(store.views_per_image, k)  # refuse K > R early

    @property
    def target_dim(self) -> int:
        return self.store.target_dim if self.read_targets else 0

    def take(self, image: int, epoch: int, height: int | None = None, width: int | None = None):
        slots = select_slots(self.seed, image, epoch, self.store.views_per_image, self.k)
        if self.read_targets:
            return (slots, *self.store.read(image, slots))
        return slots, self.store.params_batch(image, slots), None


class FreshViews:
    """New random views every epoch: slots ``FRESH_SLOT_BASE + epoch*K + v`` of ``cfg`` (no targets)."""

    needs_size = True
    target_dim = 0

    def __init__(self, cfg: ViewConfig, k: int, seed: int):
        self.cfg, self.k, self.seed = cfg, k, seed

    def take(self, image: int, epoch: int, height: int | None = None, width: int | None = None):
        slots = np.arange(self.k, dtype=np.int64) + FRESH_SLOT_BASE + int(epoch) * self.k
        return slots, sample_views(self.cfg, self.seed, image, slots, height, width), None


# ----------------------------------------------------------------------------- decoding


def decode_rgb(base, index: int, min_crop: tuple[float, float] | None = None, size: int = 0) -> torch.Tensor:
    """Image ``index`` of ``base`` as uint8 (3, H, W) (:func:`~fkd_ssl.data.image_io.read_uint8`: a JPEG
    drafted at the smallest scale at which every crop of ``min_crop`` keeps ``>= size`` pixels a side)."""
    if min_crop is None or not hasattr(base, "path"):
        return torch.from_numpy(np.array(base.load(index), dtype=np.uint8)).permute(2, 0, 1)
    return read_uint8(base.path(index), min_crop, size)


def _extra_augment(view: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The student-only extra augmentation: mild colour jitter (p 0.8, strength 0.2), grayscale p 0.1."""
    if rng.random() < 0.8:
        view = TF.adjust_brightness(view, float(rng.uniform(0.8, 1.2)))
        view = TF.adjust_contrast(view, float(rng.uniform(0.8, 1.2)))
        view = TF.adjust_saturation(view, float(rng.uniform(0.8, 1.2)))
    if rng.random() < 0.1:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    return view.contiguous()


# ----------------------------------------------------------------------------- the dataset


class ReplayDataset(Dataset):
    """Key ``(image, epoch)`` -> K views of the image from ``source`` (:class:`StoreViews`, :class:`FreshViews`)
    at the student's size, and with ``render_teacher`` also at the teacher's (``teacher_cfg``)."""

    def __init__(self, base, source, teacher_cfg: ViewConfig, student_size: int, render_teacher: bool = False,
                 extra_aug: bool = False, fast_decode: bool = False, seed: int = 0):
        self.base, self.source, self.teacher_cfg = base, source, teacher_cfg
        self.student_cfg = replace(teacher_cfg, size=int(student_size))
        self.sigma_scale = student_size / teacher_cfg.size
        self.render_teacher, self.extra_aug, self.fast_decode, self.seed = render_teacher, extra_aug, fast_decode, seed
        self.k = source.k

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        i, epoch = int(key[0]), int(key[1])
        if self.source.needs_size:
            img = decode_rgb(self.base, i)
            slots, params, targets = self.source.take(i, epoch, img.shape[1], img.shape[2])
        else:
            slots, params, targets = self.source.take(i, epoch)
            min_crop = (float(params[:, 2].min()), float(params[:, 3].min())) if self.fast_decode else None
            img = decode_rgb(self.base, i, min_crop, max(self.student_cfg.size,
                                                         self.teacher_cfg.size if self.render_teacher else 0))
        student_params = params.copy()
        student_params[:, _SIGMA] *= self.sigma_scale
        views = render_views(img, student_params, self.student_cfg)
        for v in range(self.k if self.extra_aug else 0):
            views[v] = _extra_augment(views[v], np.random.default_rng([self.seed, i, epoch, int(slots[v]), 0xE7A]))
        tviews = render_views(img, params, self.teacher_cfg) if self.render_teacher else torch.zeros(0, dtype=torch.uint8)
        t = torch.from_numpy(targets) if targets is not None else torch.zeros(self.k, 0)
        return ReplayBatch(views, t, i, torch.from_numpy(slots), tviews)
