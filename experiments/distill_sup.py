"""Train a classifier student on soft labels of replayed views (supervised FKD), or a baseline.

``--targets store`` (FKD, default): the student replays K of the R views stored per image
(``--crops-per-image``) and learns the classifier teacher's stored top-k soft labels with
soft cross-entropy; the teacher never runs.  Baselines in the same training loop:
``online`` (the teacher labels the same kind of views at every step: vanilla KD), ``hard``
(plain dataset labels on fresh RandomResizedCrop views: the conventional framework) and
``relabel`` (ReLabel: RoIAlign of each fresh crop on the teacher's dense label map from
``experiments/gen_label_map.py``, then softmax).

Budgets are counted as in FKD: ``--batch-size`` is views per step and ``--epochs`` counts
views per image, so K views of each decoded image make one pass over the images worth K
epochs; every mode sees the same number of views and steps.  Hard-label top-1 on the val
split is reported after every pass when the student's classes are the dataset's.  The
exported ``model.safetensors`` is what the evaluators read.  Rerunning the same command
resumes; ``torchrun --standalone --nproc_per_node=N experiments/distill_sup.py ...`` trains with DDP.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from fkd_ssl import cli
from fkd_ssl import dist as fdist
from fkd_ssl.data import build_dataset
from fkd_ssl.distill import open_store, store_views
from fkd_ssl.engine import OptimConfig, TrainConfig, train
from fkd_ssl.errors import ConfigError
from fkd_ssl.models import STEMS
from fkd_ssl.replay import FreshViews, ReplayDataset, StoreViews, reuse_warning
from fkd_ssl.supervised import MODES, MixConfig, SoftLabelTask, build_classifier, classifier_accuracy, init_backbone
from fkd_ssl.views import ViewConfig

#: settings that define a run: changing one needs another --out
IDENTITY = ("data", "targets", "store", "store_id", "teacher", "label_map", "arch", "stem", "input_size",
            "crops_per_image", "mixup", "cutmix", "label_smoothing", "init", "extra_aug", "fast_decode", "epochs",
            "batch_size", "seed", "optimizer", "lr", "weight_decay", "warmup_epochs", "crop_min")


def parse(argv=None):
    p = cli.parser(__doc__)
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
    p.add_argument("--stem", choices=STEMS, default="default", help="small/cifar: less downsampling for tiny inputs")
    p.add_argument("--input-size", type=cli.positive_int("--input-size"), default=None,
                   help="student input side (default: the store's / teacher's view size, else 64)")
    p.add_argument("--crop-min", type=cli.positive_float("--crop-min"), default=0.08,
                   help="RandomResizedCrop min scale of fresh views (hard/relabel/online without a store)")
    p.add_argument("--mixup", type=cli.nonneg_float("--mixup"), default=0.0, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=cli.nonneg_float("--cutmix"), default=0.0, help="cutmix alpha (0: off)")
    p.add_argument("--label-smoothing", type=cli.nonneg_float("--label-smoothing"), default=0.0,
                   help="--targets hard: label smoothing")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start from this checkpoint's backbone (fine-tuning; same --arch and --stem)")
    p.add_argument("--extra-aug", action="store_true", help="mild student-only colour augmentation on the views")
    p.add_argument("--fast-decode", action="store_true",
                   help="decode JPEGs at a reduced size when every stored crop allows it (PIL draft)")
    p.add_argument("--optimizer", choices=("sgd", "lars", "adamw"), default="sgd")
    p.add_argument("--lr", type=cli.positive_float("--lr"), default=0.2, help="for a global batch of 256 views")
    p.add_argument("--weight-decay", type=cli.nonneg_float("--weight-decay"), default=5e-5)
    p.add_argument("--warmup-epochs", type=cli.nonneg_float("--warmup-epochs"), default=0.0,
                   help="in passes over the images")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--no-val", action="store_true", help="skip the val top-1 after every pass")
    p.add_argument("--max-minutes", type=cli.nonneg_float("--max-minutes"), default=0.0,
                   help="stop after this much training time (0: no limit)")
    args = p.parse_args(argv)
    mode = args.targets
    if args.crops_per_image is None:
        args.crops_per_image = 4 if mode in ("store", "online") else 1
    k = args.crops_per_image
    if args.batch_size % k:
        p.error(f"--batch-size {args.batch_size} (views per step) must be a multiple of --crops-per-image {k}")
    if args.epochs % k:
        p.error(f"--epochs {args.epochs} must be a multiple of --crops-per-image {k}: one pass over the images "
                f"gives {k} views per image, worth {k} epochs (as in FKD)")
    if mode == "online" and not args.teacher:
        p.error("--targets online needs --teacher")
    if mode == "relabel" and not args.label_map:
        p.error("--targets relabel needs --label-map (from experiments/gen_label_map.py)")
    if mode != "online" and args.teacher:
        p.error(f"--teacher is for --targets online (with --targets {mode} the teacher is in the store / label map)")
    if mode != "hard" and args.label_smoothing:
        p.error("--label-smoothing is for --targets hard (soft labels are already soft)")
    if args.crop_min > 1:
        p.error(f"--crop-min must be <= 1, got {args.crop_min}")
    return args



def _sources(args, train_set, ctx):
    """(source, teacher-view config, student classes, teacher, teacher identity, store, label maps)."""
    mode, k = args.targets, args.crops_per_image
    store = teacher = maps = teacher_id = None
    if mode == "store" or (mode == "online" and args.store):
        if mode == "store" and args.store is None:
            raise ConfigError("--targets store needs --store (a soft-label store from gen_targets.py with a "
                              "classifier teacher)")
        store = open_store(args.store, train_set)
        args.store = str(Path(args.store).resolve())
        teacher_id = store.identity["teacher"]
        if teacher_id.get("target") != "probs":
            raise ConfigError(f"--store {args.store} holds {teacher_id.get('target')} targets, not class "
                              f"probabilities: make it with gen_targets.py and a classifier --teacher")
    geometry = ViewConfig(size=args.input_size or 64, scale=(args.crop_min, 1.0), photometric=False)
    if mode == "store":
        return StoreViews(store, k, args.seed), store_views(store), store.target_dim, None, teacher_id, store, None
    if mode == "online":
        from fkd_ssl.teacher import load_teacher

        temp = args.temp or ((store.identity["teacher"].get("temp") or 1.0) if store is not None else 1.0)
        teacher, teacher_id = load_teacher(args.teacher, args.teacher_arch, "probs", temp, ctx.device)
        if store is not None:
            if teacher_id["hash"] != store.identity["teacher"].get("hash") and ctx.is_main:
                print(f"warning: --teacher {args.teacher} is not the teacher that made --store {args.store}", flush=True)
            return (StoreViews(store, k, args.seed, read_targets=False), store_views(store), teacher.dim, teacher,
                    teacher_id, store, None)
        cfg = replace(geometry, size=teacher.input_size)
        return FreshViews(cfg, k, args.seed), cfg, teacher.dim, teacher, teacher_id, None, None
    if mode == "relabel":
        from fkd_ssl.relabel import LabelMaps, RelabelViews

        maps = LabelMaps.open(args.label_map, dataset=train_set)
        teacher_id = maps.teacher
        return RelabelViews(maps, geometry, k, args.seed), geometry, maps.num_classes, None, teacher_id, None, maps
    return FreshViews(geometry, k, args.seed), geometry, train_set.num_classes, None, None, None, None


def training_data(args, train_set, ctx):
    """What ``--targets`` trains on: (ReplayDataset of K views per image with their targets,
    teacher-view config, student classes, teacher, teacher identity, store, label maps).  Sets
    ``args.input_size`` when it was left to the teacher's.  Also used by ``bench/bench_sup.py``."""
    source, teacher_cfg, num_classes, teacher, teacher_id, store, maps = _sources(args, train_set, ctx)
    args.input_size = args.input_size or teacher_cfg.size
    dataset = ReplayDataset(train_set, source, teacher_cfg, args.input_size, render_teacher=teacher is not None,
                            extra_aug=args.extra_aug, fast_decode=args.fast_decode, seed=args.seed)
    return dataset, teacher_cfg, num_classes, teacher, teacher_id, store, maps


