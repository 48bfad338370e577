"""Linear probe of frozen features (``fkd-linear-probe``; usage lines in ``eval/linear_probe.py``)."""

from __future__ import annotations

from typing import Sequence

from ..cli import add_common_args, parser, positive_float, positive_int, run_main
from ..evaluation.commands import add_cache_args, add_output_args, add_source_args, float_list, run_linear_probe


def build_parser():
    p = parser("Linear probe of frozen features (fast: logistic regression on cached features; "
               "--full: augmented images, SGD, MoCo v3 style).")
    add_source_args(p)
    add_common_args(p, ("data", "data_root", "out", "batch_size", "workers", "device", "seed"))
    g = p.add_argument_group("fast probe")
    g.add_argument("--wd", type=float_list("--wd"), default=None,
                   help="weight decays to sweep (default 1e-6,...,1e-1); with --full, the one SGD weight decay (default 0)")
    g.add_argument("--holdout", type=positive_float("--holdout"), default=0.1,
                   help="fraction of the train split held out to choose the weight decay")
    g.add_argument("--max-iter", type=positive_int("--max-iter"), default=100, help="L-BFGS iterations per fit")
    g = p.add_argument_group("full probe")
    g.add_argument("--full", action="store_true", help="the standard protocol (for GPU runs)")
    g.add_argument("--epochs", type=positive_int("--epochs"), default=90, help="--full: passes over the images (a sample is an image)")
    g.add_argument("--lr", type=positive_float("--lr"), default=0.1, help="SGD learning rate per 256 images")
    add_cache_args(p)
    add_output_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.holdout >= 1:
        p.error(f"--holdout must be < 1 (a fraction of the train split), got {args.holdout}")
    return run(args)


run = run_linear_probe


def console() -> None:
    run_main(main)
