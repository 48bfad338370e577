"""Distil a self-supervised teacher into a student from a target store (FKD), or from an online teacher.

FKD (default): the student replays K of the R views stored per image (``--crops-per-image``)
at its own input size and reads the teacher's targets from ``--store``; the teacher never
runs.  Baselines in the same training loop: ``--online-teacher CKPT`` samples fresh views
from the store's view distribution at every step and runs the teacher on them (vanilla KD);
adding ``--online-replay`` replays the stored views instead and lets the teacher recompute
their targets.  The exported ``model.safetensors`` is what the evaluators read.  Rerunning
the same command resumes; ``torchrun --nproc_per_node=N experiments/distill_ssl.py ...``
trains with DDP.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fkd_ssl import cli
from fkd_ssl import dist as fdist
from fkd_ssl.data import build_dataset
from fkd_ssl.distill import (SSL_METHODS, DistillTask, build_student, check_head_dim, open_store,
                             store_views)
from fkd_ssl.engine import OptimConfig, TrainConfig, train
from fkd_ssl.errors import ConfigError
from fkd_ssl.losses import LOSSES, DistillLoss
from fkd_ssl.models import STEMS
from fkd_ssl.replay import FreshViews, ReplayDataset, StoreViews, reuse_warning

#: settings that define a run: changing one needs another --out
IDENTITY = ("data", "store", "store_id", "online_teacher", "online_replay", "arch", "stem", "input_size",
            "crops_per_image", "loss", "temperature", "tau", "seed_tau_t", "seed_tau_s", "queue_size",
            "multi_positive", "ssl", "ssl_weight", "ssl_queue_size", "ssl_temperature", "ssl_momentum", "head_hidden",
            "head_dim", "predictor_hidden", "extra_aug", "fast_decode", "epochs", "batch_size", "seed", "optimizer",
            "lr", "weight_decay", "warmup_epochs")


def parse(argv=None):
    p = cli.parser(__doc__)
    cli.add_common_args(p, epochs=20, batch_size=128, workers=2, arch="resnet18")
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
                   help="K views of each decoded image per step (FKD's num_crops); R/K epochs use unseen views")
    p.add_argument("--stem", choices=STEMS, default="default", help="small/cifar: less downsampling for tiny inputs")
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
    p.add_argument("--extra-aug", action="store_true", help="mild student-only colour augmentation on replayed views")
    p.add_argument("--fast-decode", action="store_true",
                   help="decode JPEGs at a reduced size when every crop allows it (PIL draft)")
    p.add_argument("--optimizer", choices=("sgd", "lars", "adamw"), default="sgd")
    p.add_argument("--lr", type=cli.positive_float("--lr"), default=0.06, help="for a global batch of 256 images")
    p.add_argument("--weight-decay", type=cli.nonneg_float("--weight-decay"), default=5e-4)
    p.add_argument("--warmup-epochs", type=cli.nonneg_float("--warmup-epochs"), default=1.0)
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--max-minutes", type=cli.nonneg_float("--max-minutes"), default=0.0,
                   help="stop after this much training time (0: no limit)")
    args = p.parse_args(argv)
    if args.online_replay and not args.online_teacher:
        p.error("--online-replay needs --online-teacher")
    return args



def main(argv=None) -> int:
    args = parse(argv)
    ctx = fdist.setup(args.device)
    try:
        with fdist.main_first(ctx):
            train_set = build_dataset(args.data, "train", args.data_root, verbose=ctx.is_main)
        store = None
        if args.store is None and (args.online_teacher is None or args.online_replay):
            default = cli.default_run_dir("store", args.data, cli.default_run_dir("teacher", args.data).name)
            if not default.exists():
                raise ConfigError(f"no --store given and {default} does not exist: run experiments/gen_targets.py "
                                  f"--data {args.data} first, or pass --store")
            args.store = str(default)
        if args.store is not None:
            store = open_store(args.store, train_set)
            args.store = str(Path(args.store).resolve())
        teacher, teacher_id = None, None
        if args.online_teacher:
            from fkd_ssl.teacher import default_views, load_teacher

            kind = store.identity["teacher"].get("target") if store is not None else None
            temp = (store.identity["teacher"].get("temp") or 1.0) if store is not None else 1.0
            teacher, teacher_id = load_teacher(args.online_teacher, args.teacher_arch, kind, temp, ctx.device)
            if store is not None and teacher_id["hash"] != store.identity["teacher"].get("hash") and ctx.is_main:
                print(f"warning: --online-teacher {args.online_teacher} is not the teacher that made --store "
                      f"{args.store}", flush=True)
            teacher_cfg = store_views(store) if store is not None else default_views(teacher)
            target_dim, probs = teacher.dim, teacher.kind == "probs"
        else:
            teacher_cfg = store_views(store)
            teacher_id = store.identity["teacher"]
            target_dim, probs = store.target_dim, teacher_id.get("target") == "probs"
        args.head_dim = check_head_dim(args.head_dim, target_dim,
                                       "the online teacher's targets" if args.online_teacher else "the store's targets")
        args.input_size = args.input_size or teacher_cfg.size
        mode = ("online-replay" if args.online_replay else "online") if args.online_teacher else "store"
        k = args.crops_per_image
        if store is not None and not (args.online_teacher and not args.online_replay):
            source = StoreViews(store, k, args.seed, read_targets=teacher is None)
        else:
            source = FreshViews(teacher_cfg, k, args.seed)
        dataset = ReplayDataset(train_set, source, teacher_cfg, args.input_size, render_teacher=teacher is not None,
                                extra_aug=args.extra_aug, fast_decode=args.fast_decode, seed=args.seed)
        indices = store.valid_indices() if store is not None else range(len(train_set))
        loss = DistillLoss(args.loss, target_dim, args.temperature, args.tau, args.seed_tau_t, args.seed_tau_s,
                           args.queue_size, args.multi_positive, probs)
        torch.manual_seed(args.seed)  # the student's initial weights depend on --seed only
        student = build_student(args.arch, args.stem, args.input_size, target_dim, args.head_hidden,
                                args.predictor_hidden)
        task = DistillTask(student, loss, teacher, args.ssl, args.ssl_weight, args.ssl_queue_size,
                           args.ssl_temperature, args.ssl_momentum, ctx.device.type == "cuda", ctx.distributed)
        if args.ssl != "none" and k < 2:
            raise ConfigError(f"--ssl {args.ssl} needs --crops-per-image >= 2 (two views of each image)")

        # everything is checked: only now the run folder is touched
        out = cli.prepare_out_dir(args.out or cli.default_run_dir("distill", args.data, mode, args.loss, args.arch))
        store_id = store.digest() if store is not None else None
        config = cli.save_run_config(out, vars(args) | {"out": str(out), "store_id": store_id, "mode": mode},
                                     IDENTITY, ctx.is_main)
        if isinstance(source, StoreViews) and ctx.is_main:
            warning = reuse_warning(store.views_per_image, k, args.epochs)
            if warning:
                print(warning, flush=True)
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, workers=args.workers, seed=args.seed,
                          optim=OptimConfig(args.optimizer, args.lr, args.weight_decay, 0.9, args.warmup_epochs),
                          amp=not args.no_amp, max_minutes=args.max_minutes)
        meta = {"method": "fkd_ssl" if mode == "store" else f"kd_{mode.replace('-', '_')}", "kind": "ssl_student",
                "targets": mode, "loss": args.loss, "ssl": args.ssl, "crops_per_image": k,
                "teacher": teacher_id, "teacher_hash": (teacher_id or {}).get("hash"),
                "store": ({"path": str(args.store), "id": store_id, "identity": store.identity,
                           "views_per_image": store.views_per_image, "target_dim": store.target_dim,
                           "codec": store.codec.name} if store is not None else None),
                "dataset": train_set.describe(), "views": dataset.student_cfg.to_dict(),
                "teacher_views": teacher_cfg.to_dict(), "config": config, "git_sha": config["git_sha"]}
        result = train(task, dataset, indices, cfg, ctx, out, meta, desc=f"distill {mode} {args.loss} {args.arch}")
        if ctx.is_main:
            print(f"student: {result.model_path} ({result.epochs_done} epochs, {result.train_seconds / 60:.1f} min, "
                  f"{result.views_per_s:.0f} views/s)", flush=True)
    finally:
        fdist.cleanup()
    return 0


if __name__ == "__main__":
    cli.run_main(main)
