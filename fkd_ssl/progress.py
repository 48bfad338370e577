"""Progress bars: tqdm, quiet on non-rank-0 processes and sparse when not on a terminal."""

from __future__ import annotations

import sys

from tqdm import tqdm


def bar(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True, **kw) -> tqdm:
    """A tqdm bar; updates at most every 10 s when stderr is not a terminal (logs, CI)."""
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5 if interactive else 10.0, **kw)
