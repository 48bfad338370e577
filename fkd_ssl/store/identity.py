"""What a store is: the identity it records (a rerun must match it) and the shape its header fixes."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .geometry import from_spec
from .layout import normalise


@dataclass(frozen=True)
class StoreIdentity:
    """A store's identity: ``teacher``, ``views``, ``seed``, ``group``, ``dataset`` and ``extra`` keys;
    fields left None are not recorded."""

    teacher: Any = None
    views: dict | None = None
    seed: int | None = None
    group: int | None = None
    dataset: Any = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> "StoreIdentity":
        named = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in named}, extra={k: v for k, v in d.items() if k not in named})

    @classmethod
    def of(cls, identity: "StoreIdentity | dict") -> "StoreIdentity":
        """``identity`` as it reads back from JSON (tuples -> lists); ConfigError if not JSON-able."""
        return cls.from_dict(normalise(identity.to_dict() if isinstance(identity, cls) else identity,
                                       "store identity"))


class StoreShape:
    """A store's sizes (N, R, P, D, shards), identity, codec and view geometry, as its header records them."""

    def __init__(self, path: Path, header: dict, codec):
        self.path, self.codec = path, codec
        self.num_images: int = header["num_images"]
        self.views_per_image: int = header["views_per_image"]
        self.param_dim: int = header["param_dim"]
        self.target_dim: int = header["target_dim"]
        self.shard_size: int = header["shard_size"]
        self.num_shards: int = header["num_shards"]
        self.identity = StoreIdentity.from_dict(header["identity"])
        self.geometry = from_spec(header.get("geometry"), self.param_dim)
