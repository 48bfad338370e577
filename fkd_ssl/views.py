"""Sample and replay random views (crops + photometric augmentation) exactly.

A view is a float32 parameter vector (:data:`PARAM_FIELDS`), a pure function of ``(seed, image, slot)`` and
the image size; :func:`render_view` turns it into exactly the pixels the teacher saw.  The recipe is
MoCo v2's with every random draw explicit (docs/distill.md).
"""

from __future__ import annotations

import math
import platform
from dataclasses import asdict, dataclass
from itertools import permutations
from typing import NamedTuple

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .errors import ConfigError

#: Fields of a view's parameter vector (all float32).
PARAM_FIELDS = ("y", "x", "h", "w", "flip", "jitter", "brightness", "contrast", "saturation", "hue",
                "order", "gray", "blur_sigma", "solarize")
VIEW_PARAM_DIM = len(PARAM_FIELDS)
_IDX = {name: k for k, name in enumerate(PARAM_FIELDS)}
_ORDERS = list(permutations(range(4)))  # 24 orders of (brightness, contrast, saturation, hue)
_INTERP = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
           "nearest": InterpolationMode.NEAREST}
#: modes F.resize hands to torch's interpolate as uint8 on this CPU (torchvision's rule); called directly, they skip
#: F.resize's checks (a fifth of a 224 px resize)
_NATIVE_UINT8 = {"nearest", "bicubic"} | ({"bilinear"} if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                                          or platform.machine() in ("aarch64", "arm64") else set())


@dataclass(frozen=True)
class ViewConfig:
    """The view distribution; saved in stores and run configs (it is part of their identity)."""

    size: int = 64  # output side in pixels
    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio
    hflip: float = 0.5
    photometric: bool = True  # False: geometry only (supervised FKD)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ConfigError(f"view size must be > 0, got {self.size}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if self.interpolation not in _INTERP:
            raise ConfigError(f"interpolation {self.interpolation!r}: one of {', '.join(_INTERP)}")
        for name in ("scale", "ratio", "blur_sigma"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViewConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ----------------------------------------------------------------------------- sampling


def _crop_box(rng: np.random.Generator, height: int, width: int, cfg: ViewConfig) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w) in pixels."""
    area = height * width
    log_ratio = (math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(cfg.scale[0], cfg.scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # fallback: the central crop with the aspect ratio clamped into range
    in_ratio = width / height
    if in_ratio < cfg.ratio[0]:
        w, h = width, int(round(width / cfg.ratio[0]))
    elif in_ratio > cfg.ratio[1]:
        h, w = height, int(round(height * cfg.ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _draws(rng: np.random.Generator, height: int, width: int, cfg: ViewConfig) -> list[float]:
    """One view's parameters (:data:`PARAM_FIELDS` order, trailing zeros left out), drawn from ``rng``."""
    top, left, h, w = _crop_box(rng, height, width, cfg)
    out = [top / height, left / width, h / height, w / width, float(rng.random() < cfg.hflip)]
    if cfg.photometric:
        if rng.random() < cfg.jitter_p:
            out += [1.0, rng.uniform(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness),
                    rng.uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast),
                    rng.uniform(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation),
                    rng.uniform(-cfg.hue, cfg.hue), float(rng.integers(len(_ORDERS)))]
        else:
            out += [0.0] * 6
        out.append(float(rng.random() < cfg.gray_p))
        out.append(rng.uniform(*cfg.blur_sigma) if rng.random() < cfg.blur_p else 0.0)
        out.append(float(rng.random() < cfg.solarize_p))
    return out


def sample_views(cfg: ViewConfig, seed: int, image: int, slots, height: int, width: int) -> np.ndarray:
    """Parameters of views ``slots`` of image ``image``, ``(len(slots), VIEW_PARAM_DIM)`` float32: each a pure
    function of ``(seed, image, slot)`` and the image size."""
    out = np.zeros((len(slots), VIEW_PARAM_DIM), dtype=np.float32)
    for row, slot in zip(out, slots):
        vals = _draws(np.random.default_rng([int(seed), int(image), int(slot)]), height, width, cfg)
        row[:len(vals)] = vals
    return out


# ----------------------------------------------------------------------------- replay


