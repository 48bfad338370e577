"""Teachers from other libraries: pretrained names ``timm:<name>[.<tag>]`` and ``tv:<name>[:<WEIGHTS>]``,
and SSL-library checkpoints (lightly, solo-learn: a backbone under a prefix, maybe a projection head).

The weights come from ``--teacher-weights`` or the library's local cache (Hugging Face / torch hub);
nothing is downloaded.  Preprocessing (mean, std, interpolation, input size) is the library's own.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .errors import CheckpointError, ConfigError

PREFIXES = ("timm:", "tv:")


def is_pretrained_ref(ref: str) -> bool:
    return str(ref).startswith(PREFIXES)


@dataclass
class Pretrained:
    """A resolved pretrained name: what to build, the weight file and the library's preprocessing."""

    arch: str  # timm name (with tag) or tv:<name>
    file: Path
    num_classes: int
    input_size: int
    mean: tuple
    std: tuple
    interpolation: str
    extra: dict


def _hub_file(url: str) -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _given(weights: str | os.PathLike | None) -> Path | None:
    if weights is not None and not Path(weights).is_file():
        raise CheckpointError(f"--teacher-weights {weights} does not exist")
    return Path(weights) if weights is not None else None


def _timm(name: str, weights) -> Pretrained:
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(name):
        raise ConfigError(f"--teacher timm:{name}: unknown timm model or tag")
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise ConfigError(f"--teacher timm:{name}: timm has no pretrained config for it (name a tag, e.g. {name}.<tag>)")
    name, file = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture, _given(weights)
    if file is None and cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        for fn in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            hit = try_to_load_from_cache(cfg.hf_hub_id, fn)
            if isinstance(hit, str):
                file = Path(hit)
                break
    if file is None and cfg.url and _hub_file(cfg.url).is_file():
        file = _hub_file(cfg.url)
    if file is None:
        where = (f"{cfg.hf_hub_filename or 'model.safetensors'} of https://huggingface.co/{cfg.hf_hub_id} "
                 f"(huggingface-cli download {cfg.hf_hub_id}, cache {constants.HF_HUB_CACHE})" if cfg.hf_hub_id
                 else f"{cfg.url} as {_hub_file(cfg.url)}" if cfg.url else "its weight file")
        raise CheckpointError(f"--teacher timm:{name}: weights not cached; get {where}, or pass the file with --teacher-weights")
    return Pretrained(name, file, cfg.num_classes or 0, int(cfg.input_size[-1]), tuple(cfg.mean), tuple(cfg.std),
                      cfg.interpolation if cfg.interpolation in ("bicubic", "nearest") else "bilinear",
                      {"pretrained": f"timm:{name}", "crop_pct": cfg.crop_pct})


def _torchvision(name: str, weights) -> Pretrained:
    import torchvision.models as tvm

    name, _, tag = name.partition(":")
    try:
        enum = tvm.get_model_weights(name)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"--teacher tv:{name}: unknown torchvision model") from e
    if tag and tag not in enum.__members__:
        raise ConfigError(f"--teacher tv:{name}:{tag}: unknown weights (one of {', '.join(enum.__members__)})")
    w = enum[tag] if tag else enum.DEFAULT
    file = _given(weights) or _hub_file(w.url)
    if not file.is_file():
        raise CheckpointError(f"--teacher tv:{name}:{w.name}: weights not cached; put {w.url} at {file}, or pass "
                              f"the file with --teacher-weights")
    t = w.transforms()
    return Pretrained(f"tv:{name}", file, len(w.meta["categories"]), int(t.crop_size[0]), tuple(t.mean), tuple(t.std),
                      t.interpolation.value, {"pretrained": f"tv:{name}:{w.name}",
                                              "crop_pct": t.crop_size[0] / t.resize_size[0]})


