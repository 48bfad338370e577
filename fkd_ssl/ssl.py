"""Self-supervised teachers: MoCo v2 and SimSiam, from lightly components and a timm backbone.

Each is a :class:`~fkd_ssl.engine.Task` on :class:`~fkd_ssl.views.ViewsBatch` pairs; the objectives are in
:mod:`fkd_ssl.objectives`.
"""

from __future__ import annotations

import torch

from .engine import Task
from .models import Encoder
from .objectives.moco import MoCoObjective
from .objectives.simsiam import collapse_std, simsiam_loss

METHODS = ("moco", "simsiam")


class _SSLTask(Task):
    def __init__(self, encoder: Encoder, channels_last: bool = False):
        super().__init__()
        self.encoder = encoder
        self.channels_last = channels_last

    def export(self) -> Encoder:
        return self.encoder


class MoCo(_SSLTask):
    """MoCo v2 (see module docstring). The key encoder is an EMA with a constant ``momentum``
    (MoCo v2 uses 0.999 for 200+ epochs; short runs need a faster-tracking key encoder)."""

    def __init__(self, encoder: Encoder, queue_size: int = 4096, temperature: float = 0.2,
                 momentum: float = 0.99, channels_last: bool = False, distributed: bool = False):
        super().__init__(encoder, channels_last)
        if encoder.projector is None:
            raise ValueError("MoCo needs an encoder with a projection head")
        self.objective = MoCoObjective(encoder, queue_size, temperature, momentum, distributed)

    def forward(self, batch, progress: float = 0.0) -> tuple[torch.Tensor, dict]:
        x1, x2 = self.prep(batch.views[:, 0]), self.prep(batch.views[:, 1])
        loss, pos = self.objective(self.encoder, x1, x2, self.encoder.project(x1), self.encoder.project(x2))
        return loss, {"pos_sim": pos, "momentum": self.objective.momentum}

    def extra_state(self) -> dict:
        return self.objective.state()

    def load_extra_state(self, state: dict) -> None:
        self.objective.load(state)


class SimSiam(_SSLTask):
    """SimSiam: symmetric negative cosine between predictions and stop-grad projections."""

    def __init__(self, encoder: Encoder, channels_last: bool = False):
        super().__init__(encoder, channels_last)
        if encoder.projector is None or encoder.predictor is None:
            raise ValueError("SimSiam needs an encoder with projection and prediction heads")

    def forward(self, batch, progress: float = 0.0) -> tuple[torch.Tensor, dict]:
        x1, x2 = self.prep(batch.views[:, 0]), self.prep(batch.views[:, 1])
        z1, z2 = self.encoder.project(x1), self.encoder.project(x2)
        loss = simsiam_loss(z1, z2, self.encoder.predictor(z1), self.encoder.predictor(z2))
        return loss, {"z_std": collapse_std(z1)}
