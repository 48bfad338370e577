"""How a store keeps each view's parameters: recomputed (``replay``), packed fixed-point (``fixed``) or
float32 (``float32``).  The three forms and their checks: docs/store.md."""

from __future__ import annotations

import zlib

import numpy as np

from ..errors import ConfigError, DataError

PARAMS = "params"
#: per image of a ``replay`` store: its size and a CRC-32 of the float32 parameters of its R views
IMAGE_DTYPE = np.dtype([("height", "<u4"), ("width", "<u4"), ("check", "<u4")])
_BITS, _FIX = 15, (1 << 15) - 1  # ``fixed``: crop y, x, h, w as 15-bit fractions and the flip bit


class Geometry:
    """``float32``: the P parameters stored as given (exact, any P)."""

    kind = "float32"
    image_dtype: np.dtype | None = None

    def __init__(self, param_dim: int):
        self.param_dim = int(param_dim)

    def spec(self) -> dict:
        return {"kind": self.kind}

    def fields(self) -> dict:
        return {PARAMS: ("<f4", (self.param_dim,))}

    def encode(self, idx: np.ndarray, params: np.ndarray, sizes) -> tuple[dict, np.ndarray | None]:
        """(per-view fields (B, R, ...), per-image rows (B,) or None) of views ``params`` (B, R, P)."""
        return {PARAMS: params}, None

    def decode(self, raw: np.ndarray, i: np.ndarray, r: np.ndarray, images: np.ndarray | None) -> np.ndarray:
        return np.ascontiguousarray(raw[PARAMS])


class FixedGeometry(Geometry):
    """``fixed``: geometry-only views (crop box as fractions, flip; the rest 0) in one uint64 per view;
    boxes read back to the same pixels for sides up to 32767 pixels."""

    kind = "fixed"

    def fields(self) -> dict:
        return {"box": ("<u8", ())}

    def encode(self, idx, params, sizes):
        if self.param_dim < 5 or params[..., 5:].any() or not np.isin(params[..., 4], (0, 1)).all() \
                or params[..., :4].min() < 0 or params[..., :4].max() > 1:
            raise ValueError("fixed geometry holds crop fractions in [0, 1] and a 0/1 flip only")
        q = np.rint(params[..., :4].astype(np.float64) * _FIX).astype(np.uint64)
        box = params[..., 4].astype(np.uint64) << np.uint64(4 * _BITS)
        for k in range(4):
            box |= q[..., k] << np.uint64(k * _BITS)
        return {"box": box}, None

    def decode(self, raw, i, r, images):
        fields = np.asarray(raw["box"], dtype=np.uint64)[..., None] >> (np.arange(5, dtype=np.uint64) * _BITS)
        out = np.zeros(fields.shape[:-1] + (self.param_dim,), dtype=np.float32)
        out[..., :4] = (fields[..., :4] & np.uint64(_FIX)) / _FIX
        out[..., 4] = fields[..., 4]
        return out


class ReplayGeometry(Geometry):
    """``replay``: nothing per view; per image its size and a check value.  Parameters are recomputed
    with :func:`fkd_ssl.views.sample_views` from ``(seed, image, slot, size)``."""

    kind = "replay"
    image_dtype = IMAGE_DTYPE

    def __init__(self, param_dim: int, views: dict, seed: int):
        super().__init__(param_dim)
        self.views, self.seed = views, int(seed)

    def spec(self) -> dict:
        return {"kind": self.kind, "views": self.views, "seed": self.seed}

    def fields(self) -> dict:
        return {}

    def _sample(self, image: int, slots, height: int, width: int) -> np.ndarray:
        from ..views import ViewConfig, sample_views

        if not hasattr(self, "_cfg"):
            self._cfg = ViewConfig.from_dict(self.views)
        return sample_views(self._cfg, self.seed, int(image), slots, int(height), int(width))

    def encode(self, idx, params, sizes):
        if sizes is None:
            raise ValueError("a replay store needs the image sizes (height, width) of the views written")
        rows = np.zeros(len(idx), IMAGE_DTYPE)
        for b, (i, (h, w)) in enumerate(zip(idx, np.asarray(sizes))):
            if not np.array_equal(self._sample(i, range(params.shape[1]), h, w), params[b]):
                raise ConfigError(f"the views given for image {i} are not the store's sampler's: its seed "
                                  f"{self.seed} and view config recompute others; write them to a float32 store")
            rows[b] = (h, w, zlib.crc32(np.ascontiguousarray(params[b], "<f4").tobytes()))
        return {}, rows

    def decode(self, raw, i, r, images):
        out = np.empty((len(i), self.param_dim), dtype=np.float32)
        for ii in np.unique(i):  # one call per image (a loader's K views are of one image)
            sel = np.flatnonzero(i == ii)
            out[sel] = self._sample(ii, r[sel], images[sel[0]]["height"], images[sel[0]]["width"])
        return out

    def mismatched(self, idx: np.ndarray, images: np.ndarray, views_per_image: int) -> list[int]:
        """The images of ``idx`` whose R recomputed views differ from those their check value records."""
        return [int(i) for i, im in zip(idx, images) if zlib.crc32(np.ascontiguousarray(
            self._sample(i, range(views_per_image), im["height"], im["width"]), "<f4").tobytes()) != im["check"]]


def from_spec(spec: dict | None, param_dim: int) -> Geometry:
    """The geometry a header records (none: ``float32``, stores of format version 1)."""
    spec = spec or {"kind": "float32"}
    kinds = {c.kind: c for c in (Geometry, FixedGeometry, ReplayGeometry)}
    if spec.get("kind") not in kinds:
        raise DataError(f"unknown store geometry {spec.get('kind')!r} (this fkd_ssl reads {', '.join(kinds)})")
    extra = {k: v for k, v in spec.items() if k != "kind"}
    return kinds[spec["kind"]](param_dim, **extra)


def default_geometry(param_dim: int, identity: dict) -> Geometry:
    """``fixed`` for the view parameters of geometry-only views (the identity's views say so), else ``float32``."""
    from ..views import VIEW_PARAM_DIM

    geometry_only = (identity.get("views") or {}).get("photometric") is False
    return (FixedGeometry if geometry_only and param_dim == VIEW_PARAM_DIM else Geometry)(param_dim)
