"""Train a classifier student on soft labels of replayed views (supervised FKD), or a baseline.

``--targets store`` (FKD, default): the student replays K of the R views stored per image
(``--crops-per-image``) and learns the classifier teacher's stored top-k soft labels with
soft cross-entropy; the teacher never runs.  Baselines in the same training loop:
``online`` (the teacher labels the same kind of views at every step: vanilla KD), ``hard``
(plain dataset labels on fresh RandomResizedCrop views: the conventional framework) and
``relabel`` (ReLabel: RoIAlign of each fresh crop on the teacher's dense label map from
``experiments/gen_label_map.py``, then softmax).

Budgets count samples (one view with its label), as in FKD: ``--epochs`` is views per image
(K views of each decoded image make one pass worth K epochs), ``--batch-size`` views per
step, ``--lr`` per 256 views; every mode sees the same number of views and steps.  Hard-label
top-1 on the val split is reported after every pass when the student's classes are the
dataset's.  The exported ``model.safetensors`` is what the evaluators read.  Rerunning the
same command resumes; ``torchrun --standalone --nproc_per_node=N experiments/distill_sup.py ...``
trains with DDP.
"""

from __future__ import annotations

from functools import partial

import torch

from .. import cli
from .. import dist as fdist
from ..data import build_dataset
from ..supervised import MODES, MixConfig, SoftLabelTask, build_classifier, classifier_accuracy, init_backbone
from ..training_data import (Source, TrainingData, add_student_args, build_training_data, check_budget,
                             resolve_spread, train_student)
from ..views import ViewConfig

#: settings that define a run: changing one needs another --out
IDENTITY = ("data", "targets", "store", "store_id", "teacher", "label_map", "arch", "stem", "input_size",
            "crops_per_image", "mixup", "cutmix", "label_smoothing", "init", "extra_aug", "fast_decode", "epochs",
            "batch_size", "seed", "optimizer", "lr", "weight_decay", "warmup_epochs", "crop_min")
METHODS = {"store": "fkd_sup", "online": "kd_online", "hard": "plain", "relabel": "relabel"}


def build_parser(description: str = __doc__):
    p = cli.parser(description)
    cli.add_common_args(p, epochs=16, batch_size=128, workers=2, arch="resnet18")
    p.add_argument("--targets", choices=MODES, default="store",
                   help="store (FKD), online (teacher every step), hard (labels), relabel (ReLabel label map)")
    p.add_argument("--store", default=None, help="soft-label store from gen_targets.py (--targets store; optional "
                                                 "with online: then its views are replayed)")
    p.add_argument("--teacher", default=None, metavar="CKPT",
                   help="classifier teacher for --targets online (project checkpoint, effnet-lite0/1/2, or a plain "
                        "state dict with --teacher-arch)")
    p.add_argument("--teacher-arch", default=None, help="architecture of a plain state-dict --teacher")
    p.add_argument("--temp", type=cli.positive_float("--temp"), default=None,
                   help="--targets online: teacher softmax temperature (default: the store's, else 1)")
    p.add_argument("--label-map", default=None, help="--targets relabel: label-map folder from gen_label_map.py")
    p.add_argument("--crops-per-image", type=cli.positive_int("--crops-per-image"), default=None,
                   help="K views of each decoded image per step (FKD's num_crops; default 4 for store/online, "
                        "1 for hard/relabel, the conventional pipelines)")
    add_student_args(p)
    p.add_argument("--input-size", type=cli.positive_int("--input-size"), default=None,
                   help="student input side (default: the store's / teacher's view size, else 64)")
    p.add_argument("--crop-min", type=cli.fraction("--crop-min"), default=0.08,
                   help="RandomResizedCrop min scale of fresh views (hard/relabel/online without a store)")
    p.add_argument("--mixup", type=cli.nonneg_float("--mixup"), default=0.0, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=cli.nonneg_float("--cutmix"), default=0.0, help="cutmix alpha (0: off)")
    p.add_argument("--label-smoothing", type=cli.nonneg_float("--label-smoothing"), default=0.0,
                   help="--targets hard: label smoothing")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start from this checkpoint's backbone (fine-tuning; same --arch and --stem)")
    p.add_argument("--no-val", action="store_true", help="skip the val top-1 after every pass")
    cli.add_optim_args(p, lr=0.2, weight_decay=5e-5, warmup_epochs=0.0)
    return p


