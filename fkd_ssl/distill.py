"""The distillation task: a student learns a teacher's targets for replayed views.

:class:`DistillTask` is an :mod:`fkd_ssl.engine` task.  Its batches come from
:class:`~fkd_ssl.replay.ReplayDataset`: ``(views uint8 (B, K, 3, S, S), targets float32
(B, K, D), image int64 (B,), slots int64 (B, K), teacher_views uint8 (B, K, 3, S_t, S_t))``.
The targets are the store's (FKD: no teacher forward) or, with an online teacher, the
teacher's outputs on ``teacher_views`` computed at every step (the vanilla-KD baselines).

The student is an :class:`~fkd_ssl.models.Encoder` (timm backbone + lightly
``MoCoProjectionHead`` to the target dim, optional ``SimSiamPredictionHead``); its output for
a view is the predictor's output if it has one, else the projection.  Optionally the student
also minimises its own SSL objective between views 0 and 1 of each image (DisCo-style;
still no teacher forward): ``moco`` (momentum encoder + queue of keys, :func:`fkd_ssl.ssl.infonce`)
or ``simsiam`` (negative cosine between predictions and stop-grad projections).

Helpers check what a student run is given: :func:`open_store` (the store exists, is complete
and was made from ``--data``), :func:`check_head_dim`, :func:`build_student`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .losses import DistillLoss
from .models import Encoder, ModelSpec
from .views import ViewConfig, normalize

SSL_METHODS = ("none", "moco", "simsiam")


# ----------------------------------------------------------------------------- checks and builders


def open_store(path, dataset, flag: str = "--store"):
    """Open the target store at ``path`` for a student trained on ``dataset``.

    DataError if it is missing / unfinished / damaged; ConfigError naming ``flag`` and
    ``--data`` if it was made from another dataset (fingerprint or image count differ).
    """
    from .store import TargetStore

    store = TargetStore.open(path)
    ds_id = store.identity.get("dataset") or {}
    have, want = ds_id.get("fingerprint"), dataset.fingerprint()
    if have != want or store.num_images != len(dataset):
        raise ConfigError(f"{flag} {path} holds targets for another dataset (fingerprint {have}, "
                          f"{store.num_images} images, split {ds_id.get('split')}) than --data {dataset.name} "
                          f"(fingerprint {want}, {len(dataset)} {dataset.split} images); make a store for this data "
                          f"with experiments/gen_targets.py --data {dataset.name}")
    if "views" not in store.identity:
        raise ConfigError(f"{flag} {path} does not record the views its teacher saw (not made by gen_targets.py)")
    return store


def store_views(store) -> ViewConfig:
    """The view distribution the store's teacher saw (``size`` = the teacher's view side)."""
    return ViewConfig.from_dict(store.identity["views"])


def check_head_dim(head_dim: int | None, target_dim: int, what: str = "the store's targets") -> int:
    """The student's output dim: ``target_dim``, or ConfigError if ``--head-dim`` says otherwise."""
    if head_dim is not None and head_dim != target_dim:
        raise ConfigError(f"--head-dim {head_dim} does not match {what}, which have dim {target_dim}; "
                          f"leave --head-dim out to use {target_dim}")
    return target_dim


def build_student(arch: str, stem: str, input_size: int, out_dim: int, head_hidden: int = 512,
                  predictor_hidden: int = 0) -> Encoder:
    """A student :class:`Encoder`: backbone + 2-layer MoCo projection head to ``out_dim`` (+ predictor)."""
    spec = ModelSpec(arch=arch, stem=stem, head="moco", head_hidden=head_hidden, head_out=out_dim, head_layers=2,
                     predictor_hidden=predictor_hidden, input_size=input_size)
    return Encoder(spec)


# ----------------------------------------------------------------------------- the task


