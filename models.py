"""Multi-peer networks: the student and teacher of PCL and DKEL (Sec. 3.2, Fig. 1(c)/(d), Fig. 3).

A multi-peer network is a shared trunk followed by M peer branches. Peer i receives the trunk's
features of its own augmented view x_i, runs the last stage of the architecture, pools it to the
feature f_i and classifies it to the logits s_i. The peer-ensemble head of Eq. (3) concatenates
(stacks) the M pooled features and classifies them with one linear layer to the ensemble logits e.

The same class builds every network the project needs (SPEC.md Sec. 5 and 6):
- the 3-peer student (and DKEL's independent teacher, a second instance of the same class);
- a single plain network: M = 1 and no ensemble head;
- M independent networks: no shared trunk, every branch is a whole network;
- the deployable model: the trunk plus one branch, cut out of a trained multi-peer network.

Architectures follow the authors' public code (SPEC.md Sec. 5); the split between trunk and
branch is where that code starts its branches. Every branch is built fresh, so the peers start
from different random weights (the authors' code deep-copies one branch three times).
"""
import copy
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


class ViewBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d of a trunk that runs M augmented views as one stacked batch of M*B images.

    The authors' code runs the trunk once per view (SPEC.md Sec. 8), so in train mode every view
    is normalised with the mean and variance of its own B images and the running statistics are
    updated M times per step, view after view. This layer gives the same in one pass of the
    convolutions: `views` is the number of views the current input holds, as M contiguous blocks
    of B images (x.flatten(0, 1) of (M, B, C, H, W); with channels_last each block is still one
    contiguous NHWC block). Whenever BatchNorm uses batch statistics, the ordinary BatchNorm2d
    forward runs on each block in view order, so each block gets its own statistics and the
    running statistics get the M sequential momentum updates (unbiased variance) of M separate
    passes. The blocks are concatenated back in the input's memory format.

    `num_batches_tracked` grows by M per stacked pass, one per block, as over M separate passes
    (it only matters with momentum=None, the cumulative average, which is then exact as well).
    With one view, or with running statistics (eval mode), this is plain BatchNorm2d; the state
    dict is BatchNorm2d's, so checkpoints load into either class.

    The layer cannot tell M from an (M*B, C, H, W) input, and nn.Sequential passes nothing but
    the tensor, so MultiPeerNet.run_trunk sets `views` = M for the duration of a stacked pass and
    back to 1 after it; anything else that runs the layer (a (B, 3, H, W) batch for every peer,
    a deployed copy of the trunk) gets ordinary BatchNorm. torch.compile traces the setting.
    """
    views: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.views == 1 or not (self.training or self.running_mean is None):
            return super().forward(x)
        batch_norm = super().forward
        blocks = x.unflatten(0, (self.views, -1)).unbind(0)             # M x (B, C, H, W)
        return torch.cat([batch_norm(block) for block in blocks])        # (M*B, C, H, W)


def per_view_batchnorm(module: nn.Module) -> None:
    """Make every nn.BatchNorm2d inside `module` (on the CPU, as built) a ViewBatchNorm2d with
    the same settings, parameters and buffers: same state-dict keys, same parameter count."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            view_bn = ViewBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats)
            view_bn.load_state_dict(child.state_dict())
            setattr(module, name, view_bn)
        else:
            per_view_batchnorm(child)


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


# ----------------------------------------------------------------------------- the networks
class Peer(nn.Module):
    """One peer branch: body (last stage + global pooling) -> pooled feature f_i -> logits s_i."""

    def __init__(self, body: nn.Module, classifier: nn.Module):
        super().__init__()
        self.body, self.classifier = body, classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.body(x)                         # (B, D)
        return self.classifier(feat), feat          # (B, C), (B, D)


class PeerOutputs(NamedTuple):
    logits: torch.Tensor                  # (M, B, C): s_1 .. s_M
    feats: torch.Tensor                   # (M, B, D): f_1 .. f_M
    ensemble: torch.Tensor | None         # (B, C): e of Eq. (3), None without an ensemble head
    trunk: torch.Tensor                   # the trunk's output, reused by PCL's peer mean teacher


