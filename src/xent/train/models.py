"""Classifiers whose shapes follow the data: 1-D signals ``(C, L)`` or 2-D images ``(C, H, W)``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

# a layer class (Conv1d, BatchNorm2d, ...), called with its arguments
_Layer = Callable[..., nn.Module]


def _layers(input_shape: tuple[int, ...]) -> tuple[_Layer, _Layer, _Layer, _Layer]:
    """Convolution, batch-norm and pooling classes for the data's number of spatial dimensions."""
    if len(input_shape) == 2:
        return nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d
    if len(input_shape) == 3:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d
    raise ValueError(f"input shape {input_shape} is neither a signal (C, L) nor an image (C, H, W)")


def linear(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int | None = None) -> nn.Module:
    """Two hidden ReLU layers: 100 units for signals (MNIST-1D's baseline), 256 for images."""
    hidden = hidden or (100 if len(input_shape) == 2 else 256)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Signals: MNIST-1D's three strided convolutions of 25 channels. Images: two conv-BN-ReLU stages with pooling,
    global average pooling and a linear head."""
    channels = input_shape[0]
    if len(input_shape) == 2:
        length = input_shape[1]
        for kernel, stride, padding in ((5, 2, 1), (3, 2, 1), (3, 2, 1)):
            length = (length + 2 * padding - kernel) // stride + 1
        return nn.Sequential(
            nn.Conv1d(channels, 25, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(25, 25, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(25, 25, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(25 * length, num_classes),
        )
    conv, norm, pool, global_pool = _layers(input_shape)

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [conv(cin, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU()]

    small = min(input_shape[1:]) < 16  # 8×8 digits: one pooling step only
    return nn.Sequential(
        *block(channels, 32),
        *block(32, 32),
        pool(2),
        *block(32, 64),
        *block(64, 64),
        nn.Identity() if small else pool(2),
        global_pool(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


class _BasicBlock(nn.Module):
    def __init__(self, conv: _Layer, norm: _Layer, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(cin, cout, 3, stride=stride, padding=1, bias=False),
            norm(cout),
            nn.ReLU(),
            conv(cout, cout, 3, padding=1, bias=False),
            norm(cout),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False), norm(cout))
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.relu(self.body(x) + self.shortcut(x)))


def resnet20(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ResNet-20 for small inputs (He et al., 2016, §4.2): 3 stages of 3 basic blocks, 16/32/64 channels, with
    projection shortcuts where the shape changes."""
    conv, norm, _, global_pool = _layers(input_shape)
    layers: list[nn.Module] = [conv(input_shape[0], 16, 3, padding=1, bias=False), norm(16), nn.ReLU()]
    cin = 16
    for stage, cout in enumerate((16, 32, 64)):
        for index in range(3):
            layers.append(_BasicBlock(conv, norm, cin, cout, stride=2 if stage > 0 and index == 0 else 1))
            cin = cout
    layers += [global_pool(1), nn.Flatten(), nn.Linear(64, num_classes)]
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model


class NormedLinear(nn.Module):
    """A cosine classifier, the head LDAM's margins are defined for (Cao et al., 2019): its logits are ``scale``
    times the cosines between the feature vector and each class's weight vector — the logits the loss scores, so
    that every probability read from them (evaluation, ECE, temperature scaling) is the model's.

    The scale is a constant of the loss, not a parameter: it is not saved in ``state_dict``."""

    def __init__(self, in_features: int, out_features: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1, 1))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t())

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, scale={self.scale}"


MODELS = {"linear": linear, "mlp": mlp, "cnn": cnn, "resnet20": resnet20}


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, *, cosine_scale: float | None = None
) -> nn.Module:
    """The named model; with ``cosine_scale`` its final linear layer is a :class:`NormedLinear` of that scale."""
    model = MODELS[name](input_shape, num_classes)
    if cosine_scale is not None:
        # every model is a Sequential that ends in its nn.Linear head
        head = cast(nn.Linear, cast(nn.Sequential, model)[-1])
        cast(nn.Sequential, model)[-1] = NormedLinear(head.in_features, head.out_features, cosine_scale)
    return model
