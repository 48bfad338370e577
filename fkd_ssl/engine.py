"""The one training loop: every teacher, student and baseline trains through :func:`train`.

A *task* is an ``nn.Module`` whose ``forward(batch, progress)`` returns ``(loss, metrics)``
(``progress`` in [0, 1] is the fraction of training done), with ``export()`` giving the
:class:`~fkd_ssl.models.Encoder` to save and ``extra_state()`` / ``load_extra_state()`` for
state outside ``state_dict`` (e.g. a MoCo queue).  The loop supplies: DDP via torchrun (gloo
on CPU, NCCL on CUDA), deterministic rank-aware sampling, SGD / LARS / AdamW with linear
warm-up and cosine decay, AMP + channels_last on CUDA, tqdm with images/s and views/s,
JSON-lines + tensorboard metrics, a state checkpoint every epoch (and every
``ckpt_minutes``), and resume: rerunning the same command continues from the last state and
gives the same result as an uninterrupted run.

Files in ``out``: ``state.safetensors`` (resume state), ``model.safetensors`` + ``model.json``
(the exported encoder, rewritten every epoch), ``metrics.jsonl``, ``tb/``.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import dist as fdist
from .checkpoint import load_state, save_model, save_state
from .data.sampler import EpochBatchSampler
from .dist import DistContext
from .errors import CheckpointError, ConfigError
from .progress import bar

OPTIMIZERS = ("sgd", "lars", "adamw")


@dataclass
class OptimConfig:
    """Optimiser and schedule. ``lr`` is for a global batch of 256 and scales linearly."""

    optimizer: str = "sgd"
    lr: float = 0.06
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    final_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer {self.optimizer!r}: one of {', '.join(OPTIMIZERS)}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ConfigError("--weight-decay and --warmup-epochs must be >= 0")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256  # per process
    workers: int = 2
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    amp: bool = True  # CUDA only
    channels_last: bool = True  # CUDA only
    log_every: int = 20
    ckpt_minutes: float = 10.0
    max_minutes: float = 0.0  # stop (and export) after this much training time; 0 = no limit


def build_optimizer(module: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """No weight decay on biases and normalisation parameters (ndim <= 1)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    from lightly.utils.lars import LARS

    return LARS(groups, lr=lr, momentum=cfg.momentum)


