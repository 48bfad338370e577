"""ReLabel baseline: run a classifier teacher once over every whole training image and store its label maps.

The top ``--topk`` class scores per location go into a target store (docs/relabel.md).  Rerunning the same
command resumes; ``torchrun --standalone --nproc_per_node=N experiments/gen_label_map.py ...`` splits the images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import cli
from .. import dist as fdist


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_common_args(p, ("data", "data_root", "out", "batch_size", "workers", "device", "seed"), batch_size=32,
                        workers=1)
    p.add_argument("--teacher", required=True,
                   help="classifier teacher: a checkpoint of this project, effnet-lite0/1/2, or a plain timm / "
                        "torchvision state dict with --teacher-arch")
    p.add_argument("--teacher-arch", default=None,
                   help="architecture of a plain state-dict --teacher (tv:<name> for torchvision)")
    p.add_argument("--topk", type=cli.positive_int("--topk"), default=5, help="class scores kept per map location")
    p.add_argument("--input-size", type=cli.positive_int("--input-size"), default=None,
                   help="side the whole image is resized to (default: the teacher's input size); sets the map size")
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--shard-size", type=cli.positive_int("--shard-size"), default=4096, help="images per shard file")
    p.add_argument("--overwrite", action="store_true", help="replace label maps made with other settings")
    p.add_argument("--no-amp", action="store_true", help="no autocast on CUDA")
    p.add_argument("--plan", action="store_true", help="print the maps' size, the free space at --out and an "
                   "estimated time (the teacher timed on a few images here); write nothing")
    return p


def _plan(args, out, model, dataset, device):
    import numpy as np

    from ..relabel.maps import _whole_images, label_map_spec, topk_maps
    from ..store.geometry import Geometry
    from ..store.plan import StorePlan

    identity, codec = label_map_spec(model, dataset, args.topk, args.input_size, device)
    size = identity.extra["maps"]["input_size"]
    step = lambda i: [topk_maps(model, [x], args.topk, device, False)  # noqa: E731
                      for _, x, _ in _whole_images(dataset, size, model.spec.interpolation, np.array([i])) if x is not None]
    return StorePlan.of(out, len(dataset), 1, codec, model.spec.num_classes, Geometry(0), args.shard_size,
                        step if args.plan else None)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_model, model_identity
    from ..data import build_dataset
    from ..relabel import LabelMaps, open_label_map_writer, write_label_maps
    from ..store import finalize
    from ..store.writer import default_provenance

    with fdist.session(args.device) as ctx:
        torch.manual_seed(args.seed)  # the maps involve no randomness; seeded for form's sake
        model, _ = load_model(args.teacher, arch=args.teacher_arch, device=ctx.device, expect="classifier")
        teacher_name = Path(args.teacher).parent.name if Path(args.teacher).exists() else args.teacher
        out = Path(args.out or cli.default_run_dir("labelmap", args.data, teacher_name))
        out = out if args.plan else cli.prepare_out_dir(out)
        with fdist.main_first(ctx):
            dataset = build_dataset(args.data, args.split, args.data_root, verbose=ctx.is_main)
        plan = _plan(args, out, model, dataset, ctx.device)
        if args.plan:
            print(plan.render(), flush=True)
            return 0
        plan.check()
        provenance = {**default_provenance(), "teacher_ref": args.teacher, "teacher_file": model_identity(args.teacher)}
        if ctx.is_main:
            cli.print_config({**vars(args), "out": str(out), "world_size": ctx.world_size,
                              "git_sha": provenance["git_sha"]})
        kw = dict(k=args.topk, input_size=args.input_size, shard_size=args.shard_size, provenance=provenance)
        if ctx.distributed:  # rank 0 creates or checks the store before the other ranks write
            with fdist.main_first(ctx):
                if ctx.is_main:
                    open_label_map_writer(model, dataset, out, overwrite=args.overwrite, shards=[], device=ctx.device,
                                          **kw)
        stats = write_label_maps(model, dataset, out, batch_size=args.batch_size, workers=args.workers,
                                 device=ctx.device, amp=not args.no_amp, overwrite=args.overwrite and not ctx.distributed,
                                 show_progress=ctx.is_main, rank=ctx.rank, world_size=ctx.world_size, **kw)
        written = int(fdist.all_gather_cat(torch.tensor([stats.images], device=ctx.device)).sum())
        fdist.barrier()
        if ctx.is_main:
            if ctx.distributed:
                finalize(out, timeout_s=600)
            maps = LabelMaps.open(out)
            print(f"label maps: {out} ({maps.num_images} images, map {maps.height}x{maps.width} from "
                  f"{maps.input_size} px, top-{maps.k} of {maps.num_classes} classes, {maps.nbytes() / 2**20:.1f} MiB, "
                  f"{len(maps.skipped)} skipped; this run {written} images in {stats.seconds:.1f} s, "
                  f"{written / max(stats.seconds, 1e-9):.1f} img/s)", flush=True)
    return 0


main, console = cli.entry_points(__name__)
