"""What a distillation run trains on (:func:`build_training_data`), and for how long (:func:`train_config`:
samples, README "Common flags", to the engine's passes), for both distill commands."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from .distill import open_store, store_views
from .engine import OptimConfig, TrainConfig
from .errors import ConfigError
from .replay import FreshViews, ReplayDataset, StoreViews, reuse_warning
from .views import ViewConfig


@dataclass(frozen=True)
class Source:
    """Where the views and targets come from (the flags of a distill command)."""

    store: str | None = None  # target store folder
    teacher: str | None = None  # online teacher checkpoint (runs at every step)
    teacher_arch: str | None = None
    teacher_flag: str = "--online-teacher"  # the flag that named it, for messages
    kind: str | None = None  # the targets the run needs (None: whatever the store holds)
    temp: float | None = None  # online teacher softmax temperature (None: the store's, else 1)
    replay: bool = True  # with a store and an online teacher: replay the stored views (else fresh ones)
    label_map: str | None = None  # ReLabel label-map folder
    fresh: ViewConfig | None = None  # views drawn fresh without a store (None: the teacher's)


@dataclass
class TrainingData:
    """The K-views-per-image dataset and everything the run's task and metadata need."""

    dataset: ReplayDataset
    teacher_cfg: ViewConfig  # the view distribution the teacher saw
    target_dim: int  # target dim (SSL) / student classes (supervised)
    teacher: Any  # the online TeacherTargets, or None
    teacher_id: dict | None
    store: Any = None  # TargetStore or None
    label_map: Any = None  # LabelMaps or None

    @property
    def indices(self):
        """The images to train on (a store's skipped images left out)."""
        return self.store.valid_indices() if self.store is not None else range(len(self.dataset))

    @property
    def probs(self) -> bool:
        return (self.teacher_id or {}).get("target") == "probs"

    def warn_reuse(self, passes: int, is_main: bool) -> None:
        """Print a warning when ``passes`` over the images use more views than the store holds."""
        if isinstance(self.dataset.source, StoreViews) and is_main:
            warning = reuse_warning(self.store.views_per_image, self.dataset.k, passes)
            if warning:
                print(warning, flush=True)


def _open_store(src: Source, train_set):
    store = open_store(src.store, train_set)
    held = store.identity.teacher.get("target")
    if src.kind is not None and held != src.kind:
        raise ConfigError(f"--store {Path(src.store).resolve()} holds {held} targets, not "
                          f"{'class probabilities' if src.kind == 'probs' else src.kind}: make it with gen_targets.py "
                          "and a classifier --teacher")
    return store


def _online_teacher(src: Source, store, ctx):
    from .teacher import load_teacher

    made_by = store.identity.teacher if store is not None else {}
    kind = src.kind or made_by.get("target")
    temp = src.temp or made_by.get("temp") or 1.0
    teacher, teacher_id = load_teacher(src.teacher, src.teacher_arch, kind, temp, ctx.device)
    if store is not None and teacher_id["hash"] != made_by.get("hash") and ctx.is_main:
        print(f"warning: {src.teacher_flag} {src.teacher} is not the teacher that made --store "
              f"{Path(src.store).resolve()}", flush=True)
    return teacher, teacher_id


def _teacher_views(src: Source, store, teacher) -> ViewConfig:
    if store is not None:
        return store_views(store)
    if src.fresh is None:
        from .teacher import default_views

        return default_views(teacher)
    return replace(src.fresh, size=teacher.input_size) if teacher is not None else src.fresh


def build_training_data(src: Source, args, train_set, ctx) -> TrainingData:
    """The run's views and targets from ``src``; ``args``: a student command's flags, in which --store and
    --input-size are resolved."""
    k, seed = args.crops_per_image, args.seed
    store = _open_store(src, train_set) if src.store else None
    maps, teacher, teacher_id = None, None, store.identity.teacher if store is not None else None
    if src.label_map:
        from .relabel import LabelMaps

        maps = LabelMaps.open(src.label_map, dataset=train_set)
        teacher_id = maps.teacher
    if src.teacher:
        teacher, teacher_id = _online_teacher(src, store, ctx)
    teacher_cfg = _teacher_views(src, store, teacher)
    if maps is not None:
        from .relabel import RelabelViews

        source = RelabelViews(maps, teacher_cfg, k, seed)
    elif store is not None and src.replay:
        source = StoreViews(store, k, seed, read_targets=teacher is None)
    else:
        source = FreshViews(teacher_cfg, k, seed)
    dim = (teacher.dim if teacher is not None else store.target_dim if store is not None
           else maps.num_classes if maps is not None else train_set.num_classes)
    dataset = ReplayDataset(train_set, source, teacher_cfg, args.input_size or teacher_cfg.size,
                            render_teacher=teacher is not None, extra_aug=args.extra_aug, fast_decode=args.fast_decode,
                            seed=seed)
    if store is not None:
        args.store = str(Path(src.store).resolve())
    args.input_size = dataset.student_cfg.size
    return TrainingData(dataset, teacher_cfg, dim, teacher, teacher_id, store, maps)


