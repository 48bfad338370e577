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
                 world: int = 1, start_epoch: int = 0, start_batch: int = 0):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size, self.epochs, self.seed = batch_size, epochs, seed
        self.rank, self.world = rank, world
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.steps_per_epoch = len(self.indices) // (batch_size * world)  # a last partial global batch is dropped
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.indices)} images cannot fill one batch of {batch_size} x {world} processes; "
                             f"lower --batch-size")

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[tuple[int, int]]]:
        """This rank's slice of each global batch of epoch ``epoch`` from batch ``start`` on."""
        order = self.indices[np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self.indices))]
        for b in range(start, self.steps_per_epoch):
            first = (b * self.world + self.rank) * self.batch_size
            yield [(int(i), epoch) for i in order[first:first + self.batch_size]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for e in range(self.start_epoch, self.epochs):
            yield from self.batches(e, self.start_batch if e == self.start_epoch else 0)

    def __len__(self) -> int:
        return max(0, (self.epochs - self.start_epoch) * self.steps_per_epoch - self.start_batch)


def spread_views(batches, window: int, per_epoch: int, start_batch: int = 0, seed: int = 0):
    """Spread the K views of each decoded image over ``window`` consecutive steps (``window``: a multiple of K;
    docs/distill.md, "Spread").  ``batches`` yields NamedTuple batches of ``b`` images x K views (per-view fields
    ``(b, K, ...)``); each aligned group of ``window`` of them comes out as ``window`` batches of ``b * K`` distinct
    images x 1 view.  A resume at a group boundary (``start_batch``) continues as the uninterrupted run does."""
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
    rng = np.random.default_rng([seed, tag, int(whole.image[0]), 0x5B7EAD])
    offset = torch.from_numpy(rng.permutation(window * b) % window)  # each image's step offset in the group
    per_view = [t.dim() >= 2 and t.shape[1] == k for t in whole]
    out = []
    for step in range(window):
        parts = [(torch.nonzero(offset == (step - v * (window // k)) % window).flatten(), v) for v in range(k)]
        out.append(type(first)(*(torch.cat([t[rows, v:v + 1] if pv else t[rows] for rows, v in parts])
                                 for t, pv in zip(whole, per_view))))
    return out
