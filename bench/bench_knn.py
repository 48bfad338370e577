"""Benchmark: exact cosine kNN queries/s, faiss (the evaluator's path) vs plain torch matmul + topk.

    python bench/bench_knn.py                       # 200k x 128 bank, 2048 queries, k = 20, CPU
    python bench/bench_knn.py --bank 1281167 --dim 2048 --device cuda

Both sides search the same L2-normalised float32 bank in query chunks of the same size and
return the top-k; the bank is prepared (normalised / indexed) once, outside the timing.  Each
side runs ``--repeat`` times after a warm-up and the best time is kept.  It prints queries/s of
each, their ratio (measured in this one run; machines differ, so no absolute time is asserted
anywhere) and how often the two agree on the neighbours.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from fkd_ssl.cli import parser, positive_int, run_main
from fkd_ssl.dist import resolve_device
from fkd_ssl.evaluation.knn import make_index, faiss_gpu_available, knn_search, l2_normalize


def torch_knn(bank: torch.Tensor, queries: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (M, D) unit queries x (N, D) unit bank -> top-k (sims, indices), chunked matmul + topk."""
    sims, idx = [], []
    for q0 in range(0, len(queries), chunk):
        s, i = torch.topk(queries[q0:q0 + chunk] @ bank.T, k, dim=1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def _best_time(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("kNN queries/s: faiss vs plain torch on a random bank.")
    p.add_argument("--bank", type=positive_int("--bank"), default=200_000, help="bank vectors (>= 100k for the claim)")
    p.add_argument("--dim", type=positive_int("--dim"), default=128)
    p.add_argument("--queries", type=positive_int("--queries"), default=2048)
    p.add_argument("--k", type=positive_int("--k"), default=20)
    p.add_argument("--chunk", type=positive_int("--chunk"), default=1024, help="queries per search call (both sides)")
    p.add_argument("--repeat", type=positive_int("--repeat"), default=2)
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    rng = np.random.default_rng(args.seed)
    bank = l2_normalize(rng.standard_normal((args.bank, args.dim), dtype=np.float32))
    queries = l2_normalize(rng.standard_normal((args.queries, args.dim), dtype=np.float32))

    use_gpu = device.type == "cuda" and faiss_gpu_available()
    index = make_index(args.dim, use_gpu, device.index or 0)
    index.add(bank)
    out: dict[str, np.ndarray] = {}

    def run_faiss() -> None:
        parts = [index.search(queries[q0:q0 + args.chunk], args.k)[1] for q0 in range(0, len(queries), args.chunk)]
        out["faiss"] = np.concatenate(parts)

    tb, tq = torch.from_numpy(bank).to(device), torch.from_numpy(queries).to(device)

    def run_torch() -> None:
        _, i = torch_knn(tb, tq, args.k, args.chunk)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out["torch"] = i.cpu().numpy()

    t_faiss = _best_time(run_faiss, args.repeat)
    t_torch = _best_time(run_torch, args.repeat)
    t_e2e = _best_time(lambda: knn_search(bank, queries, args.k, query_chunk=args.chunk, use_gpu=use_gpu), 1)

    top1_agree = float(np.mean(out["faiss"][:, 0] == out["torch"][:, 0]))
    recall = float(np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(out["faiss"], out["torch"])]))
    qps_f, qps_t = args.queries / t_faiss, args.queries / t_torch
    where = f"{device.type}" + (" (faiss-gpu)" if use_gpu else " (faiss-cpu)" if device.type == "cuda" else "")
    print(f"bank {args.bank} x {args.dim}, {args.queries} queries, k={args.k}, chunk {args.chunk}, {where}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"faiss IndexFlatIP : {qps_f:10.0f} queries/s ({t_faiss:.3f} s)")
    print(f"torch matmul+topk : {qps_t:10.0f} queries/s ({t_torch:.3f} s)")
    print(f"knn_search end-to-end (normalise + index + search): {args.queries / t_e2e:10.0f} queries/s")
    print(f"ratio faiss/torch = {qps_f / qps_t:.2f}x; same nearest neighbour {100 * top1_agree:.2f}%, "
          f"top-{args.k} overlap {100 * recall:.2f}%")
    return 0


if __name__ == "__main__":
    run_main(main)
