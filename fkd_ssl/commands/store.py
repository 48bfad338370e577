"""``python -m fkd_ssl.store COMMAND``: check (verify), describe (info), import-fkd and export-fkd target stores.

Import and export never unpickle code and resume when rerun.  Format: ``docs/store.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .. import cli
from ..store import TargetStore


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("Check, describe, import or export a target store.")
    p.prog = "python -m fkd_ssl.store"
    sub = p.add_subparsers(dest="cmd", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ver = sub.add_parser("verify", help="recompute every checksum (and replay views through the teacher)")
    ver.add_argument("path")
    ver.add_argument("--replay", type=cli.positive_int("--replay"), default=0, metavar="N",
                     help="re-run the store's teacher on N sampled replayed views and compare with the stored targets")
    cli.add_common_args(ver, ("data", "data_root", "device", "seed"))
    ver.add_argument("--teacher", default=None, help="the store's teacher (default: a named one, e.g. effnet-lite0)")
    ver.add_argument("--arch", default=None, help="architecture of a plain state-dict --teacher")
    sub.add_parser("info", help="print the manifest summary").add_argument("path")

    imp = sub.add_parser("import-fkd", formatter_class=fmt, help="published FKD soft labels -> a target store",
                         description="Convert FKD soft labels (one torch.save file per image, mirroring the image "
                                     "tree) into a target store with the topk codec. Rerunning resumes.")
    imp.add_argument("folder", help="the FKD soft-label folder (the reference trainer's --softlabel_path, holding "
                                    "<split>/<class>/<image name>.tar)")
    cli.add_common_args(imp, ("data", "data_root", "out", "workers"), workers=2)
    imp.add_argument("--split", choices=("train", "val"), default="train", help="the image split the labels are for")
    imp.add_argument("--num-classes", type=cli.positive_int("--num-classes"), default=None,
                     help="classes of the teacher (default: the number of class folders of --data)")
    imp.add_argument("--topk-mode", choices=("smooth", "renorm"), default="smooth",
                     help="how a student rebuilds the distribution: marginal smoothing (label types "
                          "marginal_smoothing_k*, smoothing, hard) or renormalised top-k (marginal_renorm)")
    imp.add_argument("--view-size", type=cli.positive_int("--view-size"), default=224,
                     help="the side the teacher saw its crops at (the generator's --input_size); recorded only")
    imp.add_argument("--crop-min", type=cli.fraction("--crop-min"), default=0.08,
                     help="RandomResizedCrop min scale the generator used (recorded only)")
    imp.add_argument("--crop-max", type=cli.positive_float("--crop-max"), default=0.936,
                     help="RandomResizedCrop max scale the generator used (recorded only)")
    imp.add_argument("--shard-size", type=cli.positive_int("--shard-size"), default=4096, help="images per shard file")
    imp.add_argument("--overwrite", action="store_true", help="replace a store made from other labels or settings")

    exp = sub.add_parser("export-fkd", formatter_class=fmt, help="a store of class probabilities -> FKD's layout",
                         description="Write a target store of class probabilities as FKD soft labels: one "
                                     "torch.save file of numpy arrays per image, mirroring --data's image tree.")
    exp.add_argument("store", help="the target store (codec topk, or any store of --target probs)")
    cli.add_common_args(exp, ("data", "data_root", "out"))
    exp.add_argument("--split", choices=("train", "val"), default=None,
                     help="default: the split the store was made for")
    exp.add_argument("--topk", type=cli.positive_int("--topk"), default=None,
                     help="classes kept per crop (default: the store's k for a topk store, else 5)")
    exp.add_argument("--fp16", action="store_true", help="float16 coords and labels (the generator's --use_fp16)")
    exp.add_argument("--overwrite", action="store_true",
                     help="rewrite another export, or write into a non-empty folder")
    return p


def _import(args: argparse.Namespace) -> int:
    from ..data import build_dataset
    from ..interop.fkd_layout import import_fkd
    from ..views import ViewConfig

    out = cli.prepare_out_dir(args.out or cli.default_run_dir("store", args.data, "fkd-" + Path(args.folder).resolve().name))
    ds = build_dataset(args.data, args.split, args.data_root)
    views = ViewConfig(size=args.view_size, scale=(args.crop_min, args.crop_max), photometric=False,
                       interpolation="bicubic")
    cli.print_config({**vars(args), "out": str(out)})
    r = import_fkd(args.folder, ds, out, num_classes=args.num_classes, mode=args.topk_mode, views=views,
                   shard_size=args.shard_size, workers=args.workers, overwrite=args.overwrite)
    store = TargetStore.open(out)
    clamped = f", {r.clamped} crop boxes clamped into their image" if r.clamped else ""
    print(f"store: {out} ({store.num_images} images x {store.views_per_image} views, topk k={r.k} of "
          f"{r.num_classes} classes, {args.topk_mode} ({r.label_type}), {store.nbytes() / 2**20:.1f} MiB; "
          f"this run {r.written} images{clamped})", flush=True)
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..data import build_dataset
    from ..interop.fkd_layout import export_fkd

    store = TargetStore.open(args.store)
    split = args.split or (store.identity.dataset or {}).get("split") or "train"
    out = cli.prepare_out_dir(args.out or cli.default_run_dir("fkd-labels", args.data, Path(args.store).resolve().name))
    ds = build_dataset(args.data, split, args.data_root)
    cli.print_config({**vars(args), "split": split, "out": str(out)})
    r = export_fkd(args.store, ds, out, k=args.topk, fp16=args.fp16, overwrite=args.overwrite)
    print(f"fkd labels: {out} ({r.files} files, {store.views_per_image} crops each, top {r.k}, "
          f"{'float16' if args.fp16 else 'float32'}; this run {r.written} files; train with "
          f"--softlabel_path {out} --soft_label_type {r.label_type} --num_classes {store.target_dim})", flush=True)
    return 0


def _replay(args: argparse.Namespace, store: TargetStore) -> None:
    """Re-run the teacher on ``--replay`` sampled views: a view agrees when its stored target is as close to
    the teacher's output now as the codec's own round trip of that output (cosine after removing the mean
    output of the sample, which a teacher's outputs often share; 0.01 slack)."""
    from ..data import build_dataset, load_uint8
    from ..dist import resolve_device
    from ..errors import ConfigError, DataError
    from ..teacher import load_teacher
    from ..views import ViewConfig, render_views

    ident = store.identity
    ref = args.teacher or str(ident.teacher.get("hash", "")).split(":")[0]
    device = resolve_device(args.device)
    teacher, tid = load_teacher(ref, args.arch, ident.teacher.get("target"), ident.teacher.get("temp") or 1.0, device)
    if tid["hash"] != ident.teacher.get("hash"):
        raise ConfigError(f"--teacher {ref} is not the teacher of store {store.path} ({tid['hash']}, the store's "
                          f"{ident.teacher.get('hash')})")
    ds = build_dataset(args.data, (ident.dataset or {}).get("split", "train"), args.data_root)
    if (ident.dataset or {}).get("fingerprint") != ds.fingerprint():
        print(f"note: --data {args.data} has fingerprint {ds.fingerprint()}, the store was made from "
              f"{ident.dataset.get('fingerprint')}: its images changed since")
    valid, R = store.valid_indices(), store.views_per_image
    pick = np.sort(np.random.default_rng(args.seed).choice(len(valid) * R, min(args.replay, len(valid) * R), False))
    cfg, rows = ViewConfig.from_dict(ident.views), []
    for i in np.unique(valid[pick // R]):
        slots = pick[valid[pick // R] == i] % R
        img, err = load_uint8(ds, int(i))
        if img is None:
            raise DataError(f"image {i} of --data {args.data} cannot be read: {err}")
        now = teacher(render_views(img, store.params_batch(i, slots), cfg).to(device)).float().cpu().numpy()
        rows.append((store.targets(i, slots), store.codec.decode(store.codec.encode(now)), now))
    stored, trip, now = (np.concatenate(a) for a in zip(*rows))
    mean = now.mean(0) if len(now) > 1 else 0
    cos, base = _cos(stored - mean, now - mean), _cos(trip - mean, now - mean)
    bad = int((cos < base - 0.01).sum())
    probs = (f", top-1 agreement {100 * np.mean(stored.argmax(1) == now.argmax(1)):.1f}%"
             if ident.teacher.get("target") == "probs" else "")
    print(f"replay: {len(pick)} views of {len(np.unique(valid[pick // R]))} images; (centred) cosine stored vs teacher "
          f"now mean {cos.mean():.5f} min {cos.min():.5f} (the codec's own round trip: mean {base.mean():.5f}){probs}; "
          f"{bad} views disagree")
    if bad:
        raise DataError(f"store {store.path}: {bad} of {len(pick)} replayed views disagree with the teacher (the "
                        f"images, the teacher or the libraries changed since the store was made); regenerate it")


def _cos(a, b):
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def _verify_or_info(args: argparse.Namespace) -> int:
    store = TargetStore.open(args.path)
    if args.cmd == "verify":
        store.verify()
        print(f"OK {args.path} ({store.num_images} images x {store.views_per_image} views, codec {store.codec.name}, "
              f"{store.nbytes() / 1e6:.1f} MB, {len(store.skipped)} skipped)")
        if args.replay:
            _replay(args, store)
    else:
        m = {k: v for k, v in store.manifest.items() if k not in ("shards", "skipped")}
        print(json.dumps({**m, "nbytes": store.nbytes()}, indent=1, sort_keys=True))
    return 0


def run(args: argparse.Namespace) -> int:
    return {"import-fkd": _import, "export-fkd": _export}.get(args.cmd, _verify_or_info)(args)


main, console = cli.entry_points(__name__)
