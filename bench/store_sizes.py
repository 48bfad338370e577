"""Expected target-store sizes for ImageNet-1k, computed from the store format itself.

Nothing here is measured or guessed: the bytes of one record come from the store's own record
dtype (``fkd_ssl.store.layout.record_dtype``: the view's float32 parameters followed by the
codec's fields, packed) and the per-shard ``.npy`` headers from numpy's own header writer, so
the totals are the exact sizes of the ``shard-*.records.npy`` and ``shard-*.done.npy`` files that
``experiments/gen_targets.py`` writes.  ``tests/test_store_sizes.py`` checks these functions
against real stores written by ``StoreWriter``, and that the table in
``experiments/recipes/README.md`` is this script's current output.

Not counted (a few hundred KB for ImageNet-1k): per shard a ``sha256.json`` (~0.5 KB) and a
``skipped.json``, the header, manifest and log, and pq's codebooks (``M x 256 x D/M`` float32:
128 KB for D = 128, 2 MB for D = 2048).

    python bench/store_sizes.py                       # the markdown table (ImageNet-1k)
    python bench/store_sizes.py --images 50000 --views 40,200
"""

from __future__ import annotations

import argparse
import ast
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import fkd_ssl
from fkd_ssl.store import Codec, make_codec
from fkd_ssl.store import layout as L

IMAGENET_TRAIN = 1_281_167
VIEWS = (40, 100, 200, 400, 500)
SHARD_SIZE = 4096  # gen_targets.py --shard-size default
GB = 1e9

# The published FKD soft labels (one torch.save file per image, 500 crops, top-5, fp16), as
# reported by its authors; not derived from this project's format.
PUBLISHED_KB_PER_IMAGE = 14.5
PUBLISHED_VIEWS = 500


def gen_targets_param_dim() -> int:
    """P, the float32 parameters gen_targets.py stores per view (``fkd_ssl.views.VIEW_PARAM_DIM``).

    Read from the source's ``PARAM_FIELDS`` when torch (which ``fkd_ssl.views`` imports) is absent.
    """
    try:
        from fkd_ssl.views import VIEW_PARAM_DIM
    except ImportError:
        tree = ast.parse((Path(fkd_ssl.__file__).parent / "views.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PARAM_FIELDS" for t in node.targets):
                return len(ast.literal_eval(node.value))
        raise RuntimeError("fkd_ssl/views.py defines no PARAM_FIELDS") from None
    return int(VIEW_PARAM_DIM)


def record_bytes(codec: Codec, dim: int, param_dim: int | None = None) -> int:
    """Bytes of one stored view: ``param_dim`` float32 parameters + the codec's encoded target."""
    p = gen_targets_param_dim() if param_dim is None else param_dim
    return int(L.record_dtype(p, codec.fields(dim)).itemsize)


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
    p = gen_targets_param_dim() if param_dim is None else param_dim
    dt = L.record_dtype(p, codec.fields(dim))
    total = 0
    for s in range(L.num_shards(num_images, shard_size)):
        start, stop = L.shard_range(s, num_images, shard_size)
        n = stop - start
        total += npy_header_bytes(dt, (n, views)) + n * views * dt.itemsize
        total += npy_header_bytes(np.dtype(np.uint8), (n,)) + n
    return total


@dataclass(frozen=True)
class Setting:
    target: str  # what the teacher outputs
    flags: str  # the gen_targets.py flags that make such a store
    codec: str
    dim: int
    config: dict = field(default_factory=dict)

    def make(self) -> Codec:
        return make_codec(self.codec, **self.config)

    @property
    def codec_label(self) -> str:
        if self.codec == "pq":
            return f"pq M={self.config['M']}"
        if self.codec == "topk":
            return f"topk k={self.config['k']} (fp16 values)"
        return self.codec


PROJ = "MoCo v2 projection, 128-d (`--target proj`)"
FEAT = "ResNet-50 backbone feature, 2048-d (`--target feature`)"
PROBS = "1000-class probabilities (`--target probs`)"

SETTINGS = (
    Setting(PROJ, "--codec fp32", "fp32", 128),
    Setting(PROJ, "--codec fp16", "fp16", 128),
    Setting(PROJ, "--codec int8", "int8", 128),
    Setting(PROJ, "--codec pq --pq-m 16", "pq", 128, {"M": 16}),
    Setting(FEAT, "--codec fp16", "fp16", 2048),
    Setting(FEAT, "--codec int8", "int8", 2048),
    Setting(FEAT, "--codec pq --pq-m 256", "pq", 2048, {"M": 256}),
    Setting(PROBS, "--codec topk --topk 5", "topk", 1000, {"k": 5, "num_classes": 1000}),
    Setting(PROBS, "--codec topk --topk 10", "topk", 1000, {"k": 10, "num_classes": 1000}),
)


def render(num_images: int = IMAGENET_TRAIN, views: tuple[int, ...] = VIEWS, shard_size: int = SHARD_SIZE) -> str:
    """The markdown table of store sizes (GB = 1e9 bytes) and the published-layout comparison."""
    P = gen_targets_param_dim()
    head = ["teacher target", "gen_targets.py flags", "codec", f"bytes/view ({4 * P} params + target)"]
    head += [f"R={r}" for r in views]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (1 + len(views))]
    for s in SETTINGS:
        c = s.make()
        rb = record_bytes(c, s.dim, P)
        row = [s.target, f"`{s.flags}`", s.codec_label, f"{rb} = {4 * P} + {c.bytes_per_view(s.dim)}"]
        row += [f"{store_bytes(num_images, r, c, s.dim, P, shard_size) / GB:,.1f} GB" for r in views]
        lines.append("| " + " | ".join(row) + " |")

    top5 = make_codec("topk", k=5, num_classes=1000)
    R = PUBLISHED_VIEWS
    ours = store_bytes(num_images, R, top5, 1000, P, shard_size)
    geo5 = store_bytes(num_images, R, top5, 1000, 5, shard_size)
    pub = PUBLISHED_KB_PER_IMAGE * 1e3 * num_images
    lines += [
        "",
        f"Sizes are for N = {num_images:,} images, {shard_size} images per shard, GB = 1e9 bytes: the "
        f"exact bytes of the record and done-mask files; JSON and pq codebooks are extra (under 3 MB).",
        "",
        f"Compared with the published FKD soft labels (top-5, R = {R}): this store holds "
        f"{record_bytes(top5, 1000, P)} bytes per view ({ours / num_images / 1e3:.1f} KB per image, "
        f"{ours / GB:,.1f} GB); the published one-file-per-image layout is reported at about "
        f"{PUBLISHED_KB_PER_IMAGE} KB per image ({pub / GB:,.1f} GB), about "
        f"{PUBLISHED_KB_PER_IMAGE * 1e3 / R:.0f} bytes per view. Most of the difference is the view "
        f"parameters: gen_targets.py stores all {P} float32 parameters even for geometry-only views. "
        f"With 5 (crop box + flip) a record would be {record_bytes(top5, 1000, 5)} bytes "
        f"({geo5 / num_images / 1e3:.1f} KB per image, {geo5 / GB:,.1f} GB); the rest is that the "
        f"geometry stays float32 here (docs/store.md says why).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=IMAGENET_TRAIN, help="number of images N (default: ImageNet-1k train)")
    p.add_argument("--views", default=",".join(map(str, VIEWS)), help="comma-separated views per image R")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="gen_targets.py --shard-size")
    args = p.parse_args(argv)
    views = tuple(int(v) for v in args.views.split(",") if v.strip())
    print(render(args.images, views, args.shard_size), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
