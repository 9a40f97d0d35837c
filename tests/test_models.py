"""Multi-peer networks (SPEC.md Sec. 5): shapes, parameter counts, stacked trunk, deployable model."""
import io

import pytest
import torch
import torchvision

from models import ARCHS, MultiPeerNet, build_deployable, count_parameters

# resnet32 for 100 classes, counted by hand (convs have no bias; a BatchNorm has 2 per channel):
# stem 432 + 32; stage 1 (16->16, 5 blocks) 5 * (2 * 2304 + 64) = 23360;
# stage 2 (16->32) 4608 + 9216 + 128 + 512 + 64 + 4 * (2 * 9216 + 128) = 88768;
# stage 3 (32->64) 18432 + 36864 + 256 + 2048 + 128 + 4 * (2 * 36864 + 256) = 353664; fc 6500.
RESNET32_TRUNK = 432 + 32 + 23360 + 88768
RESNET32_BRANCH = 353664 + 6500


def test_resnet32_parameter_counts_by_hand():
    single = MultiPeerNet("resnet32", 100, 1, ensemble_head=False)
    assert count_parameters(single) == RESNET32_TRUNK + RESNET32_BRANCH
    three = MultiPeerNet("resnet32", 100, 3)
    head = 3 * 64 * 100 + 100
    assert count_parameters(three) == RESNET32_TRUNK + 3 * RESNET32_BRANCH + head
    assert round((RESNET32_TRUNK + RESNET32_BRANCH) / 1e6, 3) == 0.473
    assert round((RESNET32_TRUNK + 3 * RESNET32_BRANCH) / 1e6, 2) == 1.19


@pytest.mark.parametrize("arch,reference", [("resnet18", torchvision.models.resnet18),
                                            ("resnet34", torchvision.models.resnet34)])
def test_tiny_resnets_match_torchvision_counts(arch, reference):
    single = MultiPeerNet(arch, 200, 1, ensemble_head=False)
    assert count_parameters(single) == count_parameters(reference(num_classes=200))


def test_independent_networks_are_m_plain_networks():
    single = count_parameters(MultiPeerNet("resnet20", 10, 1, ensemble_head=False))
    independent = MultiPeerNet("resnet20", 10, 3, ensemble_head=False, shared_trunk=False)
    assert count_parameters(independent) == 3 * single


def test_branches_are_built_fresh():
    net = MultiPeerNet("densenet40_12", 10, 3)
    w = [next(q for q in p.parameters() if q.dim() == 4) for p in net.peers]  # first conv
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    assert w[0].data_ptr() != w[1].data_ptr()  # DenseNet branches each own their block 3


@pytest.mark.parametrize("arch", list(ARCHS))
def test_shapes_stacked_trunk_and_deployable(arch):
    torch.manual_seed(0)
    size = ARCHS[arch]().input_size
    net = MultiPeerNet(arch, 7, 3).eval()
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
    assert count_parameters(deployed) == count_parameters(MultiPeerNet(arch, 7, 1, ensemble_head=False))


def test_deployable_state_dict_round_trip():
    net = MultiPeerNet("resnet8", 10, 3).eval()
    buffer = io.BytesIO()
    torch.save(net.deployable(2).state_dict(), buffer)
    buffer.seek(0)
    rebuilt = build_deployable("resnet8", 10)
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x), net(x).logits[2], atol=1e-5)


def test_ensemble_head_stacks_features_peer_after_peer():
    net = MultiPeerNet("resnet8", 5, 3).eval()
    with torch.no_grad():
        out = net(torch.randn(3, 2, 3, 32, 32))
        by_hand = torch.cat([out.feats[0], out.feats[1], out.feats[2]], 1) @ net.ensemble_head.weight.T
        assert torch.allclose(out.ensemble, by_hand + net.ensemble_head.bias, atol=1e-5)


def test_unknown_arch_rejected():
    with pytest.raises(ValueError, match="unknown architecture"):
        MultiPeerNet("resnet1000", 10)
