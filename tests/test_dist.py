"""fkd_ssl.dist: nested setup/cleanup share one process group; agree() gives every rank rank 0's
decision (two gloo processes)."""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    import torch
    import torch.distributed as dist

    from fkd_ssl import dist as fdist

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    outer = fdist.setup("cpu")  # the quick start
    inner = fdist.setup("cpu")  # a stage's main() inside it
    states = [dist.is_initialized()]
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    agreed = fdist.agree(rank == 0, rank == 1)  # each rank's own clock says something else
    fdist.cleanup()  # the stage ends: the quick start's group lives on
    states.append(dist.is_initialized())
    u = torch.tensor([1.0])
    dist.all_reduce(u)
    fdist.cleanup()  # the quick start ends
    states.append(dist.is_initialized())
    results[rank] = (outer.world_size, inner.rank, states, t.item(), u.item(), agreed)


def test_nested_setup_shares_the_group_and_the_outermost_cleanup_ends_it():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        world, inner_rank, states, total, count, agreed = results[rank]
        assert world == 2 and inner_rank == rank
        assert states == [True, True, False]
        assert total == 3.0 and count == 2.0
        assert agreed == (True, False)  # rank 0's decision on both ranks


def test_single_process_is_a_noop():
    from fkd_ssl import dist as fdist

    env = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK") if k in os.environ}
    try:
        ctx = fdist.setup("cpu")
        assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
        assert fdist.agree(True, False) == (True, False)
        fdist.cleanup()
        fdist.cleanup()  # unmatched cleanups are harmless
        assert fdist._users == 0
    finally:
        os.environ.update(env)
