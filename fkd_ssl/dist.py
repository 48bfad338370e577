"""The one distributed helper: torchrun (DDP) or a single process, CPU or CUDA. Without torchrun every collective below
is a no-op; only rank 0 logs and writes shared files."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(flag: str, local_rank: int = 0) -> torch.device:
    """``--device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    if flag not in DEVICES:
        raise ConfigError(f"--device {flag!r}: one of {', '.join(DEVICES)}")
    if flag == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here (use --device cpu)")
    if flag == "cuda" or (flag == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


_users = 0  # setup() calls not yet matched by cleanup(): the group lives while any caller uses it


def setup(device: str = "auto", timeout_s: int = 1800) -> DistContext:
    """Initialise from torchrun's environment if present; else a single process.  Calls nest: only
    the outermost :func:`cleanup` destroys the group."""
    global _users
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1:
        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
        _users += 1
    return DistContext(rank, world, local, dev)


def cleanup() -> None:
    """End one :func:`setup`; the last one destroys the process group."""
    global _users
    _users = max(_users - 1, 0)
    if dist.is_initialized() and _users == 0:
        dist.destroy_process_group()


@contextmanager
def session(device: str = "auto"):
    """A command's body: :func:`setup` before it, :func:`cleanup` after it (also on error)."""
    ctx = setup(device)
    try:
        yield ctx
    finally:
        cleanup()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def main_first(ctx: DistContext):
    """Rank 0 runs the block first (e.g. generating a dataset), then the others."""
    if not ctx.is_main:
        barrier()
    yield
    if ctx.is_main:
        barrier()


def rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes ((0, 1) without a process group)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor along dim 0 over ranks (sizes may differ per rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    padded = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


def agree(*flags: bool, device: torch.device | None = None) -> tuple[bool, ...]:
    """Rank 0's ``flags`` on every rank (one broadcast).  Decisions a rank takes from its own
    clock -- a time limit, a periodic checkpoint -- must be the same on every rank, or one rank
    waits in a barrier while another waits in DDP's all-reduce."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.uint8, device=device)
    dist.broadcast(t, 0)
    return tuple(bool(v) for v in t.tolist())


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
