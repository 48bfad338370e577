"""Teachers as target functions: uint8 views ``(B, 3, S, S)`` in, float32 targets ``(B, D)`` out.

Targets: ``proj`` (normalised head output), ``feature`` (normalised backbone feature, or a ViT's class
token / mean patch token, ``pool``) or ``probs`` (softmax(logits / temp)); the same object serves
gen_targets.py and the online-teacher baseline.  Several teachers on the same views: :class:`TeacherEnsemble`.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_model, model_identity
from .errors import ConfigError
from .models import Encoder
from .pretrained import is_pretrained_ref
from .views import ViewConfig, normalize

TARGET_KINDS = ("proj", "feature", "probs")
POOLS = ("cls", "mean", "cls+mean")
ENSEMBLE_MODES = ("mean", "concat")


def default_target(model: Encoder) -> str:
    """``proj`` for SSL teachers with a head, ``probs`` for classifiers, else ``feature``."""
    if model.projector is not None:
        return "proj"
    return "probs" if model.spec.num_classes > 0 else "feature"


class TeacherTargets(nn.Module):
    """A frozen teacher + target kind: uint8 ``(B, 3, S, S)`` -> float32 ``(B, dim)``."""

    def __init__(self, model: Encoder, kind: str | None = None, temp: float = 1.0, channels_last: bool = False,
                 pool: str | None = None):
        super().__init__()
        kind = kind or ("feature" if pool else default_target(model))
        if kind not in TARGET_KINDS:
            raise ConfigError(f"--target {kind!r}: one of {', '.join(TARGET_KINDS)}")
        if kind == "proj" and model.projector is None:
            raise ConfigError("--target proj: the teacher has no projection head (use --target feature)")
        if kind == "probs" and model.spec.num_classes == 0:
            raise ConfigError("--target probs: the teacher has no classifier (use --target feature)")
        if temp <= 0:
            raise ConfigError(f"--temp must be > 0, got {temp}")
        if pool is not None and (kind != "feature" or pool not in POOLS):
            raise ConfigError(f"--pool {pool}: one of {', '.join(POOLS)}, with --target feature")
        tokens = getattr(model.backbone, "num_prefix_tokens", None)
        if pool is not None and (tokens is None or ("cls" in pool and not tokens)):
            raise ConfigError(f"--pool {pool}: the teacher {model.spec.arch} has no "
                              f"{'class token' if tokens == 0 else 'patch tokens (not a ViT)'}")
        self.pool = pool
        self.model = model.eval().requires_grad_(False)
        self.kind, self.temp, self.channels_last = kind, float(temp), channels_last
        self.trained_views: dict | None = None  # the view distribution the teacher was trained on, if known

    @property
    def dim(self) -> int:
        spec = self.model.spec
        feature = self.model.feature_dim * (2 if self.pool == "cls+mean" else 1)
        return {"proj": spec.head_out, "feature": feature, "probs": spec.num_classes}[self.kind]

    @property
    def patch(self) -> int:
        """The side view sizes must be a multiple of (a ViT's patch size, else 1)."""
        embed = getattr(self.model.backbone, "patch_embed", None)
        return int(embed.patch_size[0]) if embed is not None else 1

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
        elif self.pool:
            tokens = self.model.backbone.forward_features(x).float()
            parts = {"cls": tokens[:, 0], "mean": tokens[:, self.model.backbone.num_prefix_tokens:].mean(1)}
            out = F.normalize(torch.cat([F.normalize(parts[p], dim=1) for p in self.pool.split("+")], 1), dim=1)
        elif self.kind == "feature":
            out = F.normalize(self.model.features(x).float(), dim=1)
        else:
            out = torch.softmax(self.model.logits(x).float() / self.temp, dim=1)
        return out.float()


def default_views(teacher: TeacherTargets) -> ViewConfig:
    """The views a store for ``teacher`` holds by default: geometry-only crops for class probabilities,
    else the teacher's own training views (or MoCo v2's), at the teacher's input size."""
    interp = "bicubic" if teacher.model.spec.interpolation == "bicubic" else "bilinear"
    if teacher.kind == "probs":
        return ViewConfig(size=teacher.input_size, scale=(0.08, 1.0), photometric=False, interpolation=interp)
    if teacher.trained_views:
        return ViewConfig.from_dict({**teacher.trained_views, "size": teacher.input_size})
    return ViewConfig(size=teacher.input_size, scale=(0.2, 1.0), photometric=True, interpolation=interp)


class TeacherEnsemble(nn.Module):
    """Teachers that see the same views: the mean of their targets (``mean``) or their targets
    concatenated and scaled to unit norm (``concat``)."""

    def __init__(self, members: list[TeacherTargets], mode: str = "mean"):
        super().__init__()
        kinds, dims = {t.kind for t in members}, {t.dim for t in members}
        if len(kinds) > 1:
            raise ConfigError(f"--teacher: the teachers give different targets ({', '.join(sorted(kinds))}): say which with --target")
        if mode == "mean" and len(dims) > 1:
            raise ConfigError(f"--ensemble mean: the teachers' targets have dims {sorted(dims)}: use --ensemble concat")
        if mode == "concat" and members[0].kind == "probs":
            raise ConfigError("--ensemble concat: class probabilities are averaged (--ensemble mean)")
        self.members, self.mode, self.kind, self.temp = nn.ModuleList(members), mode, members[0].kind, members[0].temp

    model = property(lambda self: self.members[0].model)  # the lead teacher sets the default views
    trained_views = property(lambda self: self.members[0].trained_views)
    input_size = property(lambda self: self.members[0].input_size)
    patch = property(lambda self: math.lcm(*(t.patch for t in self.members)))

    @property
    def dim(self) -> int:
        return sum(t.dim for t in self.members) if self.mode == "concat" else self.members[0].dim

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        outs = [t(views) for t in self.members]
        if self.mode == "concat":
            return torch.cat(outs, 1) / math.sqrt(len(outs))
        return torch.stack(outs).mean(0)


def load_teacher(ref: str, arch: str | None = None, kind: str | None = None, temp: float = 1.0,
                 device: torch.device | str = "cpu", weights: str | None = None,
                 pool: str | None = None, prefix: str | None = None) -> tuple[TeacherTargets, dict]:
    """Load a teacher reference (:func:`fkd_ssl.checkpoint.load_model`) as a target function, with its identity."""
    model, meta = load_model(ref, arch=arch, device=device, weights=weights, prefix=prefix)
    if "loaded" in meta:
        print(f"teacher {ref}: {meta['loaded']}", flush=True)
    dev = torch.device(device)
    teacher = TeacherTargets(model, kind, temp, channels_last=dev.type == "cuda", pool=pool).to(dev)
    teacher.trained_views = meta.get("views") if isinstance(meta.get("views"), dict) else None
    identity = {"hash": model_identity(str(ref), weights), "arch": model.spec.arch,
                "method": meta.get("method", "unknown"), "target": teacher.kind,
                "temp": teacher.temp if teacher.kind == "probs" else None, "dim": teacher.dim,
                "input_size": model.spec.input_size, "mean": list(model.spec.mean), "std": list(model.spec.std),
                **({"pool": pool} if pool else {})}
    return teacher, identity


def load_teachers(refs: list[str], weights: list[str] | None = None, ensemble: str = "mean", **kw):
    """One teacher (as :func:`load_teacher`) or an ensemble; ``weights`` go to the ``timm:`` / ``tv:``
    references in order.  An ensemble's identity names every member."""
    named = [r for r in refs if is_pretrained_ref(r)]
    weights = list(weights or [])
    if weights and len(weights) != len(named):
        raise ConfigError(f"--teacher-weights given {len(weights)} times for {len(named)} timm:/tv: teachers")
    files = iter(weights)
    loaded = [load_teacher(r, weights=next(files, None) if is_pretrained_ref(r) else None, **kw) for r in refs]
    if len(loaded) == 1:
        return loaded[0]
    teacher = TeacherEnsemble([t for t, _ in loaded], ensemble)
    members = [i for _, i in loaded]
    digest = hashlib.sha256("+".join(i["hash"] for i in members).encode()).hexdigest()[:16]
    return teacher, {"hash": f"ensemble:{digest}", "arch": "+".join(i["arch"] for i in members),
                     "method": "ensemble", "ensemble": ensemble, "target": teacher.kind,
                     "temp": members[0]["temp"], "dim": teacher.dim, "input_size": teacher.input_size,
                     "members": members}
