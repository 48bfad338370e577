"""Target codecs: how one teacher output per view is packed into fixed-dtype fields.

Encoding is deterministic and row-independent, so a store written in other batches is
byte-identical.  The codecs, their fields and their errors are tabled in docs/store.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
from typing import ClassVar

import numpy as np

from ..errors import ConfigError, DataError

FieldSpec = dict[str, tuple[str, tuple[int, ...]]]


def npy_bytes(a: np.ndarray) -> bytes:
    """The exact bytes ``np.save`` writes for ``a`` (deterministic; no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def array_sha256(a: np.ndarray) -> str:
    """sha256 hex digest of the ``.npy`` bytes of ``a`` (what the codec state file holds)."""
    return hashlib.sha256(npy_bytes(a)).hexdigest()


def _single_thread_blas():
    """Limit BLAS to one thread inside the block if threadpoolctl is installed (else no-op)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def f16_toward_zero(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 rounded toward zero (never above ``x`` for ``x >= 0``): how ``topk`` stores values."""
    x = np.asarray(x, dtype=np.float32)
    half = x.astype(np.float16)
    up = half.astype(np.float32) > x
    half[up] = np.nextafter(half[up], np.float16(0))
    return half


def _as_batch(x: np.ndarray, dim: int | None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"codec input must be 2-D (B, D), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"codec input has D={x.shape[1]}, codec expects {dim}")
    return np.ascontiguousarray(x, dtype=np.float32)


class Codec:
    """Base class: a codec packs float32 rows ``(B, D)`` into fixed-dtype fields (trained ones also fit/save state)."""

    name: ClassVar[str] = ""
    trained: ClassVar[bool] = False

    @property
    def config(self) -> dict:
        """Constructor arguments (JSON-able); ``make_codec(name, **config)`` rebuilds the codec."""
        return {}

    @property
    def params(self) -> dict:
        """Everything that defines the encoding, JSON-able: config plus trained-state references."""
        return dict(self.config)

    @property
    def is_fitted(self) -> bool:
        return True

    def check_dim(self, dim: int) -> None:
        """ConfigError if this codec cannot store targets of dimension ``dim``."""
        if dim < 1:
            raise ConfigError(f"codec {self.name}: target dim must be >= 1, got {dim}")

    def fields(self, dim: int) -> FieldSpec:
        """Field name -> (dtype string, per-row shape) for targets of dimension ``dim``."""
        raise NotImplementedError

    def bytes_per_view(self, dim: int) -> int:
        """Stored bytes of one encoded row of dimension ``dim``."""
        return sum(np.dtype(dt).itemsize * int(np.prod(shape, dtype=np.int64)) for dt, shape in self.fields(dim).values())

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """float32 ``(B, D)`` -> {field: array ``(B, *shape)`` of the field's dtype}."""
        raise NotImplementedError

    def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """{field: ``(B, *shape)``} -> float32 ``(B, D)``."""
        raise NotImplementedError

    def fit(self, sample: np.ndarray) -> "Codec":
        """Train on ``sample`` float32 ``(n, D)`` (trained codecs only); returns ``self``."""
        return self

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Trained state to save in the store: {key: array}; empty for untrained codecs."""
        return {}

    def load_state(self, arrays: dict[str, np.ndarray], params: dict, source: str = "codec state") -> None:
        """Restore state saved by :meth:`state_arrays`, checked against ``params`` (DataError naming ``source``)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


class Fp32Codec(Codec):
    """Lossless float32 features: field ``x`` float32 (D,)."""

    name = "fp32"
    _dtype = "<f4"

    def fields(self, dim: int) -> FieldSpec:
        return {"x": (self._dtype, (dim,))}

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"x": _as_batch(x, None).astype(self._dtype)}

    def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(arrays["x"]).astype(np.float32)


class Fp16Codec(Fp32Codec):
    """Half-precision features: field ``x`` float16 (D,). Values beyond +-65504 are refused."""

    name = "fp16"
    _dtype = "<f2"
    _MAX = float(np.finfo(np.float16).max)

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = _as_batch(x, None)
        if x.size and float(np.abs(x).max()) > self._MAX:
            raise DataError(f"codec fp16: a target value exceeds the float16 range (|x| <= {self._MAX:g}); use fp32 or int8")
        return super().encode(x)


class Int8Codec(Codec):
    """Symmetric per-row int8: ``scale = max|x| / 127`` (float32), ``q = round(x / scale)``; decode ``q * scale``."""

    name = "int8"

    def fields(self, dim: int) -> FieldSpec:
        return {"q": ("<i1", (dim,)), "scale": ("<f4", ())}

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = _as_batch(x, None)
        scale = (np.abs(x).max(axis=1) / np.float32(127.0)).astype(np.float32) if x.shape[1] else np.zeros(len(x), np.float32)
        safe = np.where(scale > 0, scale, np.float32(1.0))
        q = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
        return {"q": q, "scale": scale}

    def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        q = np.asarray(arrays["q"]).astype(np.float32)
        return q * np.asarray(arrays["scale"], dtype=np.float32)[:, None]


class PQCodec(Codec):
    """Product quantisation: D split into M sub-vectors, each coded by one of 256 centroids (field ``codes``).

    The codebooks (faiss k-means, fixed seed, one thread) are the codec state.  Codes are
    batch-independent: near-ties are re-decided in fixed-order float64 (docs/store.md).
    """

    name = "pq"
    trained = True
    _CHUNK = 256  # rows per distance table (small: BLAS stays single-threaded, cache-resident)

    def __init__(self, M: int = 16, nbits: int = 8, seed: int = 1234, max_train: int = 65536):
        if nbits != 8:
            raise ConfigError(f"codec pq: nbits must be 8 (codes are uint8), got {nbits}")
        if M < 1:
            raise ConfigError(f"codec pq: M must be >= 1, got {M}")
        self.M, self.nbits, self.seed, self.max_train = int(M), int(nbits), int(seed), int(max_train)
        self.centroids: np.ndarray | None = None  # float32 (M, 256, dsub)
        self._train_rows: int | None = None
        self._tab: tuple[np.ndarray, np.ndarray] | None = None
        self._pq = None  # faiss.ProductQuantizer, built lazily for encoding

    @property
    def config(self) -> dict:
        return {"M": self.M, "nbits": self.nbits, "seed": self.seed, "max_train": self.max_train}

    @property
    def params(self) -> dict:
        p = dict(self.config)
        if self.centroids is not None:
            p.update(dim=self.dim, train_rows=self._train_rows, centroids_sha256=array_sha256(self.centroids))
        return p

    @property
    def is_fitted(self) -> bool:
        return self.centroids is not None

    @property
    def dim(self) -> int | None:
        return None if self.centroids is None else int(self.M * self.centroids.shape[2])

    def check_dim(self, dim: int) -> None:
        super().check_dim(dim)
        if dim % self.M:
            raise ConfigError(f"codec pq: target dim {dim} is not divisible by M={self.M}")
        if self.dim is not None and dim != self.dim:
            raise ConfigError(f"codec pq: trained on dim {self.dim}, store target dim is {dim}")

    def fields(self, dim: int) -> FieldSpec:
        return {"codes": ("<u1", (self.M,))}

    def fit(self, sample: np.ndarray) -> "PQCodec":
        """Train codebooks on the first ``max_train`` rows of ``sample`` float32 (n, D), n >= 256."""
        import faiss  # imported here: only trained codecs need it

        x = _as_batch(sample, None)[: self.max_train]
        n, dim = x.shape
        self.check_dim(dim)
        if n < 256:
            raise ConfigError(f"codec pq: needs at least 256 training rows, got {n}")
        if not np.isfinite(x).all():
            raise DataError("codec pq: the training sample holds NaN or inf")
        pq = faiss.ProductQuantizer(dim, self.M, self.nbits)
        pq.cp.seed = self.seed
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            pq.train(np.ascontiguousarray(x))
        finally:
            faiss.omp_set_num_threads(threads)
        self.centroids = faiss.vector_to_array(pq.centroids).astype(np.float32).reshape(self.M, pq.ksub, pq.dsub)
        self._tab = self._pq = None
        self._train_rows = int(n)
        return self

    def state_arrays(self) -> dict[str, np.ndarray]:
        if self.centroids is None:
            raise ConfigError("codec pq: call fit(sample) before creating a store")
        return {"centroids": self.centroids}

    def load_state(self, arrays: dict[str, np.ndarray], params: dict, source: str = "codec state") -> None:
        c = np.asarray(arrays["centroids"])
        if c.dtype != np.float32 or c.ndim != 3 or c.shape[0] != self.M or c.shape[1] != 256:
            raise DataError(f"{source}: expected float32 centroids (M={self.M}, 256, dsub), got {c.dtype} {c.shape}")
        if array_sha256(c) != params.get("centroids_sha256"):
            raise DataError(f"{source}: codebook checksum does not match the recorded codec params")
        self.centroids = np.ascontiguousarray(c)
        self._tab = self._pq = None
        self._train_rows = params.get("train_rows")

    def _need(self) -> np.ndarray:
        if self.centroids is None:
            raise ConfigError("codec pq is not trained: call fit(sample) or open it from a store")
        return self.centroids

    def _faiss_pq(self):
        """A faiss ProductQuantizer holding these codebooks (built once, on first encode)."""
        if self._pq is None:
            import faiss

            c = self._need()
            pq = faiss.ProductQuantizer(int(self.M * c.shape[2]), self.M, self.nbits)
            faiss.copy_array_to_vector(np.ascontiguousarray(c).ravel(), pq.centroids)
            self._pq = pq
        return self._pq

    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 (M, dsub, K) of ``-2 c^T`` and (M, K) of ``||c||^2`` (computed in float64)."""
        c = self._need()
        if self._tab is None:
            self._tab = (np.ascontiguousarray(-2.0 * c.transpose(0, 2, 1)).astype(np.float32),
                         (c.astype(np.float64) ** 2).sum(axis=2).astype(np.float32))
        return self._tab

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        c = self._need()
        M, K, dsub = c.shape
        x = _as_batch(x, M * dsub)
        if dsub < 16:  # faiss codes such sub-vectors one row at a time (no BLAS): batch-independent
            return {"codes": self._faiss_pq().compute_codes(x).reshape(len(x), M)}
        with _single_thread_blas():  # tiny products: threads only add contention
            return {"codes": self._encode_wide(x, c)}

    def _encode_wide(self, x: np.ndarray, c: np.ndarray) -> np.ndarray:
        M, K, dsub = c.shape
        ct2, cn = self._tables()
        codes = np.empty((len(x), M), dtype=np.uint8)
        # any float32 summation order errs by at most ~(dsub + 2) * 2^-24 * (|x|^2 + |c|^2); a
        # gap below 8x that may be decided differently in another batch: re-decide it exactly
        slack = np.float32(8 * (dsub + 2) * 2.0 ** -24)
        for start in range(0, len(x), self._CHUNK):
            xb = x[start:start + self._CHUNK]
            rows = np.arange(len(xb))
            for m in range(M):
                xs = xb[:, m * dsub:(m + 1) * dsub]
                d = xs @ ct2[m]  # (b, K): ||x - c||^2 - ||x||^2
                d += cn[m]
                best = d.argmin(axis=1)
                d1 = d[rows, best]
                d[rows, best] = np.inf
                gap = d.min(axis=1) - d1
                close = np.nonzero(gap <= slack * ((xs * xs).sum(axis=1) + cn[m].max()))[0]
                if len(close):
                    best[close] = self._exact_argmin(xs[close], c[m])
                codes[start + rows, m] = best
        return codes

    @staticmethod
    def _exact_argmin(xs: np.ndarray, cm: np.ndarray) -> np.ndarray:
        """Nearest centroid of each row of ``xs`` in ``cm``: float64, fixed summation order, first minimum wins."""
        x64, c64 = xs.astype(np.float64), cm.astype(np.float64)
        acc = np.zeros((len(x64), len(c64)), dtype=np.float64)
        for j in range(x64.shape[1]):
            diff = x64[:, j, None] - c64[None, :, j]
            acc += diff * diff
        return acc.argmin(axis=1)

    def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        c, codes = self._need(), np.asarray(arrays["codes"])
        return c[np.arange(self.M), codes].reshape(len(codes), self.dim)  # (B, M, dsub) -> (B, D)


class TopKCodec(Codec):
    """Top-k class probabilities: fields ``idx`` uint16 (k,) and ``val`` float16 (k,), by descending value.

    Decoding ``mode``: ``"smooth"`` (FKD's marginal smoothing of the remaining mass) or ``"renorm"``.
    """

    name = "topk"
    MODES = ("smooth", "renorm")

    def __init__(self, k: int = 5, num_classes: int = 1000, mode: str = "smooth"):
        if mode not in self.MODES:
            raise ConfigError(f"codec topk: mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        if not 1 <= num_classes <= 65536:
            raise ConfigError(f"codec topk: num_classes must be in 1..65536 (uint16 indices), got {num_classes}")
        if not 1 <= k <= num_classes:
            raise ConfigError(f"codec topk: k must be in 1..num_classes={num_classes}, got {k}")
        self.k, self.num_classes, self.mode = int(k), int(num_classes), mode

    @property
    def config(self) -> dict:
        return {"k": self.k, "num_classes": self.num_classes, "mode": self.mode}

    def check_dim(self, dim: int) -> None:
        if dim != self.num_classes:
            raise ConfigError(f"codec topk: target dim {dim} differs from num_classes={self.num_classes}")

    def fields(self, dim: int) -> FieldSpec:
        return {"idx": ("<u2", (self.k,)), "val": ("<f2", (self.k,))}

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = _as_batch(x, self.num_classes)
        if len(x):
            if float(x.min()) < -1e-6 or float(np.abs(x.sum(axis=1, dtype=np.float64) - 1.0).max()) > 1e-2:
                raise DataError("codec topk: targets must be probabilities (non-negative rows summing to 1); "
                                "apply softmax to the teacher's logits first")
        k, C = self.k, self.num_classes
        if k < C:
            cand = np.argpartition(-x, k - 1, axis=1)[:, :k]
            # canonical order: descending value, then ascending index (lexsort: last key is primary)
            vals = np.take_along_axis(x, cand, axis=1)
            order = np.lexsort((cand, -vals), axis=1)
            idx = np.take_along_axis(cand, order, axis=1)
        else:
            idx = np.lexsort((np.broadcast_to(np.arange(C), x.shape), -x), axis=1)
        # rounded toward zero, so the decoded top-k never hold more mass than the teacher gave them
        return {"idx": idx.astype(np.uint16), "val": f16_toward_zero(np.take_along_axis(x, idx, axis=1))}

    def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        idx = np.asarray(arrays["idx"]).astype(np.intp)
        val = np.asarray(arrays["val"]).astype(np.float32)
        B, k, C = idx.shape[0], self.k, self.num_classes
        total = val.sum(axis=1)
        if self.mode == "renorm":
            out = np.zeros((B, C), dtype=np.float32)
            val = val / np.where(total > 0, total, np.float32(1.0))[:, None]
        else:
            rest = np.maximum(np.float32(1.0) - total, np.float32(0.0)) / np.float32(max(C - k, 1))
            out = np.repeat(rest[:, None], C, axis=1)
        np.put_along_axis(out, idx, val, axis=1)
        return out


class FieldsCodec(Codec):
    """Records of fields the caller encodes itself (e.g. ReLabel's label maps), ``[name, dtype, shape]`` each."""

    name = "fields"

    def __init__(self, fields: list):
        try:
            self.spec: FieldSpec = {str(n): (np.dtype(dt).str, tuple(int(d) for d in shape)) for n, dt, shape in fields}
        except (TypeError, ValueError) as e:
            raise ConfigError(f"codec fields: fields must be [name, dtype, shape] triples, got {fields!r} ({e})") from None
        if not self.spec:
            raise ConfigError("codec fields: needs at least one field")

    @property
    def config(self) -> dict:
        return {"fields": [[n, dt, list(shape)] for n, (dt, shape) in self.spec.items()]}

    def fields(self, dim: int) -> FieldSpec:
        return dict(self.spec)

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        raise ConfigError("codec fields: a store of raw fields is written with write_encoded(), not write()")

    def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        raise ConfigError("codec fields: this store holds raw fields (e.g. label maps), not targets; read its records()")


CODECS: dict[str, type[Codec]] = {c.name: c for c in (Fp32Codec, Fp16Codec, Int8Codec, PQCodec, TopKCodec, FieldsCodec)}


def make_codec(name: str, **config) -> Codec:
    """A codec by name with its constructor arguments, e.g. ``make_codec("topk", k=5, num_classes=1000)``."""
    if name not in CODECS:
        raise ConfigError(f"unknown codec {name!r}: one of {', '.join(CODECS)}")
    try:
        return CODECS[name](**config)
    except TypeError as e:
        raise ConfigError(f"codec {name}: bad parameters {config} ({e})") from None


def codec_from_params(name: str, params: dict) -> Codec:
    """Rebuild a codec from the ``params`` a store recorded (a trained one then needs :meth:`Codec.load_state`)."""
    if name not in CODECS:
        raise DataError(f"store uses unknown codec {name!r} (this fkd_ssl knows {', '.join(CODECS)})")
    keys = inspect.signature(CODECS[name]).parameters  # the constructor's arguments
    return make_codec(name, **{k: v for k, v in params.items() if k in keys})
