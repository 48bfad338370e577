"""Run a teacher once over R views of every image and fill a target store.

Views go through the teacher in fixed groups of images aligned to shard starts, so a resumed or
multi-process store is byte-identical; unreadable images are recorded as skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np
import torch

from .data.datasets import IndexedDataset
from .data.image_io import load_uint8
from .data.sampler import group_loader
from .progress import bar
from .store import StoreWriter
from .teacher import TeacherTargets
from .views import ViewConfig, render_views, sample_views


class ImageViews(NamedTuple):
    """The R rendered views of one image, or why it could not be read."""

    image: int
    views: torch.Tensor | None  # uint8 (R, 3, S, S)
    params: np.ndarray | None  # float32 (R, P)
    error: str | None
    size: tuple[int, int] | None = None  # (height, width) of the image


def image_views(base: IndexedDataset, cfg: ViewConfig, seed: int, views: int, group) -> list[ImageViews]:
    """The :class:`ImageViews` of every image of ``group`` (a list of indices)."""
    out = []
    for i in map(int, group):
        img, err = load_uint8(base, i)
        if img is None:
            out.append(ImageViews(i, None, None, err))
            continue
        _, h, w = img.shape
        params = sample_views(cfg, seed, i, range(views), h, w)
        out.append(ImageViews(i, render_views(img, params, cfg), params, None, (h, w)))
    return out


def plan_groups(writer: StoreWriter, group: int) -> list[np.ndarray]:
    """Groups (arrays of image indices) of this writer's shards that still have missing images."""
    missing, groups = set(writer.missing_images().tolist()), []
    for s in writer.shards:
        shard = np.arange(s * writer.shard_size, min((s + 1) * writer.shard_size, writer.num_images), dtype=np.int64)
        groups += [g for g in np.split(shard, range(group, len(shard), group)) if missing.intersection(g.tolist())]
    return groups


@dataclass
class GenStats:
    images: int
    views: int
    skipped: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    @property
    def views_per_s(self) -> float:
        return self.views / max(self.seconds, 1e-9)


def generate(teacher: TeacherTargets, base: IndexedDataset, writer: StoreWriter, cfg: ViewConfig, seed: int,
             batch_size: int, workers: int, device: torch.device, group: int, amp: bool = True,
             show_progress: bool = True) -> GenStats:
    """Compute and write every missing record of ``writer``'s shards; returns throughput."""
    R = writer.views_per_image
    groups = plan_groups(writer, group)
    cuda = device.type == "cuda"
    loader = group_loader(partial(image_views, base, cfg, seed, R), groups, workers, pin_memory=cuda)
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    n_img = n_views = n_skip = 0
    t0 = time.time()
    pbar = bar(sum(len(g) for g in groups), "teacher", "img", enabled=show_progress)
    for items in loader:
        good = [it for it in items if it.error is None]
        for it in items:
            if it.error is not None:
                writer.skip(it.image, base.source(it.image), it.error)
                n_skip += 1
        if good:
            views = torch.cat([it.views for it in good]).to(device, non_blocking=True)
            outs = []
            with torch.autocast(device.type, dtype=amp_dtype, enabled=cuda and amp):
                for c in range(0, len(views), batch_size):
                    outs.append(teacher(views[c:c + batch_size]).float().cpu())
            targets = torch.cat(outs).numpy().reshape(len(good), R, -1)
            params = np.stack([it.params for it in good]).astype(np.float32)
            writer.write(np.array([it.image for it in good]), params, targets, sizes=[it.size for it in good])
            n_img += len(good)
            n_views += len(views)
        pbar.update(len(items))
        dt = max(time.time() - t0, 1e-9)
        pbar.set_postfix(img_s=f"{n_img / dt:.1f}", views_s=f"{n_views / dt:.0f}", skipped=n_skip, refresh=False)
    pbar.close()
    return GenStats(n_img, n_views, n_skip, time.time() - t0)

