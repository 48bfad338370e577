"""Supervised FKD: a classifier student trained on soft labels of replayed views (docs/supervised.md).

Where each view's target distribution comes from is the *mode* (``--targets``); the loss is soft cross-entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from .engine import Task
from .errors import ConfigError
from .losses import soft_ce_probs
from .models import Encoder, ModelSpec
from .replay import ReplayBatch

MODES = ("store", "online", "hard", "relabel")


def one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(N,) int64 -> (N, C) float32 with ``1 - smoothing`` on the label and the rest spread evenly."""
    t = torch.full((labels.shape[0], num_classes), smoothing / num_classes, device=labels.device)
    return t.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + smoothing / num_classes)


@dataclass(frozen=True)
class MixConfig:
    """Mixup / cutmix: with ``mixup_alpha`` and ``cutmix_alpha`` both > 0, each batch picks one (p = 0.5)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ConfigError("--mixup and --cutmix must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def mix_batch(x: torch.Tensor, t: torch.Tensor, cfg: MixConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Mix a batch with its reverse: x (N, 3, S, S), t (N, C) -> mixed (x, t) and what was done.  ``t`` is
    mixed with the same ``lam ~ Beta(alpha, alpha)`` (cutmix: corrected to the pasted area), drawn from torch's
    global RNG, which the engine's resume state restores."""
    if not cfg.enabled or x.shape[0] < 2:
        return x, t, {}
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha == 0 or float(torch.rand(())) < 0.5)
    alpha = torch.tensor(cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha)
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    x2, t2 = x.flip(0), t.flip(0)
    if use_cutmix:
        s_h, s_w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(s_h * cut), int(s_w * cut)
        cy = int(torch.randint(s_h, ()))
        cx = int(torch.randint(s_w, ()))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, s_h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, s_w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x2[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (s_h * s_w)
    else:
        x = lam * x + (1.0 - lam) * x2
    return x, lam * t + (1.0 - lam) * t2, {"mix": "cutmix" if use_cutmix else "mixup", "lam": lam}


def build_classifier(arch: str, stem: str, input_size: int, num_classes: int) -> Encoder:
    """A classifier :class:`Encoder`: backbone + its own linear classifier to ``num_classes``."""
    return Encoder(ModelSpec(arch=arch, stem=stem, num_classes=num_classes, input_size=input_size))


def probe_classifier(encoder: Encoder, weight: torch.Tensor, bias: torch.Tensor, input_size: int) -> Encoder:
    """``encoder``'s backbone (frozen features) with a linear probe as its classifier: a teacher for
    supervised FKD.  ``weight`` (C, D) / ``bias`` (C,) act on the raw pooled features."""
    spec = replace(encoder.spec, num_classes=int(weight.shape[0]), input_size=int(input_size))
    model = Encoder(spec)
    classifier = model.backbone.get_classifier()
    own = model.state_dict()
    kept = {k: v for k, v in encoder.state_dict().items() if k in own and own[k].shape == v.shape}
    missing = set(own) - set(kept) - {f"backbone.{n}.{p}" for n, m in model.backbone.named_modules()
                                       if m is classifier for p in ("weight", "bias")}
    if missing:
        raise ConfigError(f"cannot rebuild {spec.arch} with a {weight.shape[0]}-class classifier: {sorted(missing)[0]}")
    model.load_state_dict(kept, strict=False)
    classifier.weight.data.copy_(weight)
    classifier.bias.data.copy_(bias)
    return model.eval()


def init_backbone(model: Encoder, ref: str, device: str | torch.device = "cpu") -> dict:
    """Copy the backbone weights (and a classifier of the same shape) of checkpoint ``ref`` into ``model``;
    ConfigError if they do not fit.  Returns a short description for the run's metadata."""
    from .checkpoint import load_model, model_identity

    src, meta = load_model(ref, arch=model.spec.arch, device=device)
    if src.spec.arch != model.spec.arch or src.spec.stem != model.spec.stem:
        raise ConfigError(f"--init {ref} is a {src.spec.arch} (stem {src.spec.stem}), the student is a "
                          f"{model.spec.arch} (stem {model.spec.stem}): use --arch/--stem {src.spec.arch}/{src.spec.stem}")
    own, classifier = model.backbone.state_dict(), model.backbone.get_classifier()
    head = {f"{n}.{k}" for n, mod in model.backbone.named_modules() if mod is classifier for k in ("weight", "bias")}
    copied = {}
    for k, v in src.backbone.state_dict().items():
        if k in own and own[k].shape == v.shape:
            copied[k] = v
        elif k not in head:
            raise ConfigError(f"--init {ref}: backbone tensor {k} {tuple(v.shape)} does not fit the student")
    missing = [k for k in own if k not in copied and k not in head]
    if missing:
        raise ConfigError(f"--init {ref} lacks backbone tensors of the student, e.g. {missing[0]}")
    kept = [k for k in own if k not in copied]
    model.backbone.load_state_dict({**own, **copied})
    return {"ref": str(ref), "hash": model_identity(str(ref)), "method": meta.get("method"),
            "fresh": sorted(kept)}


class SoftLabelTask(Task):
    """Classifier student + soft cross-entropy on K views per image.  ``labels``: int64 (N,), for ``hard``;
    ``teacher``: ``probs`` targets for ``online`` (frozen, not a registered submodule, never saved)."""

    def __init__(self, student: Encoder, mode: str, labels: torch.Tensor | None = None,
                 teacher: nn.Module | None = None, mix: MixConfig = MixConfig(), label_smoothing: float = 0.0,
                 channels_last: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"--targets {mode!r}: one of {', '.join(MODES)}")
        if student.spec.num_classes <= 0:
            raise ConfigError("the student needs a classifier (num_classes > 0)")
        if mode == "online" and teacher is None:
            raise ConfigError("--targets online needs a teacher")
        if mode == "hard" and labels is None:
            raise ConfigError("--targets hard needs the dataset labels")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {label_smoothing}")
        self.student, self.mode, self.mix, self.label_smoothing = student, mode, mix, float(label_smoothing)
        self.num_classes = student.spec.num_classes
        self.register_buffer("labels", labels.long() if labels is not None else torch.zeros(0, dtype=torch.long),
                             persistent=False)
        object.__setattr__(self, "teacher", teacher)
        self.channels_last = channels_last

    def targets(self, batch: ReplayBatch) -> torch.Tensor:
        """(B*K, C) target distributions of the batch's views (no grad)."""
        k = batch.views.shape[1]
        if self.mode == "hard":
            return one_hot(self.labels[batch.image.repeat_interleave(k)], self.num_classes, self.label_smoothing)
        if self.mode == "online":
            return self.teacher(batch.teacher_views.flatten(0, 1))
        t = batch.targets.flatten(0, 1).float()
        if t.shape[1] != self.num_classes:
            raise ConfigError(f"the targets have {t.shape[1]} classes, the student {self.num_classes}")
        return t

    def forward(self, batch: ReplayBatch, progress: float = 0.0) -> tuple[torch.Tensor, dict]:
        t = self.targets(batch)
        x = self.prep(batch.views.flatten(0, 1))
        x, t, info = mix_batch(x, t, self.mix)
        logits = self.student.logits(x)
        loss = soft_ce_probs(logits.float(), t)
        metrics = {"target_agree": float((logits.argmax(1) == t.argmax(1)).float().mean())}
        if "lam" in info:
            metrics["mix_lam"] = info["lam"]
        return loss, metrics

    def export(self) -> Encoder:
        return self.student


@torch.no_grad()
def classifier_accuracy(model: Encoder, dataset, batch_size: int = 256, workers: int = 0,
                        device: str | torch.device = "cpu") -> dict[str, float]:
    """Top-1 / top-5 (%) of ``model``'s classifier on ``dataset`` (whose class ``c`` is the model's), through
    the evaluators' transform."""
    from torch.utils.data import DataLoader

    from .evaluation.features import spec_eval_transform
    from .evaluation.probe import accuracy

    if model.spec.num_classes != dataset.num_classes:
        raise ConfigError(f"the classifier has {model.spec.num_classes} classes, {dataset.name} has "
                          f"{dataset.num_classes}")
    transform, _ = spec_eval_transform(model.spec)
    old, dataset.transform = dataset.transform, transform
    was_training = model.training
    model.eval()
    try:
        logits, labels = zip(*[(model.logits(x.to(device)).cpu(), y) for x, y, _ in
                               DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)])
    finally:
        dataset.transform = old
        model.train(was_training)
    acc = accuracy(torch.cat(logits), torch.cat(labels))
    return {"val_top1": acc[1], "val_top5": acc[5]}
