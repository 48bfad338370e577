"""The shared command-line vocabulary, run config and error handling of every command.

Flags and units are described in the README; :func:`run_main` turns user errors
(:class:`~fkd_ssl.errors.FKDError`) into a one-line ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import re
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .data.datasets import DEFAULT_DATA_ROOT
from .errors import ConfigError, FKDError, prepare_out_dir
from .fileio import write_text_atomic

COMMON = ("data", "data_root", "out", "epochs", "batch_size", "workers", "device", "seed", "arch")


def bounded(kind: type, minimum: float, strict: bool, flag: str, maximum: float | None = None):
    """argparse type: a ``kind`` number ``> minimum`` (``strict``) or ``>= minimum``, and ``<= maximum``."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects {kind.__name__}, got {text!r}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{flag} must be a finite number, got {text}")
        if v <= minimum if strict else v < minimum:
            raise argparse.ArgumentTypeError(f"{flag} must be {'>' if strict else '>='} {minimum}, got {text}")
        if maximum is not None and v > maximum:
            raise argparse.ArgumentTypeError(f"{flag} must be <= {maximum}, got {text}")
        return v
    return parse


#: argparse types named by their flag (the flag is in every message): ``positive_int("--epochs")``
positive_int, nonneg_int = partial(bounded, int, 1, False), partial(bounded, int, 0, False)
positive_float, nonneg_float = partial(bounded, float, 0, True), partial(bounded, float, 0.0, False)
fraction = partial(bounded, float, 0, True, maximum=1)  # 0 < v <= 1


