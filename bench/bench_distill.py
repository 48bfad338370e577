"""Benchmark the FKD student side; prints ratios measured side by side in one run (never asserts).

(a) ``train``: student training throughput (views/s, steady state) through the one engine,
    same student, batch and views per image, with targets from
      * the store (FKD),
      * an online teacher on fresh views (vanilla KD: the teacher runs every step),
      * random constant targets and fresh views (no store, no teacher: the upper bound),
    so ``store / online`` is FKD's speed-up and ``store / constant`` what reading the store
    costs.  The teacher has >= 4x the student's FLOPs (both printed, via count_flops).
(b) ``load``: data-loading views per CPU second of one process (1 thread; ``time.process_time``, so
    other jobs on a shared machine do not count) on ImageNet-sized JPEGs (~500x375, generated in a
    temp folder): the plain torchvision ImageFolder + RandomResizedCrop + flip pipeline (one decode
    per view) against ReplayDataset with K = 1, 2, 4, 8 views per decoded image, plus PIL draft
    (reduced-size JPEG decoding), a store whose views are recomputed when read (gen_targets.py's)
    and the photometric (MoCo v2) variant.
(c) ``smoke`` (only when asked): every loss, SSL term and target source through the engine for
    two short epochs on ``--device`` (on CUDA: the AMP / channels_last paths CPU tests miss).

    python bench/bench_distill.py                 # (a) and (b), CPU sized (~2 min on 2 cores)
    python bench/bench_distill.py --only load --size 112
    python bench/bench_distill.py --only train --device cuda --images 4096 --image-size 128 --epochs 2 \
        --batch-size 128 --workers 12 --teacher-arch resnet50 --teacher-stem default --teacher-size 128 \
        --student-arch resnet18 --student-stem default --student-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fkd_ssl.data.synthetic import write_photo_jpegs
from fkd_ssl.dist import DistContext
from fkd_ssl.views import VIEW_PARAM_DIM, ViewConfig, sample_views

_TMP: list[Path] = []


def _tmpdir(prefix: str) -> Path:
    """A temporary folder removed when the bench ends."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    _TMP.append(path)
    return path


# ----------------------------------------------------------------------------- (a) training


def _steady_views_per_s(out: Path, views_per_step: int, skip: int) -> float:
    """Views/s over the logged steps after the first ``skip`` (warm-up, worker start)."""
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines() if r.strip()]
    rows = [r for r in rows if "elapsed" in r]
    a, b = rows[skip - 1], rows[-1]
    return (b["step"] - a["step"]) * views_per_step / max(b["elapsed"] - a["elapsed"], 1e-9)


