"""The architectures of the paper's experiments (Sec. 4.2, docs/spec.md Sec. 5) and where each one
splits into the shared trunk and a peer branch of the multi-peer network (models.py).

The paper takes its networks from the authors' public code (Chen et al. [3]): CIFAR ResNets
(resnet32, resnet110), WRN-20-8, VGG-16 and DenseNet-40-12 for CIFAR-10/100, ResNet-18/34 for
TinyImageNet; resnet8 and resnet20 are small extras for fast runs on a CPU. The split is where
that code starts its branches:

| arch | shared trunk | each peer branch |
|---|---|---|
| resnet8/20/32/110, wrn20_8 | stem + stages 1-2 | stage 3 + pool + FC |
| vgg16 | conv stages 1-4 | last 512x3 conv stage + pool + FC 512-512-C |
| densenet40_12 | stem + dense blocks 1-2 + transitions | dense block 3 + BN/ReLU + pool + FC |
| resnet18, resnet34 | stem + stages 1-3 | stage 4 + pool + FC |

`ARCHS[name]()` gives an `ArchSpec`: factories for the trunk and for the body of one branch
(which ends in the pooled feature f_i), the feature width D and the classifier on f_i.
"""
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- building blocks
def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut (He et al. 2016)."""
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(in_ch, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_ch, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 with expansion 4; `width` is the inner width (8x planes for WRN-20-8)."""
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, width: int | None = None):
        super().__init__()
        width = width or planes
        out_ch = planes * self.expansion
        self.conv1, self.bn1 = conv1x1(in_ch, width), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = conv1x1(width, out_ch), nn.BatchNorm2d(out_ch)
        self.shortcut = _projection(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _projection(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))


def res_stage(block: type, in_ch: int, planes: int, blocks: int, stride: int,
              width_factor: int = 1) -> nn.Sequential:
    """One ResNet stage: `blocks` blocks, the first one strided; a `width_factor` widens the
    inner convolutions of a Bottleneck (WRN-20-8)."""
    layers, ch = [], in_ch
    wide = {"width": planes * width_factor} if width_factor != 1 else {}
    for k in range(blocks):
        layers.append(block(ch, planes, stride if k == 0 else 1, **wide))
        ch = planes * block.expansion
    return nn.Sequential(*layers)


class DenseLayer(nn.Module):
    """DenseNet-BC layer: BN-ReLU-1x1 conv (4k channels) then BN-ReLU-3x3 conv (k channels)."""

    def __init__(self, in_ch: int, growth: int):
        super().__init__()
        self.bottleneck = nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(), conv1x1(in_ch, 4 * growth))
        self.conv = nn.Sequential(nn.BatchNorm2d(4 * growth), nn.ReLU(), conv3x3(4 * growth, growth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.bottleneck(x))], dim=1)


def dense_block(in_ch: int, growth: int, layers: int) -> nn.Sequential:
    return nn.Sequential(*[DenseLayer(in_ch + k * growth, growth) for k in range(layers)])


def transition(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(), conv1x1(in_ch, out_ch), nn.AvgPool2d(2))


def vgg_stage(in_ch: int, out_ch: int, convs: int) -> nn.Sequential:
    """`convs` 3x3 conv-BN-ReLU layers (with bias, as in the authors' VGG) and a 2x2 max-pool."""
    layers = []
    for k in range(convs):
        layers += [nn.Conv2d(in_ch if k == 0 else out_ch, out_ch, 3, padding=1),
                   nn.BatchNorm2d(out_ch), nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2))


