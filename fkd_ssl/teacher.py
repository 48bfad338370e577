"""Teachers as target functions: uint8 views ``(B, 3, S, S)`` in, float32 targets ``(B, D)`` out.

Targets: ``proj`` (normalised head output), ``feature`` (normalised backbone feature) or ``probs``
(softmax(logits / temp)); the same object serves gen_targets.py and the online-teacher baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_model, model_identity
from .errors import ConfigError
from .models import Encoder
from .views import normalize

TARGET_KINDS = ("proj", "feature", "probs")


def default_target(model: Encoder) -> str:
    """``proj`` for SSL teachers with a head, ``probs`` for classifiers, else ``feature``."""
    if model.projector is not None:
        return "proj"
    return "probs" if model.spec.num_classes > 0 else "feature"


class TeacherTargets(nn.Module):
    """A frozen teacher + target kind: uint8 ``(B, 3, S, S)`` -> float32 ``(B, dim)``."""

    def __init__(self, model: Encoder, kind: str | None = None, temp: float = 1.0, channels_last: bool = False):
        super().__init__()
        kind = kind or default_target(model)
        if kind not in TARGET_KINDS:
            raise ConfigError(f"--target {kind!r}: one of {', '.join(TARGET_KINDS)}")
        if kind == "proj" and model.projector is None:
            raise ConfigError("--target proj: the teacher has no projection head (use --target feature)")
        if kind == "probs" and model.spec.num_classes == 0:
            raise ConfigError("--target probs: the teacher has no classifier (use --target feature)")
        if temp <= 0:
            raise ConfigError(f"--temp must be > 0, got {temp}")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.kind, self.temp, self.channels_last = kind, float(temp), channels_last
        self.trained_views: dict | None = None  # the view distribution the teacher was trained on, if known

    @property
    def dim(self) -> int:
        spec = self.model.spec
        return {"proj": spec.head_out, "feature": self.model.feature_dim, "probs": spec.num_classes}[self.kind]

    @property
    def input_size(self) -> int:
        return self.model.spec.input_size

    def train(self, mode: bool = True) -> "TeacherTargets":  # a teacher never leaves eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, views: torch.Tensor) -> torch.Tensor:
        x = normalize(views, self.model.spec.mean, self.model.spec.std, self.channels_last)
        if self.kind == "proj":
            out = F.normalize(self.model.project(x).float(), dim=1)
        elif self.kind == "feature":
            out = F.normalize(self.model.features(x).float(), dim=1)
        else:
            out = torch.softmax(self.model.logits(x).float() / self.temp, dim=1)
        return out.float()


def default_views(teacher: TeacherTargets) -> "ViewConfig":
    """The views a store for ``teacher`` holds by default: geometry-only crops for class probabilities,
    else the teacher's own training views (or MoCo v2's), at the teacher's input size."""
    from .views import ViewConfig

    interp = "bicubic" if teacher.model.spec.interpolation == "bicubic" else "bilinear"
    if teacher.kind == "probs":
        return ViewConfig(size=teacher.input_size, scale=(0.08, 1.0), photometric=False, interpolation=interp)
    if teacher.trained_views:
        return ViewConfig.from_dict({**teacher.trained_views, "size": teacher.input_size})
    return ViewConfig(size=teacher.input_size, scale=(0.2, 1.0), photometric=True, interpolation=interp)


def load_teacher(ref: str, arch: str | None = None, kind: str | None = None, temp: float = 1.0,
                 device: torch.device | str = "cpu") -> tuple[TeacherTargets, dict]:
    """Load a teacher reference (:func:`fkd_ssl.checkpoint.load_model`) as a target function, with its identity."""
    model, meta = load_model(ref, arch=arch, device=device)
    dev = torch.device(device)
    teacher = TeacherTargets(model, kind, temp, channels_last=dev.type == "cuda").to(dev)
    teacher.trained_views = meta.get("views") if isinstance(meta.get("views"), dict) else None
    identity = {"hash": model_identity(str(ref)), "arch": model.spec.arch,
                "method": meta.get("method", "unknown"), "target": teacher.kind,
                "temp": teacher.temp if teacher.kind == "probs" else None, "dim": teacher.dim,
                "input_size": model.spec.input_size, "mean": list(model.spec.mean), "std": list(model.spec.std)}
    return teacher, identity
