"""The multi-peer network of PCL and DKEL: student and teacher (Sec. 3.2, Fig. 1(c)/(d), Fig. 3).

A shared trunk (the backbone) is followed by M peer branches. Peer i is fed its own augmented
view x_i: the trunk's features of x_i run through branch i, which pools them to the flat feature
f_i (B, D) and classifies it to the logits s_i (B, C). The peer ensemble e of Eq. (3) stacks the
M features and classifies them with one linear layer, e = h(f_1, ..., f_M) = W [f_1; ...; f_M] + b.
DKEL's independent teacher (Fig. 3) is a second multi-peer network of the same architecture,
without the ensemble head; the deployed model is the trunk followed by one branch.

`MultiPeerNet(trunk, branch, feature_dim, num_classes)` wraps any network cut into a trunk and a
branch; `multi_peer_net(arch, num_classes)` builds one of the paper's architectures
(backbones.py, Sec. 4.2). The same class gives every network the project needs (docs/spec.md Sec. 5, 6):
- the 3-peer student, and DKEL's independent teacher;
- a single plain network: M = 1 and no ensemble head;
- M independent networks (DML, KDCL): no shared trunk, every branch a whole network;
- the deployable model: the trunk plus one branch, cut out of a trained multi-peer network.

After the network: the per-view BatchNorm of the shared trunk (docs/spec.md Sec. 8), which gives a
stacked pass of the M views the BatchNorm statistics of M separate passes.
"""
import copy
from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from backbones import ARCHS, init_weights


class PeerOutputs(NamedTuple):
    logits: torch.Tensor                  # (M, B, C): s_1 .. s_M
    feats: torch.Tensor                   # (M, B, D): f_1 .. f_M
    ensemble: torch.Tensor | None         # (B, C): e of Eq. (3), None without an ensemble head
    trunk: torch.Tensor                   # the trunk's output, reused by PCL's peer mean teacher


class MultiPeerNet(nn.Module):
    """Shared trunk + M peers (+ the peer-ensemble head of Eq. (3)).

    `trunk` maps images (N, 3, H, W) to features; `branch()` returns a fresh branch body that
    maps those features to the pooled feature f_i (B, `feature_dim`). It is called once per peer,
    so every peer owns its branch; `multi_peer_net`'s branches are built fresh, so its peers start
    from different random weights (the authors' code deep-copies one branch M times).
    `classifier(feature_dim, num_classes)` builds the classifier on f_i of each peer.

    `trunk=None` gives M independent networks: no shared trunk, and every `branch()` is a whole
    network, given as nn.Sequential(trunk, body) so that `deployable` cuts it where a shared
    trunk would end.

    `per_view_bn=True` (the default, docs/spec.md Sec. 8) makes every BatchNorm2d of the shared trunk
    a ViewBatchNorm2d (in place), so that a stacked pass of M views has the BatchNorm statistics of M
    separate passes (see `run_trunk`). The peers see one view each and keep plain BatchNorm;
    without a shared trunk there is nothing to change. Parameters and state-dict keys are the
    same either way.
    """

    def __init__(self, trunk: nn.Module | None, branch: Callable[[], nn.Module], feature_dim: int,
                 num_classes: int, num_peers: int = 3, ensemble_head: bool = True,
                 classifier: Callable[[int, int], nn.Module] = nn.Linear, per_view_bn: bool = True):
        super().__init__()
        self.num_classes, self.num_peers = num_classes, num_peers
        self.shared_trunk = trunk is not None
        self.trunk = trunk if self.shared_trunk else nn.Identity()
        if per_view_bn:
            per_view_batchnorm(self.trunk)
        self.peers = nn.ModuleList(Peer(branch(), classifier(feature_dim, num_classes))
                                   for _ in range(num_peers))
        # The peer-ensemble head h of Eq. (3): one linear layer on the M stacked features.
        self.ensemble_head = nn.Linear(num_peers * feature_dim, num_classes) if ensemble_head else None

    def run_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """x: (M, B, 3, H, W), one view per peer, or (B, 3, H, W), one image for every peer.
        Returns the trunk's features with a leading view dimension of size M or 1.

        The M views run through the trunk as one stacked batch of M*B images (one big batch
        beats M small ones).
        NOTE(paper): the paper does not say how BatchNorm treats the views. As in the authors'
        code, which runs the trunk once per view (docs/spec.md Sec. 8), the statistics are per view:
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
            if isinstance(module, PerViewStatistics):
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

        An independent network (no shared trunk: its branch body is nn.Sequential(trunk, body))
        is cut at the same place, so every exported model has the same state-dict keys and loads
        into `build_deployable(arch, num_classes)` whatever method trained it."""
        branch = copy.deepcopy(self.peers[peer])
        if self.shared_trunk:
            return DeployableNet(copy.deepcopy(self.trunk), branch)
        trunk, body = branch.body
        return DeployableNet(trunk, Peer(body, branch.classifier))


