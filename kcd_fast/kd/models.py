"""Teacher and student networks for the KD trainer.

- CIFAR-style ResNets as in the KD literature (CRD / RepDistiller, which KCD's code builds
  on): ``resnet8``, ``resnet14``, ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``,
  ``resnet110`` and the 4x-wide ``resnet8x4`` (student) and ``resnet32x4`` (teacher).
- A tiny pair small enough for a CPU run on 32x32 RGB images: ``convnet_s`` / ``convnet_t``.
- An MLP pair for small flat inputs such as sklearn's 8x8 digits: ``mlp_s`` / ``mlp_t``.
- torchvision models for ImageNet-style data: ``tv:<name>`` (e.g. ``tv:resnet18``),
  built with random weights (nothing is downloaded).

Every model maps a float batch ``[B, C, H, W]`` to logits ``[B, num_classes]``;
``model(x, features=True)`` also returns the penultimate embedding ``[B, D]`` (the hook
for a feature loss). Weights are initialised from a seed with a per-call generator; the
global RNGs are never reseeded (see :func:`build_model`).

The teacher cache is :mod:`kcd_fast.kd.teacher`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import is_int

__all__ = [
    "CIFAR_RESNETS",
    "MODELS",
    "ConvNet",
    "MLP",
    "CifarResNet",
    "build_model",
    "init_weights_",
    "count_parameters",
]


# -- CIFAR ResNets (He et al. 2016, as in CRD/RepDistiller) ------------------------------
class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class CifarResNet(nn.Module):
    """ResNet-``depth`` for 32x32 inputs: a 3x3 stem, three stages of ``(depth - 2) / 6``
    basic blocks (strides 1, 2, 2), global average pooling and a linear classifier.

    ``widths`` are ``(stem, stage1, stage2, stage3)``: ``(16, 16, 32, 64)`` for resnet8..110,
    ``(32, 64, 128, 256)`` for the x4 models. Pooling is adaptive, so other input sizes work.
    """

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth!r}")
        if len(widths) != 4:
            raise ValueError(f"widths must hold 4 numbers (stem, stage1..3), got {widths!r}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, inplanes = [], widths[0]
        for stage, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2), strict=True)):
            stage_blocks = []
            for b in range(blocks):
                stage_blocks.append(BasicBlock(inplanes, planes, stride if b == 0 else 1))
                inplanes = planes
            layers.append(nn.Sequential(*stage_blocks))
            setattr(self, f"layer{stage + 1}", layers[-1])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        self.embed_dim = inplanes

    def forward(self, x: torch.Tensor, features: bool = False):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        f = torch.flatten(self.pool(x), 1)
        logits = self.fc(f)
        return (logits, f) if features else logits


CIFAR_RESNETS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    **{f"resnet{d}": (d, (16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}


# -- tiny models for CPU runs --------------------------------------------------------------
class _PooledConvNet(nn.Module):
    """A conv body, global average pooling and a linear classifier; ``forward(x, features=True)``
    also returns the pooled features."""

    def _finish(self, blocks: list[nn.Module], channels: int, num_classes: int) -> None:
        self.body = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)
        self.embed_dim = channels

    def forward(self, x: torch.Tensor, features: bool = False):
        f = torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1)
        logits = self.fc(f)
        return (logits, f) if features else logits


class ConvNet(_PooledConvNet):
    """A plain conv net: ``len(widths)`` blocks of conv3x3-BN-ReLU, each followed by 2x2
    max pooling, then global average pooling and a linear classifier."""

    def __init__(self, widths: Sequence[int], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        blocks: list[nn.Module] = []
        c = in_channels
        for w in widths:
            blocks += [
                nn.Conv2d(c, w, 3, 1, 1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c = w
        self._finish(blocks, c, num_classes)


class MLP(nn.Module):
    """Flatten, then ``len(hidden)`` Linear-ReLU layers and a linear classifier (no batch
    norm, so a last batch of one sample trains too)."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(inplace=True)]
            d = h
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(d, num_classes)
        self.embed_dim = d

    def forward(self, x: torch.Tensor, features: bool = False):
        f = self.body(torch.flatten(x, 1))
        logits = self.fc(f)
        return (logits, f) if features else logits