def train_student(args, data: TrainingData, task, ctx, train_set, out: Path, identity: tuple[str, ...],
                  meta: Callable[[dict], dict], desc: str, on_epoch_end=None, **config) -> None:
    """What both student commands do once everything is checked: the run folder and its config (only now
    touched; ``config``: entries besides the flags), training with ``meta(config)`` plus the shared
    metadata in the exported model, and the closing line."""
    from . import cli
    from .engine import train

    cfg, k = train_config(args, args.crops_per_image), args.crops_per_image  # a bad budget: before --out exists
    out = cli.prepare_out_dir(args.out or out)
    store_id = data.store.digest() if data.store is not None else None
    config = cli.save_run_config(out, vars(args) | {"out": str(out), "store_id": store_id, **config}, identity,
                                 ctx.is_main)
    data.warn_reuse(cfg.epochs, ctx.is_main)
    shared = {"crops_per_image": k, "teacher": data.teacher_id, "teacher_hash": (data.teacher_id or {}).get("hash"),
              "dataset": train_set.describe(), "views": data.dataset.student_cfg.to_dict(),
              "teacher_views": data.teacher_cfg.to_dict(), "config": config, "git_sha": config["git_sha"]}
    result = train(task, data.dataset, data.indices, cfg, ctx, out, {**meta(config), **shared}, on_epoch_end,
                   desc=desc)
    if ctx.is_main:
        print(f"student: {result.model_path} ({result.epochs_done * k} epochs, {result.train_seconds / 60:.1f} min, "
              f"{result.views_per_s:.0f} views/s)", flush=True)


def add_student_args(p) -> None:
    """The flags both students share (``--spread-steps``: see :func:`resolve_spread` for its default)."""
    from .cli import nonneg_int
    from .models import STEMS

    p.add_argument("--spread-steps", type=nonneg_int("--spread-steps"), default=None, metavar="N",
                   help="spread each decoded image's K views over N steps, a multiple of K (default 4K; 0: all K "
                        "in one step, as FKD does; docs/distill.md 'What a step does')")
    p.add_argument("--stem", choices=STEMS, default="default", help="small/cifar: less downsampling for tiny inputs")
    p.add_argument("--extra-aug", action="store_true", help="mild student-only colour augmentation on the views")
    p.add_argument("--fast-decode", action="store_true",
                   help="decode JPEGs at a reduced size when every crop allows it (PIL draft)")


def resolve_spread(args, one_step: bool = False) -> None:
    """Fill the default --spread-steps: 4K when K > 1, unless ``one_step`` (the views must share a step)."""
    if args.spread_steps is None:
        args.spread_steps = 4 * args.crops_per_image if args.crops_per_image > 1 and not one_step else 0


def check_budget(args, k: int) -> None:
    """ConfigError unless --epochs and --batch-size are whole numbers of passes / images at K = ``k``
    and --spread-steps is a multiple of K."""
    if getattr(args, "spread_steps", 0) % k:  # a students' flag
        raise ConfigError(f"--spread-steps {args.spread_steps} must be a multiple of --crops-per-image {k}")
    if args.epochs % k:
        raise ConfigError(f"--epochs {args.epochs} must be a multiple of --crops-per-image {k}: one pass over the "
                          f"images gives {k} views per image, worth {k} epochs (as in FKD)")
    if args.batch_size % k:
        raise ConfigError(f"--batch-size {args.batch_size} (samples per step) must be a multiple of "
                          f"--crops-per-image {k}")


def train_config(args, k: int) -> TrainConfig:
    """The engine's schedule for a run counted in samples (one view with its target each): with
    K views per decoded image one pass over the images is K epochs, a step of ``--batch-size``
    samples holds ``batch / K`` images, ``--lr`` (per 256 samples) is ``K * lr`` per 256 images
    and ``--warmup-epochs`` is ``warmup / K`` passes."""
    check_budget(args, k)
    optim = OptimConfig(args.optimizer, args.lr * k, args.weight_decay, 0.9, args.warmup_epochs / k)
    return TrainConfig(epochs=args.epochs // k, batch_size=args.batch_size // k, workers=args.workers, seed=args.seed,
                       optim=optim, amp=not args.no_amp, max_minutes=args.max_minutes, spread=getattr(args, "spread_steps", 0))
