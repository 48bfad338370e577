"""gen_targets throughput against the teacher's bare forward, measured side by side.

The pipeline (decode, sample and render R views per image, teacher, encode, write) should add
little to the teacher's own cost: the goal is images/s of ``generate`` >= 0.9 x the teacher's
forward on pre-rendered views of the same batch shape.  Prints both rates and their ratio.

    python bench/bench_gen_targets.py [--teacher resnet50] [--view-size 96] [--images 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from fkd_ssl.data import build_dataset, pil_to_uint8_tensor
from fkd_ssl.dist import resolve_device
from fkd_ssl.generate import generate
from fkd_ssl.models import Encoder, ModelSpec, count_flops
from fkd_ssl.store import StoreWriter, make_codec
from fkd_ssl.teacher import TeacherTargets
from fkd_ssl.views import VIEW_PARAM_DIM, ViewConfig, render_views, sample_views


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--view-size", type=int, default=96)
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--views", type=int, default=8, help="R views per image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = Encoder(ModelSpec(arch=args.teacher, head="moco", head_hidden=512, head_out=128, input_size=args.view_size))
    teacher = TeacherTargets(model.to(device), "proj", channels_last=device.type == "cuda")
    with tempfile.TemporaryDirectory() as tmp:
        data = f"synthetic:train={args.images},val=10,size=96"
        ds = build_dataset(data, "train", Path(tmp) / "data", verbose=False)
        cfg = ViewConfig(size=args.view_size)
        # bare forward: the same number of views, pre-rendered, same batch shape
        views = torch.cat([render_views(pil_to_uint8_tensor(ds.load(i)), sample_views(cfg, 0, i, range(args.views), 96, 96), cfg)
                           for i in range(args.images)])
        teacher(views[: args.batch_size].to(device))  # warm-up
        t0 = time.perf_counter()
        for c in range(0, len(views), args.batch_size):
            teacher(views[c:c + args.batch_size].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        bare = args.images / (time.perf_counter() - t0)
        writer = StoreWriter.create_or_resume(Path(tmp) / "store", {"bench": 1}, num_images=len(ds),
                                              views_per_image=args.views, param_dim=VIEW_PARAM_DIM, target_dim=128,
                                              codec=make_codec("fp16"), shard_size=4096)
        stats = generate(teacher, ds, writer, cfg, 0, args.batch_size, args.workers, device,
                         group=max(1, args.batch_size // args.views), show_progress=False)
    print(f"teacher {args.teacher} at {args.view_size}px ({count_flops(model.cpu(), args.view_size, 'project') / 1e9:.2f} GFLOPs/view), "
          f"R={args.views}, batch {args.batch_size}, workers {args.workers}, device {device}")
    print(f"bare teacher forward : {bare:8.1f} images/s ({bare * args.views:.0f} views/s)")
    print(f"gen_targets pipeline : {stats.images_per_s:8.1f} images/s ({stats.views_per_s:.0f} views/s)")
    print(f"ratio pipeline/bare  : {stats.images_per_s / bare:.2f}  (goal >= 0.9)")


if __name__ == "__main__":
    main()
