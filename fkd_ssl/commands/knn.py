"""kNN evaluation of frozen features (``fkd-knn``; usage lines in ``eval/knn.py``)."""

from __future__ import annotations

from typing import Sequence

from ..cli import add_common_args, parser, positive_float, positive_int, run_main
from ..evaluation.commands import add_cache_args, add_output_args, add_source_args, int_list, run_knn
from ..evaluation.knn import DEFAULT_KS, DEFAULT_T


def build_parser():
    p = parser("kNN classification of frozen features (train split = bank, val split = queries).")
    add_source_args(p)
    add_common_args(p, ("data", "data_root", "out", "batch_size", "workers", "device", "seed"))
    g = p.add_argument_group("kNN")
    g.add_argument("--k", type=int_list("--k", allow_empty=True), default=list(DEFAULT_KS),
                   help="neighbour counts for the weighted vote (comma-separated, or none)")
    g.add_argument("--majority-k", type=int_list("--majority-k", allow_empty=True), default=[1],
                   help="neighbour counts for the plain majority vote (1 = nearest neighbour; or none)")
    g.add_argument("--temperature", type=positive_float("--temperature"), default=DEFAULT_T,
                   help="T of the exp(sim / T) vote weights")
    g.add_argument("--query-chunk", type=positive_int("--query-chunk"), default=8192, help="queries per search call")
    add_cache_args(p)
    add_output_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


run = run_knn


def console() -> None:
    run_main(main)
