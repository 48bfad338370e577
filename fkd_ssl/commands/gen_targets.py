"""Run a teacher once over R random views of every training image and store its targets.

Rerunning the same command resumes; another teacher, sampler, codec or dataset is refused unless
``--overwrite``.  ``torchrun --standalone --nproc_per_node=N experiments/gen_targets.py ...`` splits the shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import cli
from .. import dist as fdist
from ..data import build_dataset
from ..errors import ConfigError
from ..generate import generate, image_views
from ..store import StoreIdentity, StoreWriter, TargetStore, finalize, make_codec, owned_shards
from ..store.geometry import ReplayGeometry
from ..store.plan import StorePlan
from ..store.layout import HEADER, num_shards
from ..teacher import ENSEMBLE_MODES, POOLS, TARGET_KINDS, default_views, load_teachers
from ..views import VIEW_PARAM_DIM, ViewConfig


def build_parser():
    p = cli.parser(__doc__)
    cli.add_common_args(p, ("data", "data_root", "out", "batch_size", "workers", "device", "seed"), batch_size=256,
                        workers=1)
    p.add_argument("--teacher", action="append", default=None,
                   help="project checkpoint, effnet-lite0/1/2, timm:<name>[.<tag>], tv:<name>[:<WEIGHTS>], or a plain "
                        "timm/torchvision state dict with --arch (default: the teacher pretrain_teacher.py wrote for "
                        "--data); given several times: an ensemble on the same views")
    p.add_argument("--teacher-weights", action="append", default=None,
                   help="weight file of a timm:/tv: --teacher (once per such teacher, in order); default: the "
                        "library's local cache")
    p.add_argument("--arch", default=None, help="architecture of a plain state-dict --teacher (tv:<name> for torchvision)")
    p.add_argument("--teacher-prefix", default=None,
                   help="an SSL library's checkpoint (lightly, solo-learn): the backbone's key prefix, e.g. backbone. "
                        "(default: detected); a projection head beside it is loaded for --target proj")
    p.add_argument("--target", choices=TARGET_KINDS, default=None,
                   help="proj (SSL head, default with a head), feature, or probs (classifier softmax)")
    p.add_argument("--pool", choices=POOLS, default=None,
                   help="a ViT teacher's feature (implies --target feature): class token, mean patch token, or both")
    p.add_argument("--ensemble", choices=ENSEMBLE_MODES, default="mean",
                   help="several teachers: mean of their targets, or their targets concatenated")
    p.add_argument("--views-from", default=None,
                   help="a store whose views (seed, R, view distribution) this store repeats exactly")
    p.add_argument("--temp", type=cli.positive_float("--temp"), default=1.0, help="softmax temperature for --target probs")
    p.add_argument("--views-per-image", type=cli.positive_int("--views-per-image"), default=None,
                   help="R stored views per image (a student using K per step gets R/K epochs of fresh views; "
                        "default 40)")
    p.add_argument("--codec", choices=("fp32", "fp16", "int8", "pq", "topk"), default=None,
                   help="target codec (default: fp16 for vectors, topk for probabilities)")
    p.add_argument("--topk", type=cli.positive_int("--topk"), default=5, help="k for --codec topk")
    p.add_argument("--topk-mode", choices=("smooth", "renorm"), default="smooth",
                   help="topk reconstruction: FKD's marginal smoothing or renormalised top-k")
    p.add_argument("--pq-m", type=cli.positive_int("--pq-m"), default=16, help="sub-quantisers for --codec pq")
    p.add_argument("--view-size", type=cli.positive_int("--view-size"), default=None,
                   help="side of the views the teacher sees (default: the teacher's input size)")
    p.add_argument("--crop-min", type=cli.fraction("--crop-min"), default=None,
                   help="RandomResizedCrop min scale (default: the teacher's training views; 0.2 for other "
                        "embedding teachers, 0.08 for probs)")
    p.add_argument("--photometric", choices=("auto", "on", "off"), default="auto",
                   help="photometric augmentation of the views (auto: as the teacher was trained, MoCo v2's for "
                        "other embedding teachers, off for probs)")
    p.add_argument("--shard-size", type=cli.positive_int("--shard-size"), default=4096, help="images per shard file")
    p.add_argument("--group", type=cli.positive_int("--group"), default=8,
                   help="images whose views go through the teacher together (fixed, so results are reproducible)")
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--overwrite", action="store_true", help="replace a store made with other settings")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--plan", action="store_true", help="print the store's size, the free space at --out and an "
                   "estimated generation time (the teacher timed on a few images here); write nothing")
    return p


def _codec(args, teacher):
    name = args.codec or ("topk" if teacher.kind == "probs" else "fp16")
    if name == "topk":
        if teacher.kind != "probs":
            raise ConfigError(f"--codec topk needs --target probs (the teacher's target is {teacher.kind})")
        return make_codec("topk", k=args.topk, num_classes=teacher.dim, mode=args.topk_mode)
    if name == "pq":
        return make_codec("pq", M=args.pq_m, seed=args.seed)
    return make_codec(name)


def _pq_sample(teacher, train_set, cfg, seed, R, device, max_views=8192) -> np.ndarray:
    """Teacher outputs on the first images' views: the deterministic sample PQ trains on."""
    outs, n = [], 0
    for i in range(len(train_set)):
        views = image_views(train_set, cfg, seed, R, [i])[0].views
        if views is None:  # unreadable: gen_targets records it as skipped
            continue
        outs.append(teacher(views.to(device)).cpu().numpy())
        n += len(views)
        if n >= max_views:
            break
    return np.concatenate(outs)