def number_list(kind: type, flag: str, allow_empty: bool = False):
    """argparse type: ``10,20,100`` -> a list (``none`` -> [] when allowed): integers >= 1 (sorted, distinct)
    or finite numbers >= 0 (in order)."""
    what, lo = ("integers", 1) if kind is int else ("numbers", 0)

    def parse(text: str) -> list:
        if allow_empty and text.strip().lower() in ("", "none"):
            return []
        try:
            values = [kind(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects comma-separated {what}, got {text!r}") from None
        if not values or not all(math.isfinite(v) and v >= lo for v in values):
            raise argparse.ArgumentTypeError(f"{flag} expects {what} >= {lo}, got {text!r}")
        return sorted(set(values)) if kind is int else values
    return parse


def add_common_args(p: argparse.ArgumentParser, which: Iterable[str] = COMMON, **defaults) -> argparse.ArgumentParser:
    """Add the shared flags named in ``which``; ``defaults`` overrides their default values."""
    spec = {
        "data": (("--data",), dict(default="synthetic", help="dataset spec: synthetic[:k=v,..], mnist5k[:k=v,..], groceries[:fine=1], imagefolder:PATH, cifar10:ROOT, cifar100:ROOT, stl10:ROOT")),
        "data_root": (("--data-root",), dict(default=DEFAULT_DATA_ROOT, help="where generated data and caches live")),
        "out": (("--out",), dict(default=None, help="output folder (rerunning the same command resumes it)")),
        "epochs": (("--epochs",), dict(type=positive_int("--epochs"), default=10,
                                        help="training length; one epoch = as many samples as --data has images")),
        "batch_size": (("--batch-size",), dict(type=positive_int("--batch-size"), default=256,
                                               help="samples per step, per process")),
        "workers": (("--workers",), dict(type=nonneg_int("--workers"), default=2, help="DataLoader worker processes")),
        "device": (("--device",), dict(default="auto", choices=("auto", "cpu", "cuda"))),
        "seed": (("--seed",), dict(type=nonneg_int("--seed"), default=0)),
        "arch": (("--arch",), dict(default="resnet18", help="timm model name, or tv:<name> for torchvision")),
    }
    for name in which:
        flags, kw = spec[name]
        if name in defaults:
            kw = {**kw, "default": defaults[name]}
        p.add_argument(*flags, **kw)
    return p


def add_optim_args(p: argparse.ArgumentParser, lr: float, weight_decay: float, warmup_epochs: float,
                   optimizer: str = "sgd") -> None:
    """The optimizer, schedule and time-limit flags of the training commands."""
    p.add_argument("--optimizer", choices=("sgd", "lars", "adamw"), default=optimizer)
    p.add_argument("--lr", type=positive_float("--lr"), default=lr,
                   help="peak learning rate for a global batch of 256 samples (scaled linearly)")
    p.add_argument("--weight-decay", type=nonneg_float("--weight-decay"), default=weight_decay)
    p.add_argument("--warmup-epochs", type=nonneg_float("--warmup-epochs"), default=warmup_epochs,
                   help="linear warm-up, in epochs")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--max-minutes", type=nonneg_float("--max-minutes"), default=0.0,
                   help="stop after this much training time (0: no limit)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def parser(description: str) -> argparse.ArgumentParser:
    return _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def _message(e: BaseException) -> str:
    """A user error's message as one line.  A DataLoader worker re-raises the error with the
    worker's traceback in its message: only the original message is kept."""
    text = str(e)
    if "\nOriginal Traceback" in text:
        lines = text.splitlines()
        head = f"{type(e).__module__}.{type(e).__qualname__}: "
        starts = [i for i, ln in enumerate(lines) if ln.startswith(head)]
        if starts:
            text = "\n".join([lines[starts[-1]][len(head):], *lines[starts[-1] + 1:]])
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())


def _close_progress_bars() -> None:
    """End the progress bars an error interrupted, so the error line starts a line of its own."""
    try:
        from tqdm import tqdm

        for b in list(getattr(tqdm, "_instances", ())):
            b.close()
    except Exception:  # cosmetic only
        pass


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a script's ``main``; user errors print one line and exit 2 (no traceback)."""
    try:
        code = main(argv)
    except FKDError as e:
        _close_progress_bars()
        print(f"error: {_message(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a full or read-only disk where no writer named its file: still one line
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            raise
        _close_progress_bars()
        print(f"error: {e.strerror}" + (f": {e.filename}" if e.filename else " (writing the outputs of this run)"),
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def entry_points(module: str) -> tuple[Callable[[Sequence[str] | None], int], Callable[[], None]]:
    """A command module's ``main(argv=None)`` (parse, the module's ``check(parser, args)`` if it has one, ``run``)
    and ``console()`` (``main`` behind :func:`run_main`); both look the module's functions up when called."""
    def main(argv: Sequence[str] | None = None) -> int:
        mod = sys.modules[module]
        p = mod.build_parser()
        args = p.parse_args(argv)
        if hasattr(mod, "check"):
            mod.check(p, args)
        return mod.run(args)
    return main, lambda: run_main(main)


def git_sha() -> str:
    """The project's git commit (``+dirty`` if modified), or ``unknown`` outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip()[:12] + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def default_run_dir(kind: str, data: str, *parts: str) -> Path:
    """``runs/<kind>-<data>[-<parts>]``: where a script writes unless ``--out`` says otherwise."""
    slug = "-".join(re.sub(r"[^A-Za-z0-9_.=-]+", "_", t).strip("_") for t in (data, *parts))
    return Path("runs") / f"{kind}-{slug}"


def print_config(config: dict) -> None:
    """The ``config: {...}`` line a command prints before its work (with the git SHA unless ``config`` has one)."""
    config = config if "git_sha" in config else {**config, "git_sha": git_sha()}
    print("config: " + json.dumps(config, sort_keys=True, default=str), flush=True)


def save_run_config(out: Path, config: dict, identity_keys: Iterable[str], is_main: bool = True) -> dict:
    """Print the resolved config and write ``config.json``; refuse a run folder made with other
    ``identity_keys`` values (the settings that define the run)."""
    config = {**config, "git_sha": git_sha(), "command": " ".join(sys.argv)}
    path = out / "config.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is corrupt; remove it or use another --out") from e
        diff = [k for k in identity_keys if old.get(k) != config.get(k)]
        if diff:
            pairs = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
            raise ConfigError(f"--out {out} holds a run with other settings ({pairs}); use another --out")
    if is_main:
        print_config(config)
        write_text_atomic(path, json.dumps(config, indent=1, sort_keys=True, default=str), fsync=False)  # reruns rewrite it
    return config