def bench_train(args) -> dict:
    from fkd_ssl.checkpoint import save_model
    from fkd_ssl.data import build_dataset
    from fkd_ssl.distill import DistillTask, build_student, open_store, store_views
    from fkd_ssl.engine import OptimConfig, TrainConfig, train
    from fkd_ssl.generate import generate
    from fkd_ssl.losses import DistillLoss
    from fkd_ssl.models import Encoder, ModelSpec, count_flops
    from fkd_ssl.replay import FreshViews, ReplayDataset, StoreViews
    from fkd_ssl.store import StoreWriter, finalize, make_codec
    from fkd_ssl.teacher import load_teacher

    device = torch.device(args.device)
    ctx = DistContext(0, 1, 0, device)
    tmp = _tmpdir("bench_distill_")
    data = f"synthetic:train={args.images},val=16,size={args.image_size}"
    ds = build_dataset(data, "train", tmp / "data", verbose=False)

    torch.manual_seed(0)
    tspec = ModelSpec(arch=args.teacher_arch, stem=args.teacher_stem, head="moco", head_hidden=512, head_out=128,
                      input_size=args.teacher_size)
    teacher_model = Encoder(tspec).eval()
    ckpt = save_model(tmp / "teacher" / "model", teacher_model, {"method": "bench"})
    student = build_student(args.student_arch, args.student_stem, args.student_size, 128, 512)
    f_t = count_flops(teacher_model, args.teacher_size)
    f_s = count_flops(student, args.student_size)
    print(f"teacher {args.teacher_arch} stem {args.teacher_stem} @{args.teacher_size}px: {f_t / 1e9:.3f} GFLOPs/view; "
          f"student {args.student_arch} stem {args.student_stem} @{args.student_size}px: {f_s / 1e9:.3f} GFLOPs/view "
          f"(teacher/student {f_t / f_s:.1f}x)", flush=True)

    teacher, tid = load_teacher(str(ckpt), device=device)
    views = ViewConfig(size=args.teacher_size)
    identity = {"teacher": tid, "views": views.to_dict(), "seed": 0, "group": 8,
                "dataset": {"fingerprint": ds.fingerprint(), "split": "train", "num_classes": ds.num_classes}}
    w = StoreWriter.create_or_resume(tmp / "store", identity, num_images=len(ds), views_per_image=args.views,
                                     param_dim=VIEW_PARAM_DIM, target_dim=teacher.dim, codec=make_codec("fp16"),
                                     shard_size=4096)
    stats = generate(teacher, ds, w, views, 0, 256, args.workers, device, 8, show_progress=False)
    w.complete_owned()
    w.close()
    finalize(tmp / "store")
    store = open_store(tmp / "store", ds)
    print(f"store: {len(ds)} images x {args.views} views in {stats.seconds:.1f} s "
          f"({stats.views_per_s:.0f} teacher views/s, done once)", flush=True)

    k = args.k
    cfg_t = store_views(store)

    class ConstantTargets(FreshViews):
        """Fresh views with one fixed random target per view slot: no store, no teacher."""

        target_dim = 128

        def __init__(self, *a):
            super().__init__(*a)
            self.t = np.random.default_rng(0).standard_normal((k, 128)).astype(np.float32)

        def take(self, image, epoch, height=None, width=None):
            slots, params, _ = super().take(image, epoch, height, width)
            return slots, params, self.t

    modes = {
        "store": (ReplayDataset(ds, StoreViews(store, k, 0), cfg_t, args.student_size), None),
        "online": (ReplayDataset(ds, FreshViews(cfg_t, k, 0), cfg_t, args.student_size, render_teacher=True), teacher),
        "constant": (ReplayDataset(ds, ConstantTargets(cfg_t, k, 0), cfg_t, args.student_size), None),
    }
    results = {}
    for rep in range(args.repeats):
        for name, (dataset, tch) in modes.items():
            torch.manual_seed(0)
            task = DistillTask(build_student(args.student_arch, args.student_stem, args.student_size, 128, 512),
                               DistillLoss("infonce", 128, queue_size=4096), teacher=tch,
                               channels_last=device.type == "cuda")
            cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, workers=args.workers, seed=0,
                              optim=OptimConfig(lr=0.05, warmup_epochs=0.0), log_every=1, ckpt_minutes=0)
            out = tmp / f"run-{name}-{rep}"
            t0 = time.time()
            train(task, dataset, store.valid_indices(), cfg, ctx, out, {"method": "bench"}, desc=name)
            vps = _steady_views_per_s(out, args.batch_size * k, skip=args.warmup_steps)
            results.setdefault(name, []).append(vps)
            print(f"  {name:9s} rep {rep}: {vps:8.0f} views/s steady ({time.time() - t0:.1f} s wall)", flush=True)
    results = {name: float(np.median(v)) for name, v in results.items()}  # median over --repeats
    s, o, c = results["store"], results["online"], results["constant"]
    print(f"(a) views/s  store {s:.0f} | online teacher {o:.0f} | constant targets {c:.0f}")
    print(f"(a) FKD store / online teacher = {s / o:.2f}x (goal >= 2.5x); store cost vs constant targets = "
          f"{100 * (1 - s / c):+.1f}% of throughput (goal < 5%)", flush=True)
    return {"flops_teacher": f_t, "flops_student": f_s, **results, "store_vs_online": s / o, "store_vs_constant": s / c}


# ----------------------------------------------------------------------------- (b) data loading


def _rate(fn, n_items: int, views_per_item: int, seconds: float) -> float:
    """Views per CPU second of this process (``time.process_time``: other jobs on a shared machine do not count)
    of calling ``fn(j)`` for j = 0, 1, ... (cycling over n_items) for ~``seconds`` of CPU time."""
    fn(0)
    done, t0 = 0, time.process_time()
    while time.process_time() - t0 < seconds:
        fn(done % n_items)
        done += 1
    return done * views_per_item / (time.process_time() - t0)


def _load_store(path: Path, ds, cfg: ViewConfig, replay: bool):
    """A store of ``ds``'s images x 8 views of ``cfg``, random targets; its geometry recomputed when read
    (``replay``, as gen_targets.py writes) or stored (the writer's default)."""
    from PIL import Image

    from fkd_ssl.store import StoreWriter, TargetStore, finalize, make_codec
    from fkd_ssl.store.geometry import ReplayGeometry

    R = 8
    w = StoreWriter.create_or_resume(path, {"views": cfg.to_dict(), "dataset": {"fingerprint": ds.fingerprint()}},
                                     num_images=len(ds), views_per_image=R, param_dim=VIEW_PARAM_DIM, target_dim=128,
                                     codec=make_codec("fp16"), shard_size=4096, sync=False,
                                     geometry=ReplayGeometry(VIEW_PARAM_DIM, cfg.to_dict(), 0) if replay else None)
    rng = np.random.default_rng(0)
    for i in range(len(ds)):
        with Image.open(ds.path(i)) as im:
            W, H = im.size
        w.write(np.array([i]), sample_views(cfg, 0, i, range(R), H, W)[None],
                rng.standard_normal((1, R, 128)).astype(np.float32), sizes=np.array([[H, W]]))
    w.complete_owned()
    w.close()
    finalize(path)
    return TargetStore.open(path)


