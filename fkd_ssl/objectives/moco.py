"""MoCo v2's objective: a momentum (key) encoder, a FIFO queue of keys and symmetric InfoNCE.

Both loss terms use the queue as it was before the step; :meth:`MoCoObjective.state` saves the queue.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..models import Encoder


def infonce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with one positive per row: q, k (B, D) and negatives (N, D), L2-normalised; the mean loss."""
    pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    neg = q @ negatives.t()  # (B, N)
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class MoCoObjective(nn.Module):
    """Key encoder (EMA of ``encoder``) + queue; ``forward(online, x1, x2, z1, z2) -> (loss, pos_sim)``."""

    def __init__(self, encoder: Encoder, queue_size: int = 4096, temperature: float = 0.2, momentum: float = 0.99,
                 distributed: bool = False):
        super().__init__()
        from lightly.models.modules.memory_bank import MemoryBankModule

        self.momentum_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.queue = MemoryBankModule(size=(queue_size, encoder.spec.head_out), gather_distributed=distributed,
                                      feature_dim_first=False)
        self.temperature, self.momentum = temperature, momentum

    def forward(self, online: Encoder, x1: torch.Tensor, x2: torch.Tensor, z1: torch.Tensor,
                z2: torch.Tensor) -> tuple[torch.Tensor, float]:
        from lightly.models.utils import update_momentum

        q1, q2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        with torch.no_grad():
            if self.training:
                update_momentum(online, self.momentum_encoder, self.momentum)
            k1 = F.normalize(self.momentum_encoder.project(x1), dim=1)
            k2 = F.normalize(self.momentum_encoder.project(x2), dim=1)
        _, negatives = self.queue(k2, update=self.training)
        negatives = negatives.to(q1.dtype)
        t = self.temperature
        loss = 0.5 * (infonce(q1, k2, negatives, t) + infonce(q2, k1, negatives, t))
        with torch.no_grad():
            pos = 0.5 * ((q1 * k2).sum(1).mean() + (q2 * k1).sum(1).mean())
        return loss, float(pos)

    def state(self) -> dict:
        bank = self.queue
        return {"queue": bank.bank.detach().cpu().clone(), "queue_ptr": bank.bank_ptr.detach().cpu().clone()}

    def load(self, state: dict) -> None:
        self.queue.bank.copy_(state["queue"])
        self.queue.bank_ptr.copy_(state["queue_ptr"])
