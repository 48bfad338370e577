"""What a store's targets are: the identity a store records and a rerun must match."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

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