class _TorchvisionWrapper(nn.Module):
    """A torchvision classifier with the ``features=`` keyword (the embedding is taken
    from the input of the last Linear layer through a forward hook)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.net = model
        self._last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        self.embed_dim = self._last_linear.in_features

    def forward(self, x: torch.Tensor, features: bool = False):
        if not features:
            return self.net(x)
        box: list[torch.Tensor] = []
        handle = self._last_linear.register_forward_hook(lambda _m, inp, _o: box.append(inp[0]))
        try:
            logits = self.net(x)
        finally:
            handle.remove()
        return logits, torch.flatten(box[0], 1)


MODELS: dict[str, str] = {
    **{name: f"CIFAR ResNet-{d}, widths {w}" for name, (d, w) in CIFAR_RESNETS.items()},
    "convnet_s": "tiny student: 3 conv blocks, widths (16, 32, 64)",
    "convnet_t": "tiny teacher: 3 conv blocks x 2 convs, widths (32, 64, 128)",
    "mlp_s": "MLP student: one hidden layer of 32",
    "mlp_t": "MLP teacher: two hidden layers of 256",
    "tv:<name>": "any torchvision classification model, random weights (e.g. tv:resnet18)",
}


def _construct(name: str, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    c = int(input_shape[0])
    if name in CIFAR_RESNETS:
        depth, widths = CIFAR_RESNETS[name]
        return CifarResNet(depth, widths, num_classes, in_channels=c)
    if name == "convnet_s":
        return ConvNet((16, 32, 64), num_classes, in_channels=c)
    if name == "convnet_t":
        return _ConvNetTeacher(num_classes, in_channels=c)
    if name in ("mlp_s", "mlp_t"):
        hidden = (32,) if name == "mlp_s" else (256, 256)
        return MLP(math.prod(int(s) for s in input_shape), hidden, num_classes)
    if name.startswith("tv:"):
        import torchvision

        try:
            net = torchvision.models.get_model(name[3:], weights=None, num_classes=num_classes)
        except ValueError as err:
            raise ValueError(f"model {name!r}: torchvision has no model {name[3:]!r} ({err})") from None
        return _TorchvisionWrapper(net)
    choices = ", ".join(MODELS)
    raise ValueError(f"model must be one of {choices}, got {name!r}")


class _ConvNetTeacher(_PooledConvNet):
    """The tiny teacher: three stages of two conv3x3-BN-ReLU, widths 32/64/128, max pooling."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        blocks: list[nn.Module] = []
        c = in_channels
        for w in (32, 64, 128):
            for _ in range(2):
                blocks += [nn.Conv2d(c, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
            blocks.append(nn.MaxPool2d(2))
        self._finish(blocks, c, num_classes)


def init_weights_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-initialises conv, linear and norm layers in place from ``generator``:
    Kaiming-normal (fan-out) convolutions, PyTorch's default uniform for linear layers,
    norm weights 1 and biases 0. Other parameters keep their values."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            nn.init.uniform_(m.weight, -bound, bound, generator=generator)
            if m.bias is not None:
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def build_model(name: str, num_classes: int, input_shape: Sequence[int] = (3, 32, 32), seed: int = 0) -> nn.Module:
    """A freshly initialised model (see the module docstring for the names).

    Args:
        name: a key of :data:`MODELS`, or ``"tv:<torchvision name>"``.
        num_classes: number of classes (>= 2).
        input_shape: ``(C, H, W)`` of one input (the MLPs need it; convs use only C).
        seed: the weights are a function of ``(name, num_classes, input_shape, seed)``.
            Construction runs inside ``torch.random.fork_rng`` (the global RNG state is
            restored afterwards) and every conv/linear/norm layer is then re-initialised
            from a ``torch.Generator`` seeded with ``seed``.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)!r}")
    if not is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    num_classes, seed = int(num_classes), int(seed)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # forked state: restored on exit
        model = _construct(name, num_classes, input_shape)
    init_weights_(model, torch.Generator().manual_seed(seed))
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or frozen, such as a teacher's)."""
    return sum(p.numel() for p in model.parameters())