def main(argv=None) -> int:
    args = parse(argv)
    ctx = fdist.setup(args.device)
    try:
        with fdist.main_first(ctx):
            train_set = build_dataset(args.data, "train", args.data_root, verbose=ctx.is_main)
            val_set = None if args.no_val else build_dataset(args.data, "val", args.data_root, verbose=False)
        dataset, teacher_cfg, num_classes, teacher, teacher_id, store, maps = training_data(args, train_set, ctx)
        mode, k = args.targets, args.crops_per_image
        indices = store.valid_indices() if store is not None else range(len(train_set))
        torch.manual_seed(args.seed)  # the student's initial weights depend on --seed only
        student = build_classifier(args.arch, args.stem, args.input_size, num_classes)
        init = init_backbone(student, args.init) if args.init else None
        labels = torch.as_tensor(train_set.targets, dtype=torch.long)
        task = SoftLabelTask(student, mode, labels, teacher, MixConfig(args.mixup, args.cutmix),
                             args.label_smoothing, ctx.device.type == "cuda")

        # everything is checked: only now the run folder is touched
        out = cli.prepare_out_dir(args.out or cli.default_run_dir("sup", args.data, mode, args.arch))
        store_id = store.digest() if store is not None else None
        config = cli.save_run_config(out, vars(args) | {"out": str(out), "store_id": store_id}, IDENTITY, ctx.is_main)
        passes = args.epochs // k
        if store is not None and ctx.is_main:
            warning = reuse_warning(store.views_per_image, k, passes)
            if warning:
                print(warning, flush=True)
        cfg = TrainConfig(epochs=passes, batch_size=args.batch_size // k, workers=args.workers, seed=args.seed,
                          optim=OptimConfig(args.optimizer, args.lr * k, args.weight_decay, 0.9, args.warmup_epochs),
                          amp=not args.no_amp, max_minutes=args.max_minutes)
        method = {"store": "fkd_sup", "online": "kd_online", "hard": "plain", "relabel": "relabel"}[mode]
        meta = {"method": method, "kind": "sup_student", "targets": mode, "crops_per_image": k,
                "view_epochs": args.epochs, "teacher": teacher_id, "teacher_hash": (teacher_id or {}).get("hash"),
                "init": init, "num_classes": num_classes,
                "store": ({"path": args.store, "id": store_id, "views_per_image": store.views_per_image,
                           "codec": store.codec.name, "nbytes": store.nbytes()} if store is not None else None),
                "label_map": ({"path": str(args.label_map), "nbytes": maps.nbytes()} if maps is not None else None),
                "dataset": train_set.describe(), "views": dataset.student_cfg.to_dict(),
                "teacher_views": teacher_cfg.to_dict(), "config": config, "git_sha": config["git_sha"]}
        on_epoch_end = None
        if val_set is not None and num_classes == val_set.num_classes:
            def on_epoch_end(epoch, t):  # noqa: E306 - rank 0 only, after every pass
                return classifier_accuracy(t.export(), val_set, 256, 0, ctx.device)
        elif val_set is not None and ctx.is_main:
            print(f"note: the student has {num_classes} classes, {args.data} has {val_set.num_classes}: no val top-1 "
                  f"(judge it with eval/knn.py and eval/linear_probe.py)", flush=True)
        result = train(task, dataset, indices, cfg, ctx, out, meta, on_epoch_end,
                       desc=f"sup {mode} {args.arch} K={k}")
        if ctx.is_main:
            print(f"student: {result.model_path} ({result.epochs_done * k} epochs, {result.train_seconds / 60:.1f} min, "
                  f"{result.views_per_s:.0f} views/s)", flush=True)
    finally:
        fdist.cleanup()
    return 0


if __name__ == "__main__":
    cli.run_main(main)
