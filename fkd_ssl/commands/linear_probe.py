"""Linear probe of frozen features (``fkd-linear-probe``; usage lines in ``eval/linear_probe.py``)."""

from __future__ import annotations

import argparse
import time

from ..cli import entry_points, number_list, positive_float, positive_int
from ..dist import session
from ..errors import ConfigError
from ..evaluation import commands as E
from ..evaluation.probe import DEFAULT_WDS, fast_linear_probe


def build_parser():
    p = E.parser("Linear probe of frozen features (fast: logistic regression on cached features; "
                 "--full: augmented images, SGD, MoCo v3 style).")
    g = p.add_argument_group("fast probe")
    g.add_argument("--wd", type=number_list(float, "--wd"), default=None,
                   help="weight decays to sweep (default 1e-6,...,1e-1); with --full, the one SGD weight decay (default 0)")
    g.add_argument("--holdout", type=positive_float("--holdout"), default=0.1,
                   help="fraction of the train split held out to choose the weight decay")
    g.add_argument("--max-iter", type=positive_int("--max-iter"), default=100, help="L-BFGS iterations per fit")
    g.add_argument("--export-classifier", default=None, metavar="FILE",
                   help="also write the model with the probe as its classifier (a teacher for fkd-gen-targets)")
    g = p.add_argument_group("full probe")
    g.add_argument("--full", action="store_true", help="the standard protocol (for GPU runs)")
    g.add_argument("--epochs", type=positive_int("--epochs"), default=90, help="--full: passes over the images (a sample is an image)")
    g.add_argument("--lr", type=positive_float("--lr"), default=0.1, help="SGD learning rate per 256 images")
    return E.add_cache_and_output_args(p)


def check(p, args) -> None:
    if args.holdout >= 1:
        p.error(f"--holdout must be < 1 (a fraction of the train split), got {args.holdout}")
    if args.export_classifier and (args.full or args.checkpoint.startswith("pixels") or args.features != "backbone"):
        p.error("--export-classifier needs the fast probe of a model's backbone features")


def run(args: argparse.Namespace) -> int:
    """Fast (default) or full linear probe (:mod:`fkd_ssl.evaluation.probe`, :mod:`~fkd_ssl.evaluation.probe_full`)."""
    t0 = time.time()
    with session(args.device) as ctx:
        source, out, train, val = E.start(args, ctx)
        if args.full:
            from ..evaluation.probe_full import FullProbeConfig, default_state_path, full_linear_probe

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
            tf, vf = E.features(args, source, train, val, ctx)
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
        path = E.finish(args, out, "linear_probe_full" if args.full else "linear_probe", source, train, val, [
            dict(protocol=protocol, top1=res.top1, top5=res.top5, seconds=seconds, extract_seconds=t_extract,
                 cached=cached, extra=extra)])
        if args.export_classifier:
            _export(args, source, res, train)
        detail = (f"{args.epochs} epochs" if args.full else f"wd={res.wd:g}")
        print(f"linear probe ({'full' if args.full else 'fast'}): {E.header(source, train, val, cached)} | "
              f"top1 {res.top1:.1f} top5 {res.top5:.1f} | {detail} | {seconds:.1f} s -> {path}", flush=True)
        return 0


def _export(args, source, res, train) -> None:
    """``--export-classifier``: the backbone with the refit probe folded into its classifier."""
    from ..checkpoint import save_model
    from ..supervised import probe_classifier

    model = probe_classifier(source.encoder.cpu(), *(t.cpu() for t in res.model.folded()), source.input_size)
    path = save_model(args.export_classifier, model, {
        "method": "linear-probe", "num_classes": train.num_classes, "classes": list(train.classes),
        "probe": {"source": source.describe(), "wd": res.wd, "val_top1": res.top1, "data": args.data}})
    print(f"classifier (backbone + this probe) -> {path}", flush=True)


main, console = entry_points(__name__)
