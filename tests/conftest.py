import pytest
import torch

# Arguments for registered backbones that cannot be built without any; every other backbone is built bare.
BACKBONE_ARGS = {"timm": {"model": "efficientvit_b0"}}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_bn(model: torch.nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics, so that folding it is a real test."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
