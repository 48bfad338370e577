"""What the evaluation commands (``fkd-knn``, ``fkd-linear-probe``) share: their flags, the model and
splits they start from, the features, and the result files (``<out>/<protocol>.json`` and ``--results``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import cli
from ..data.datasets import IndexedDataset, build_dataset
from ..dist import DistContext, main_first
from ..errors import DataError
from .features import DTYPES, OUTPUTS, FeatureSet, FeatureSource, default_out_dir, extract_features, resolve_source
from .results import append_rows, make_row, write_json

DEFAULT_RESULTS = "runs/results.jsonl"


def parser(description: str) -> argparse.ArgumentParser:
    """An evaluation command's parser: the model (``--checkpoint`` and how to read it), then the shared flags;
    the command adds its own, then :func:`add_cache_and_output_args`."""
    p = cli.parser(description)
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
    return cli.add_common_args(p, ("data", "data_root", "out", "batch_size", "workers", "device", "seed"))


def add_cache_and_output_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("feature cache")
    g.add_argument("--cache-dir", default=None, help="feature cache folder (default: <data-root>/features)")
    g.add_argument("--no-cache", action="store_true", help="extract into memory, write no cache")
    g.add_argument("--cache-dtype", default="float16", choices=DTYPES, help="storage dtype of cached features")
    g = p.add_argument_group("output")
    g.add_argument("--results", default=DEFAULT_RESULTS, help="results table that accumulates rows (.jsonl or .csv)")
    return p


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


def start(args: argparse.Namespace, ctx: DistContext) -> tuple[FeatureSource, Path, IndexedDataset, IndexedDataset]:
    """The model, the output folder (before the work: a bad --out fails fast) and the splits of an evaluation."""
    source = resolve_source(args.checkpoint, arch=args.arch, stem=args.stem, input_size=args.input_size,
                            output=args.features, seed=args.seed, name=args.name)
    out = cli.prepare_out_dir(args.out if args.out else default_out_dir(source), "--out")
    return (source, out, *load_splits(args.data, args.data_root, ctx))


def features(args: argparse.Namespace, source: FeatureSource, train: IndexedDataset, val: IndexedDataset,
             ctx: DistContext) -> tuple[FeatureSet | None, FeatureSet | None]:
    cache = None if args.no_cache else (args.cache_dir or str(Path(args.data_root).expanduser() / "features"))
    kw = dict(batch_size=args.batch_size, workers=args.workers, cache_dir=cache, dtype=args.cache_dtype)
    return extract_features(source, train, ctx, **kw), extract_features(source, val, ctx, **kw)


def finish(args: argparse.Namespace, out: Path, name: str, source: FeatureSource, train: IndexedDataset,
           val: IndexedDataset, results: list[dict]) -> Path:
    """The result rows (``results``: what each measured) into ``<out>/<name>[_head].json`` and ``--results``."""
    splits = {"source": source.describe(), "train": train.describe(), "val": val.describe()}
    rows = [make_row(data=args.data, **splits, **r) for r in results]
    path = write_json(out / f"{name}{'_head' if source.output == 'head' else ''}.json",
                      {**splits, "config": vars(args), "results": rows})
    append_rows(args.results, rows)
    return path


def header(source: FeatureSource, train: IndexedDataset, val: IndexedDataset, cached: bool) -> str:
    return (f"{source.name} ({source.method}, dim {source.feature_dim}) on {train.name} "
            f"{len(train)}/{len(val)}, {train.num_classes} classes" + (", cached features" if cached else ""))
