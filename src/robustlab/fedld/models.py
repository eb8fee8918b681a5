"""Models for FedLD experiments: a small CNN for 28 px images (default) and torchvision ResNet-18/50 when
torchvision is installed.

Every model exposes ``features(x)`` (the representation MOON and FedPAC need), ``head`` (the classifier
layer) and ``forward(x) = head(features(x))`` (logits).

Design choice (brief's numerical pitfall 1): the CNN's convolutions have **no bias in front of
BatchNorm**. A conv bias followed by BN has (almost) zero gradient, so only weight decay moves it and every
client's delta for it is parallel to the bias itself: the m x m Gram matrix of that tensor is rank-1 by
construction, which is exactly where a float32 principal-gradient implementation returns NaN. BN's own
shift (``bn.bias``) plays the role of the conv bias. With ``norm="none"`` the convolutions keep their bias
and there is no BN (no running statistics to aggregate; FedBN is then meaningless).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from robustlab.errors import UserError

MODEL_NAMES = ("cnn", "resnet18", "resnet50")


class SmallCNN(nn.Module):
    """3 x [conv3x3 (no bias) + BatchNorm + ReLU + maxpool 2] with 16/32/64 channels, then FC 128 + ReLU
    (the representation) and a linear head. About 98k parameters for 28 px RGB input and 5 classes."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 28,
        norm: str = "batch",
        widths: tuple[int, int, int] = (16, 32, 64),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        if norm not in ("batch", "none"):
            raise UserError(f"unknown norm '{norm}' for the CNN", "use 'batch' or 'none'")
        if num_classes < 1 or in_channels < 1 or image_size < 8:
            raise UserError(
                f"CNN needs num_classes >= 1, in_channels >= 1, image_size >= 8 (got {num_classes}, "
                f"{in_channels}, {image_size})",
                "check the dataset",
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=(norm == "none")))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(width))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.conv = nn.Sequential(*layers)
        side = image_size
        for _ in widths:
            side //= 2
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * side * side, hidden), nn.ReLU(inplace=True)
        )
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ResNetClassifier(nn.Module):
    """A torchvision ResNet whose ``fc`` is split off as ``head`` (``features`` = pooled 512/2048-d)."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _resnet(name: str, num_classes: int, in_channels: int, pretrained: bool) -> ResNetClassifier:
    if importlib.util.find_spec("torchvision") is None:
        raise UserError(
            f"model '{name}' needs the torchvision package, which is not installed",
            "pip install torchvision (matching your torch version), or use --model cnn",
        )
    import torchvision

    builder = getattr(torchvision.models, name)
    weights = "IMAGENET1K_V1" if pretrained else None  # pretrained weights come through torchvision's cache
    net = builder(weights=weights)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    head = nn.Linear(net.fc.in_features, num_classes)
    net.fc = nn.Identity()
    return ResNetClassifier(net, head)


def build_model(
    name: str = "cnn",
    num_classes: int = 5,
    in_channels: int = 3,
    image_size: int = 28,
    *,
    norm: str = "batch",
    pretrained: bool = False,
) -> nn.Module:
    """``cnn`` (default, :class:`SmallCNN`), ``resnet18`` or ``resnet50`` (torchvision, optional; the paper
    uses an ImageNet ResNet-50 at 384 px). Raises ``UserError`` for an unknown name or when torchvision is
    missing for a ResNet."""
    key = name.lower()
    if key == "cnn":
        return SmallCNN(num_classes, in_channels, image_size, norm=norm)
    if key in ("resnet18", "resnet50"):
        return _resnet(key, num_classes, in_channels, pretrained)
    raise UserError(f"unknown model '{name}'", f"use one of {', '.join(MODEL_NAMES)}")


def num_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def batchnorm_keys(model: nn.Module) -> list[str]:
    """Every ``state_dict`` key that belongs to a BatchNorm layer (weight, bias, running stats, counter),
    found by module type, not by the substring ``'bn'`` (which misses ResNet's ``downsample.1``): what
    FedBN keeps local."""
    keys: list[str] = []
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            prefix = f"{mod_name}." if mod_name else ""
            keys += [prefix + k for k in module.state_dict()]
    return keys


def head_keys(model: nn.Module) -> list[str]:
    """Every ``state_dict`` key of the model's classifier layer (``model.head``, else its last ``Linear``):
    the part FedPAC personalises (the official code's ``['fc.weight', 'fc.bias']``)."""
    if isinstance(getattr(model, "head", None), nn.Module):
        return [f"head.{k}" for k in model.head.state_dict()]  # type: ignore[union-attr]
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("the model has no classifier head (no `head` and no Linear layer)", "use --model cnn")
    return [f"{linears[-1]}.{k}" for k in dict(model.named_modules())[linears[-1]].state_dict()]
