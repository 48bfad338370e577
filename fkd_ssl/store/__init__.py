"""The target store: per stored view its geometry and the teacher's target, packed by a codec.

Format: ``docs/store.md``.  :class:`StoreWriter` / :func:`finalize` write a store, :class:`TargetStore` reads one.
"""

from .codecs import CODECS, Codec, FieldsCodec, Fp16Codec, Fp32Codec, Int8Codec, PQCodec, TopKCodec, make_codec
from .identity import StoreIdentity
from .layout import FORMAT, VERSION
from .store import TargetStore
from .writer import StoreWriter, finalize, owned_shards
