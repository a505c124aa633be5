"""detkd.modeling.resnet: narrow ResNet-10/18/34 stages from detectron2's blocks."""

import torch
from detectron2.modeling.backbone.resnet import BasicStem, ResNet

from detkd.modeling.resnet import basic_resnet_stages

import pytest


def _layout(stages):
    return [
        [(b.in_channels, b.out_channels, b.stride, type(b.conv1.norm).__name__) for b in s]
        for s in stages
    ]


def _shapes(stages):
    modules = torch.nn.ModuleList(torch.nn.ModuleList(s) for s in stages)
    return {k: tuple(v.shape) for k, v in modules.state_dict().items()}


@pytest.mark.parametrize("depth", [18, 34])
def test_width_64_is_detectron2s_default_stages(depth):
    """The docstring's promise: width=64 gives ResNet.make_default_stages' ResNet-18/34, block
    by block (channels, strides, norm) and weight by weight (so its checkpoints load)."""
    ours = basic_resnet_stages(depth, 64, "FrozenBN")
    ref = ResNet.make_default_stages(depth, norm="FrozenBN")
    assert _layout(ours) == _layout(ref)
    assert _shapes(ours) == _shapes(ref)


def test_channels_double_per_stage_at_strides_4_to_32():
    """res2..res5 have width x 1, 2, 4, 8 channels at strides 4, 8, 16, 32 (ResNet-10: one
    block per stage)."""
    stages = basic_resnet_stages(10, 16, "BN")
    assert [len(s) for s in stages] == [1, 1, 1, 1]
    net = ResNet(BasicStem(3, 16, norm="BN"), stages, out_features=["res2", "res3", "res4", "res5"])
    assert {k: (v.channels, v.stride) for k, v in net.output_shape().items()} == {
        "res2": (16, 4),
        "res3": (32, 8),
        "res4": (64, 16),
        "res5": (128, 32),
    }
    out = net.eval()(torch.zeros(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (1, 16, 16, 24),
        "res3": (1, 32, 8, 12),
        "res4": (1, 64, 4, 6),
        "res5": (1, 128, 2, 3),
    }
    with pytest.raises(ValueError, match=r"supports depth \[10, 18, 34\], got 50"):
        basic_resnet_stages(50, 16)
