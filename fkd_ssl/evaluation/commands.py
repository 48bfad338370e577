"""The wiring behind ``eval/knn.py``, ``eval/linear_probe.py`` and ``eval/report.py``.

Each ``run_*`` runs one evaluation, writes ``<out>/<protocol>.json`` and appends to ``--results``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from ..cli import prepare_out_dir
from ..data.datasets import IndexedDataset, build_dataset
from ..dist import DistContext, main_first, session
from ..errors import ConfigError, DataError
from ..fileio import write_text_atomic
from . import knn as knn_mod
from .features import DTYPES, OUTPUTS, FeatureSet, FeatureSource, default_out_dir, extract_features, resolve_source
from .probe import DEFAULT_WDS, fast_linear_probe
from .results import append_rows, load_rows, make_row, render_markdown, render_png, write_csv, write_json

DEFAULT_RESULTS = "runs/results.jsonl"


def int_list(flag: str, allow_empty: bool = False):
    """argparse type: ``10,20,100`` -> [10, 20, 100] (``none`` -> [] when allowed)."""
    def parse(text: str) -> list[int]:
        if allow_empty and text.strip().lower() in ("", "none"):
            return []
        try:
            values = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects comma-separated integers, got {text!r}") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{flag} expects integers >= 1, got {text!r}")
        return sorted(set(values))
    return parse


def float_list(flag: str):
    """argparse type: ``1e-4,1e-3`` -> [0.0001, 0.001] (all >= 0)."""
    def parse(text: str) -> list[float]:
        try:
            values = [float(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects comma-separated numbers, got {text!r}") from None
        if not values or not all(math.isfinite(v) and v >= 0 for v in values):
            raise argparse.ArgumentTypeError(f"{flag} expects numbers >= 0, got {text!r}")
        return values
    return parse


def add_source_args(p: argparse.ArgumentParser) -> None:
    """``--checkpoint`` and how to read it."""
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True,
                   help="a checkpoint (X.safetensors / X.json), a named teacher (effnet-lite0), random:ARCH "
                        "(random init) or pixels[:SIZE] (raw pixels)")
    g.add_argument("--arch", default=None, help="architecture of a plain timm/torchvision state dict (tv:<name>)")
    g.add_argument("--stem", default=None, choices=("default", "small", "cifar"), help="stem of random:ARCH")
    g.add_argument("--input-size", type=int, default=None,
                   help="eval resolution (default: the checkpoint's; 224 for random:ARCH, 32 for pixels)")
    g.add_argument("--features", default="backbone", choices=OUTPUTS,
                   help="backbone output, or the projection head output")
    g.add_argument("--name", default=None, help="label of the model in result tables (default: from --checkpoint)")


def add_cache_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("feature cache")
    g.add_argument("--cache-dir", default=None, help="feature cache folder (default: <data-root>/features)")
    g.add_argument("--no-cache", action="store_true", help="extract into memory, write no cache")
    g.add_argument("--cache-dtype", default="float16", choices=DTYPES, help="storage dtype of cached features")


def add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--results", default=DEFAULT_RESULTS, help="results table that accumulates rows (.jsonl or .csv)")


def load_splits(spec: str, data_root: str, ctx: DistContext) -> tuple[IndexedDataset, IndexedDataset]:
    """Train and val splits of ``--data``; DataError if a split is missing or they disagree on classes."""
    with main_first(ctx):
        train = build_dataset(spec, "train", root=data_root, verbose=ctx.is_main)
        val = build_dataset(spec, "val", root=data_root, verbose=ctx.is_main)
    if train.classes != val.classes:
        raise DataError(f"--data {spec}: train has {train.num_classes} classes but val has {val.num_classes} "
                        f"(class folders must match)")
    if train.num_classes < 2:
        raise DataError(f"--data {spec}: needs at least 2 classes, found {train.num_classes}")
    return train, val


def _start(args: argparse.Namespace, ctx: DistContext) -> tuple[FeatureSource, Path, IndexedDataset, IndexedDataset]:
    """The model, the output folder (before the work: a bad --out fails fast) and the splits of an evaluation."""
    source = resolve_source(args.checkpoint, arch=args.arch, stem=args.stem, input_size=args.input_size,
                            output=args.features, seed=args.seed, name=args.name)
    out = prepare_out_dir(args.out if args.out else default_out_dir(source), "--out")
    return (source, out, *load_splits(args.data, args.data_root, ctx))


def _features(args: argparse.Namespace, source: FeatureSource, train: IndexedDataset, val: IndexedDataset,
              ctx: DistContext) -> tuple[FeatureSet | None, FeatureSet | None]:
    cache = None if args.no_cache else (args.cache_dir or str(Path(args.data_root).expanduser() / "features"))
    kw = dict(batch_size=args.batch_size, workers=args.workers, cache_dir=cache, dtype=args.cache_dtype)
    return extract_features(source, train, ctx, **kw), extract_features(source, val, ctx, **kw)


def _finish(args: argparse.Namespace, out: Path, name: str, source: FeatureSource, train: IndexedDataset,
            val: IndexedDataset, results: list[dict]) -> Path:
    """The result rows (``results``: what each measured) into ``<out>/<name>[_head].json`` and ``--results``."""
    splits = {"source": source.describe(), "train": train.describe(), "val": val.describe()}
    rows = [make_row(data=args.data, **splits, **r) for r in results]
    path = write_json(out / f"{name}{'_head' if source.output == 'head' else ''}.json",
                      {**splits, "config": vars(args), "results": rows})
    append_rows(args.results, rows)
    return path


def _header(source: FeatureSource, train: IndexedDataset, val: IndexedDataset, cached: bool) -> str:
    return (f"{source.name} ({source.method}, dim {source.feature_dim}) on {train.name} "
            f"{len(train)}/{len(val)}, {train.num_classes} classes" + (", cached features" if cached else ""))


def run_knn(args: argparse.Namespace) -> int:
    """kNN evaluation (see :mod:`fkd_ssl.evaluation.knn`)."""
    t0 = time.time()
    with session(args.device) as ctx:
        source, out, train, val = _start(args, ctx)
        all_k = args.k + args.majority_k
        if not all_k:
            raise ConfigError("--k none and --majority-k none: nothing to evaluate")
        if max(all_k) > len(train):
            raise ConfigError(f"--k {max(all_k)} exceeds the {len(train)} train images of --data {args.data}")
        tf, vf = _features(args, source, train, val, ctx)
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
        path = _finish(args, out, "knn", source, train, val, [
            dict(protocol="knn" if r.vote == "weighted" else "knn-majority", k=r.k, temperature=r.temperature,
                 top1=r.top1, top5=r.top5, seconds=seconds, extract_seconds=t_extract, cached=cached,
                 extra={"faiss_gpu": use_gpu, "eval_seconds": round(seconds - t_extract, 3)}) for r in results])
        parts = " ".join(("1-NN" if (r.vote == "majority" and r.k == 1) else
                          f"{'k' if r.vote == 'weighted' else 'maj-k'}={r.k}") + f" {r.top1:.1f}/{r.top5:.1f}"
                         for r in results)
        print(f"knn: {_header(source, train, val, cached)} | top1/top5 % {parts} | T={args.temperature} | "
              f"{seconds:.1f} s -> {path}", flush=True)
        return 0


def run_linear_probe(args: argparse.Namespace) -> int:
    """Fast (default) or full linear probe (see :mod:`.probe` and :mod:`.probe_full`)."""
    t0 = time.time()
    with session(args.device) as ctx:
        source, out, train, val = _start(args, ctx)
        if args.full:
            from .probe_full import FullProbeConfig, default_state_path, full_linear_probe

            wd = args.wd or [0.0]
            if len(wd) != 1:
                raise ConfigError("--full takes a single --wd value")
            cfg = FullProbeConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=wd[0],
                                  seed=args.seed)
            res = full_linear_probe(source, train, val, train.num_classes, ctx, cfg, workers=args.workers,
                                    state_path=default_state_path(out, source.output))
            protocol, t_extract, cached = "linear-full", 0.0, False
            extra = {"epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "world_size": ctx.world_size,
                     "weight_decay": cfg.weight_decay}
        else:
            tf, vf = _features(args, source, train, val, ctx)
            if not ctx.is_main:
                return 0
            assert tf is not None and vf is not None
            t_extract = time.time() - t0
            res = fast_linear_probe(tf.features, tf.labels, vf.features, vf.labels, train.num_classes,
                                    wds=args.wd or DEFAULT_WDS, holdout=args.holdout, seed=args.seed,
                                    max_iter=args.max_iter, device=ctx.device)
            protocol, cached = "linear-fast", tf.cached and vf.cached
            extra = {"wd": res.wd, "sweep": res.sweep, "holdout": args.holdout, "iterations": res.iterations}
        if res is None or not ctx.is_main:
            return 0
        seconds = time.time() - t0
        extra["eval_seconds"] = round(seconds - t_extract, 3)
        path = _finish(args, out, "linear_probe_full" if args.full else "linear_probe", source, train, val, [
            dict(protocol=protocol, top1=res.top1, top5=res.top5, seconds=seconds, extract_seconds=t_extract,
                 cached=cached, extra=extra)])
        detail = (f"{args.epochs} epochs" if args.full else f"wd={res.wd:g}")
        print(f"linear probe ({'full' if args.full else 'fast'}): {_header(source, train, val, cached)} | "
              f"top1 {res.top1:.1f} top5 {res.top5:.1f} | {detail} | {seconds:.1f} s -> {path}", flush=True)
        return 0


def run_report(args: argparse.Namespace) -> int:
    """Render the results table as markdown + PNG (+ CSV) and print the markdown."""
    rows = load_rows(args.results)
    if args.data:
        rows = [r for r in rows if args.data in str(r.get("data"))]
    if args.model:
        rows = [r for r in rows if any(m in str(r.get("model")) for m in args.model)]
    if not rows:
        raise DataError(f"--results {args.results}: no rows" + (" match the filters" if args.data or args.model else ""))
    out = prepare_out_dir(args.out if args.out else Path(args.results).parent, "--out")
    md = render_markdown(rows, args.metric)
    md_path = out / "results.md"
    write_text_atomic(md_path, md)
    png = render_png(rows, out / "results.png", args.metric)
    csv_path = write_csv(rows, out / "results.csv")
    print(md)
    n_models = len({(r.get("model"), r.get("model_identity")) for r in rows})
    print(f"report: {len(rows)} rows, {n_models} models -> {md_path}, {png}, {csv_path}", flush=True)
    return 0


__all__ = ["add_source_args", "add_cache_args", "add_output_args", "run_knn", "run_linear_probe", "run_report",
           "int_list", "float_list", "load_splits"]