def check(p, args) -> None:
    """Flag combinations argparse cannot check; fills the default --crops-per-image."""
    mode = args.targets
    if args.crops_per_image is None:
        args.crops_per_image = 4 if mode in ("store", "online") else 1
    resolve_spread(args)
    check_budget(args, args.crops_per_image)
    if mode == "online" and not args.teacher:
        p.error("--targets online needs --teacher")
    if mode == "relabel" and not args.label_map:
        p.error("--targets relabel needs --label-map (from fkd-gen-label-map)")
    if mode != "online" and args.teacher:
        p.error(f"--teacher is for --targets online (with --targets {mode} the teacher is in the store / label map)")
    if mode != "hard" and args.label_smoothing:
        p.error("--label-smoothing is for --targets hard (soft labels are already soft)")
    if mode == "store" and not args.store:
        p.error("--targets store needs --store (a soft-label store from gen_targets.py with a classifier teacher)")


def training_data(args, train_set, ctx) -> TrainingData:
    """What ``--targets`` trains on; resolves --store and --input-size in ``args`` (also used by
    ``bench/bench_sup.py``)."""
    mode = args.targets
    src = Source(store=args.store if mode in ("store", "online") else None,
                 teacher=args.teacher if mode == "online" else None, teacher_arch=args.teacher_arch,
                 teacher_flag="--teacher", kind="probs", temp=args.temp,
                 label_map=args.label_map if mode == "relabel" else None,
                 fresh=ViewConfig(size=args.input_size or 64, scale=(args.crop_min, 1.0), photometric=False))
    return build_training_data(src, args, train_set, ctx)


def _meta(args, data: TrainingData, init: dict | None, config: dict) -> dict:
    store, maps = data.store, data.label_map
    return {"method": METHODS[args.targets], "kind": "sup_student", "targets": args.targets,
            "view_epochs": args.epochs, "init": init, "num_classes": data.target_dim,
            "store": ({"path": args.store, "id": config["store_id"], "views_per_image": store.views_per_image,
                       "codec": store.codec.name, "nbytes": store.nbytes()} if store is not None else None),
            "label_map": ({"path": str(args.label_map), "nbytes": maps.nbytes()} if maps is not None else None)}


def _val_hook(args, num_classes: int, val_set, ctx):
    """Val top-1 after every pass (rank 0), when the student's classes are the dataset's."""
    if val_set is not None and num_classes == val_set.num_classes:
        return lambda epoch, t: classifier_accuracy(t.export(), val_set, 256, 0, ctx.device)
    if val_set is not None and ctx.is_main:
        print(f"note: the student has {num_classes} classes, {args.data} has {val_set.num_classes}: no val top-1 "
              f"(judge it with fkd-knn and fkd-linear-probe)", flush=True)
    return None


def run(args) -> int:
    with fdist.session(args.device) as ctx:
        with fdist.main_first(ctx):
            train_set = build_dataset(args.data, "train", args.data_root, verbose=ctx.is_main)
            val_set = None if args.no_val else build_dataset(args.data, "val", args.data_root, verbose=False)
        data = training_data(args, train_set, ctx)
        torch.manual_seed(args.seed)  # the student's initial weights depend on --seed only
        student = build_classifier(args.arch, args.stem, args.input_size, data.target_dim)
        init = init_backbone(student, args.init) if args.init else None
        labels = torch.as_tensor(train_set.targets, dtype=torch.long)
        task = SoftLabelTask(student, args.targets, labels, data.teacher, MixConfig(args.mixup, args.cutmix),
                             args.label_smoothing, ctx.device.type == "cuda")
        desc = f"sup {args.targets} {args.arch} K={args.crops_per_image}"
        train_student(args, data, task, ctx, train_set, cli.default_run_dir("sup", args.data, args.targets, args.arch),
                      IDENTITY, partial(_meta, args, data, init), desc, _val_hook(args, data.target_dim, val_set, ctx))
    return 0


main, console = cli.entry_points(__name__)
