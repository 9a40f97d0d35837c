"""Multi-peer networks (docs/spec.md Sec. 5): shapes, parameter counts, stacked trunk, deployable model,
a network of one's own wrapped, per-view BatchNorm of the stacked trunk (docs/spec.md Sec. 8)."""
import copy
import io

import pytest
import torch
import torchvision
from torch import nn

from backbones import ARCHS
from models import (MultiPeerNet, ViewBatchNorm2d, build_deployable, count_parameters,
                    multi_peer_net)

def test_independent_networks_are_m_plain_networks():
    single = count_parameters(multi_peer_net("resnet20", 10, 1, ensemble_head=False))
    independent = multi_peer_net("resnet20", 10, 3, ensemble_head=False, shared_trunk=False)
    assert count_parameters(independent) == 3 * single


def test_branches_are_built_fresh():
    net = multi_peer_net("densenet40_12", 10, 3)
    w = [next(q for q in p.parameters() if q.dim() == 4) for p in net.peers]  # first conv
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    assert w[0].data_ptr() != w[1].data_ptr()  # DenseNet branches each own their block 3


@pytest.mark.parametrize("arch", list(ARCHS))
def test_shapes_stacked_trunk_and_deployable(arch):
    torch.manual_seed(0)
    size = ARCHS[arch]().input_size
    net = multi_peer_net(arch, 7, 3).eval()
    views = torch.randn(3, 2, 3, size, size)                  # (M, B, 3, H, W)
    with torch.no_grad():
        out = net(views)
        assert out.logits.shape == (3, 2, 7) and out.ensemble.shape == (2, 7)
        assert out.feats.shape[:2] == (3, 2)
        # Stacked trunk == each view through the trunk on its own (eval-mode BatchNorm).
        for i in range(3):
            one = net(views[i]).logits[i]                      # same image to every peer
            assert torch.allclose(out.logits[i], one, atol=1e-4, rtol=1e-4)
        # The deployable cut-down == branch i inside the full network.
        deployed = net.deployable(1).eval()
        assert torch.allclose(deployed(views[1]), out.logits[1], atol=1e-4, rtol=1e-4)
    assert count_parameters(deployed) == count_parameters(multi_peer_net(arch, 7, 1, ensemble_head=False))


def test_deployable_state_dict_round_trip():
    net = multi_peer_net("resnet8", 10, 3).eval()
    buffer = io.BytesIO()
    torch.save(net.deployable(2).state_dict(), buffer)
    buffer.seek(0)
    rebuilt = build_deployable("resnet8", 10)
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x), net(x).logits[2], atol=1e-5)


def test_ensemble_head_stacks_features_peer_after_peer():
    net = multi_peer_net("resnet8", 5, 3).eval()
    with torch.no_grad():
        out = net(torch.randn(3, 2, 3, 32, 32))
        by_hand = torch.cat([out.feats[0], out.feats[1], out.feats[2]], 1) @ net.ensemble_head.weight.T
        assert torch.allclose(out.ensemble, by_hand + net.ensemble_head.bias, atol=1e-5)


def test_unknown_arch_rejected():
    with pytest.raises(ValueError, match="unknown architecture"):
        multi_peer_net("resnet1000", 10)



def test_wraps_a_network_of_ones_own():
    # torchvision's resnet18 cut before its last stage: each branch a fresh copy of layer4 + pooling.
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    trunk = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                          resnet.layer1, resnet.layer2, resnet.layer3)

    def branch() -> nn.Module:
        return nn.Sequential(copy.deepcopy(resnet.layer4), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    net = MultiPeerNet(trunk, branch, feature_dim=512, num_classes=10).eval()
    views = torch.randn(3, 4, 3, 32, 32)                      # (M, B, 3, H, W)
    images = torch.randn(4, 3, 32, 32)                        # (B, 3, H, W)
    with torch.no_grad():
        out = net(views)
        assert out.logits.shape == (3, 4, 10) and out.ensemble.shape == (4, 10)
        deployed = net.deployable(0).eval()(images)           # (B, C)
        # By hand, with torchvision's own modules: stem, stages 1-3, layer4, mean pool, peer 0's fc.
        stem = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(images))))
        feat = resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(stem)))).mean((2, 3))  # (B, 512)
        fc = net.peers[0].classifier
        expected = feat @ fc.weight.T + fc.bias                # (B, C)
        other_peer = net.peers[1].classifier(feat)
    assert torch.allclose(deployed, expected, atol=1e-5)
    assert not torch.allclose(deployed, other_peer, atol=1e-2)  # peer 0's classifier, not another's

# ------------------------------------------------------------------ per-view BatchNorm (docs/spec.md Sec. 8)
# The reference is what the authors' code does: the trunk run once per view, with torch's own
# nn.BatchNorm2d (a per_view_bn=False copy holding the same state), view after view.
def per_view_and_reference(arch: str, channels_last: bool = False) -> tuple[MultiPeerNet, MultiPeerNet]:
    """A per-view network with random BatchNorm affine parameters and running statistics (so that
    eval mode and the momentum updates have something to get wrong) and a plain-BN copy."""
    torch.manual_seed(0)
    net = multi_peer_net(arch, 10, 3)
    with torch.no_grad():
        for bn in net.trunk.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_()
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
    reference = multi_peer_net(arch, 10, 3, per_view_bn=False)
    reference.load_state_dict(net.state_dict())
    if channels_last:
        net.to(memory_format=torch.channels_last)
        reference.to(memory_format=torch.channels_last)
    return net, reference


