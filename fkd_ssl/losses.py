"""Distillation losses: student outputs ``s`` (N, D) against the teacher's targets ``t`` (N, D) for the same views.

Unless said otherwise a loss L2-normalises its inputs along ``D`` and returns the mean over the ``N`` rows
(the losses and their defaults: docs/distill.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

LOSSES = ("infonce", "soft-ce", "seed", "cosine")
#: losses that compare against a queue of earlier teacher targets
QUEUE_LOSSES = ("infonce", "seed")


# ----------------------------------------------------------------------------- pure losses


def contrastive(s: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with one or several positives per row: keys (M, D), positives bool (N, M) with at least one
    True per row; every other key is a negative.  Row ``n``'s loss is the mean over its positives ``p`` of
    ``-log softmax(s_n . keys / T)[p]``."""
    s, keys = F.normalize(s, dim=1), F.normalize(keys, dim=1)
    logp = torch.log_softmax(s @ keys.t() / temperature, dim=1)  # (N, M)
    pos = positives.to(logp.dtype)
    return (-(logp * pos).sum(1) / pos.sum(1)).mean()


def soft_ce(s: torch.Tensor, t: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    """Cross-entropy ``-sum_d softmax(t/tau)_d log_softmax(s/tau)_d`` over the D embedding dims."""
    s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
    return soft_ce_probs(s / tau, torch.softmax(t / tau, dim=1))


def seed(s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor, tau_t: float = 0.01,
         tau_s: float = 0.2) -> torch.Tensor:
    """SEED (Fang et al., ICLR 2021): soft cross-entropy over the reference points ``[t_n; queue]``
    (queue (Q, D), Q may be 0) at temperatures ``tau_t`` (teacher) and ``tau_s`` (student)."""
    s, t, queue = F.normalize(s, dim=1), F.normalize(t, dim=1), F.normalize(queue, dim=1)
    logit_s = torch.cat([(s * t).sum(1, keepdim=True), s @ queue.t()], dim=1)  # (N, 1 + Q)
    logit_t = torch.cat([(t * t).sum(1, keepdim=True), t @ queue.t()], dim=1)
    return soft_ce_probs(logit_s / tau_s, torch.softmax(logit_t / tau_t, dim=1))


def cosine(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Regression to the target direction: mean of ``1 - cos(s_n, t_n)``."""
    return (1 - F.cosine_similarity(s, t, dim=1)).mean()


def soft_ce_probs(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The one soft cross-entropy: logits (N, C) against probabilities (N, C), ``-sum_c p_c log_softmax(logits)_c``."""
    return -(probs * torch.log_softmax(logits, dim=1)).sum(1).mean()


# ----------------------------------------------------------------------------- the queue


class TargetQueue(nn.Module):
    """FIFO of the last ``size`` teacher targets (float32 ``(size, D)``); starts empty.  The buffers are not
    part of ``state_dict``: :meth:`state` / :meth:`load` save and restore them (resume)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = int(size)
        self.register_buffer("bank", torch.zeros(self.size, dim), persistent=False)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("filled", torch.zeros((), dtype=torch.long), persistent=False)

    def negatives(self) -> torch.Tensor:
        """(filled, D): the queued targets (in slot order; the order does not matter)."""
        return self.bank[: int(self.filled)]

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        """Enqueue (n, D) targets, overwriting the oldest; keeps the last ``size`` if n > size."""
        if self.size == 0 or x.shape[0] == 0:
            return
        x = x[-self.size:].to(self.bank.dtype)
        p = int(self.ptr)
        idx = (torch.arange(x.shape[0], device=x.device) + p) % self.size
        self.bank[idx.to(self.bank.device)] = x.to(self.bank.device)
        self.ptr.fill_((p + x.shape[0]) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + x.shape[0]))

    def state(self) -> dict:
        return {"bank": self.bank.detach().cpu().clone(), "ptr": int(self.ptr), "filled": int(self.filled)}

    def load(self, state: dict) -> None:
        if tuple(state["bank"].shape) != tuple(self.bank.shape):
            raise ValueError(f"queue shape {tuple(state['bank'].shape)} != {tuple(self.bank.shape)}")
        self.bank.copy_(state["bank"])
        self.ptr.fill_(int(state["ptr"]))
        self.filled.fill_(int(state["filled"]))


class TargetCenter(nn.Module):
    """An EMA of the mean teacher target (over all ranks; the first batch sets it), subtracted before the
    loss: DINO's centring (``--center``)."""

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        from . import dist as fdist

        if self.training:
            with torch.no_grad():
                mean = fdist.all_gather_cat(t).mean(0)
                self.center.copy_(torch.where(self.started, self.momentum * self.center + (1 - self.momentum) * mean,
                                              mean))
                self.started.fill_(True)
        return F.normalize(t - self.center, dim=1)


# ----------------------------------------------------------------------------- the bound loss


class DistillLoss(nn.Module):
    """One distillation loss with its settings and queue: ``(s, t, image) -> (loss, metrics)``; ``image`` int64
    (N,) is each view's image.  ``probs=True``: class-probability targets (:func:`soft_ce_probs` on raw outputs).
    Keys and queues over DDP ranks: docs/distill.md; float32 with autocast off (SEED's tau_t 0.01 needs it)."""

    def __init__(self, name: str, dim: int, temperature: float = 0.2, tau: float = 0.2, tau_t: float = 0.01,
                 tau_s: float = 0.2, queue_size: int = 4096, multi_positive: bool = False, probs: bool = False,
                 center: bool = False):
        super().__init__()
        if name not in LOSSES:
            raise ConfigError(f"--loss {name!r}: one of {', '.join(LOSSES)}")
        if probs and name != "soft-ce":
            raise ConfigError(f"--loss {name} needs embedding targets, but the store holds class probabilities "
                              f"(a classifier teacher): use --loss soft-ce")
        if dim < 2:
            raise ConfigError(f"--loss {name}: the target dim is {dim}; distillation needs >= 2 dims")
        if min(temperature, tau, tau_t, tau_s) <= 0:
            raise ConfigError("distillation temperatures must be > 0")
        if multi_positive and name != "infonce":
            raise ConfigError(f"--multi-positive applies to --loss infonce only (got --loss {name})")
        if queue_size < 0:
            raise ConfigError(f"--queue-size must be >= 0, got {queue_size}")
        self.name, self.dim, self.probs = name, dim, probs
        self.temperature, self.tau, self.tau_t, self.tau_s = temperature, tau, tau_t, tau_s
        self.multi_positive = multi_positive
        self.queue = TargetQueue(queue_size if name in QUEUE_LOSSES else 0, dim)
        self.center = TargetCenter(dim) if center and not probs else None

    def forward(self, s: torch.Tensor, t: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, dict]:
        from . import dist as fdist

        if s.shape != t.shape:
            raise ConfigError(f"student output {tuple(s.shape)} does not match the targets {tuple(t.shape)}")
        with torch.autocast(s.device.type, enabled=False):
            s, t = s.float(), t.float()
            metrics: dict[str, float] = {}
            if self.probs:
                return soft_ce_probs(s, t), {"agree": float((s.argmax(1) == t.argmax(1)).float().mean())}
            t = F.normalize(t, dim=1)
            if self.center is not None:
                t = self.center(t)
            if self.name == "infonce":
                keys = fdist.all_gather_cat(t)  # (M, D) global batch, rank-major
                n, m = t.shape[0], keys.shape[0]
                rank, world = fdist.rank_world()
                if m != n * world:
                    raise RuntimeError("infonce needs the same batch size on every rank")
                if self.multi_positive:
                    pos = image[:, None] == fdist.all_gather_cat(image)[None, :]
                else:  # each view's own target
                    own = rank * n + torch.arange(n, device=s.device)
                    pos = torch.arange(m, device=s.device)[None, :] == own[:, None]
                queued = self.queue.negatives()
                keys_all = torch.cat([keys, queued.to(keys)], dim=0)
                pos = torch.cat([pos, torch.zeros(n, queued.shape[0], dtype=torch.bool, device=s.device)], dim=1)
                loss = contrastive(s, keys_all, pos, self.temperature)
                if self.training:
                    self.queue.push(keys)
                metrics["negatives"] = float(keys_all.shape[0] - 1)
            elif self.name == "seed":
                loss = seed(s, t, self.queue.negatives().to(t), self.tau_t, self.tau_s)
                if self.training:
                    self.queue.push(fdist.all_gather_cat(t))
            elif self.name == "soft-ce":
                loss = soft_ce(s, t, self.tau)
            else:
                loss = cosine(s, t)
            with torch.no_grad():
                metrics["cos"] = float(F.cosine_similarity(s, t, dim=1).mean())
        return loss, metrics

    def extra_state(self) -> dict:
        return {"queue": self.queue.state()}

    def load_extra_state(self, state: dict) -> None:
        self.queue.load(state["queue"])
