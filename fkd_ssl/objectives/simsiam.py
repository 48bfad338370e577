"""SimSiam's objective: symmetric negative cosine between predictions and stop-grad projections."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def simsiam_loss(z1: torch.Tensor, z2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``, each term averaged over the rows; all (B, D)."""
    return -0.5 * (F.cosine_similarity(p1, z2.detach(), dim=1).mean()
                   + F.cosine_similarity(p2, z1.detach(), dim=1).mean())


@torch.no_grad()
def collapse_std(z: torch.Tensor) -> float:
    """Mean per-dim std of the L2-normalised rows of ``z`` (B, D), times sqrt(D): ~1 when not collapsed."""
    return float(F.normalize(z, dim=1).std(dim=0).mean() * math.sqrt(z.shape[1]))
