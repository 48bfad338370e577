"""Pretrain a self-supervised teacher (MoCo v2 or SimSiam) on --data.

With no arguments: a MoCo v2 ResNet-10t at 48 px on the built-in synthetic set, on CPU in under ten minutes,
to ``runs/teacher-synthetic/model.safetensors``.  A sample is one image.  Rerunning the same command resumes;
``torchrun --nproc_per_node=N experiments/pretrain_teacher.py ...`` trains with DDP.
"""

from __future__ import annotations

import torch

from .. import cli
from .. import dist as fdist
from ..data import build_dataset
from ..engine import train
from ..models import STEMS, Encoder, ModelSpec
from ..ssl import METHODS, MoCo, SimSiam
from ..training_data import train_config
from ..views import RandomViewsDataset, ViewConfig

#: settings that define a run: changing one needs another --out
IDENTITY = ("data", "arch", "stem", "method", "input_size", "crop_min", "jitter", "hue", "gray_p", "epochs", "batch_size", "seed", "queue_size",
            "temperature", "momentum", "proj_dim", "proj_hidden", "head_bn", "optimizer", "lr", "weight_decay", "warmup_epochs")


def build_parser():
    p = cli.parser(__doc__)
    cli.add_common_args(p, epochs=5, batch_size=64, workers=1, arch="resnet10t")
    p.add_argument("--method", choices=METHODS, default="moco")
    p.add_argument("--stem", choices=STEMS, default="default", help="small/cifar: less downsampling for tiny inputs")
    p.add_argument("--input-size", type=cli.positive_int("--input-size"), default=48, help="training crop side (px)")
    p.add_argument("--crop-min", type=cli.fraction("--crop-min"), default=0.2, help="RandomResizedCrop min scale")
    p.add_argument("--jitter", type=cli.nonneg_float("--jitter"), default=0.8,
                   help="colour-jitter strength for brightness, contrast and saturation (MoCo v2: 0.4)")
    p.add_argument("--hue", type=cli.bounded(float, 0.0, False, "--hue", 0.5), default=0.5,
                   help="hue jitter (MoCo v2: 0.1)")
    p.add_argument("--gray-p", type=cli.bounded(float, 0.0, False, "--gray-p", 1), default=0.5,
                   help="grayscale probability (MoCo v2: 0.2)")
    p.add_argument("--queue-size", type=cli.positive_int("--queue-size"), default=512,
                   help="MoCo queue length (a short queue learns faster in short runs; MoCo v2 uses 65536)")
    p.add_argument("--temperature", type=cli.positive_float("--temperature"), default=0.2)
    p.add_argument("--momentum", type=cli.positive_float("--momentum"), default=0.99, help="MoCo key-encoder EMA (start)")
    p.add_argument("--proj-dim", type=cli.positive_int("--proj-dim"), default=128)
    p.add_argument("--proj-hidden", type=cli.positive_int("--proj-hidden"), default=512)
    p.add_argument("--head-bn", action="store_true", help="BatchNorm in the projection head")
    cli.add_optim_args(p, lr=0.06, weight_decay=5e-4, warmup_epochs=1.0)
    return p


def _task(args, ctx):
    """The MoCo / SimSiam task around a freshly initialised encoder."""
    spec = ModelSpec(arch=args.arch, stem=args.stem, head="moco" if args.method == "moco" else "simsiam",
                     head_hidden=args.proj_hidden, head_out=args.proj_dim, head_bn=args.head_bn,
                     predictor_hidden=args.proj_hidden // 2 if args.method == "simsiam" else 0,
                     input_size=args.input_size)
    channels_last = ctx.device.type == "cuda"
    torch.manual_seed(args.seed)  # the initial weights depend on --seed only
    encoder = Encoder(spec)
    if args.method == "moco":
        return MoCo(encoder, args.queue_size, args.temperature, args.momentum, channels_last, ctx.distributed)
    return SimSiam(encoder, channels_last)


def run(args) -> int:
    cfg = train_config(args, 1)  # a sample is an image
    with fdist.session(args.device) as ctx:
        with fdist.main_first(ctx):
            train_set = build_dataset(args.data, "train", args.data_root, verbose=ctx.is_main)
        task = _task(args, ctx)
        views = ViewConfig(size=args.input_size, scale=(args.crop_min, 1.0), brightness=args.jitter,
                           contrast=args.jitter, saturation=args.jitter, hue=args.hue, gray_p=args.gray_p)
        dataset = RandomViewsDataset(train_set, views, args.seed, n_views=2)
        # everything is checked: only now the run folder is touched
        out = cli.prepare_out_dir(args.out or cli.default_run_dir("teacher", args.data))
        config = cli.save_run_config(out, vars(args) | {"out": str(out)}, IDENTITY, ctx.is_main)
        meta = {"method": args.method, "kind": "ssl_teacher", "dataset": train_set.describe(),
                "views": views.to_dict(), "config": config, "git_sha": config["git_sha"]}
        result = train(task, dataset, range(len(train_set)), cfg, ctx, out, meta, desc=f"{args.method} {args.arch}")
        if ctx.is_main:
            print(f"teacher: {result.model_path} ({result.epochs_done} epochs, {result.train_seconds / 60:.1f} min, "
                  f"{result.images_per_s:.0f} img/s)", flush=True)
    return 0


main, console = cli.entry_points(__name__)
