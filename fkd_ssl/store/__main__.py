"""``python -m fkd_ssl.store verify PATH``: recompute a store's checksums.

Prints ``OK <path> (...)`` and exits 0, or ``error: <the failing file and why>`` and exits 2.
``python -m fkd_ssl.store info PATH`` prints the manifest's summary without reading arrays.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from ..errors import FKDError
from .store import TargetStore


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fkd_ssl.store", description="Check or describe a target store.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("verify", help="recompute every checksum").add_argument("path")
    sub.add_parser("info", help="print the manifest summary").add_argument("path")
    args = p.parse_args(argv)
    store = TargetStore.open(args.path)
    if args.cmd == "verify":
        store.verify()
        print(f"OK {args.path} ({store.num_images} images x {store.views_per_image} views, codec {store.codec.name}, "
              f"{store.nbytes() / 1e6:.1f} MB, {len(store.skipped)} skipped)")
    else:
        m = {k: v for k, v in store.manifest.items() if k not in ("shards", "skipped")}
        m["nbytes"] = store.nbytes()
        print(json.dumps(m, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except FKDError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)
