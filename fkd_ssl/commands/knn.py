"""kNN evaluation of frozen features (``fkd-knn``; usage lines in ``eval/knn.py``)."""

from __future__ import annotations

import argparse
import time

from ..cli import entry_points, number_list, positive_float, positive_int
from ..dist import session
from ..errors import ConfigError
from ..evaluation import commands as E
from ..evaluation import knn as knn_mod
from ..evaluation.knn import DEFAULT_KS, DEFAULT_T


def build_parser():
    p = E.parser("kNN classification of frozen features (train split = bank, val split = queries).")
    g = p.add_argument_group("kNN")
    g.add_argument("--k", type=number_list(int, "--k", allow_empty=True), default=list(DEFAULT_KS),
                   help="neighbour counts for the weighted vote (comma-separated, or none)")
    g.add_argument("--majority-k", type=number_list(int, "--majority-k", allow_empty=True), default=[1],
                   help="neighbour counts for the plain majority vote (1 = nearest neighbour; or none)")
    g.add_argument("--temperature", type=positive_float("--temperature"), default=DEFAULT_T,
                   help="T of the exp(sim / T) vote weights")
    g.add_argument("--query-chunk", type=positive_int("--query-chunk"), default=8192, help="queries per search call")
    return E.add_cache_and_output_args(p)


def run(args: argparse.Namespace) -> int:
    """kNN evaluation (see :mod:`fkd_ssl.evaluation.knn`)."""
    t0 = time.time()
    with session(args.device) as ctx:
        source, out, train, val = E.start(args, ctx)
        all_k = args.k + args.majority_k
        if not all_k:
            raise ConfigError("--k none and --majority-k none: nothing to evaluate")
        if max(all_k) > len(train):
            raise ConfigError(f"--k {max(all_k)} exceeds the {len(train)} train images of --data {args.data}")
        tf, vf = E.features(args, source, train, val, ctx)
        if not ctx.is_main:
            return 0
        assert tf is not None and vf is not None
        t_extract = time.time() - t0
        use_gpu = ctx.device.type == "cuda" and knn_mod.faiss_gpu_available()
        results = knn_mod.knn_evaluate(tf.features, tf.labels, vf.features, vf.labels, train.num_classes,
                                       ks=args.k, majority_ks=args.majority_k, temperature=args.temperature,
                                       query_chunk=args.query_chunk, use_gpu=use_gpu)
        seconds = time.time() - t0
        cached = tf.cached and vf.cached
        path = E.finish(args, out, "knn", source, train, val, [
            dict(protocol="knn" if r.vote == "weighted" else "knn-majority", k=r.k, temperature=r.temperature,
                 top1=r.top1, top5=r.top5, seconds=seconds, extract_seconds=t_extract, cached=cached,
                 extra={"faiss_gpu": use_gpu, "eval_seconds": round(seconds - t_extract, 3)}) for r in results])
        parts = " ".join(("1-NN" if (r.vote == "majority" and r.k == 1) else
                          f"{'k' if r.vote == 'weighted' else 'maj-k'}={r.k}") + f" {r.top1:.1f}/{r.top5:.1f}"
                         for r in results)
        print(f"knn: {E.header(source, train, val, cached)} | top1/top5 % {parts} | T={args.temperature} | "
              f"{seconds:.1f} s -> {path}", flush=True)
        return 0


main, console = entry_points(__name__)
