"""Expected target-store sizes for ImageNet-1k, computed from the store format (fkd_ssl.store.sizes).

The totals are the exact sizes of the ``shard-*.records.npy`` and ``shard-*.done.npy`` files;
``tests/test_store_sizes.py`` checks them against real stores and the table in docs/recipes/README.md.

    python bench/store_sizes.py                       # the markdown table (ImageNet-1k)
    python bench/store_sizes.py --images 50000 --views 40,200
"""

import argparse

from fkd_ssl.store.sizes import IMAGENET_TRAIN, SHARD_SIZE, VIEWS, render


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=IMAGENET_TRAIN, help="number of images N (default: ImageNet-1k train)")
    p.add_argument("--views", default=",".join(map(str, VIEWS)), help="comma-separated views per image R")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="gen_targets.py --shard-size")
    args = p.parse_args(argv)
    print(render(args.images, tuple(int(v) for v in args.views.split(",") if v.strip()), args.shard_size), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
