"""The project's checkpoint format (safetensors + embedded JSON metadata), and pickle-free training state.

Training state is one ``.safetensors`` file of a nested dict's tensors, with the structure as JSON in
its header, written atomically.  Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import pretrained
from .errors import CheckpointError
from .fileio import atomic_path, file_sha256, write_text_atomic
from .models import (NAMED_TEACHERS, Encoder, ModelSpec, create_backbone, load_named_teacher, map_by_order,
                     named_teacher_file)

FORMAT = "fkd_ssl.model"
STATE_FORMAT = "fkd_ssl.state"
VERSION = 1
_META_KEY = "fkd_ssl"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={_META_KEY: json.dumps(meta)})


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors and embedded metadata of a safetensors file; CheckpointError if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} does not exist") from e
    except Exception as e:  # safetensors raises its own error types for truncated / garbage files
        raise CheckpointError(f"checkpoint {path} is truncated or not a safetensors file ({e})") from e
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path} has corrupt metadata") from e
    return tensors, meta


def save_model(path: str | os.PathLike, model: Encoder, meta: dict | None = None) -> Path:
    """Write ``model`` to ``path`` (``.safetensors`` added if missing) + a ``.json`` sidecar."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    full = {"format": FORMAT, "version": VERSION, "model": model.spec.to_dict(), **(meta or {})}
    _atomic_save(model.state_dict(), path, full)
    write_text_atomic(path.with_suffix(".json"), json.dumps(full, indent=1, default=str))
    return path


def file_digest(path: str | os.PathLike) -> str:
    """sha256 (first 16 hex digits) of a file: the identity caches and stores record."""
    return file_sha256(Path(path))[:16]


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 (16 hex) of a module's state dict (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_identity(ref: str, weights: str | None = None) -> str:
    """A stable identity for a model reference: a file digest, or the teacher's name and its file's digest."""
    if ref in NAMED_TEACHERS:
        return f"{ref}:{file_digest(named_teacher_file(ref))}"
    if pretrained.is_pretrained_ref(ref):
        p = pretrained.resolve(ref, weights)
        return f"{p.extra['pretrained']}:{file_digest(p.file)}"
    return file_digest(resolve_path(ref))


def resolve_path(ref: str | os.PathLike) -> Path:
    """Accept ``X``, ``X.safetensors`` or ``X.json`` and return the weight file."""
    p = Path(ref)
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
        if not p.exists() and Path(ref).exists():
            raise CheckpointError(f"checkpoint {ref} is a JSON file without its weights {p}: pass a model "
                                  f".safetensors file")
    if not p.exists() and p.with_name(p.name + ".safetensors").exists():
        p = p.with_name(p.name + ".safetensors")
    if p.is_dir() and (p / "model.safetensors").exists():
        p = p / "model.safetensors"
    if not p.exists():
        raise CheckpointError(f"checkpoint {ref} does not exist")
    if p.is_dir():
        raise CheckpointError(f"checkpoint {ref} is a folder without a model.safetensors, not a checkpoint")
    return p


def _plain_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return _read(path)[0]
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read as a plain state dict ({e})") from e
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_plain(path: Path, arch: str, prefix: str | None = None, **spec_kw) -> tuple[Encoder, dict]:
    """A plain timm / torchvision state dict as an :class:`Encoder` of ``arch`` (``spec_kw``: preprocessing), or
    an SSL library's checkpoint: the backbone under ``prefix`` (see :func:`pretrained.split_checkpoint`)."""
    tv = arch.startswith("tv:")
    with torch.device("meta"):  # the names the architecture expects, without building it for real
        bare = create_backbone(arch)
    split = pretrained.split_checkpoint(_plain_state_dict(path), prefix, set((bare.net if tv else bare).state_dict()))
    num_classes = 0
    for k in ("fc.weight", "classifier.weight", "head.fc.weight", "head.weight", "heads.head.weight"):
        if k in split.backbone and split.backbone[k].ndim == 2:
            num_classes = split.backbone[k].shape[0]
    spec = ModelSpec(**{"arch": arch, "num_classes": num_classes, "extra": {"source": str(path)},
                        **pretrained.head_spec(split), **spec_kw})
    model = Encoder(spec)
    _load_backbone(model, split, path)
    if model.projector is not None:
        _load_head(model, split)
    meta = {"format": FORMAT, "method": "pretrained", "model": spec.to_dict(), "source": str(path)}
    return model, {**meta, "loaded": split.report()} if split.prefix else meta


def _load_backbone(model: Encoder, split: "pretrained.Split", path: Path) -> None:
    arch, sd = model.spec.arch, split.backbone
    tv = arch.startswith("tv:")
    holder = model.backbone.net if tv else model.backbone
    missing = set(holder.state_dict()) - set(sd)
    if missing and split.prefix:  # the SSL library's own module names (e.g. a Sequential of the children): by order
        sd = map_by_order(sd, holder.state_dict(), f"checkpoint {path} under {split.prefix} for --arch {arch}")
    elif missing:
        raise CheckpointError(f"checkpoint {path} does not fit --arch {arch}: missing {sorted(missing)[:3]}...")
    if tv:
        # the final linear layer was moved out of the net into backbone.fc
        head = model.backbone._head_name
        sd = dict(sd)
        fc = {k[len(head) + 1:]: sd.pop(k) for k in list(sd) if k.startswith(head + ".")}
        if model.spec.num_classes:
            model.backbone.fc.load_state_dict(fc)
    try:
        holder.load_state_dict(sd, strict=not tv)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit --arch {arch}: {str(e)[:300]}") from e


