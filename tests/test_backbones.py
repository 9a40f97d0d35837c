"""The paper's architectures (Sec. 4.2, docs/spec.md Sec. 5): parameter counts by hand and against
torchvision, as multi-peer networks."""
import pytest
import torchvision

from backbones import ARCHS
from models import count_parameters, multi_peer_net

# resnet32 for 100 classes, counted by hand (convs have no bias; a BatchNorm has 2 per channel):
# stem 432 + 32; stage 1 (16->16, 5 blocks) 5 * (2 * 2304 + 64) = 23360;
# stage 2 (16->32) 4608 + 9216 + 128 + 512 + 64 + 4 * (2 * 9216 + 128) = 88768;
# stage 3 (32->64) 18432 + 36864 + 256 + 2048 + 128 + 4 * (2 * 36864 + 256) = 353664; fc 6500.
RESNET32_TRUNK = 432 + 32 + 23360 + 88768
RESNET32_BRANCH = 353664 + 6500


def test_resnet32_parameter_counts_by_hand():
    spec = ARCHS["resnet32"]()
    assert count_parameters(spec.trunk()) == RESNET32_TRUNK
    branch = count_parameters(spec.branch_body()) + count_parameters(spec.classifier(spec.feature_dim, 100))
    assert branch == RESNET32_BRANCH
    single = multi_peer_net("resnet32", 100, 1, ensemble_head=False)
    assert count_parameters(single) == RESNET32_TRUNK + RESNET32_BRANCH
    three = multi_peer_net("resnet32", 100, 3)
    head = 3 * 64 * 100 + 100
    assert count_parameters(three) == RESNET32_TRUNK + 3 * RESNET32_BRANCH + head
    assert round((RESNET32_TRUNK + RESNET32_BRANCH) / 1e6, 3) == 0.473
    assert round((RESNET32_TRUNK + 3 * RESNET32_BRANCH) / 1e6, 2) == 1.19


@pytest.mark.parametrize("arch,reference", [("resnet18", torchvision.models.resnet18),
                                            ("resnet34", torchvision.models.resnet34)])
def test_tiny_resnets_match_torchvision_counts(arch, reference):
    single = multi_peer_net(arch, 200, 1, ensemble_head=False)
    assert count_parameters(single) == count_parameters(reference(num_classes=200))