def resolve(ref: str, weights: str | os.PathLike | None = None) -> Pretrained:
    """The architecture, local weight file and preprocessing of ``timm:...`` / ``tv:...``."""
    kind, _, name = str(ref).partition(":")
    return _timm(name, weights) if kind == "timm" else _torchvision(name, weights)


BACKBONE_PREFIXES = ("backbone.", "encoder.", "model.backbone.", "student.backbone.", "teacher.backbone.",
                     "encoder_q.", "base_encoder.")
HEAD_NAMES = ("projection_head.", "projector.", "head.")
INNER_HEADS = {"encoder_q.": "fc.", "base_encoder.": "head."}  # MoCo v1/v2 and v3: the head inside the encoder


@dataclass
class Split:
    """A checkpoint's backbone tensors (prefix removed), projection head tensors and the rest."""

    backbone: dict
    prefix: str = ""
    head: dict = field(default_factory=dict)
    head_prefix: str = ""
    ignored: list = field(default_factory=list)
    head_kind: str = "moco"  # or "dino": an MLP to the bottleneck, then the prototypes (``last_layer``)

    def report(self) -> str:
        groups = Counter(k.split(".")[0] for k in self.ignored)
        used = f"{len(self.backbone)} tensors under {self.prefix!r}" + (
            f" and {len(self.head)} under {self.head_prefix!r} (projection head)" if self.head else "")
        return f"used {used}; ignored {len(self.ignored)}" + (
            f" ({', '.join(f'{g}.* x{n}' for g, n in groups.most_common())})" if self.ignored else "")


def split_checkpoint(sd: dict, prefix: str | None, fits: set) -> Split:
    """The backbone under ``prefix`` (None: the first known prefix present, unless the keys ``fits``
    already) and the projection head beside it (``projector.``, ``projection_head.`` or ``head.``), or
    inside it for MoCo's own checkpoints (:data:`INNER_HEADS`)."""
    if prefix is None:
        prefix = "" if fits <= set(sd) else next((p for p in BACKBONE_PREFIXES if any(k.startswith(p) for k in sd)), "")
    if not prefix:
        return Split(sd)
    parent = prefix[: -len("backbone.")] if prefix.endswith("backbone.") else ""
    names = [prefix + INNER_HEADS[prefix]] if prefix in INNER_HEADS else [parent + h for h in HEAD_NAMES]
    head_prefix = next((h for h in names if any(k.startswith(h) for k in sd)), "")
    part = lambda p: {k[len(p):]: v for k, v in sd.items() if p and k.startswith(p)}  # noqa: E731
    head = part(head_prefix)
    backbone = {k: v for k, v in part(prefix).items() if not (head_prefix and (prefix + k).startswith(head_prefix))}
    if not backbone:
        raise CheckpointError(f"--teacher-prefix {prefix}: no tensor of the checkpoint starts with it")
    kind = "dino" if any(k.startswith("last_layer.") for k in head) else "moco"
    head = {k: v for k, v in head.items() if not k.startswith("last_layer.")}  # DINO's prototypes: not a target
    used = {prefix + k for k in backbone} | {head_prefix + k for k in head}
    return Split(backbone, prefix, head, head_prefix, [k for k in sd if k not in used], kind)


def module_order(tensors: dict) -> dict:
    """``tensors`` sorted by module index (``mlp.2.bias`` after ``mlp.0.weight``): the order a head's
    tensors map in, whatever order the file kept them in (safetensors sorts by name)."""
    return dict(sorted(tensors.items(), key=lambda kv: [(0, int(p), "") if p.isdigit() else (1, 0, p)
                                                        for p in kv[0].split(".")]))


def head_spec(split: Split) -> dict:
    """ModelSpec fields of the projection head of ``split`` ({} without one)."""
    linears = [v for v in split.head.values() if v.ndim == 2]
    if not linears:
        return {}
    return dict(head=split.head_kind, head_hidden=linears[0].shape[0], head_out=linears[-1].shape[0],
                head_layers=len(linears), head_bn=any(k.endswith("running_mean") for k in split.head))