def _load_head(model: Encoder, split: "pretrained.Split") -> None:
    """The checkpoint's projection head, matched in module order; one of another form is dropped and reported."""
    order = pretrained.module_order
    try:
        model.projector.load_state_dict(map_by_order(order(split.head), order(model.projector.state_dict()), "head"))
    except CheckpointError:  # e.g. batch norm in DINO's MLP: features only
        model.projector, model.spec.head = None, "none"
        split.ignored += [split.head_prefix + k for k in split.head]
        split.head = {}


def _load_pretrained(ref: str, weights: str | None) -> tuple[Encoder, dict]:
    """``timm:`` / ``tv:`` names from a local file, with the library's preprocessing."""
    p = pretrained.resolve(ref, weights)
    kw = dict(num_classes=p.num_classes, input_size=p.input_size, mean=p.mean, std=p.std,
              interpolation=p.interpolation, extra={**p.extra, "source": str(p.file)})
    if p.arch.startswith("tv:"):
        return _load_plain(p.file, p.arch, **kw)
    spec = ModelSpec(arch=p.arch, **kw)
    try:
        model = Encoder(spec, weights=str(p.file))
    except Exception as e:  # timm and safetensors raise their own types for a file that does not fit
        raise CheckpointError(f"weights {p.file} do not fit {ref}: {str(e)[:300]}") from e
    return model, {"format": FORMAT, "method": "pretrained", "model": spec.to_dict(), "source": str(p.file)}


def load_model(ref: str | os.PathLike, arch: str | None = None, device: str | torch.device = "cpu",
               expect: str | None = None, weights: str | None = None, prefix: str | None = None) -> tuple[Encoder, dict]:
    """Rebuild a model and its metadata from a project checkpoint, a named teacher, a ``timm:`` / ``tv:``
    pretrained name (``weights``: its file), or a plain timm / torchvision state dict with ``arch`` (an SSL
    library's checkpoint: the backbone under ``prefix``, auto-detected); ``expect`` ("classifier" / "projector") checks a part.
    """
    ref = str(ref)
    if ref in NAMED_TEACHERS:
        model, meta = load_named_teacher(ref), {"format": FORMAT, "method": "pretrained", "name": ref}
        meta["model"] = model.spec.to_dict()
    elif pretrained.is_pretrained_ref(ref):
        model, meta = _load_pretrained(ref, weights)
    else:
        path = resolve_path(ref)
        tensors, meta = _read(path) if path.suffix == ".safetensors" else ({}, None)
        if meta is not None and meta.get("format") == STATE_FORMAT:
            raise CheckpointError(f"checkpoint {path} is a training state, not a model: pass the exported model "
                                  f"(model.safetensors in the run folder)")
        if meta is not None and meta.get("format") == FORMAT:
            if meta.get("version", 0) > VERSION:
                raise CheckpointError(f"checkpoint {path} has format version {meta['version']} (this fkd_ssl reads {VERSION})")
            spec = ModelSpec.from_dict(meta["model"])
            model = Encoder(spec)
            try:
                model.load_state_dict(tensors, strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"checkpoint {path} does not match its own model spec: {str(e)[:300]}") from e
        elif arch is None:
            if path.suffix == ".safetensors":
                raise CheckpointError(f"checkpoint {path} is a plain state dict: say which architecture it is "
                                      f"with --arch")
            raise CheckpointError(f"checkpoint {path} is not a model of this project (a .safetensors file); "
                                  f"if it is a plain timm / torchvision state dict, say which architecture it "
                                  f"is with --arch")
        else:
            model, meta = _load_plain(path, arch, prefix)
    if expect == "classifier" and model.spec.num_classes == 0:
        raise CheckpointError(f"checkpoint {ref} has no classifier; a classifier teacher is needed here")
    if expect == "projector" and model.projector is None:
        raise CheckpointError(f"checkpoint {ref} has no projection head; use --target feature")
    return model.to(device).eval(), meta


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors / arrays in a nested structure by references; collect them."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        key, is_tensor = prefix or "_", isinstance(obj, torch.Tensor)
        tensors[key] = obj if is_tensor else torch.from_numpy(np.ascontiguousarray(obj))
        return {"__tensor__" if is_tensor else "__ndarray__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"state keys must be str or int at {prefix}")
        return {"__dict__": [[k, _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(path: str | os.PathLike, state: dict) -> None:
    """Atomically write a nested dict of tensors / arrays / JSON values (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(state, "", tensors)
    # safetensors refuses tensors that share memory: store independent copies
    seen: dict[int, str] = {}
    for k, t in list(tensors.items()):
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen and ptr != -1:
            tensors[k] = t.clone()
        seen[ptr] = k
    _atomic_save(tensors, Path(path), {"format": STATE_FORMAT, "version": VERSION, "state": structure})


def load_state(path: str | os.PathLike) -> dict:
    """Read a file written by :func:`save_state`."""
    tensors, meta = _read(Path(path))
    if not meta or meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a training state file")
    return _unflatten(meta["state"], tensors)
