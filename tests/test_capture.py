"""FeatureCapture: clear errors for bad names and unfired hooks; no silent in-place corruption."""
import pytest
import torch
from torch import nn

from detkd import FeatureCapture


class Net(nn.Module):
    def __init__(self, inplace_after=False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1))
        self.head = nn.Conv2d(4, 2, 1)
        self.unused = nn.Conv2d(4, 2, 1)
        self.inplace_after = inplace_after

    def forward(self, x):
        y = self.body(x)
        out = self.head(y)
        if self.inplace_after:
            y.relu_()  # a later in-place op on a captured tensor
        return out


def test_records_nested_names():
    net = Net()
    cap = FeatureCapture(net, ["body.1", "head"])
    x = torch.randn(1, 3, 4, 4)
    with cap:
        out = net(x)
    assert torch.equal(cap["head"], out)
    assert torch.allclose(cap["body.1"], net.body(x))
    assert not net.head._forward_hooks  # hooks removed on exit


def test_typo_lists_valid_names():
    with pytest.raises(KeyError, match=r"\['hed'\] not found in Net.*'body', 'body.0'.*'head'"):
        FeatureCapture(Net(), ["hed"])


def test_hook_not_fired_is_an_error():
    net = Net()
    cap = FeatureCapture(net, ["head", "unused"])
    with cap:
        net(torch.randn(1, 3, 4, 4))
    with pytest.raises(KeyError, match="'unused' did not fire"):
        cap.as_dict()


def test_inplace_change_detected_or_avoided_by_clone():
    x = torch.randn(1, 3, 4, 4)
    net = Net(inplace_after=True)
    cap = FeatureCapture(net, ["body"])
    with cap:
        net(x)
    with pytest.raises(RuntimeError, match="modified in place.*clone=True"):
        cap["body"]
    cap = FeatureCapture(net, ["body"], clone=True)
    with cap:
        net(x)
    expected = net.body(x)  # before relu_
    assert torch.allclose(cap["body"], expected)
    assert (expected < 0).any()


def test_taps_recorded_under_inference_mode_are_readable():
    """Tensors made under torch.inference_mode have no version counter: reading a tap recorded
    there (a model's training-mode losses computed for validation under inference_mode) must
    not fail; taps of normal tensors are still checked."""
    net = Net()
    cap = FeatureCapture(net, ["body", "head"])
    x = torch.randn(1, 3, 4, 4)
    with torch.inference_mode(), cap:
        out = net(x)
    assert cap["head"].is_inference() and torch.equal(cap["head"], out)
    assert torch.equal(cap.as_dict()["body"], net.body(x))