class Peer(nn.Module):
    """One peer branch: body (last stage + global pooling) -> pooled feature f_i -> logits s_i."""

    def __init__(self, body: nn.Module, classifier: nn.Module):
        super().__init__()
        self.body, self.classifier = body, classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.body(x)                         # (B, D)
        return self.classifier(feat), feat          # (B, C), (B, D)


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
    """The empty deployed model of `arch`, for loading an exported state dict."""
    net = multi_peer_net(arch, num_classes, 1, ensemble_head=False, shared_trunk=shared_trunk)
    return net.deployable(0)


def multi_peer_net(arch: str, num_classes: int, num_peers: int = 3, ensemble_head: bool = True,
                   shared_trunk: bool = True, per_view_bn: bool = True) -> MultiPeerNet:
    """The MultiPeerNet of one of the paper's architectures (backbones.ARCHS), split where the
    authors' code starts its branches and initialised as in that code (backbones.init_weights).
    `shared_trunk=False` gives M independent networks, each branch (its own trunk, branch body)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    spec = ARCHS[arch]()
    if shared_trunk:
        trunk, branch = spec.trunk(), spec.branch_body
    else:
        trunk, branch = None, lambda: nn.Sequential(spec.trunk(), spec.branch_body())
    net = MultiPeerNet(trunk, branch, spec.feature_dim, num_classes, num_peers, ensemble_head,
                       spec.classifier, per_view_bn)
    init_weights(net)
    return net


# ----------------------------------------------------------------------------- per-view BatchNorm
class PerViewStatistics:
    """The per-view forward of a BatchNorm layer in a trunk that runs M augmented views as one
    stacked batch of M*B images (a mixin before the BatchNorm class: ViewBatchNorm2d here;
    distributed.ViewSyncBatchNorm, under torchrun with --sync-bn, has its own training forward,
    per view as well, and takes its `views` from the mixin).

    The authors' code runs the trunk once per view (docs/spec.md Sec. 8), so in train mode every view
    is normalised with the mean and variance of its own B images and the running statistics are
    updated M times per step, view after view. This layer gives the same in one pass of the
    convolutions: `views` is the number of views the current input holds, as M contiguous blocks
    of B images (x.flatten(0, 1) of (M, B, C, H, W); with channels_last each block is still one
    contiguous NHWC block). Whenever BatchNorm uses batch statistics, the ordinary BatchNorm
    forward runs on each block in view order, so each block gets its own statistics and the
    running statistics get the M sequential momentum updates (unbiased variance) of M separate
    passes. The blocks are concatenated back in the input's memory format.

    The layer cannot tell M from an (M*B, C, H, W) input, and nn.Sequential passes nothing but
    the tensor, so MultiPeerNet.run_trunk sets `views` = M for the duration of a stacked pass and
    back to 1 after it; anything else that runs the layer (a (B, 3, H, W) batch for every peer,
    a deployed copy of the trunk) gets ordinary BatchNorm. torch.compile traces the setting.
    """
    views: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_norm = super().forward  # the BatchNorm class's forward, after this mixin
        if self.views == 1 or not (self.training or self.running_mean is None):
            return batch_norm(x)
        blocks = x.unflatten(0, (self.views, -1)).unbind(0)           # M x (B, C, H, W)
        return torch.cat([batch_norm(block) for block in blocks])      # (M*B, C, H, W)


class ViewBatchNorm2d(PerViewStatistics, nn.BatchNorm2d):
    """BatchNorm2d with per-view statistics (PerViewStatistics), the trunk's BatchNorm.

    `num_batches_tracked` grows by M per stacked pass, one per block, as over M separate passes
    (it only matters with momentum=None, the cumulative average, which is then exact as well).
    With one view, or with running statistics (eval mode), this is plain BatchNorm2d; the state
    dict is BatchNorm2d's, so checkpoints load into either class.
    """


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


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
