"""The distillation task: a student learns the store's or an online teacher's targets for replayed views,
optionally with its own SSL objective between views 0 and 1 (DisCo-style; docs/distill.md)."""

from __future__ import annotations

import torch
from torch import nn

from .engine import Task
from .errors import ConfigError
from .losses import DistillLoss
from .models import Encoder, ModelSpec
from .objectives.moco import MoCoObjective
from .objectives.simsiam import simsiam_loss
from .replay import ReplayBatch
from .views import ViewConfig

SSL_METHODS = ("none", "moco", "simsiam")


# ----------------------------------------------------------------------------- checks and builders


def open_store(path, dataset, flag: str = "--store"):
    """The target store at ``path`` for a student trained on ``dataset``: DataError if it is missing or damaged,
    ConfigError naming ``flag`` if it was made from another dataset."""
    from .store import TargetStore

    store = TargetStore.open(path)
    check_made_from(store, dataset, flag)
    if store.identity.views is None:
        raise ConfigError(f"{flag} {path} does not record the views its teacher saw (not made by gen_targets.py)")
    return store


def check_made_from(store, dataset, flag: str = "--store", what: str = "targets",
                    maker: str = "experiments/gen_targets.py") -> None:
    """ConfigError naming ``flag`` and ``--data`` unless ``store`` (targets, or label maps) was made from
    ``dataset``: the same fingerprint and image count."""
    have = store.identity.dataset or {}
    if have.get("fingerprint") != dataset.fingerprint() or store.num_images != len(dataset):
        raise ConfigError(f"{flag} {store.path} holds {what} for another dataset (fingerprint "
                          f"{have.get('fingerprint')}, {store.num_images} images, split {have.get('split')}) than "
                          f"--data {dataset.name} (fingerprint {dataset.fingerprint()}, {len(dataset)} {dataset.split} "
                          f"images); make {what} for this data with {maker} --data {dataset.name}")


def store_views(store) -> ViewConfig:
    """The view distribution the store's teacher saw (``size`` = the teacher's view side)."""
    return ViewConfig.from_dict(store.identity.views)


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


class DistillTask(Task):
    """Student + distillation loss (+ optional SSL term).  ``teacher``: the online baselines' targets (None: they
    come with the batch); frozen, not a registered submodule, never saved."""

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
        if ssl == "simsiam" and student.predictor is None:
            raise ConfigError("--ssl simsiam needs a predictor: set --predictor-hidden > 0")
        self.student, self.loss = student, loss
        object.__setattr__(self, "teacher", teacher)
        self.ssl, self.ssl_weight = ssl, float(ssl_weight)
        self.channels_last = channels_last
        self.moco = (MoCoObjective(student, ssl_queue_size, ssl_temperature, ssl_momentum, distributed)
                     if ssl == "moco" else None)

    def forward(self, batch: ReplayBatch, progress: float = 0.0) -> tuple[torch.Tensor, dict]:
        b, k = batch.views.shape[:2]
        if self.teacher is not None:
            t = self.teacher(batch.teacher_views.flatten(0, 1))  # (B*K, D), no grad
        else:
            t = batch.targets.flatten(0, 1)
        x = self.prep(batch.views.flatten(0, 1))
        z = self.student.project(x)  # (B*K, D)
        s = self.student.predictor(z) if self.student.predictor is not None else z
        loss, metrics = self.loss(s, t, batch.image.repeat_interleave(k))
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
        if self.moco is None:
            return simsiam_loss(z[:, 0], z[:, 1], p[:, 0], p[:, 1])
        return self.moco(self.student, x[:, 0], x[:, 1], z[:, 0], z[:, 1])[0]

    def export(self) -> Encoder:
        return self.student

    def extra_state(self) -> dict:
        state = {"loss": self.loss.extra_state()}
        if self.moco is not None:
            state["ssl"] = self.moco.state()
        return state

    def load_extra_state(self, state: dict) -> None:
        self.loss.load_extra_state(state["loss"])
        if self.moco is not None:
            self.moco.load(state["ssl"])