def distinct_views(channels_last: bool = False) -> torch.Tensor:
    """(M, B, 3, H, W) = (3, 4, 3, 32, 32), every view with its own mean and scale, so that
    per-view and pooled statistics differ; channels_last as data.py hands them over."""
    views = torch.randn(3, 4, 3, 32, 32) * torch.tensor([1.0, 2.0, 0.5]).view(3, 1, 1, 1, 1)
    views = views + torch.tensor([0.0, 1.0, -1.0]).view(3, 1, 1, 1, 1)
    if channels_last:
        return views.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (3, 4))
    return views


def assert_grads_close(net: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Same gradients up to fp32 summation order (one conv over M*B images vs M over B: ~3e-6
    relative to the largest entry)."""
    for (name, p), (_, q) in zip(net.named_parameters(), reference.named_parameters(), strict=True):
        scale = q.grad.abs().max()
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-4 * scale), name


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("arch", ["resnet8", "densenet40_12"])
def test_stacked_per_view_trunk_equals_one_pass_per_view(arch, train, channels_last):
    net, reference = per_view_and_reference(arch, channels_last)
    net.train(train)
    reference.train(train)
    for _ in range(2):  # two steps: the running statistics go on from where the first left them
        views = distinct_views(channels_last)
        out = net.run_trunk(views)                                              # (M, B, ...)
        expected = torch.stack([reference.trunk(views[i]) for i in range(3)])   # (M, B, ...)
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)  # bitwise equal on this CPU
        assert out.flatten(0, 1).is_contiguous(memory_format=torch.channels_last) == channels_last
        weights = torch.randn_like(expected)  # a random linear function of the outputs
        (out * weights).sum().backward()
        (expected * weights).sum().backward()
        assert_grads_close(net.trunk, reference.trunk)
        net.zero_grad()
        reference.zero_grad()
        # running_mean / running_var after M sequential momentum updates, num_batches_tracked + M
        for (name, a), (_, b) in zip(net.trunk.state_dict().items(), reference.trunk.state_dict().items(),
                                     strict=True):
            assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7), name
    if train:  # the test can tell: one stacked pass of plain BatchNorm pools the M*B images
        assert not torch.allclose(reference.run_trunk(views), expected, atol=1e-2)
        first = next(m for m in net.trunk.modules() if isinstance(m, ViewBatchNorm2d))
        assert first.num_batches_tracked == 6  # M per step, as over M separate passes


def test_one_view_for_every_peer_is_ordinary_batchnorm_in_train_mode():
    # ONE, CL, OKDDip, the baseline and evaluation feed a (B, 3, H, W) batch to every peer.
    net, reference = per_view_and_reference("resnet8")
    images = distinct_views()[1]                                   # (B, 3, H, W)
    out = net.run_trunk(images)                                    # (1, B, ...)
    expected = reference.trunk(images)
    assert torch.allclose(out[0], expected, rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(net.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7), name


def test_view_batchnorm_layer_keeps_channels_last_and_counts_batches():
    # momentum=None is the cumulative average, whose factor 1/num_batches_tracked is exact only
    # if the counter moves once per view, as over M separate passes.
    layer, plain = ViewBatchNorm2d(8, momentum=None), torch.nn.BatchNorm2d(8, momentum=None)
    layer.views = 3
    x = (torch.randn(12, 8, 5, 5) * 3 + 1).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        out = layer(x)
        expected = torch.cat([plain(block) for block in x.split(4)])
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert layer.num_batches_tracked == plain.num_batches_tracked == 6
    assert torch.allclose(layer.running_mean, plain.running_mean)
    assert torch.allclose(layer.running_var, plain.running_var)
    assert torch.allclose(layer.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-5)  # the running statistics


def test_per_view_trunk_under_compile_and_autocast():
    net, reference = per_view_and_reference("resnet8")
    views = distinct_views()
    expected = torch.stack([reference.trunk(views[i]) for i in range(3)])
    compiled = torch.compile(net.run_trunk, backend="aot_eager", fullgraph=True)  # no graph break
    out = compiled(views)
    out.sum().backward()
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert all(bn.views == 1 for bn in net.trunk.modules() if isinstance(bn, ViewBatchNorm2d))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net.run_trunk(views)
        expected = torch.stack([reference.trunk(views[i]) for i in range(3)])
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_per_view_option_keeps_state_dict_and_deployable():
    net, reference = per_view_and_reference("resnet8")
    assert list(net.state_dict()) == list(reference.state_dict())
    assert count_parameters(net) == count_parameters(reference)
    # every BatchNorm of the shared trunk (stem 1, stage 1: 2, stage 2: 2 + projection 1), none elsewhere
    trunk_bns = [type(m) for m in net.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert trunk_bns == [ViewBatchNorm2d] * 6
    assert not any(isinstance(m, ViewBatchNorm2d) for m in net.peers.modules())
    independent = multi_peer_net("resnet8", 10, 3, shared_trunk=False)
    assert not any(isinstance(m, ViewBatchNorm2d) for m in independent.modules())
    net(distinct_views())  # a stacked train-mode pass, then the deployed copy on single images
    deployed, expected = net.deployable(0), reference.deployable(0)
    expected.load_state_dict(deployed.state_dict())
    images = torch.randn(4, 3, 32, 32)
    assert torch.allclose(deployed.train()(images), expected.train()(images), rtol=1e-5, atol=1e-5)
    build_deployable("resnet8", 10).load_state_dict(deployed.state_dict())  # strict: the same keys
