"""A store's size, the free space where it goes and its generation time, before it is made (``--plan``)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from . import layout as L
from .codecs import Codec
from .geometry import Geometry
from .sizes import store_bytes

_JSON_PER_SHARD, _JSON = 1500, 4096  # checksum and manifest entries, header and log (upper bounds)


@dataclass(frozen=True)
class StorePlan:
    out: Path
    num_images: int
    views_per_image: int
    total_bytes: int  # every file of the finished store
    existing_bytes: int  # of a store already at ``out`` (resumed: its shards are allocated)
    free_bytes: int
    seconds_per_image: float | None  # measured on a few images, teacher and views in one process
    timed_images: int

    @classmethod
    def of(cls, out: str | os.PathLike, num_images: int, views_per_image: int, codec: Codec, dim: int,
           geometry: Geometry, shard_size: int, step: Callable[[int], object] | None = None,
           sample: int = 4) -> "StorePlan":
        """The plan of a store at ``out``; ``step(i)``: the work for image ``i``, timed on ``sample`` images."""
        out = Path(out).expanduser()
        total = store_bytes(num_images, views_per_image, codec, dim, geometry, shard_size)
        total += _JSON + _JSON_PER_SHARD * L.num_shards(num_images, shard_size) + (256 * dim * 4 if codec.trained else 0)
        total += 2 * len(json.dumps(shlex.join(sys.argv)))  # the command line, in the header and in the log
        existing = sum(f.stat().st_size for f in out.iterdir() if L.is_store_file(f.name)) if out.is_dir() else 0
        where = next(p for p in (out, *out.absolute().parents) if p.exists())
        n = min(sample, num_images - 1)
        seconds = None
        if step is not None and n > 0:
            step(0)  # warm-up
            t0 = time.perf_counter()
            for i in range(1, n + 1):
                step(i)
            seconds = (time.perf_counter() - t0) / n
        return cls(out, num_images, views_per_image, total, existing, shutil.disk_usage(where).free, seconds, n)

    @property
    def needed_bytes(self) -> int:
        return max(self.total_bytes - self.existing_bytes, 0)

    def render(self) -> str:
        gb = lambda b: f"{b / 1e9:,.3f} GB ({b:,} bytes)"  # noqa: E731
        lines = [f"plan: {self.num_images} images x {self.views_per_image} views -> {self.out}",
                 f"  bytes per view (all files): {self.total_bytes / (self.num_images * self.views_per_image):.2f}",
                 f"  store size: {gb(self.total_bytes)} ({gb(self.existing_bytes)} already there)",
                 f"  free space at {self.out}: {gb(self.free_bytes)} -> " + ("fits" if self.fits else "DOES NOT FIT")]
        if self.seconds_per_image is not None:
            h = self.seconds_per_image * self.num_images / 3600
            lines.append(f"  generation time: about {h:.2f} h ({self.seconds_per_image * 1e3:.0f} ms per image, "
                         f"measured on {self.timed_images} images here, one process)")
        return "\n".join(lines)

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.free_bytes

    def check(self) -> None:
        """ConfigError with the numbers if the store cannot fit on the disk at ``out``."""
        if not self.fits:
            raise ConfigError(f"--out {self.out}: the store needs {self.needed_bytes / 1e9:,.3f} GB more "
                              f"({self.total_bytes / 1e9:,.3f} GB in all), {self.free_bytes / 1e9:,.3f} GB are free "
                              f"there; free space or choose another --out (--plan shows the numbers)")