class DistillTask(nn.Module):
    """Student + distillation loss (+ optional SSL term); an engine task (see module docstring).

    ``teacher``: a :class:`~fkd_ssl.teacher.TeacherTargets` for the online baselines (None:
    targets come with the batch).  It is deliberately not a registered submodule: it is
    frozen, stays on its device, and is not saved in training states.
    """

    def __init__(self, student: Encoder, loss: DistillLoss, teacher: nn.Module | None = None, ssl: str = "none",
                 ssl_weight: float = 1.0, ssl_queue_size: int = 4096, ssl_temperature: float = 0.2,
                 ssl_momentum: float = 0.99, channels_last: bool = False, distributed: bool = False):
        super().__init__()
        if ssl not in SSL_METHODS:
            raise ConfigError(f"--ssl {ssl!r}: one of {', '.join(SSL_METHODS)}")
        if student.projector is None:
            raise ConfigError("the student needs a projection head")
        out_dim = student.spec.head_out
        if out_dim != loss.dim:
            raise ConfigError(f"the student's head dim {out_dim} does not match the target dim {loss.dim}")
        self.student, self.loss = student, loss
        object.__setattr__(self, "teacher", teacher)
        self.ssl, self.ssl_weight = ssl, float(ssl_weight)
        self.ssl_temperature, self.base_momentum = ssl_temperature, ssl_momentum
        self.channels_last = channels_last
        self.momentum_encoder: Encoder | None = None
        self.ssl_queue = None
        if ssl == "moco":
            from lightly.models.modules.memory_bank import MemoryBankModule
            from lightly.models.utils import deactivate_requires_grad

            self.momentum_encoder = copy.deepcopy(student)
            deactivate_requires_grad(self.momentum_encoder)
            self.ssl_queue = MemoryBankModule(size=(ssl_queue_size, out_dim), gather_distributed=distributed,
                                              feature_dim_first=False)
        elif ssl == "simsiam" and student.predictor is None:
            raise ConfigError("--ssl simsiam needs a predictor: set --predictor-hidden > 0")

    def prep(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> normalised float input."""
        x = normalize(u8, self.student.spec.mean, self.student.spec.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, batch, progress: float = 0.0) -> tuple[torch.Tensor, dict]:
        views, targets, image = batch[0], batch[1], batch[2]
        b, k = views.shape[:2]
        if self.teacher is not None:
            t = self.teacher(batch[4].flatten(0, 1))  # (B*K, D), no grad
        else:
            t = targets.flatten(0, 1)
        x = self.prep(views.flatten(0, 1))
        z = self.student.project(x)  # (B*K, D)
        s = self.student.predictor(z) if self.student.predictor is not None else z
        loss, metrics = self.loss(s, t, image.repeat_interleave(k))
        metrics = {"loss_distill": float(loss.detach()), **metrics}
        if self.ssl != "none":
            if k < 2:
                raise ConfigError(f"--ssl {self.ssl} needs --crops-per-image >= 2 (two views of each image)")
            l_ssl = self._ssl_loss(x.view(b, k, *x.shape[1:]), z.view(b, k, -1), s.view(b, k, -1))
            metrics["loss_ssl"] = float(l_ssl.detach())
            loss = loss + self.ssl_weight * l_ssl
        return loss, metrics

    def _ssl_loss(self, x: torch.Tensor, z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The student's own SSL loss between views 0 and 1: x (B, K, 3, S, S), z / p (B, K, D)."""
        if self.ssl == "simsiam":
            return -0.5 * (F.cosine_similarity(p[:, 0], z[:, 1].detach(), dim=1).mean()
                           + F.cosine_similarity(p[:, 1], z[:, 0].detach(), dim=1).mean())
        from lightly.models.utils import update_momentum

        from .ssl import infonce

        m = self.base_momentum  # a constant EMA, as fkd_ssl.ssl.MoCo uses
        q1, q2 = F.normalize(z[:, 0], dim=1), F.normalize(z[:, 1], dim=1)
        with torch.no_grad():
            if self.training:
                update_momentum(self.student, self.momentum_encoder, m)
            k1 = F.normalize(self.momentum_encoder.project(x[:, 0]), dim=1)
            k2 = F.normalize(self.momentum_encoder.project(x[:, 1]), dim=1)
        _, negatives = self.ssl_queue(k2, update=self.training)
        negatives = negatives.to(q1.dtype)
        t = self.ssl_temperature
        return 0.5 * (infonce(q1, k2, negatives, t) + infonce(q2, k1, negatives, t))

    def export(self) -> Encoder:
        return self.student

    def extra_state(self) -> dict:
        state = {"loss": self.loss.extra_state()}
        if self.ssl_queue is not None:
            state["ssl_queue"] = self.ssl_queue.bank.detach().cpu().clone()
            state["ssl_queue_ptr"] = self.ssl_queue.bank_ptr.detach().cpu().clone()
        return state

    def load_extra_state(self, state: dict) -> None:
        self.loss.load_extra_state(state["loss"])
        if self.ssl_queue is not None:
            self.ssl_queue.bank.copy_(state["ssl_queue"])
            self.ssl_queue.bank_ptr.copy_(state["ssl_queue_ptr"])