def _default_teacher(args) -> str:
    """The teacher pretrain_teacher.py wrote for --data (it must exist)."""
    path = cli.default_run_dir("teacher", args.data) / "model.safetensors"
    if not path.exists():
        raise ConfigError(f"no --teacher given and {path} does not exist: run "
                          f"fkd-pretrain-teacher --data {args.data} first, or pass --teacher")
    return str(path)


def _views_from(args, train_set) -> ViewConfig:
    """--views-from: the other store's view distribution; its seed and R become this run's."""
    other = TargetStore.open(args.views_from)
    ident = other.identity
    if ident.dataset.get("fingerprint") != train_set.fingerprint() or ident.dataset.get("split") != args.split:
        raise ConfigError(f"--views-from {args.views_from} was made from another dataset or split than --data "
                          f"{args.data} --split {args.split}")
    given = [f for f, v in (("--view-size", args.view_size), ("--crop-min", args.crop_min)) if v is not None]
    if given or args.photometric != "auto" or args.views_per_image not in (None, other.views_per_image):
        raise ConfigError(f"--views-from {args.views_from} sets the views: leave out "
                          f"{', '.join(given) or '--photometric / --views-per-image'}")
    args.seed, args.views_per_image = ident.seed, other.views_per_image
    print(f"views from {args.views_from}: seed {ident.seed}, {other.views_per_image} views per image", flush=True)
    return ViewConfig.from_dict(ident.views)


def _fit_patch(views: ViewConfig, teacher, fixed: bool) -> ViewConfig:
    """Views of a ViT teacher at a multiple of its patch size (rounded, and said so)."""
    p = teacher.patch
    if views.size % p == 0:
        return views
    if fixed:
        raise ConfigError(f"--views-from: the views' size {views.size} is not a multiple of the teacher's patch size {p}")
    size = max(p, round(views.size / p) * p)
    print(f"note: view size {views.size} rounded to {size}, a multiple of the teacher's patch size {p}", flush=True)
    return ViewConfig.from_dict({**views.to_dict(), "size": size})


def _views(args, teacher, train_set) -> ViewConfig:
    """--views-from's views, or the teacher's view distribution with the overrides of --view-size,
    --crop-min, --photometric; a multiple of a ViT teacher's patch size."""
    if args.views_from:
        return _fit_patch(_views_from(args, train_set), teacher, fixed=True)
    args.views_per_image = args.views_per_image or 40
    views = default_views(teacher)
    overrides = {}
    if args.view_size:
        overrides["size"] = args.view_size
    if args.crop_min is not None:
        overrides["scale"] = (args.crop_min, views.scale[1])
    if args.photometric != "auto":
        overrides["photometric"] = args.photometric == "on"
    return _fit_patch(ViewConfig.from_dict({**views.to_dict(), **overrides}), teacher, fixed=False)


