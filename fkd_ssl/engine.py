"""The one training loop: every teacher, student and baseline is a :class:`Task` trained by :func:`train`;
a rerun continues as an uninterrupted run would."""

from __future__ import annotations

import json
import math
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
from .data.sampler import EpochBatchSampler, spread_views
from .dist import DistContext
from .errors import CheckpointError, ConfigError
from .fileio import write_text_atomic
from .models import Encoder
from .progress import bar
from .views import normalize

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
    spread: int = 0  # > 1: spread each image's K views over this many steps (data.sampler.spread_views)


class Task(nn.Module):
    """What :func:`train` trains: ``forward(batch, progress) -> (loss, metrics)``, :meth:`export`,
    extra state outside ``state_dict`` and :meth:`count`.  Batches are NamedTuples with ``views``."""

    channels_last = False

    def forward(self, batch, progress: float = 0.0) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def export(self) -> Encoder:
        raise NotImplementedError

    def prep(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> the exported encoder's normalised float input."""
        spec = self.export().spec
        return normalize(u8, spec.mean, spec.std, self.channels_last)

    def count(self, batch) -> tuple[int, int]:
        """(images, views) in ``batch``."""
        b, v = batch.views.shape[:2]
        return b, b * v

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


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


def _to_device(batch, device: torch.device):
    """A batch NamedTuple with its tensors on ``device``."""
    return type(batch)(*(o.to(device, non_blocking=True) if isinstance(o, torch.Tensor) else o for o in batch))


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


@dataclass
class Position:
    """Where training stands; saved in the resume state."""

    epoch: int = 0
    batch: int = 0  # batches done in ``epoch``
    step: int = 0
    elapsed: float = 0.0  # training seconds (evaluation excluded)


class Stepper:
    """Optimiser, gradient scaler and autocast: one optimisation step of a task."""

    def __init__(self, task: nn.Module, cfg: TrainConfig, device: torch.device, peak_lr: float):
        cuda = device.type == "cuda"
        self.device_type, self.amp = device.type, cuda and cfg.amp
        self.opt = build_optimizer(task, cfg.optim, peak_lr)
        self.amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)

    def __call__(self, net: nn.Module, batch, lr: float, progress: float, step: int) -> tuple[torch.Tensor, dict]:
        for g in self.opt.param_groups:
            g["lr"] = lr
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp):
            loss, metrics = net(batch, progress)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss, metrics

    def state(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict()}

    def load(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


class RunFiles:
    """The run's files in ``out``: the resume state (load / save) and the exported model."""

    def __init__(self, out: Path, task: Task, stepper: Stepper, meta: dict, ctx: DistContext):
        self.task, self.stepper, self.meta, self.ctx = task, stepper, meta, ctx
        self.state_path, self.model_path = out / "state.safetensors", out / "model.safetensors"

    def load(self) -> Position:
        """The position to start from; the task, optimiser and RNGs are restored if a state exists."""
        if not self.state_path.exists():
            return Position()
        try:
            st = load_state(self.state_path)
            self.task.load_state_dict(st["model"])
            self.stepper.load(st)
            self.task.load_extra_state(st["extra"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{self.state_path} does not fit this run ({str(e)[:200]}); use another --out") from e
        _set_rng_state(st["rng"])
        pos = Position(st["epoch"], st["batch"], st["step"], st["elapsed"])
        if self.ctx.is_main:
            print(f"resuming from {self.state_path}: epoch {pos.epoch}, batch {pos.batch}, step {pos.step}", flush=True)
        return pos

    def save(self, pos: Position) -> None:
        if self.ctx.is_main:
            save_state(self.state_path, {"model": self.task.state_dict(), **self.stepper.state(),
                                         "extra": self.task.extra_state(), "rng": _rng_state(), **asdict(pos),
                                         "meta": json.dumps(self.meta, default=str)})
        fdist.barrier()

    def export(self, pos: Position) -> None:
        if self.ctx.is_main:
            save_model(self.model_path, self.task.export(), {**self.meta, "epochs": pos.epoch, "steps": pos.step,
                                                             "train_seconds": round(pos.elapsed, 2)})


class MetricsLog:
    """Running means since the last row and images / views per second (every rank); the rows go
    to ``metrics.jsonl`` + tensorboard on rank 0.  On resume, rows past the resumed step are dropped."""

    def __init__(self, out: Path, enabled: bool, resume_step: int, world_size: int = 1):
        self.enabled, self.world_size = enabled, world_size
        self.path = out / "metrics.jsonl"
        self.tb = None
        self.window: dict[str, float] = {}
        self.n = self.images = self.views = 0
        if not enabled:
            return
        if self.path.exists():
            rows = [r for r in self.path.read_text().splitlines() if r.strip()]
            keep = [r for r in rows if json.loads(r).get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(r + "\n" for r in keep), fsync=False)  # a log: no fsync
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is a dependency, but logging must never stop training
            self.tb = None

    def add(self, loss: float, metrics: dict, images: int, views: int) -> None:
        """One step of this rank: its loss, metrics and batch size (all ranks count alike)."""
        self.images += images * self.world_size
        self.views += views * self.world_size
        for k, v in {"loss": loss, **metrics}.items():
            self.window[k] = self.window.get(k, 0.0) + float(v)
        self.n += 1

    def rates(self, elapsed: float) -> tuple[float, float]:
        return self.images / max(elapsed, 1e-9), self.views / max(elapsed, 1e-9)

    def flush(self, step: int, lr: float, epoch: int, elapsed: float) -> dict:
        """Write the means since the last row (with ``lr``, ``epoch`` and the rates); return the row."""
        img_s, view_s = self.rates(elapsed)
        row = {k: v / self.n for k, v in self.window.items()}
        row.update(lr=lr, epoch=epoch, images_per_s=img_s, views_per_s=view_s, elapsed=elapsed)
        self.window, self.n = {}, 0
        self.log(step, row)
        return row

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


class StopPolicy:
    """When to save a state or stop besides the epoch end: ``--max-minutes`` of training and a
    periodic checkpoint every ``ckpt_minutes``.  Under DDP with a time limit set, rank 0's clock
    decides for every rank (one broadcast per step)."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.last_save = time.time()

    def decide(self, elapsed: float, epoch_end: bool) -> tuple[bool, bool]:
        """(stop, save a state now) after a step."""
        cfg = self.cfg
        stop = cfg.max_minutes > 0 and elapsed >= cfg.max_minutes * 60
        save = not epoch_end and cfg.ckpt_minutes > 0 and time.time() - self.last_save > cfg.ckpt_minutes * 60
        if self.ctx.distributed and (cfg.max_minutes > 0 or cfg.ckpt_minutes > 0):
            stop, save = fdist.agree(stop, save, device=self.ctx.device)
        return stop, save

    def saved(self) -> None:
        self.last_save = time.time()


@dataclass
class TrainResult:
    model_path: Path
    epochs_done: int
    steps: int
    train_seconds: float
    images_per_s: float
    views_per_s: float
    finished: bool


def build_loader(dataset: Dataset, sampler: EpochBatchSampler, cfg: TrainConfig, cuda: bool) -> DataLoader:
    # the loader draws its workers' base seed from its own generator, never from the global RNG, which
    # belongs to the task (e.g. mixup) and is restored on resume: a resumed run then draws as an uninterrupted one
    # a spread group takes cfg.spread batches at once: the workers keep that many in flight, or they would idle
    prefetch = max(4, -(-cfg.spread // cfg.workers)) if cfg.workers > 0 else None
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=cuda,
                      persistent_workers=cfg.workers > 0, prefetch_factor=prefetch,
                      generator=torch.Generator().manual_seed(cfg.seed))


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """``module`` (a task, the full probe's layer) in DistributedDataParallel under torchrun, else itself."""
    if not ctx.distributed:
        return module
    import inspect

    ddp = nn.parallel.DistributedDataParallel
    # buffers (BN statistics, the MoCo queue) are synced once at start, not at every forward
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else {"broadcast_buffers": False})
    return ddp(module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, **sync)


def train(task: Task, dataset: Dataset, indices, cfg: TrainConfig, ctx: DistContext, out: Path,
          meta: dict, on_epoch_end: Callable[[int, nn.Module], dict] | None = None, desc: str = "train") -> TrainResult:
    """Train ``task`` on ``dataset`` keys ``(i, epoch)``; resume from ``out``.  ``meta`` goes into every
    exported model; ``on_epoch_end(epoch, task)`` may return extra metrics (rank 0 only)."""
    device = ctx.device
    torch.manual_seed(cfg.seed)
    task.to(device)
    if device.type == "cuda" and cfg.channels_last:
        task.to(memory_format=torch.channels_last)
    peak_lr = cfg.optim.lr * (cfg.batch_size * ctx.world_size) / 256  # lr is for a global batch of 256
    stepper = Stepper(task, cfg, device, peak_lr)
    files = RunFiles(out, task, stepper, meta, ctx)
    pos = files.load()
    sampler = EpochBatchSampler(indices, cfg.batch_size, cfg.epochs, cfg.seed, ctx.rank, ctx.world_size,
                                start_epoch=pos.epoch, start_batch=pos.batch)
    per_epoch = sampler.steps_per_epoch
    total_steps, warmup = per_epoch * cfg.epochs, int(round(cfg.optim.warmup_epochs * per_epoch))
    if pos.epoch >= cfg.epochs:
        if ctx.is_main:
            print(f"{out}: already trained for {cfg.epochs} epochs; model at {files.model_path}", flush=True)
        if not files.model_path.exists():
            files.export(pos)
        return TrainResult(files.model_path, pos.epoch, pos.step, pos.elapsed, 0.0, 0.0, True)

    net = wrap_ddp(task, ctx)
    loader = build_loader(dataset, sampler, cfg, device.type == "cuda")
    group = max(cfg.spread, 1)  # states are saved, and runs stop, only at the boundaries of spread groups
    if group > 1:
        loader = spread_views(loader, group, per_epoch, pos.batch, cfg.seed)
    log, policy = MetricsLog(out, ctx.is_main, pos.step, ctx.world_size), StopPolicy(cfg, ctx)
    pbar = bar(len(sampler), desc, "step", enabled=ctx.is_main)
    task.train()
    t_last, finished = time.time(), True
    for batch in loader:
        batch = _to_device(batch, device)
        lr = lr_at(pos.step, total_steps, warmup, peak_lr, cfg.optim.final_lr_ratio)
        loss, metrics = stepper(net, batch, lr, pos.step / total_steps, pos.step)
        log.add(float(loss.detach()), metrics, *task.count(batch))
        pos.step, pos.batch = pos.step + 1, pos.batch + 1
        now = time.time()
        pos.elapsed, t_last = pos.elapsed + now - t_last, now
        pbar.update(1)
        epoch_end = pos.batch == per_epoch
        if pos.step % cfg.log_every == 0 or epoch_end:
            row = log.flush(pos.step, lr, pos.epoch, pos.elapsed)
            pbar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}",
                             views_s=f"{row['views_per_s']:.0f}", refresh=False)
        stop, save = policy.decide(pos.elapsed, epoch_end)
        if pos.batch % group and not epoch_end:
            stop = save = False
        if epoch_end:
            pos.epoch, pos.batch = pos.epoch + 1, 0
            files.save(pos)
            files.export(pos)
            if on_epoch_end is not None and ctx.is_main:
                _epoch_hook(on_epoch_end, task, pos, log, pbar)
            t_last = time.time()  # evaluation time is not training time
        elif save:
            files.save(pos)
            policy.saved()
        if stop:
            if log.n:  # the rows since the last log, so a time-limited run still reports its speed
                log.flush(pos.step, lr, pos.epoch, pos.elapsed)
            finished = pos.epoch >= cfg.epochs
            files.save(pos)
            files.export(pos)
            break
    pbar.close()
    log.close()
    return TrainResult(files.model_path, pos.epoch, pos.step, pos.elapsed, *log.rates(pos.elapsed),
                       finished and pos.epoch >= cfg.epochs)


def _epoch_hook(on_epoch_end: Callable[[int, nn.Module], dict], task: Task, pos: Position, log: MetricsLog,
                pbar) -> None:
    extra = on_epoch_end(pos.epoch, task)
    if extra:
        log.log(pos.step, {"epoch": pos.epoch, **extra})
        pbar.write(f"epoch {pos.epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in extra.items()))
    task.train()
