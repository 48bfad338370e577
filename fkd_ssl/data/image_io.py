"""Robust image decoding shared by every dataset.

All images become 8-bit RGB whatever they were stored as (grayscale, palette, CMYK, 16-bit,
RGBA).  A file that cannot be decoded raises :class:`~fkd_ssl.errors.DataError` naming it.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")

# A decompression-bomb guard that still admits large photos (~ 16k x 16k).
Image.MAX_IMAGE_PIXELS = 16384 * 16384


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB (16-bit and float modes are rescaled, not clipped)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB") if img.mode != "RGB" else img


@contextlib.contextmanager
def _decoding(path):
    """Open ``path`` with PIL; any failure to read or decode becomes one DataError naming the file."""
    from ..errors import DataError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                yield img
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {path}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise DataError(f"cannot decode image {path}: {e}") from e


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` to an RGB PIL image; raises DataError naming the file if unreadable."""
    with _decoding(path) as img:
        img.load()
        return to_rgb(img)


def read_uint8(path: str | os.PathLike, min_crop: tuple[float, float] | None = None, size: int = 0) -> torch.Tensor:
    """Decode ``path`` to uint8 ``(3, H, W)``; a JPEG is drafted (decoded at 1/2, 1/4 or 1/8 size) at
    the smallest scale at which every crop of ``min_crop`` (fractions of the image) keeps ``>= size``
    pixels a side."""
    with _decoding(path) as img:
        if img.format == "JPEG" and min_crop is not None:
            w, h = img.size
            factor = 1
            while factor < 8 and min(min_crop[0] * h, min_crop[1] * w) / (factor * 2) >= size:
                factor *= 2
            if factor > 1:
                img.draft("RGB", (math.ceil(w / factor), math.ceil(h / factor)))
        img.load()
        return torch.from_numpy(np.array(to_rgb(img), dtype=np.uint8)).permute(2, 0, 1)


def pil_to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W), contiguous."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_uint8(dataset, index: int) -> tuple[torch.Tensor | None, str | None]:
    """Image ``index`` of ``dataset`` (anything with ``load(index) -> PIL image``) as uint8
    ``(3, H, W)`` and ``None``, or ``(None, reason)`` when it cannot be decoded (``DataError``;
    the reason on one line, for a skipped-images list).  Other exceptions propagate."""
    from ..errors import DataError

    try:
        return pil_to_uint8_tensor(dataset.load(index)), None
    except DataError as e:
        return None, " ".join(str(e).split())
