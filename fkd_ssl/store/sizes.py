"""Exact target-store sizes from the format itself (record dtype, numpy's ``.npy`` headers); see bench/store_sizes.py."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np

from . import layout as L
from .codecs import Codec, make_codec
from .geometry import IMAGE_DTYPE, Geometry, ReplayGeometry

IMAGENET_TRAIN = 1_281_167
VIEWS = (40, 100, 200, 400, 500)
SHARD_SIZE = 4096  # gen_targets.py --shard-size default
GB = 1e9
PUBLISHED_KB_PER_IMAGE, PUBLISHED_VIEWS = 14.5, 500  # the published FKD soft labels (top-5, fp16), as reported


def gen_targets_param_dim() -> int:
    """P, the float32 parameters gen_targets.py stores per view (read from views.py's source without torch)."""
    try:
        from ..views import VIEW_PARAM_DIM
    except ImportError:
        tree = ast.parse((Path(__file__).parents[1] / "views.py").read_text())
        return next(len(ast.literal_eval(n.value)) for n in tree.body if isinstance(n, ast.Assign)
                    and any(getattr(t, "id", None) == "PARAM_FIELDS" for t in n.targets))
    return int(VIEW_PARAM_DIM)


def gen_targets_geometry() -> Geometry:
    """How gen_targets.py keeps view parameters: recomputed (``replay``: nothing per view, 12 bytes per image)."""
    return ReplayGeometry(gen_targets_param_dim(), {}, 0)


def record_bytes(codec: Codec, dim: int, geometry: Geometry | None = None) -> int:
    """Bytes of one stored view: the geometry's fields (none for ``replay``) + the codec's encoded target."""
    return int(L.stored_dtype(geometry or gen_targets_geometry(), codec.fields(dim)).itemsize)


def npy_header_bytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """Bytes of the ``.npy`` header numpy writes for an array of ``dtype`` and ``shape``."""
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # header too long for format 1.0
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return len(buf.getvalue())


def store_bytes(num_images: int, views: int, codec: Codec, dim: int, geometry: Geometry | None = None,
                shard_size: int = SHARD_SIZE) -> int:
    """Exact bytes of a store's record, done-mask and per-image files (every shard, headers included)."""
    geometry = geometry or gen_targets_geometry()
    dt, per_image = L.stored_dtype(geometry, codec.fields(dim)), [np.dtype(np.uint8)] + [geometry.image_dtype] * (
        geometry.image_dtype is not None)
    total = 0
    for s in range(L.num_shards(num_images, shard_size)):
        start, stop = L.shard_range(s, num_images, shard_size)
        n = stop - start
        total += npy_header_bytes(dt, (n, views)) + n * views * dt.itemsize
        total += sum(npy_header_bytes(d, (n,)) + n * d.itemsize for d in per_image)
    return total


_PROJ, _FEAT = "MoCo v2 projection, 128-d (`--target proj`)", "ResNet-50 backbone feature, 2048-d (`--target feature`)"
_PROBS = "1000-class probabilities (`--target probs`)"
# (teacher target, gen_targets.py flags, codec, dim, codec config)
SETTINGS = [(_PROJ, f"--codec {c}", c, 128, {}) for c in ("fp32", "fp16", "int8")] + [
    (_PROJ, "--codec pq --pq-m 16", "pq", 128, {"M": 16}),
    (_FEAT, "--codec fp16", "fp16", 2048, {}), (_FEAT, "--codec int8", "int8", 2048, {}),
    (_FEAT, "--codec pq --pq-m 256", "pq", 2048, {"M": 256}),
    (_PROBS, "--codec topk --topk 5", "topk", 1000, {"k": 5, "num_classes": 1000}),
    (_PROBS, "--codec topk --topk 10", "topk", 1000, {"k": 10, "num_classes": 1000})]


def _codec_label(name: str, config: dict) -> str:
    return {"pq": f"pq M={config.get('M')}", "topk": f"topk k={config.get('k')} (fp16 values)"}.get(name, name)


def render(num_images: int = IMAGENET_TRAIN, views: tuple[int, ...] = VIEWS, shard_size: int = SHARD_SIZE) -> str:
    """The markdown table of store sizes (GB = 1e9 bytes) and the published-layout comparison."""
    P, per_image = gen_targets_param_dim(), 1 + IMAGE_DTYPE.itemsize
    head = ["teacher target", "gen_targets.py flags", "codec", f"bytes/view (+ {per_image} per image)"]
    lines = ["| " + " | ".join(head + [f"R={r}" for r in views]) + " |", "|" + "---|" * 3 + "---:|" * (1 + len(views))]
    for target, flags, name, dim, config in SETTINGS:
        c = make_codec(name, **config)
        row = [target, f"`{flags}`", _codec_label(name, config), str(record_bytes(c, dim))] + \
            [f"{store_bytes(num_images, r, c, dim, shard_size=shard_size) / GB:,.1f} GB" for r in views]
        lines.append("| " + " | ".join(row) + " |")
    top5, R, pub_kb = make_codec("topk", k=5, num_classes=1000), PUBLISHED_VIEWS, PUBLISHED_KB_PER_IMAGE
    ours, v1 = (store_bytes(num_images, R, top5, 1000, g, shard_size) for g in (None, Geometry(P)))
    pub = pub_kb * 1e3 * num_images
    return "\n".join(lines + [
        "",
        f"Sizes are for N = {num_images:,} images, {shard_size} images per shard, GB = 1e9 bytes: the exact "
        f"bytes of the record, done-mask and per-image files ({per_image} bytes per image: done flag, height, "
        f"width, check value); JSON and pq codebooks are extra (under 3 MB).",
        "",
        f"Compared with the published FKD soft labels (top-5, R = {R}): this store holds "
        f"{ours / (num_images * R):.2f} bytes per view all included ({ours / num_images / 1e3:.1f} KB per image, "
        f"{ours / GB:,.1f} GB); the published one-file-per-image layout is reported at about {pub_kb} KB per image "
        f"({pub / GB:,.1f} GB), about {pub_kb * 1e3 / R:.0f} bytes per view. The view parameters are recomputed "
        f"from (seed, image, slot, image size), not stored; format version 1 stored {P} float32 per view "
        f"({record_bytes(top5, 1000, Geometry(P))} bytes per view, {v1 / GB:,.1f} GB).",
    ]) + "\n"