def global_pool() -> nn.Sequential:
    """Global average pooling to the flat feature f_i (adaptive, so any input size works)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


# ----------------------------------------------------------------------------- architectures
class ArchSpec(NamedTuple):
    """How to build one architecture: its trunk, the body of one branch (last stage + pooling,
    output: the pooled feature f_i of `feature_dim`), and the classifier on f_i."""
    trunk: Callable[[], nn.Module]
    branch_body: Callable[[], nn.Module]
    feature_dim: int
    classifier: Callable[[int, int], nn.Module]  # (feature_dim, num_classes) -> module
    input_size: int                              # the size the architecture was designed for


def _linear(feature_dim: int, num_classes: int) -> nn.Module:
    return nn.Linear(feature_dim, num_classes)


def _vgg_classifier(feature_dim: int, num_classes: int) -> nn.Module:
    # FC 512-512-C, as in the authors' VGG (dropout 0 there, so none here).
    return nn.Sequential(nn.Linear(feature_dim, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, num_classes))


def cifar_resnet(block: type, blocks: int, width_factor: int = 1) -> ArchSpec:
    """CIFAR ResNet with stages of 16/32/64 planes; trunk = stem + stages 1-2, branch = stage 3."""
    e = block.expansion

    def trunk() -> nn.Module:
        return nn.Sequential(conv3x3(3, 16), nn.BatchNorm2d(16), nn.ReLU(),
                             res_stage(block, 16, 16, blocks, 1, width_factor),
                             res_stage(block, 16 * e, 32, blocks, 2, width_factor))

    def branch() -> nn.Module:
        return nn.Sequential(res_stage(block, 32 * e, 64, blocks, 2, width_factor), global_pool())

    return ArchSpec(trunk, branch, 64 * e, _linear, 32)


def tiny_resnet(blocks: list[int]) -> ArchSpec:
    """ImageNet-style BasicBlock ResNet (64/128/256/512) for 64x64 TinyImageNet; trunk = stem +
    stages 1-3, branch = stage 4."""

    def trunk() -> nn.Module:
        # NOTE(paper): the paper does not describe the 64x64 adaptation; like the authors' code we
        # keep the ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool): 64 -> 16 pixels.
        return nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
                             nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
                             res_stage(BasicBlock, 64, 64, blocks[0], 1),
                             res_stage(BasicBlock, 64, 128, blocks[1], 2),
                             res_stage(BasicBlock, 128, 256, blocks[2], 2))

    def branch() -> nn.Module:
        return nn.Sequential(res_stage(BasicBlock, 256, 512, blocks[3], 2), global_pool())

    return ArchSpec(trunk, branch, 512, _linear, 64)


def vgg16() -> ArchSpec:
    """VGG-16 (13 conv + 3 FC); trunk = conv stages 1-4, branch = the last 512x3 stage."""

    def trunk() -> nn.Module:
        return nn.Sequential(vgg_stage(3, 64, 2), vgg_stage(64, 128, 2), vgg_stage(128, 256, 3),
                             vgg_stage(256, 512, 3))

    def branch() -> nn.Module:
        return nn.Sequential(vgg_stage(512, 512, 3), global_pool())

    return ArchSpec(trunk, branch, 512, _vgg_classifier, 32)


def densenet_bc(growth: int = 12, layers: int = 6) -> ArchSpec:
    """DenseNet-BC-40 (k=12): 3 dense blocks of 6 bottleneck layers, compression 0.5. Trunk =
    stem + blocks 1-2 with their transitions; every branch owns its own block 3."""
    ch1 = 2 * growth + layers * growth          # after block 1
    ch2 = ch1 // 2 + layers * growth            # after transition 1 and block 2
    ch3 = ch2 // 2 + layers * growth            # after transition 2 and block 3

    def trunk() -> nn.Module:
        return nn.Sequential(conv3x3(3, 2 * growth), dense_block(2 * growth, growth, layers),
                             transition(ch1, ch1 // 2), dense_block(ch1 // 2, growth, layers),
                             transition(ch2, ch2 // 2))

    def branch() -> nn.Module:
        return nn.Sequential(dense_block(ch2 // 2, growth, layers), nn.BatchNorm2d(ch3), nn.ReLU(),
                             global_pool())

    return ArchSpec(trunk, branch, ch3, _linear, 32)


ARCHS: dict[str, Callable[[], ArchSpec]] = {
    "resnet8": lambda: cifar_resnet(BasicBlock, 1),
    "resnet20": lambda: cifar_resnet(BasicBlock, 3),
    "resnet32": lambda: cifar_resnet(BasicBlock, 5),
    "resnet110": lambda: cifar_resnet(Bottleneck, 12),
    "wrn20_8": lambda: cifar_resnet(Bottleneck, 2, width_factor=8),
    "vgg16": vgg16,
    "densenet40_12": densenet_bc,
    "resnet18": lambda: tiny_resnet([2, 2, 2, 2]),
    "resnet34": lambda: tiny_resnet([3, 4, 6, 3]),
}


def init_weights(module: nn.Module) -> None:
    """He-normal convolutions, unit BatchNorm, as in the authors' code; linear layers keep
    PyTorch's default initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