def _open_writer(args, out, identity, codec, teacher, train_set, views, ctx) -> StoreWriter:
    """Create or resume the store on rank 0 (fitting a PQ codec first), then open this rank's shards."""
    kw = dict(num_images=len(train_set), views_per_image=args.views_per_image, param_dim=VIEW_PARAM_DIM,
              target_dim=teacher.dim, shard_size=args.shard_size,
              geometry=ReplayGeometry(VIEW_PARAM_DIM, views.to_dict(), args.seed))
    with fdist.main_first(ctx):
        if ctx.is_main:
            fresh = not (out / HEADER).exists() or args.overwrite
            if fresh and codec.name == "pq":
                codec.fit(_pq_sample(teacher, train_set, views, args.seed, args.views_per_image, ctx.device))
            StoreWriter.create_or_resume(out, identity, codec=codec, overwrite=args.overwrite, shards=[], **kw)
    if ctx.is_main:
        cli.print_config({**vars(args), "identity": identity.to_dict()})
    shards = owned_shards(num_shards(len(train_set), args.shard_size), ctx.rank, ctx.world_size)
    return StoreWriter.create_or_resume(out, identity, codec=codec, shards=shards, **kw)


def _plan(args, out, teacher, train_set, views, codec, device) -> StorePlan:
    def step(i):  # one image's views through the teacher, as generate() does
        it = image_views(train_set, views, args.seed, args.views_per_image, [i])[0]
        for c in range(0, 0 if it.views is None else len(it.views), args.batch_size):
            teacher(it.views[c:c + args.batch_size].to(device))
    return StorePlan.of(out, len(train_set), args.views_per_image, codec, teacher.dim, ReplayGeometry(
        VIEW_PARAM_DIM, views.to_dict(), args.seed), args.shard_size, step if args.plan else None)


def _finish(out, stats, ctx) -> None:
    """Rank 0: finalize the store once every rank is done and print its summary."""
    fdist.barrier()
    if not ctx.is_main:
        return
    manifest = finalize(out, timeout_s=600 if ctx.distributed else 0)
    store = TargetStore.open(out)
    print(f"store: {out} ({store.num_images} images x {store.views_per_image} views, dim {store.target_dim}, codec "
          f"{store.codec.name}, {store.nbytes() / 2**20:.1f} MiB, {manifest['num_skipped']} skipped; "
          f"this run {stats.images} images at {stats.images_per_s:.1f} img/s, {stats.views_per_s:.0f} views/s)",
          flush=True)


def run(args) -> int:
    with fdist.session(args.device) as ctx:
        args.teacher = args.teacher or [_default_teacher(args)]
        teacher, teacher_id = load_teachers(args.teacher, args.teacher_weights, args.ensemble, arch=args.arch,
                                            kind=args.target, temp=args.temp, device=ctx.device, pool=args.pool,
                                            prefix=args.teacher_prefix)
        names = [Path(t).parent.name if Path(t).exists() else t for t in args.teacher]
        out = Path(args.out or cli.default_run_dir("store", args.data, "+".join(names)))
        out = out if args.plan else cli.prepare_out_dir(out)
        with fdist.main_first(ctx):
            train_set = build_dataset(args.data, args.split, args.data_root, verbose=ctx.is_main)
        views = _views(args, teacher, train_set)
        identity = StoreIdentity(teacher=teacher_id, views=views.to_dict(), seed=args.seed, group=args.group,
                                 dataset={"fingerprint": train_set.fingerprint(), "split": args.split,
                                          "num_classes": train_set.num_classes})
        codec = _codec(args, teacher)
        plan = _plan(args, out, teacher, train_set, views, codec, ctx.device)
        if args.plan:
            print(plan.render(), flush=True)
            return 0
        plan.check()
        writer = _open_writer(args, out, identity, codec, teacher, train_set, views, ctx)
        stats = generate(teacher, train_set, writer, views, args.seed, args.batch_size, args.workers, ctx.device,
                         args.group, amp=not args.no_amp, show_progress=ctx.is_main)
        writer.complete_owned()
        writer.close()
        _finish(out, stats, ctx)
    return 0


main, console = cli.entry_points(__name__)