def bench_load(args) -> dict:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from fkd_ssl.data.datasets import ImageFolderDataset
    from fkd_ssl.replay import ReplayDataset, StoreViews

    torch.set_num_threads(1)
    tmp = _tmpdir("bench_load_")
    write_photo_jpegs(tmp / "jpegs", args.jpegs)
    size = args.size
    results = {}
    for photometric in (False, True):
        tag = "moco-v2" if photometric else "geometry"
        ops = [T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomHorizontalFlip()]
        if photometric:
            ops += [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                    T.RandomApply([T.GaussianBlur(23, (0.1, 2.0))], p=0.5)]
        plain = ImageFolder(str(tmp / "jpegs"), transform=T.Compose(ops + [T.PILToTensor()]))
        runs = {"plain": ("plain ImageFolder+RandomResizedCrop (uint8 PILToTensor)", lambda j, d=plain: d[j], 1)}
        if not photometric:  # the usual recipe converts and normalises every view in the loader
            usual = ImageFolder(str(tmp / "jpegs"), transform=T.Compose(
                ops + [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]))
            runs["plain-float"] = ("plain ImageFolder+RandomResizedCrop (ToTensor+Normalize)", lambda j, d=usual: d[j], 1)
        ds = ImageFolderDataset(tmp / "jpegs", "train")
        cfg = ViewConfig(size=size, photometric=photometric)
        store = _load_store(tmp / f"store-{tag}", ds, cfg, replay=False)
        stores = [(store, k, fast, f"K={k}" + ("+draft" if fast else "")) for fast in (False, True) for k in (1, 2, 4, 8)]
        stores.append((_load_store(tmp / f"replay-{tag}", ds, cfg, replay=True), 4, False, "K=4 recomputed"))
        for st, k, fast, name in stores:
            data = ReplayDataset(ds, StoreViews(st, k, 0), cfg, size, fast_decode=fast)
            label = f"replay K={k}" + (" +draft" if fast else "") + (", views recomputed (gen_targets.py's store)"
                                                                    if st is not store else "")
            runs[name] = (label, lambda j, d=data: d[(j, 0)], k)
        rates = {name: [] for name in runs}
        for _ in range(args.rounds):  # interleaved, so that a load change on a shared machine hits every run alike
            for name, (_, fn, per) in runs.items():
                rates[name].append(_rate(fn, len(ds), per, args.seconds / args.rounds))
        print(f"(b) {tag} at {size} px: views per CPU second, median of {args.rounds} interleaved rounds; "
              f"x = median over rounds of this / plain uint8", flush=True)
        for name, (label, _, _) in runs.items():
            v, x = np.median(rates[name]), np.median(np.array(rates[name]) / np.array(rates["plain"]))
            results[f"{tag}/{name}"], results[f"{tag}/{name}/x"] = float(v), float(x)
            print(f"(b)   {label:66s} {v:7.0f} views/s = {x:4.2f}x", flush=True)
    print(f"(b) at K=4: {results['geometry/K=4/x']:.2f}x plain uint8 ({results['geometry/K=4 recomputed/x']:.2f}x "
          f"with views recomputed) / {results['geometry/K=4/x'] / results['geometry/plain-float/x']:.2f}x plain float "
          f"(geometry), {results['moco-v2/K=4/x']:.2f}x plain (MoCo v2 photometric); goal >= 3x")
    return results


# ----------------------------------------------------------------------------- (c) smoke


