"""Pretrained teachers by library name: ``timm:<name>[.<tag>]`` and ``tv:<name>[:<WEIGHTS>]``.

The weights come from ``--teacher-weights`` or the library's local cache (Hugging Face / torch hub);
nothing is downloaded.  Preprocessing (mean, std, interpolation, input size) is the library's own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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
            file = Path(hit) if isinstance(hit, str) else file
            if file:
                break
    if file is None and cfg.url and _hub_file(cfg.url).is_file():
        file = _hub_file(cfg.url)
    if file is None:
        where = (f"model.safetensors of https://huggingface.co/{cfg.hf_hub_id} (huggingface-cli download "
                 f"{cfg.hf_hub_id}, cache {constants.HF_HUB_CACHE})" if cfg.hf_hub_id else f"{cfg.url} as {_hub_file(cfg.url)}")
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
