"""Full linear probe: the standard protocol (MoCo v3 style, SGD, 90 epochs) for GPU runs.

Resumes from its state after every epoch; a state made with other settings is refused (docs/evaluation.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_state, save_state
from ..data.datasets import IndexedDataset
from ..dist import DistContext, barrier
from ..engine import lr_at, wrap_ddp
from ..errors import ConfigError
from ..progress import bar
from .features import FeatureSource, extract_features
from .probe import ProbeResult, accuracy


@dataclass
class FullProbeConfig:
    """Settings of the full protocol (all of them define the run, so they gate resuming)."""

    epochs: int = 90
    batch_size: int = 256  # per process
    lr: float = 0.1  # per 256 images of global batch
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0


def train_transform(source: FeatureSource):
    """RandomResizedCrop(S) + flip + ToTensor + Normalize with the source's statistics."""
    from torchvision import transforms as T

    desc = source.transform_desc
    return T.Compose([
        T.RandomResizedCrop(desc["crop"], interpolation=T.InterpolationMode(desc["interpolation"])),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(desc["mean"], desc["std"]),
    ])


def full_linear_probe(source: FeatureSource, train_ds: IndexedDataset, val_ds: IndexedDataset, num_classes: int,
                      ctx: DistContext, cfg: FullProbeConfig, *, workers: int = 2, state_path: Path | None = None,
                      progress: bool = True) -> ProbeResult | None:
    """Train a linear layer on frozen features of augmented images; val top-1 / top-5 on rank 0."""
    from torch.utils.data import DataLoader, DistributedSampler

    torch.manual_seed(cfg.seed)
    source.to(ctx.device)
    if source.encoder is not None:
        source.encoder.requires_grad_(False)
    layer = nn.Linear(source.feature_dim, num_classes)
    nn.init.normal_(layer.weight, std=0.01)
    nn.init.zeros_(layer.bias)
    model = wrap_ddp(layer.to(ctx.device), ctx)
    base_lr = cfg.lr * cfg.batch_size * ctx.world_size / 256.0
    opt = torch.optim.SGD(layer.parameters(), lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    start_epoch = 0
    settings = {**asdict(cfg), "world_size": ctx.world_size, "model": source.identity, "output": source.output,
                "data": train_ds.fingerprint()}
    if state_path is not None and state_path.exists():
        state = load_state(state_path)
        if state.get("settings") != settings:
            raise ConfigError(f"{state_path} holds a probe run with other settings; use another --out or delete it")
        layer.load_state_dict(state["layer"])
        opt.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])

    train_ds.transform = train_transform(source)
    sampler = DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=ctx.device.type == "cuda", drop_last=False)
    steps_per_epoch = len(loader)
    total = cfg.epochs * steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        pbar = bar(steps_per_epoch, f"probe epoch {epoch + 1}/{cfg.epochs}", "batch", enabled=ctx.is_main and progress)
        for i, (x, y, _) in enumerate(loader):
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * steps_per_epoch + i, total, 0, base_lr)  # cosine, no warm-up
            feats = source.embed(x.to(ctx.device, non_blocking=True))
            loss = F.cross_entropy(model(feats), y.to(ctx.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        pbar.close()
        if state_path is not None and ctx.is_main:
            save_state(state_path, {"epoch": epoch + 1, "layer": layer.state_dict(), "optimizer": opt.state_dict(),
                                    "settings": settings})
        barrier()
    val = extract_features(source, val_ds, ctx, batch_size=cfg.batch_size, workers=workers, dtype="float32",
                           progress=progress)  # rank 0 only, in dataset order
    if val is None:
        return None
    with torch.no_grad():
        logits = layer.eval()(torch.as_tensor(val.features, device=ctx.device)).float().cpu()
    acc = accuracy(logits, torch.as_tensor(val.labels))
    return ProbeResult(acc[1], acc[5], cfg.weight_decay, [], cfg.epochs, logits.argmax(1).numpy())


def default_state_path(out_dir: Path, output: str) -> Path:
    return out_dir / ("linear_probe_full" + ("_head" if output == "head" else "") + ".state.safetensors")
