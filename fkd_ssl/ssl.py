"""Self-supervised teachers: MoCo v2 and SimSiam, from lightly components and a timm backbone.

Each method is an ``nn.Module`` *task* for :mod:`fkd_ssl.engine`: ``forward(batch, progress)``
takes ``batch = (views, labels, indices)`` with two augmented views per image, uint8
``(B, 2, 3, S, S)``, and returns ``(loss, metrics)``.  :meth:`export` gives the :class:`~fkd_ssl.models.Encoder` to save.

MoCo v2: query encoder + momentum (key) encoder with the MLP projection head
(``lightly.models.modules.MoCoProjectionHead``), InfoNCE at temperature 0.2 against a FIFO
queue of keys (``lightly``'s ``MemoryBankModule``, gathered across ranks); the loss is
symmetrised over the two views and both terms use the queue as it was before this step (the
step's own keys would otherwise be false negatives).  The queue is a non-persistent buffer in
lightly, so :meth:`MoCo.extra_state` saves it explicitly.

SimSiam: projection + prediction heads (lightly), symmetric negative cosine with stop-grad.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .models import Encoder
from .views import normalize

METHODS = ("moco", "simsiam")


def infonce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with one positive per row.

    q, k: (B, D) L2-normalised; negatives: (N, D) L2-normalised. Returns the mean loss.
    """
    pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    neg = q @ negatives.t()  # (B, N)
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class _Task(nn.Module):
    """Shared plumbing: uint8 views -> normalised float input on the model's device."""

    def __init__(self, encoder: Encoder, channels_last: bool = False):
        super().__init__()
        self.encoder = encoder
        self.channels_last = channels_last

    def prep(self, u8: torch.Tensor) -> torch.Tensor:
        x = normalize(u8, self.encoder.spec.mean, self.encoder.spec.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def export(self) -> Encoder:
        return self.encoder

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


class MoCo(_Task):
    """MoCo v2 (see module docstring). The key encoder is an EMA with a constant ``momentum``
    (MoCo v2 uses 0.999 for 200+ epochs; short runs need a faster-tracking key encoder)."""

    def __init__(self, encoder: Encoder, queue_size: int = 4096, temperature: float = 0.2,
                 momentum: float = 0.99, channels_last: bool = False, distributed: bool = False):
        super().__init__(encoder, channels_last)
        from lightly.models.modules.memory_bank import MemoryBankModule
        from lightly.models.utils import deactivate_requires_grad

        if encoder.projector is None:
            raise ValueError("MoCo needs an encoder with a projection head")
        self.momentum_encoder = copy.deepcopy(encoder)
        deactivate_requires_grad(self.momentum_encoder)
        self.queue = MemoryBankModule(size=(queue_size, encoder.spec.head_out), gather_distributed=distributed,
                                      feature_dim_first=False)
        self.temperature = temperature
        self.base_momentum = momentum

    def forward(self, batch, progress: float = 0.0) -> tuple[torch.Tensor, dict]:
        from lightly.models.utils import update_momentum

        views = batch[0]
        m = self.base_momentum
        x1, x2 = self.prep(views[:, 0]), self.prep(views[:, 1])
        q1 = F.normalize(self.encoder.project(x1), dim=1)
        q2 = F.normalize(self.encoder.project(x2), dim=1)
        with torch.no_grad():
            if self.training:
                update_momentum(self.encoder, self.momentum_encoder, m)
            k1 = F.normalize(self.momentum_encoder.project(x1), dim=1)
            k2 = F.normalize(self.momentum_encoder.project(x2), dim=1)
        _, negatives = self.queue(k2, update=self.training)
        negatives = negatives.to(q1.dtype)
        loss = 0.5 * (infonce(q1, k2, negatives, self.temperature) + infonce(q2, k1, negatives, self.temperature))
        with torch.no_grad():
            pos = 0.5 * ((q1 * k2).sum(1).mean() + (q2 * k1).sum(1).mean())
        return loss, {"pos_sim": float(pos), "momentum": m}

    def extra_state(self) -> dict:
        return {"queue": self.queue.bank.detach().cpu().clone(), "queue_ptr": self.queue.bank_ptr.detach().cpu().clone()}

    def load_extra_state(self, state: dict) -> None:
        self.queue.bank.copy_(state["queue"])
        self.queue.bank_ptr.copy_(state["queue_ptr"])


class SimSiam(_Task):
    """SimSiam: symmetric negative cosine between predictions and stop-grad projections."""

    def __init__(self, encoder: Encoder, channels_last: bool = False):
        super().__init__(encoder, channels_last)
        if encoder.projector is None or encoder.predictor is None:
            raise ValueError("SimSiam needs an encoder with projection and prediction heads")

    def forward(self, batch, progress: float = 0.0) -> tuple[torch.Tensor, dict]:
        views = batch[0]
        x1, x2 = self.prep(views[:, 0]), self.prep(views[:, 1])
        z1, z2 = self.encoder.project(x1), self.encoder.project(x2)
        p1, p2 = self.encoder.predictor(z1), self.encoder.predictor(z2)
        loss = -0.5 * (F.cosine_similarity(p1, z2.detach(), dim=1).mean()
                       + F.cosine_similarity(p2, z1.detach(), dim=1).mean())
        with torch.no_grad():
            std = F.normalize(z1, dim=1).std(dim=0).mean() * math.sqrt(z1.shape[1])  # ~1 when not collapsed
        return loss, {"z_std": float(std)}