class MultiPeerNet(nn.Module):
    """Shared trunk + M peers (+ the peer-ensemble head of Eq. (3)).

    `shared_trunk=False` gives M independent networks (the trunk is the identity and every
    branch carries its own copy of the trunk).

    `per_view_bn=True` (the default, SPEC.md Sec. 8) makes every BatchNorm of the shared trunk a
    ViewBatchNorm2d, so that a stacked pass of M views has the BatchNorm statistics of M separate
    passes (see `run_trunk`). The peers see one view each and keep plain BatchNorm; without a
    shared trunk there is nothing to change. Parameters and state-dict keys are the same either way.
    """

    def __init__(self, arch: str, num_classes: int, num_peers: int = 3,
                 ensemble_head: bool = True, shared_trunk: bool = True, per_view_bn: bool = True):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
        spec = ARCHS[arch]()
        self.arch, self.num_classes, self.num_peers = arch, num_classes, num_peers
        self.shared_trunk = shared_trunk
        self.trunk = spec.trunk() if shared_trunk else nn.Identity()
        if per_view_bn:
            per_view_batchnorm(self.trunk)
        self.peers = nn.ModuleList(
            Peer(spec.branch_body() if shared_trunk else nn.Sequential(spec.trunk(), spec.branch_body()),
                 spec.classifier(spec.feature_dim, num_classes))
            for _ in range(num_peers))
        # The peer-ensemble head h of Eq. (3): one linear layer on the M stacked features.
        self.ensemble_head = nn.Linear(num_peers * spec.feature_dim, num_classes) if ensemble_head else None
        init_weights(self)

    def run_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """x: (M, B, 3, H, W), one view per peer, or (B, 3, H, W), one image for every peer.
        Returns the trunk's features with a leading view dimension of size M or 1.

        The M views run through the trunk as one stacked batch of M*B images (one big batch
        beats M small ones).
        NOTE(paper): the paper does not say how BatchNorm treats the views. As in the authors'
        code, which runs the trunk once per view (SPEC.md Sec. 8), the statistics are per view:
        in train mode each view is normalised with the mean and variance of its own B images
        and the running statistics are updated M times, view after view, exactly as M separate
        passes would (tests/test_models.py checks outputs, gradients and running statistics).
        For the stacked pass this method sets `views` = M on the trunk's ViewBatchNorm2d layers
        and puts it back to 1 afterwards, so a (B, 3, H, W) input (one view for every peer, as in
        evaluation and in methods that feed one view) and every other caller of the trunk get ordinary
        BatchNorm. With `per_view_bn=False` the M*B images share one set of statistics instead.
        In eval mode all of these are identical.
        """
        if x.dim() == 4:
            return self.trunk(x).unsqueeze(0)                         # (1, B, ...)
        self._set_views(x.shape[0])
        try:
            out = self.trunk(x.flatten(0, 1))                         # (M*B, ...)
        finally:
            self._set_views(1)
        return out.unflatten(0, x.shape[:2])                          # (M, B, ...)

    def _set_views(self, views: int) -> None:
        for module in self.trunk.modules():
            if isinstance(module, ViewBatchNorm2d):
                module.views = views

    def run_peers(self, trunk_out: torch.Tensor, peers: nn.ModuleList | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Peer i on view i of the trunk output (every peer on view 0 when there is one view).
        `peers` defaults to this network's own; PCL's peer mean teacher passes its EMA copy."""
        peers = self.peers if peers is None else peers
        views = trunk_out.shape[0]
        outs = [peer(trunk_out[i if views > 1 else 0]) for i, peer in enumerate(peers)]
        logits = torch.stack([o[0] for o in outs])                   # (M, B, C)
        feats = torch.stack([o[1] for o in outs])                    # (M, B, D)
        return logits, feats

    def forward(self, x: torch.Tensor) -> PeerOutputs:
        trunk_out = self.run_trunk(x)
        logits, feats = self.run_peers(trunk_out)
        ensemble = None
        if self.ensemble_head is not None:
            stacked = feats.transpose(0, 1).flatten(1)               # (B, M*D): f_1, ..., f_M
            # Eq. (3): e = h(f_1, ..., f_M) = W [f_1; ...; f_M] + b  (stacking ensemble).
            ensemble = self.ensemble_head(stacked)                   # (B, C)
        return PeerOutputs(logits, feats, ensemble, trunk_out)

    def deployable(self, peer: int) -> "DeployableNet":
        """The deployed model: a copy of the trunk followed by a copy of branch `peer`.

        An independent network (shared_trunk=False: its body is (trunk, branch body)) is cut at
        the same place, so every exported model has the same state-dict keys and loads into
        `build_deployable(arch, num_classes)` whatever method trained it."""
        branch = copy.deepcopy(self.peers[peer])
        if self.shared_trunk:
            return DeployableNet(copy.deepcopy(self.trunk), branch)
        trunk, body = branch.body
        return DeployableNet(trunk, Peer(body, branch.classifier))


class DeployableNet(nn.Module):
    """Trunk + one peer: a plain single network mapping images (B, 3, H, W) to logits (B, C).
    Its state dict is what train.py exports; `build_deployable` rebuilds the empty module.
    A trunk copied from a per-view MultiPeerNet keeps its ViewBatchNorm2d layers, which only
    run_trunk makes per view: here they are ordinary BatchNorm, in train mode as well."""

    def __init__(self, trunk: nn.Module, peer: Peer):
        super().__init__()
        self.trunk, self.peer = trunk, peer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.peer(self.trunk(x))[0]


def build_deployable(arch: str, num_classes: int, shared_trunk: bool = True) -> DeployableNet:
    return MultiPeerNet(arch, num_classes, 1, ensemble_head=False, shared_trunk=shared_trunk).deployable(0)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def multi_peer_net(arch: str, num_classes: int, num_peers: int = 3, **options) -> MultiPeerNet:
    return MultiPeerNet(arch, num_classes, num_peers, **options)
