"""The whole FKD pipeline in one command, on the built-in synthetic set, on CPU.

Teacher once, students fast, results side by side: the ImageNet EfficientNet-Lite0 teacher
shipped by a PyPI package fills a target store; the FKD student trains from it (no teacher at
training time) beside the online-teacher student and the student trained by MoCo alone; the
supervised variant's teacher is the same network with a linear probe fitted on the train labels as
its classifier; it stores that teacher's soft labels and ReLabel map, and trains FKD, plain-label and
ReLabel students; K = 4 crops per decoded image in both variants (the supervised students spread an
image's K views over 4K steps, distill_sup's default).
Every model is then judged by kNN and a linear probe.  Ends with a table, the claims each
judged on it, a figure (accuracy vs training time) and ``report.md`` in ``--out``.  Each stage
prints the command that reproduces it; rerunning resumes (finished stages are skipped).
``--fast``: smaller everything (a few minutes on 2 cores; what CI runs).  Under ``torchrun`` every rank runs
every stage (each command is DDP-aware) and rank 0 writes the ledger, table and figure.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from .. import cli, pipeline
from .. import dist as fdist
from ..data import build_dataset


def build_parser():
    p = cli.parser(__doc__)
    cli.add_common_args(p, ("data", "data_root", "out", "workers", "device", "seed"), data=None, workers=1)
    p.add_argument("--fast", action="store_true", help="tiny data and models: the whole pipeline in ~1.5 minutes")
    return p


def _start(args, sizes: pipeline.Sizes, ctx) -> tuple[Path, dict]:
    """Check --data (before the output folder is touched), then create --out and its config."""
    with fdist.main_first(ctx):
        for split in ("train", "val"):
            build_dataset(sizes.data, split, args.data_root, verbose=ctx.is_main and split == "train")
    out = Path(args.out or Path("runs") / ("quickstart-fast" if args.fast else "quickstart"))
    with fdist.main_first(ctx):
        out = cli.prepare_out_dir(out)
        config = cli.save_run_config(out, {"data": sizes.data, "data_root": str(args.data_root), "fast": args.fast,
                                           "device": args.device, "workers": args.workers, "seed": args.seed,
                                           "sizes": sizes.__dict__, "out": str(out)},
                                     ("data", "fast", "seed", "sizes"), ctx.is_main)
    return out, config


def run(args) -> int:
    sizes = pipeline.FAST if args.fast else pipeline.FULL
    if args.data:
        sizes = replace(sizes, data=args.data)
    with fdist.session(args.device) as ctx:  # under torchrun every rank runs every stage; rank 0 keeps the books
        out, config = _start(args, sizes, ctx)
        stages = pipeline.plan(out, sizes, str(args.data_root), args.device, args.workers, args.seed)
        ledger = pipeline.Ledger(out / "pipeline.json", write=ctx.is_main)
        t0 = time.time()
        pipeline.run_stages(stages, ledger, log=print if ctx.is_main else (lambda _: None), sync=fdist.barrier)
        if ctx.is_main:
            header = (f"# FKD quick start on `{sizes.data}` ({'--fast' if args.fast else 'full'}, device "
                      f"{args.device}, {ctx.world_size} process(es), git {config['git_sha']})")
            text = pipeline.summarize(out, stages, ledger, header, sizes)
            print("\n" + text.split("## Commands")[0].rstrip())
            print(f"\nquick start: {time.time() - t0:.0f} s this run -> {out / 'report.md'}, "
                  f"{out / 'accuracy_vs_time.png'}", flush=True)
    return 0


main, console = cli.entry_points(__name__)
