"""Deterministic, resumable, rank-aware batch sampling.

:class:`EpochBatchSampler` yields batches of keys ``(index, epoch)`` for every remaining epoch; the ranks'
slices of a global batch together equal the single-process run, and a resume yields the same batches.
:func:`group_loader` runs a function over fixed groups of images in DataLoader workers.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class _Groups(Dataset):
    def __init__(self, fn: Callable[[np.ndarray], Any], groups: Sequence[np.ndarray]):
        self.fn, self.groups = fn, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, g: int):
        return self.fn(self.groups[g])


def group_loader(fn: Callable[[np.ndarray], Any], groups: Sequence[np.ndarray], workers: int,
                 pin_memory: bool = False) -> DataLoader:
    """``fn(group)`` of every group in order, computed in ``workers`` processes (``fn`` must pickle); the
    items come as ``fn`` returns them (no collation, numpy arrays stay arrays)."""
    return DataLoader(_Groups(fn, groups), batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      collate_fn=_as_is, prefetch_factor=4 if workers > 0 else None)


def _as_is(item):
    return item


class EpochBatchSampler(Sampler):
    def __init__(self, indices: Sequence[int], batch_size: int, epochs: int, seed: int = 0, rank: int = 0,
                 world: int = 1, start_epoch: int = 0, start_batch: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size, self.epochs, self.seed = batch_size, epochs, seed
        self.rank, self.world = rank, world
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.shuffle, self.drop_last = shuffle, drop_last
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.indices)} images cannot fill one batch of {batch_size} x {world} processes; "
                             f"lower --batch-size")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.indices)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def order(self, epoch: int) -> np.ndarray:
        """All indices in epoch ``epoch``'s order."""
        if not self.shuffle:
            return self.indices
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        return self.indices[rng.permutation(len(self.indices))]

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[tuple[int, int]]]:
        order = self.order(epoch)
        for b in range(start, self.steps_per_epoch):
            chunk = order[b * self.global_batch:(b + 1) * self.global_batch]
            per = -(-len(chunk) // self.world)
            mine = chunk[self.rank * per:(self.rank + 1) * per]
            if len(mine):
                yield [(int(i), epoch) for i in mine]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for e in range(self.start_epoch, self.epochs):
            yield from self.batches(e, self.start_batch if e == self.start_epoch else 0)

    def __len__(self) -> int:
        return max(0, (self.epochs - self.start_epoch) * self.steps_per_epoch - self.start_batch)


def spread_views(batches, window: int, per_epoch: int, start_batch: int = 0, seed: int = 0):
    """Spread the K views of each decoded image over ``window`` consecutive steps (``window``: a multiple of K).

    ``batches`` yields NamedTuple batches of ``b`` images x K views (per-view fields ``(b, K, ...)``, per-image
    fields ``(b, ...)``); each aligned group of ``window`` of them (counted from each epoch's start) comes out as
    ``window`` batches of ``b * K`` distinct images x 1 view.  Image ``i`` of the group goes to offset
    ``g(i)`` (a seeded balanced assignment) and its view ``v`` to step ``(g(i) + v * window / K) % window``, so every
    batch keeps its size and an image's views are ``window / K`` steps apart.  The tail of an epoch that does not fill
    a group passes through unchanged.  The steps stay aligned with the input's, so a resume at a group
    boundary (``start_batch``) continues as the uninterrupted run does."""
    pos, group = start_batch % per_epoch, []
    for batch in batches:
        group.append(batch)
        pos += 1
        if pos == per_epoch or len(group) == window:
            if len(group) == window:
                yield from _spread(group, window, seed, pos // window)
            else:
                yield from group
            group, pos = [], pos % per_epoch


def _spread(group: list, window: int, seed: int, tag: int) -> list:
    first = group[0]
    b, k = first.views.shape[:2]
    if window % k:
        raise ValueError(f"the spread window ({window} steps) must be a multiple of K = {k}")
    whole = type(first)(*(torch.cat([getattr(g, f) for g in group]) for f in first._fields))  # (window*b, ...)
    images = window * b
    offset = torch.from_numpy(np.random.default_rng([seed, tag, int(whole.image[0]), 0x5B7EAD]).permutation(images) % window)
    out = []
    for step in range(window):
        parts = []
        for v in range(k):
            rows = torch.nonzero(offset == (step - v * (window // k)) % window).flatten()
            parts.append((rows, v))
        fields = []
        for f in first._fields:
            t = getattr(whole, f)
            per_view = t.dim() >= 2 and t.shape[1] == k
            fields.append(torch.cat([t[rows, v:v + 1] if per_view else t[rows] for rows, v in parts]))
        out.append(type(first)(*fields))
    return out