def crop_pixels(p: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """The integer pixel box (top, left, h, w) a parameter vector's fractions stand for."""
    top = int(round(float(p[0]) * height))
    left = int(round(float(p[1]) * width))
    h = max(1, int(round(float(p[2]) * height)))
    w = max(1, int(round(float(p[3]) * width)))
    return top, left, min(h, height - top), min(w, width - left)


def _photometric(out: torch.Tensor, p: np.ndarray, cfg: ViewConfig) -> torch.Tensor:
    """The view's colour jitter, grayscale, blur and solarize on uint8 ``(3, S, S)`` (``out`` itself if none)."""
    if p[_IDX["jitter"]] > 0.5:
        ops = (
            lambda t: F.adjust_brightness(t, float(p[_IDX["brightness"]])),
            lambda t: F.adjust_contrast(t, float(p[_IDX["contrast"]])),
            lambda t: F.adjust_saturation(t, float(p[_IDX["saturation"]])),
            lambda t: F.adjust_hue(t, float(p[_IDX["hue"]])),
        )
        for k in _ORDERS[int(p[_IDX["order"]])]:
            out = ops[k](out)
    if p[_IDX["gray"]] > 0.5:
        out = F.rgb_to_grayscale(out, num_output_channels=3)
    sigma = float(p[_IDX["blur_sigma"]])
    if sigma > 0:
        k = min(2 * math.ceil(3 * sigma) + 1, cfg.size - (1 - cfg.size % 2))
        out = F.gaussian_blur(out, [k, k], [sigma, sigma])
    if p[_IDX["solarize"]] > 0.5:
        out = F.solarize(out, 128)
    return out


def _resize(crop: torch.Tensor, cfg: ViewConfig) -> torch.Tensor:
    """``F.resize(crop, S, antialias=True)`` for uint8 ``(1, 3, h, w)``, the same pixels by the shortest path."""
    mode, size = cfg.interpolation, [cfg.size, cfg.size]
    if mode not in _NATIVE_UINT8:
        return F.resize(crop, size, interpolation=_INTERP[mode], antialias=True)
    exact = mode == "nearest"
    return torch.nn.functional.interpolate(crop, size, mode=mode, align_corners=None if exact else False, antialias=not exact)


def render_views(img: torch.Tensor, params: np.ndarray, cfg: ViewConfig) -> torch.Tensor:
    """Replay views of one decoded image: uint8 ``(3, H, W)`` + ``(V, P)`` params -> uint8 ``(V, 3, S, S)``, the
    pixels of ``F.resized_crop`` + ``F.horizontal_flip``.  Crops are resized channels-last (the native uint8
    kernels' layout) and moved to ``(3, S, S)`` by numpy (twice torch's speed at it)."""
    _, height, width = img.shape
    out = torch.empty((len(params), 3, cfg.size, cfg.size), dtype=torch.uint8)
    for v, p in enumerate(params):
        top, left, h, w = crop_pixels(p, height, width)
        crop = img[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
        src = _resize(crop, cfg)[0].numpy()
        view = out[v]
        np.copyto(view.numpy(), src)
        if p[_IDX["flip"]] > 0.5:
            view.copy_(view.flip(-1))
        view.copy_(_photometric(view, p, cfg))  # a no-op without photometric ops (copy_ of itself)
    return out


def render_view(img: torch.Tensor, p: np.ndarray, cfg: ViewConfig) -> torch.Tensor:
    """Replay one view: uint8 ``(3, H, W)`` image + parameters -> uint8 ``(3, S, S)`` view."""
    return render_views(img, np.asarray(p)[None], cfg)[0]


def normalize(x: torch.Tensor, mean, std, channels_last: bool = False) -> torch.Tensor:
    """uint8 ``(B, 3, S, S)`` -> float32 normalised with per-channel ``mean`` / ``std`` (0–1 scale)."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    x = (x.float() - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class ViewsBatch(NamedTuple):
    """An item of :class:`RandomViewsDataset` (a batch once collated: a leading ``B`` on each field)."""

    views: torch.Tensor  # uint8 (n_views, 3, S, S)
    label: int
    image: int


class RandomViewsDataset(torch.utils.data.Dataset):
    """Fresh random views for online training: key ``(i, epoch)`` -> :class:`ViewsBatch` of image ``i``
    (slot ``epoch * n_views + v``, so every epoch sees new views)."""

    def __init__(self, base, cfg: ViewConfig, seed: int, n_views: int = 2):
        self.base, self.cfg, self.seed, self.n_views = base, cfg, seed, n_views

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        from .data.image_io import pil_to_uint8_tensor

        i, epoch = key
        img = pil_to_uint8_tensor(self.base.load(i))
        _, h, w = img.shape
        params = sample_views(self.cfg, self.seed, i, range(epoch * self.n_views, (epoch + 1) * self.n_views), h, w)
        return ViewsBatch(render_views(img, params, self.cfg), self.base.targets[i], i)
