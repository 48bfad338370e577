"""Fast linear probe: multinomial logistic regression (full-batch L-BFGS) on cached frozen features.

The protocol (held-out weight-decay sweep, then a refit) is in docs/evaluation.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from .knn import ranked_classes, topk_accuracy

DEFAULT_WDS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split indices of ``labels`` into sorted (fit, holdout), about ``fraction`` of each class held out."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"--holdout must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue
        take = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        held.append(rng.permutation(members)[:take])
    hold = np.sort(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels), dtype=np.int64), hold), hold


@dataclass
class LinearModel:
    """``logits = ((x - mean) / std) @ weight.T + bias``: weight (C, D), bias (C,), mean/std (D,)."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    iterations: int = 0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) raw features -> (N, C) logits."""
        x = x.to(self.weight.device, self.weight.dtype)
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (C, D), bias (C,)) of the same map on raw features: ``x @ weight.T + bias``."""
        weight = self.weight / self.std
        return weight, self.bias - weight @ self.mean


def standardizer(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (D,) of (N, D) features (constant dimensions get std 1)."""
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return mean, torch.where(std > eps, std, torch.ones_like(std))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float, *, max_iter: int = 100,
                 init: LinearModel | None = None, stats: tuple[torch.Tensor, torch.Tensor] | None = None,
                 tol: float = 1e-6) -> LinearModel:
    """Minimise ``mean CE + wd/2 ||W||^2`` on standardised ``x`` (N, D) with labels ``y`` (N,).

    ``stats`` = (mean, std) to standardise with (default: ``x``'s); ``init`` warm-starts from another fit.
    """
    if wd < 0:
        raise ConfigError(f"weight decay must be >= 0, got {wd}")
    if init is None:
        zeros = partial(torch.zeros, dtype=x.dtype, device=x.device)
        init = LinearModel(zeros(num_classes, x.shape[1]), zeros(num_classes), *(stats or standardizer(x)))
    mean, std = init.mean, init.std
    z = (x - mean) / std
    w, b = init.weight.clone().requires_grad_(True), init.bias.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + 0.5 * wd * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    iters = int(opt.state[opt._params[0]].get("n_iter", 0))
    return LinearModel(w.detach(), b.detach(), mean, std, iters)


def accuracy(logits: torch.Tensor, y: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent of (N, C) logits against (N,) labels; ties go to the lower class."""
    return {k: 100.0 * v for k, v in topk_accuracy(ranked_classes(logits, max(ks)), y, ks).items()}


@dataclass
class ProbeResult:
    """Val accuracy (percent) of the refit probe, the chosen weight decay and the sweep."""

    top1: float
    top5: float
    wd: float
    sweep: list[dict] = field(default_factory=list)
    iterations: int = 0
    predictions: np.ndarray | None = None
    model: LinearModel | None = None  # the refit probe (fast protocol)


def fast_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                      num_classes: int, *, wds: Sequence[float] = DEFAULT_WDS, holdout: float = 0.1, seed: int = 0,
                      max_iter: int = 100, device: torch.device | str = "cpu") -> ProbeResult:
    """The fast protocol (module docstring) on features ``train_x`` (N, D), ``val_x`` (M, D)."""
    if not wds:
        raise ConfigError("--wd needs at least one value")
    train_y = np.asarray(train_y, dtype=np.int64)
    val_y = np.asarray(val_y, dtype=np.int64)
    for what, y in (("train", train_y), ("val", val_y)):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{what} labels fall outside 0..{num_classes - 1}")
    xt = torch.as_tensor(np.asarray(train_x, dtype=np.float32), device=device)
    yt = torch.as_tensor(train_y, device=device)
    stats = standardizer(xt)
    fit_idx, hold_idx = stratified_holdout(train_y, holdout, seed)
    sweep: list[dict] = []
    best_wd, best_model = float(wds[0]), None
    if len(wds) > 1:
        if len(hold_idx) == 0:
            raise DataError("the train split is too small to hold out a part for the weight-decay sweep")
        fi, hi = torch.as_tensor(fit_idx, device=device), torch.as_tensor(hold_idx, device=device)
        best_acc = -1.0
        prev: LinearModel | None = None
        for wd in sorted((float(w) for w in wds), reverse=True):  # strong to weak, warm-started
            model = fit_logistic(xt[fi], yt[fi], num_classes, wd, max_iter=max_iter, init=prev, stats=stats)
            prev = model
            acc = accuracy(model.logits(xt[hi]), yt[hi], (1,))[1]
            sweep.append({"wd": wd, "holdout_top1": round(acc, 4), "iterations": model.iterations})
            if acc > best_acc:  # strict: among equals keep the larger weight decay
                best_acc, best_wd, best_model = acc, wd, model
    final = fit_logistic(xt, yt, num_classes, best_wd, max_iter=max_iter, init=best_model, stats=stats)
    logits = final.logits(torch.as_tensor(np.asarray(val_x, dtype=np.float32), device=device))
    vy = torch.as_tensor(val_y, device=device)
    acc = accuracy(logits, vy)
    return ProbeResult(acc[1], acc[5], best_wd, sweep, final.iterations, logits.argmax(1).cpu().numpy(), final)
