"""Distil a self-supervised teacher into a student from a target store (FKD), or from an online teacher.

FKD (default): the student replays K of the R views stored per image (``--crops-per-image``)
at its own input size and reads the teacher's targets from ``--store``; the teacher never
runs.  Baselines in the same training loop: ``--online-teacher CKPT`` samples fresh views
from the store's view distribution at every step and runs the teacher on them (vanilla KD);
adding ``--online-replay`` replays the stored views instead and lets the teacher recompute
their targets.  Budgets count samples (one view with its target), as in FKD: ``--epochs`` is
views per image (K views of each decoded image make one pass worth K epochs), ``--batch-size``
views per step, ``--lr`` per 256 views.  The exported ``model.safetensors`` is what the
evaluators read.  Rerunning the same command resumes; ``torchrun --nproc_per_node=N
experiments/distill_ssl.py ...`` trains with DDP.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from .. import cli
from .. import dist as fdist
from ..data import build_dataset
from ..distill import SSL_METHODS, DistillTask, build_student, check_head_dim
from ..errors import ConfigError
from ..losses import LOSSES, DistillLoss
from ..training_data import (Source, TrainingData, add_student_args, build_training_data, resolve_spread,
                             train_student)

#: settings that define a run: changing one needs another --out
IDENTITY = ("data", "store", "store_id", "online_teacher", "online_replay", "arch", "stem", "input_size",
            "crops_per_image", "loss", "temperature", "tau", "seed_tau_t", "seed_tau_s", "queue_size",
            "multi_positive", "center", "ssl", "ssl_weight", "ssl_queue_size", "ssl_temperature", "ssl_momentum", "head_hidden",
            "head_dim", "predictor_hidden", "extra_aug", "fast_decode", "epochs", "batch_size", "seed", "optimizer",
            "lr", "weight_decay", "warmup_epochs")


def build_parser():
    p = cli.parser(__doc__)
    cli.add_common_args(p, epochs=80, batch_size=512, workers=2, arch="resnet18")
    p.add_argument("--store", default=None,
                   help="target store from gen_targets.py (default: the store gen_targets.py writes for --data and "
                        "its default teacher; optional with --online-teacher)")
    p.add_argument("--online-teacher", default=None, metavar="CKPT",
                   help="baseline: run this teacher at every step instead of reading stored targets")
    p.add_argument("--online-replay", action="store_true",
                   help="with --online-teacher: replay the store's views (teacher recomputes targets) instead of "
                        "fresh views")
    p.add_argument("--teacher-arch", default=None, help="architecture of a plain state-dict --online-teacher")
    p.add_argument("--crops-per-image", type=cli.positive_int("--crops-per-image"), default=4,
                   help="K views of each decoded image per step (FKD's num_crops); R/K passes use unseen views")
    add_student_args(p)
    p.add_argument("--input-size", type=cli.positive_int("--input-size"), default=None,
                   help="student input side (default: the teacher's view size; lower is faster, as in FKD)")
    p.add_argument("--loss", choices=LOSSES, default="infonce")
    p.add_argument("--temperature", type=cli.positive_float("--temperature"), default=0.2, help="infonce temperature")
    p.add_argument("--tau", type=cli.positive_float("--tau"), default=0.2, help="soft-ce temperature")
    p.add_argument("--seed-tau-t", type=cli.positive_float("--seed-tau-t"), default=0.01,
                   help="SEED teacher temperature (paper 0.01; its code defaults to 1e-4)")
    p.add_argument("--seed-tau-s", type=cli.positive_float("--seed-tau-s"), default=0.2,
                   help="SEED student temperature")
    p.add_argument("--queue-size", type=cli.nonneg_int("--queue-size"), default=4096,
                   help="earlier teacher targets kept as negatives (infonce) / reference points (seed)")
    p.add_argument("--center", action=argparse.BooleanOptionalAction, default=False,
                   help="subtract an EMA of the mean target first (DINO's centring; pretrained features share a "
                        "large common direction)")
    p.add_argument("--multi-positive", action="store_true",
                   help="infonce: the other views of the same image are positives too")
    p.add_argument("--ssl", choices=SSL_METHODS, default="none",
                   help="add the student's own SSL loss between two replayed views (DisCo-style)")
    p.add_argument("--ssl-weight", type=cli.nonneg_float("--ssl-weight"), default=1.0)
    p.add_argument("--ssl-queue-size", type=cli.positive_int("--ssl-queue-size"), default=4096)
    p.add_argument("--ssl-temperature", type=cli.positive_float("--ssl-temperature"), default=0.2)
    p.add_argument("--ssl-momentum", type=cli.positive_float("--ssl-momentum"), default=0.99,
                   help="--ssl moco: key-encoder EMA momentum (constant)")
    p.add_argument("--head-hidden", type=cli.positive_int("--head-hidden"), default=512, help="projection head width")
    p.add_argument("--head-dim", type=cli.positive_int("--head-dim"), default=None,
                   help="student output dim; must equal the target dim (default: the target dim)")
    p.add_argument("--predictor-hidden", type=cli.nonneg_int("--predictor-hidden"), default=0,
                   help="> 0: add a predictor on top of the projection (needed by --ssl simsiam)")
    # measured defaults (docs/distill.md, "Choosing the defaults"): AdamW moves a student on a short schedule
    cli.add_optim_args(p, lr=5e-3, weight_decay=0.05, warmup_epochs=1.0, optimizer="adamw")
    return p


def check(p, args) -> None:
    if args.online_replay and not args.online_teacher:
        p.error("--online-replay needs --online-teacher")
    if args.ssl != "none" and args.crops_per_image < 2:
        p.error(f"--ssl {args.ssl} needs --crops-per-image >= 2 (two views of each image)")
    if args.ssl != "none" and args.spread_steps:
        p.error(f"--ssl {args.ssl} needs the views of an image in one step: drop --spread-steps")
    resolve_spread(args, one_step=args.ssl != "none")


def _default_store(args) -> str:
    """The store gen_targets.py writes for --data and its default teacher (it must exist)."""
    default = cli.default_run_dir("store", args.data, cli.default_run_dir("teacher", args.data).name)
    if not default.exists():
        raise ConfigError(f"no --store given and {default} does not exist: run fkd-gen-targets "
                          f"--data {args.data} first, or pass --store")
    return str(default)


def _training_data(args, train_set, ctx) -> TrainingData:
    """Resolves --store, --head-dim and --input-size in ``args``."""
    if args.store is None and (args.online_teacher is None or args.online_replay):
        args.store = _default_store(args)
    src = Source(store=args.store, teacher=args.online_teacher, teacher_arch=args.teacher_arch,
                 replay=args.online_replay or not args.online_teacher)
    data = build_training_data(src, args, train_set, ctx)
    args.head_dim = check_head_dim(args.head_dim, data.target_dim,
                                   "the online teacher's targets" if args.online_teacher else "the store's targets")
    return data


def _task(args, data: TrainingData, ctx) -> DistillTask:
    loss = DistillLoss(args.loss, data.target_dim, args.temperature, args.tau, args.seed_tau_t, args.seed_tau_s,
                       args.queue_size, args.multi_positive, data.probs, args.center)
    torch.manual_seed(args.seed)  # the student's initial weights depend on --seed only
    student = build_student(args.arch, args.stem, args.input_size, data.target_dim, args.head_hidden,
                            args.predictor_hidden)
    return DistillTask(student, loss, data.teacher, args.ssl, args.ssl_weight, args.ssl_queue_size,
                       args.ssl_temperature, args.ssl_momentum, ctx.device.type == "cuda", ctx.distributed)


def _meta(args, data: TrainingData, mode: str, config: dict) -> dict:
    store = data.store
    return {"method": "fkd_ssl" if mode == "store" else f"kd_{mode.replace('-', '_')}", "kind": "ssl_student",
            "targets": mode, "loss": args.loss, "ssl": args.ssl,
            "store": ({"path": str(args.store), "id": config["store_id"], "identity": store.identity.to_dict(),
                       "views_per_image": store.views_per_image, "target_dim": store.target_dim,
                       "codec": store.codec.name} if store is not None else None)}


def run(args) -> int:
    with fdist.session(args.device) as ctx:
        with fdist.main_first(ctx):
            train_set = build_dataset(args.data, "train", args.data_root, verbose=ctx.is_main)
        data = _training_data(args, train_set, ctx)
        task = _task(args, data, ctx)
        mode = ("online-replay" if args.online_replay else "online") if args.online_teacher else "store"
        train_student(args, data, task, ctx, train_set, cli.default_run_dir("distill", args.data, mode, args.loss,
                      args.arch), IDENTITY, partial(_meta, args, data, mode), f"distill {mode} {args.loss} {args.arch}",
                      mode=mode)
    return 0


main, console = cli.entry_points(__name__)
