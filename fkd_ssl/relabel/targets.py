"""ReLabel's targets: a classifier's class scores at every location, pooled over a crop's box.

Conventions (RoIAlign alignment, map coordinates): ``docs/relabel.md``.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..models import Encoder, TorchvisionBackbone

ArrayLike = Union[np.ndarray, torch.Tensor]


def classifier_weights(model: Encoder) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's final classifier (``nn.Linear`` or 1x1 ``nn.Conv2d``) as ``(weight (C, D), bias | None)``."""
    if model.spec.num_classes == 0:
        raise ConfigError(f"teacher {model.spec.arch} has no classifier (num_classes=0): ReLabel needs a "
                          f"classifier teacher")
    head = model.backbone.get_classifier()
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    if isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1) and head.groups == 1:
        return head.weight.flatten(1), head.bias
    raise ConfigError(f"teacher {model.spec.arch}: its classifier is a {type(head).__name__}, not a linear layer, "
                      f"so per-location class scores (ReLabel's label map) are not defined for it")


def _feature_map(model: Encoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(map (B, D', h, w) as the model gives it, the model's own logits (B, C))``."""
    bb = model.backbone
    if isinstance(bb, TorchvisionBackbone):
        pool = getattr(bb.net, "avgpool", None)
        if not isinstance(pool, nn.AdaptiveAvgPool2d) or pool.output_size not in (1, (1, 1)):
            raise ConfigError(f"teacher {model.spec.arch}: no global average pooling (avgpool) found, so its "
                              f"per-location class scores are not defined")
        seen: list[torch.Tensor] = []
        handle = pool.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
        try:
            pooled = bb.net(x)
        finally:
            handle.remove()
        with torch.autocast(x.device.type, enabled=False):
            return seen[-1], bb.fc(pooled.float())
    fmap = bb.forward_features(x)
    if fmap.ndim != 4:
        raise ConfigError(f"teacher {model.spec.arch}: its features are {tuple(fmap.shape)} (tokens), not a "
                          f"(B, C, h, w) map; ReLabel needs a convolutional teacher")
    with torch.autocast(x.device.type, enabled=False):
        return fmap, bb.forward_head(fmap.float())


@torch.no_grad()
def dense_scores(model: Encoder, x: torch.Tensor) -> torch.Tensor:
    """The teacher's class-score map: normalised images ``(B, 3, S, S)`` -> float32 logits ``(B, C, h, w)``;
    ConfigError unless its spatial mean equals the model's pooled logits."""
    weight, bias = classifier_weights(model)
    fmap, ref = _feature_map(model, x)
    D = weight.shape[1]
    if fmap.shape[1] != D and fmap.shape[-1] == D:  # channels-last features (e.g. Swin)
        fmap = fmap.permute(0, 3, 1, 2)
    if fmap.shape[1] != D:
        raise ConfigError(f"teacher {model.spec.arch}: its classifier takes {D} features but the final feature map "
                          f"has {fmap.shape[1]} channels (a head between pooling and classifier), so per-location "
                          f"class scores are not defined")
    with torch.autocast(x.device.type, enabled=False):
        out = torch.einsum("bdhw,cd->bchw", fmap.float(), weight.float())
        if bias is not None:
            out = out + bias.float().view(1, -1, 1, 1)
        tol = (1e-3 if fmap.dtype == torch.float32 else 5e-2) * (1.0 + float(ref.abs().max()))
        err = float((out.mean(dim=(2, 3)) - ref.float()).abs().max())
        if err > tol:
            raise ConfigError(f"teacher {model.spec.arch}: the mean of its per-location scores differs from its "
                              f"logits by {err:.3g} (its head is not global average pooling + a linear "
                              f"classifier), so ReLabel's label map is not defined for it")
    return out


def _as_tensor(a: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device) if device is not None else t


def dense_from_topk(values: ArrayLike, indices: ArrayLike, num_classes: int) -> torch.Tensor:
    """Top-k scores and class indices ``(..., h, w, k)`` -> float32 dense map ``(..., C, h, w)``, 0 elsewhere."""
    v = _as_tensor(values).float()
    idx = _as_tensor(indices, v.device).long()
    if v.shape != idx.shape or v.ndim < 3:
        raise ValueError(f"values {tuple(v.shape)} and indices {tuple(idx.shape)} must both be (..., h, w, k)")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_classes):
        raise ValueError(f"class indices out of range 0..{num_classes - 1}")
    *lead, h, w, k = v.shape
    dense = torch.zeros(*lead, h, w, num_classes, dtype=torch.float32, device=v.device)
    dense.scatter_(-1, idx, v)
    return dense.movedim(-1, -3).contiguous()


def box_rois(boxes: ArrayLike, height: int, width: int) -> torch.Tensor:
    """Crop boxes ``(K, 4)`` ``[top, left, height, width]`` fractions -> ``[x1, y1, x2, y2]`` in map coordinates."""
    b = _as_tensor(boxes).float()
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be (K, 4) [top, left, height, width] fractions, got {tuple(b.shape)}")
    top, left, h, w = b.unbind(1)
    return torch.stack([left * width, top * height, (left + w) * width, (top + h) * height], dim=1)


def relabel_targets(values: ArrayLike, indices: ArrayLike | None, boxes: ArrayLike,
                    num_classes: int | None = None) -> torch.Tensor:
    """ReLabel's label of each crop (LabelPooling): float32 ``(K, C)`` class probabilities.

    ``values``/``indices``: the map as top-k ``([K,] h, w, k)``, or with ``indices=None`` a dense
    ``([K,] C, h, w)``; ``boxes``: ``(K, 4)`` crop boxes as fractions (docs/relabel.md).
    """
    from torchvision.ops import roi_align

    if indices is None:
        dense = _as_tensor(values).float()
    else:
        if num_classes is None:
            raise ValueError("num_classes is needed with top-k indices")
        dense = dense_from_topk(values, indices, int(num_classes))
    if dense.ndim not in (3, 4):
        raise ValueError(f"label map must be (C, h, w) or (K, C, h, w), got {tuple(dense.shape)}")
    rois = box_rois(boxes, dense.shape[-2], dense.shape[-1]).to(dense.device)
    K = rois.shape[0]
    if dense.ndim == 3:
        dense, batch = dense.unsqueeze(0), torch.zeros(K, 1, device=dense.device)
    else:
        if dense.shape[0] != K:
            raise ValueError(f"{dense.shape[0]} label maps for {K} boxes")
        batch = torch.arange(K, device=dense.device, dtype=torch.float32).unsqueeze(1)
    pooled = roi_align(dense, torch.cat([batch, rois], dim=1), output_size=(1, 1), spatial_scale=1.0,
                       sampling_ratio=-1, aligned=True)
    return torch.softmax(pooled.flatten(1), dim=1)