def bench_smoke(args) -> dict:
    """Every loss, SSL term and target source through the engine for one short epoch on
    ``--device`` (on CUDA: the AMP, GradScaler and channels_last paths the CPU tests cannot reach)."""
    from fkd_ssl.checkpoint import save_model
    from fkd_ssl.data import build_dataset
    from fkd_ssl.distill import DistillTask, build_student, open_store, store_views
    from fkd_ssl.engine import OptimConfig, TrainConfig, train
    from fkd_ssl.generate import generate
    from fkd_ssl.losses import DistillLoss
    from fkd_ssl.models import Encoder, ModelSpec
    from fkd_ssl.replay import FreshViews, ReplayDataset, StoreViews
    from fkd_ssl.store import StoreWriter, finalize, make_codec
    from fkd_ssl.teacher import load_teacher

    device = torch.device(args.device)
    tmp = _tmpdir("smoke_distill_")
    ds = build_dataset("synthetic:train=64,val=16,size=48", "train", tmp / "data", verbose=False)
    torch.manual_seed(0)
    tm = Encoder(ModelSpec(arch="resnet18", stem="small", head="moco", head_hidden=128, head_out=32, input_size=48))
    ckpt = save_model(tmp / "teacher" / "model", tm.eval(), {"method": "smoke"})
    teacher, tid = load_teacher(str(ckpt), device=device)
    views = ViewConfig(size=48)
    identity = {"teacher": tid, "views": views.to_dict(), "seed": 0, "group": 8,
                "dataset": {"fingerprint": ds.fingerprint(), "split": "train", "num_classes": ds.num_classes}}
    w = StoreWriter.create_or_resume(tmp / "store", identity, num_images=len(ds), views_per_image=4,
                                     param_dim=VIEW_PARAM_DIM, target_dim=32, codec=make_codec("fp16"), shard_size=64)
    generate(teacher, ds, w, views, 0, 64, 0, device, 8, show_progress=False)
    w.complete_owned()
    w.close()
    finalize(tmp / "store")
    store = open_store(tmp / "store", ds)
    cfg_t = store_views(store)
    runs = [("infonce", "none", 0, "store"), ("infonce-multi", "moco", 0, "store"), ("soft-ce", "none", 0, "store"),
            ("seed", "simsiam", 16, "store"), ("cosine", "none", 16, "store"), ("infonce", "none", 0, "online"),
            ("cosine", "none", 0, "online-replay")]
    results = {}
    for loss_name, ssl, pred, mode in runs:
        name = loss_name.replace("-multi", "")
        if mode == "store":
            data = ReplayDataset(ds, StoreViews(store, 2, 0), cfg_t, 32, extra_aug=True)
        elif mode == "online":
            data = ReplayDataset(ds, FreshViews(cfg_t, 2, 0), cfg_t, 32, render_teacher=True)
        else:
            data = ReplayDataset(ds, StoreViews(store, 2, 0, read_targets=False), cfg_t, 32, render_teacher=True)
        task = DistillTask(build_student("resnet10t", "small", 32, 32, 64, pred),
                           DistillLoss(name, 32, queue_size=64, multi_positive=loss_name.endswith("multi")),
                           teacher=None if mode == "store" else teacher, ssl=ssl, ssl_queue_size=64,
                           channels_last=device.type == "cuda")
        cfg = TrainConfig(epochs=2, batch_size=16, workers=2, seed=0, optim=OptimConfig(lr=0.05, warmup_epochs=0.0),
                          log_every=1, ckpt_minutes=0)
        tag = f"{loss_name}+{ssl}+{mode}"
        out = tmp / tag
        res = train(task, data, store.valid_indices(), cfg, DistContext(0, 1, 0, device), out, {"method": "smoke"},
                    desc=tag)
        rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines() if r.strip()]
        results[tag] = (rows[0]["loss"], rows[-1]["loss"])
        print(f"(c) {tag:30s} {res.steps} steps, loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}, "
              f"cos {rows[-1].get('cos', float('nan')):.3f}", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("train", "load", "smoke"), default=None,
                   help="run one part (default: train and load; smoke only when asked)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=256, help="(a) training images")
    p.add_argument("--image-size", type=int, default=96, help="(a) synthetic image side")
    p.add_argument("--views", type=int, default=4, help="(a) stored views per image")
    p.add_argument("--k", type=int, default=2, help="(a) views per image per step")
    p.add_argument("--epochs", type=int, default=1, help="(a) passes over the images per mode (<= views // k keeps views unseen)")
    p.add_argument("--batch-size", type=int, default=16, help="(a) images per step (k views each)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="(a) runs per mode, interleaved (the median is reported)")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--teacher-arch", default="resnet18")
    p.add_argument("--teacher-stem", default="small")
    p.add_argument("--teacher-size", type=int, default=64)
    p.add_argument("--student-arch", default="resnet10t")
    p.add_argument("--student-stem", default="small")
    p.add_argument("--student-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of the main process (default: 1 on CPU, where a second thread on a "
                        "busy machine slows small models down many times; torch's default on CUDA)")
    p.add_argument("--jpegs", type=int, default=200, help="(b) generated JPEGs")
    p.add_argument("--size", type=int, default=224, help="(b) output view side")
    p.add_argument("--seconds", type=float, default=3.0, help="(b) CPU seconds per measurement")
    p.add_argument("--rounds", type=int, default=5, help="(b) interleaved rounds the seconds are split into")
    args = p.parse_args()
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, device {args.device}, "
          f"{torch.get_num_threads()} intra-op threads", flush=True)
    try:
        if args.only in (None, "train"):
            bench_train(args)
        if args.only in (None, "load"):
            bench_load(args)
        if args.only == "smoke":
            bench_smoke(args)
    finally:
        for path in _TMP:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
