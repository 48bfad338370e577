"""The target store: what the teacher said about every stored view, on disk.

A teacher runs once over R random views of each of N images; for every view the store keeps
the view's geometry (P float32, bit-exact) and the teacher's target packed by a codec
(:mod:`fkd_ssl.store.codecs`).  Students read any ``(image, view)`` record at random without
running the teacher.  Format: ``docs/store.md``; layout: :mod:`fkd_ssl.store.layout`.

* :class:`StoreWriter` / :func:`finalize` write a store (sharded, resumable, multi-process);
* :class:`TargetStore` reads one; ``python -m fkd_ssl.store verify PATH`` checks one.
"""

from .codecs import CODECS, Codec, FieldsCodec, Fp16Codec, Fp32Codec, Int8Codec, PQCodec, TopKCodec, make_codec
from .identity import StoreIdentity
from .layout import FORMAT, VERSION
from .store import TargetStore
from .writer import StoreWriter, finalize, owned_shards

__all__ = [
    "CODECS", "Codec", "FieldsCodec", "Fp16Codec", "Fp32Codec", "Int8Codec", "PQCodec", "TopKCodec", "make_codec",
    "FORMAT", "VERSION", "StoreIdentity", "TargetStore", "StoreWriter", "finalize", "owned_shards",
]
