"""k-nearest-neighbour classification of frozen features (exact cosine search with faiss).

Banks are indexed in chunks and their top-k merged; voting (weighted / majority) is in docs/evaluation.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_T = 0.07
VOTES = ("weighted", "majority")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """(N, D) any float dtype -> (N, D) float32 rows of unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def faiss_gpu_available() -> bool:
    """True when the installed faiss has GPU support and a CUDA device is visible."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and torch.cuda.is_available()


_GPU_RESOURCES: dict[int, object] = {}  # one StandardGpuResources per device, alive for the process


def make_index(dim: int, use_gpu: bool, gpu_device: int = 0):
    """An empty exact inner-product index of dimension ``dim`` (faiss GPU index if ``use_gpu``)."""
    import faiss

    if use_gpu:
        if gpu_device not in _GPU_RESOURCES:  # the index does not own its resources: keep them alive here
            _GPU_RESOURCES[gpu_device] = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = gpu_device
        return faiss.GpuIndexFlatIP(_GPU_RESOURCES[gpu_device], dim, cfg)
    return faiss.IndexFlatIP(dim)


def _merge_topk(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray, k: int):
    """Merge two (M, k) top-k lists (similarities descending) into one."""
    cat_s, cat_i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i], axis=1)
    order = np.argsort(-cat_s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cat_s, order, 1), np.take_along_axis(cat_i, order, 1)


def knn_search(bank: np.ndarray, queries: np.ndarray, k: int, *, query_chunk: int = 8192,
               bank_chunk: int | None = None, use_gpu: bool | None = None,
               gpu_device: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of each query among the bank rows: ``sims`` (M, k) float32 descending,
    ``indices`` (M, k) int64.  ``bank_chunk`` rows are indexed at a time."""
    n, d = bank.shape
    m = queries.shape[0]
    if queries.ndim != 2 or queries.shape[1] != d:
        raise ConfigError(f"query features have shape {queries.shape}, the bank {bank.shape}")
    if not 1 <= k <= n:
        raise ConfigError(f"--k {k}: must be between 1 and the bank size {n}")
    if use_gpu is None:
        use_gpu = faiss_gpu_available()
    if bank_chunk is None:
        bank_chunk = max(1, (2 << 30) // (4 * d))
    sims = np.full((m, k), -np.inf, dtype=np.float32)
    idx = np.full((m, k), -1, dtype=np.int64)
    for b0 in range(0, n, bank_chunk):
        shard = l2_normalize(bank[b0:b0 + bank_chunk])
        index = make_index(d, use_gpu, gpu_device)
        index.add(shard)
        kk = min(k, shard.shape[0])
        for q0 in range(0, m, query_chunk):
            q = l2_normalize(queries[q0:q0 + query_chunk])
            s, i = index.search(q, kk)
            i = i.astype(np.int64) + b0
            if kk < k:  # pad a short last shard
                s = np.pad(s, ((0, 0), (0, k - kk)), constant_values=-np.inf)
                i = np.pad(i, ((0, 0), (0, k - kk)), constant_values=-1)
            rows = slice(q0, q0 + len(q))  # merged into the (-inf, -1) start, the first shard is itself
            sims[rows], idx[rows] = _merge_topk(sims[rows], idx[rows], s, i, k)
        del index, shard
    return sims, idx


def vote(neighbor_labels: torch.Tensor, neighbor_sims: torch.Tensor, num_classes: int, mode: str = "weighted",
         temperature: float = DEFAULT_T) -> torch.Tensor:
    """Class scores (M, C) from the neighbours' labels and similarities (M, k): ``weighted`` or ``majority``."""
    m = neighbor_labels.shape[0]
    sims = neighbor_sims.double()
    scores = torch.zeros((m, num_classes), dtype=torch.float64)
    if mode == "weighted":
        scores.scatter_add_(1, neighbor_labels, torch.exp(sims / temperature))
    elif mode == "majority":
        scores.scatter_add_(1, neighbor_labels, torch.ones_like(sims))
        best = torch.full((m, num_classes), -1.0, dtype=torch.float64)
        best.scatter_reduce_(1, neighbor_labels, sims, reduce="amax", include_self=True)
        scores += (best.clamp(-1.0, 1.0) + 1.0) / 4.0 * (scores > 0)
    else:
        raise ConfigError(f"vote {mode!r}: one of {', '.join(VOTES)}")
    return scores


def ranked_classes(scores: torch.Tensor, top: int = 5) -> torch.Tensor:
    """(M, C) scores -> (M, min(top, C)) class indices, best first; ties go to the lower index."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :top]


def topk_accuracy(ranked: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction (0..1) of rows whose label is among the first k ranked classes, for each k."""
    hit = ranked == labels[:, None]
    return {k: float(hit[:, :k].any(dim=1).double().mean()) for k in ks}


@dataclass
class KnnResult:
    """One (vote, k) evaluation: accuracies in percent and the (M,) top-1 predictions."""

    vote: str
    k: int
    temperature: float | None
    top1: float
    top5: float
    predictions: np.ndarray


def knn_evaluate(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
                 num_classes: int, ks: Sequence[int] = DEFAULT_KS, majority_ks: Sequence[int] = (1,),
                 temperature: float = DEFAULT_T, *, query_chunk: int = 8192, bank_chunk: int | None = None,
                 use_gpu: bool | None = None) -> list[KnnResult]:
    """Search once with the largest k, then one :class:`KnnResult` per weighted k, then per majority k."""
    if temperature <= 0:
        raise ConfigError(f"--temperature must be positive, got {temperature}")
    all_k = list(ks) + list(majority_ks)
    if not all_k:
        raise ConfigError("no k to evaluate: give --k and/or --majority-k")
    kmax = max(all_k)
    if min(all_k) < 1 or kmax > len(bank):
        raise ConfigError(f"--k values must be between 1 and the bank size {len(bank)}, got {sorted(set(all_k))}")
    sims, idx = knn_search(bank, queries, kmax, query_chunk=query_chunk, bank_chunk=bank_chunk, use_gpu=use_gpu)
    bank_labels_t = torch.as_tensor(np.asarray(bank_labels, dtype=np.int64))
    labels_t = torch.as_tensor(np.asarray(query_labels, dtype=np.int64))
    nb_labels = bank_labels_t[torch.from_numpy(idx)]
    nb_sims = torch.from_numpy(sims)
    results = []
    for mode, k_list in (("weighted", ks), ("majority", majority_ks)):
        for k in k_list:
            r = torch.cat([ranked_classes(vote(nb_labels[q0:q0 + query_chunk, :k], nb_sims[q0:q0 + query_chunk, :k],
                                               num_classes, mode, temperature))
                           for q0 in range(0, len(labels_t), query_chunk)])
            acc = topk_accuracy(r, labels_t)
            results.append(KnnResult(mode, int(k), temperature if mode == "weighted" else None,
                                     100.0 * acc[1], 100.0 * acc[5], r[:, 0].numpy()))
    return results
