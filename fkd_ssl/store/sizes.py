"""Exact target-store sizes from the format itself (record dtype, numpy's ``.npy`` headers); see bench/store_sizes.py."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np

from . import layout as L
from .codecs import Codec, make_codec

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


def _p(param_dim: int | None) -> int:
    return gen_targets_param_dim() if param_dim is None else param_dim


def record_bytes(codec: Codec, dim: int, param_dim: int | None = None) -> int:
    """Bytes of one stored view: ``param_dim`` float32 parameters + the codec's encoded target."""
    return int(L.record_dtype(_p(param_dim), codec.fields(dim)).itemsize)


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


def store_bytes(num_images: int, views: int, codec: Codec, dim: int, param_dim: int | None = None,
                shard_size: int = SHARD_SIZE) -> int:
    """Exact bytes of a store's record and done-mask files (every shard, headers included)."""
    dt = L.record_dtype(_p(param_dim), codec.fields(dim))
    total = 0
    for s in range(L.num_shards(num_images, shard_size)):
        start, stop = L.shard_range(s, num_images, shard_size)
        n = stop - start
        total += npy_header_bytes(dt, (n, views)) + n * views * dt.itemsize + npy_header_bytes(np.dtype(np.uint8), (n,)) + n
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
    P = gen_targets_param_dim()
    head = ["teacher target", "gen_targets.py flags", "codec", f"bytes/view ({4 * P} params + target)"]
    lines = ["| " + " | ".join(head + [f"R={r}" for r in views]) + " |", "|" + "---|" * 3 + "---:|" * (1 + len(views))]
    for target, flags, name, dim, config in SETTINGS:
        c = make_codec(name, **config)
        row = [target, f"`{flags}`", _codec_label(name, config), f"{record_bytes(c, dim, P)} = {4 * P} + "
               f"{c.bytes_per_view(dim)}"] + [f"{store_bytes(num_images, r, c, dim, P, shard_size) / GB:,.1f} GB" for r in views]
        lines.append("| " + " | ".join(row) + " |")
    top5, R, pub_kb = make_codec("topk", k=5, num_classes=1000), PUBLISHED_VIEWS, PUBLISHED_KB_PER_IMAGE
    ours, geo5 = (store_bytes(num_images, R, top5, 1000, p, shard_size) for p in (P, 5))
    pub = pub_kb * 1e3 * num_images
    lines += [
        "",
        f"Sizes are for N = {num_images:,} images, {shard_size} images per shard, GB = 1e9 bytes: the "
        f"exact bytes of the record and done-mask files; JSON and pq codebooks are extra (under 3 MB).",
        "",
        f"Compared with the published FKD soft labels (top-5, R = {R}): this store holds "
        f"{record_bytes(top5, 1000, P)} bytes per view ({ours / num_images / 1e3:.1f} KB per image, "
        f"{ours / GB:,.1f} GB); the published one-file-per-image layout is reported at about "
        f"{pub_kb} KB per image ({pub / GB:,.1f} GB), about {pub_kb * 1e3 / R:.0f} bytes per view. Most of the "
        f"difference is the view parameters: gen_targets.py stores all {P} float32 parameters even for "
        f"geometry-only views. With 5 (crop box + flip) a record would be {record_bytes(top5, 1000, 5)} bytes "
        f"({geo5 / num_images / 1e3:.1f} KB per image, {geo5 / GB:,.1f} GB); the rest is that the "
        f"geometry stays float32 here (docs/store.md says why).",
    ]
    return "\n".join(lines) + "\n"