def lr_at(step: int, total: int, warmup: int, peak: float, final_ratio: float = 0.0) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``peak*final_ratio``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [np_state[0], np_state[1], *np_state[2:]],
            "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state((s["numpy"][0], np.asarray(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class MetricsLog:
    """``metrics.jsonl`` + tensorboard on rank 0; on resume, rows past the resumed step are dropped."""

    def __init__(self, out: Path, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            rows = [r for r in self.path.read_text().splitlines() if r.strip()]
            keep = [r for r in rows if json.loads(r).get("step", 0) <= resume_step]
            self.path.write_text("".join(r + "\n" for r in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is a dependency, but logging must never stop training
            self.tb = None

    def log(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **row}) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@dataclass
class TrainResult:
    model_path: Path
    epochs_done: int
    steps: int
    train_seconds: float
    images_per_s: float
    views_per_s: float
    finished: bool


def _count(batch) -> tuple[int, int]:
    """(images, views) in a batch whose first element is (B, 3, S, S) or (B, V, 3, S, S)."""
    x = batch[0]
    if x.ndim == 5:
        return x.shape[0], x.shape[0] * x.shape[1]
    return x.shape[0], x.shape[0]


def train(task: nn.Module, dataset: Dataset, indices, cfg: TrainConfig, ctx: DistContext, out: Path,
          meta: dict, on_epoch_end: Callable[[int, nn.Module], dict] | None = None,
          collate_fn=None, desc: str = "train") -> TrainResult:
    """Train ``task`` on ``dataset`` keys ``(i, epoch)`` for ``i`` in ``indices``; resume from ``out``.

    ``meta`` goes into every exported model (method, config, dataset fingerprint, ...).
    ``on_epoch_end(epoch, task)`` may return extra metrics (e.g. a kNN monitor) — rank 0 only.
    """
    device = ctx.device
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    task.to(device)
    if cuda and cfg.channels_last:
        task.to(memory_format=torch.channels_last)
    world_batch = cfg.batch_size * ctx.world_size
    peak_lr = cfg.optim.lr * world_batch / 256
    opt = build_optimizer(task, cfg.optim, peak_lr)
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and cfg.amp and amp_dtype == torch.float16)

    state_path = out / "state.safetensors"
    epoch, batch_in_epoch, step, elapsed = 0, 0, 0, 0.0
    if state_path.exists():
        try:
            st = load_state(state_path)
            task.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            scaler.load_state_dict(st["scaler"])
            task.load_extra_state(st["extra"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{state_path} does not fit this run ({str(e)[:200]}); use another --out") from e
        _set_rng_state(st["rng"])
        epoch, batch_in_epoch, step, elapsed = st["epoch"], st["batch"], st["step"], st["elapsed"]
        if ctx.is_main:
            print(f"resuming from {state_path}: epoch {epoch}, batch {batch_in_epoch}, step {step}", flush=True)

    sampler = EpochBatchSampler(indices, cfg.batch_size, cfg.epochs, cfg.seed, ctx.rank, ctx.world_size,
                                start_epoch=epoch, start_batch=batch_in_epoch)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    model_path = out / "model.safetensors"

    def export(epochs_done: int) -> None:
        if ctx.is_main:
            save_model(model_path, task.export(), {**meta, "epochs": epochs_done, "steps": step,
                                                   "train_seconds": round(elapsed, 2)})

    def checkpoint() -> None:
        if ctx.is_main:
            save_state(state_path, {"model": task.state_dict(), "optimizer": opt.state_dict(),
                                    "scaler": scaler.state_dict(), "extra": task.extra_state(), "rng": _rng_state(),
                                    "epoch": epoch, "batch": batch_in_epoch, "step": step, "elapsed": elapsed,
                                    "meta": json.dumps(meta, default=str)})
        fdist.barrier()

    if epoch >= cfg.epochs:
        if ctx.is_main:
            print(f"{out}: already trained for {cfg.epochs} epochs; model at {model_path}", flush=True)
        if not model_path.exists():
            export(epoch)
        return TrainResult(model_path, epoch, step, elapsed, 0.0, 0.0, True)

    net: nn.Module = task
    if ctx.distributed:
        import inspect

        ddp = nn.parallel.DistributedDataParallel
        # buffers (BN statistics, the MoCo queue) are synced once at start, not at every forward
        sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                else {"broadcast_buffers": False})
        net = ddp(task, device_ids=[device.index] if cuda else None, **sync)
    # the loader draws its workers' base seed from its own generator, never from the global RNG, which
    # belongs to the task (e.g. mixup) and is restored on resume: a resumed run then draws as an uninterrupted one
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=cuda,
                        persistent_workers=cfg.workers > 0, collate_fn=collate_fn,
                        prefetch_factor=4 if cfg.workers > 0 else None,
                        generator=torch.Generator().manual_seed(cfg.seed))
    log = MetricsLog(out, ctx.is_main, step)
    pbar = bar(len(sampler), desc, "step", enabled=ctx.is_main)
    task.train()
    n_img = n_view = 0
    t_last = time.time()
    last_ckpt = time.time()
    window: dict[str, float] = {}
    finished = True
    for batch in loader:
        batch = _to_device(batch, device)
        lr = lr_at(step, total_steps, warmup, peak_lr, cfg.optim.final_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=amp_dtype, enabled=cuda and cfg.amp):
            loss, metrics = net(batch, step / total_steps)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        imgs, views = _count(batch)
        n_img += imgs * ctx.world_size
        n_view += views * ctx.world_size
        step += 1
        batch_in_epoch += 1
        for k, v in {"loss": float(loss.detach()), **metrics}.items():
            window[k] = window.get(k, 0.0) + float(v)
        window["_n"] = window.get("_n", 0) + 1
        now = time.time()
        elapsed += now - t_last
        t_last = now
        pbar.update(1)
        if step % cfg.log_every == 0 or batch_in_epoch == steps_per_epoch:
            n = window.pop("_n")
            row = {k: v / n for k, v in window.items()}
            row.update(lr=lr, epoch=epoch, images_per_s=n_img / max(elapsed, 1e-9), views_per_s=n_view / max(elapsed, 1e-9))
            pbar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{n_img / max(elapsed, 1e-9):.0f}",
                             views_s=f"{n_view / max(elapsed, 1e-9):.0f}", refresh=False)
            log.log(step, {**row, "elapsed": elapsed})
            window = {}
        epoch_end = batch_in_epoch == steps_per_epoch
        stop = cfg.max_minutes > 0 and elapsed >= cfg.max_minutes * 60
        save = not epoch_end and cfg.ckpt_minutes > 0 and time.time() - last_ckpt > cfg.ckpt_minutes * 60
        if ctx.distributed and (cfg.max_minutes > 0 or cfg.ckpt_minutes > 0):
            stop, save = fdist.agree(stop, save, device=device)  # rank 0's clock decides for every rank
        if epoch_end:
            epoch += 1
            batch_in_epoch = 0
            checkpoint()
            export(epoch)
            if on_epoch_end is not None and ctx.is_main:
                extra = on_epoch_end(epoch, task)
                if extra:
                    log.log(step, {"epoch": epoch, **extra})
                    pbar.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in extra.items()))
                task.train()
            t_last = time.time()  # evaluation time is not training time
        elif save:
            checkpoint()
            last_ckpt = time.time()
        if stop:
            if window:  # the rows since the last log, so a time-limited run still reports its speed
                n = window.pop("_n")
                log.log(step, {**{k: v / n for k, v in window.items()}, "lr": lr, "epoch": epoch,
                               "images_per_s": n_img / max(elapsed, 1e-9), "views_per_s": n_view / max(elapsed, 1e-9),
                               "elapsed": elapsed})
                window = {}
            finished = epoch >= cfg.epochs
            checkpoint()
            export(epoch)
            break
    pbar.close()
    log.close()
    return TrainResult(model_path, epoch, step, elapsed, n_img / max(elapsed, 1e-9), n_view / max(elapsed, 1e-9),
                       finished and epoch >= cfg.epochs)
