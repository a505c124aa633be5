"""FeatureCapture: clear errors for bad names and unfired hooks; no silent in-place corruption."""

import torch
from torch import nn

from detkd import FeatureCapture

import pytest


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


class _Structured(nn.Module):
    """A module whose output nests tensors in a dict and a tuple, changed in place afterwards."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        return {"a": y, "b": (y * 2, [y + 1])}


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Structured()

    def forward(self, x, skip=False):
        if skip:
            return x
        out = self.inner(x)
        out["a"].zero_()
        out["b"][0].zero_()
        out["b"][1][0].zero_()
        return out


def test_clone_copies_tensors_nested_in_dicts_tuples_and_lists_and_keeps_their_gradient():
    """clone=True stores copies of every tensor of a nested output (an in-place change of the
    model's own output afterwards is then harmless), and the copies stay in the autograd graph:
    a loss on them reaches the module's parameters."""
    net = _Outer()
    x = torch.randn(1, 3, 2, 2)
    y = net.inner.conv(x).detach()
    cap = FeatureCapture(net, ["inner"], clone=True)
    with cap:
        net(x)
    tap = cap["inner"]
    assert torch.equal(tap["a"], y) and torch.equal(tap["b"][0], 2 * y)
    assert torch.equal(tap["b"][1][0], y + 1)
    assert isinstance(tap["b"], tuple) and isinstance(tap["b"][1], list)
    # d/dbias of sum(a + b0 + b1[0]) = (1 + 2 + 1) * H * W per output channel
    loss = tap["a"].sum() + tap["b"][0].sum() + tap["b"][1][0].sum()
    (grad,) = torch.autograd.grad(loss, net.inner.conv.bias)
    assert torch.equal(grad, torch.full((2,), 16.0))


def test_each_forward_starts_from_no_taps_and_unrequested_names_are_named():
    """Entering the context forgets the previous forward's taps: a module that did not run in
    this forward is an error, not the last forward's output. A name that was never requested
    is reported as such."""
    net = _Outer()
    cap = FeatureCapture(net, ["inner"], clone=True)
    with cap:
        net(torch.randn(1, 3, 2, 2))
    assert "inner" in cap
    with cap:
        net(torch.randn(1, 3, 2, 2), skip=True)
    assert "inner" not in cap
    with pytest.raises(KeyError, match="'inner' did not fire"):
        cap["inner"]
    with pytest.raises(KeyError, match="'inner.conv' is not a recorded tap; taps: \\['inner'\\]"):
        cap["inner.conv"]


class _LateInplace(nn.Module):
    """Changes in place only the last tensor of its nested output, after returning it."""

    def __init__(self):
        super().__init__()
        self.inner = _Structured()

    def forward(self, x):
        out = self.inner(x)
        out["b"][1][0].zero_()
        return out


def test_inplace_change_of_any_nested_tensor_is_detected():
    """Every tensor of a nested output is checked, not only the first one."""
    net = _LateInplace()
    cap = FeatureCapture(net, ["inner"])
    with cap:
        net(torch.randn(1, 3, 2, 2))
    with pytest.raises(RuntimeError, match="'inner' was modified in place"):
        cap["inner"]


def test_exceptions_in_the_context_propagate_and_hooks_are_removed():
    net = Net()
    cap = FeatureCapture(net, ["head"])
    with pytest.raises(ZeroDivisionError):
        with cap:
            net(torch.randn(1, 3, 4, 4))
            1 / 0
    assert not net.head._forward_hooks


def test_clone_keeps_the_dict_type_of_an_output():
    from collections import OrderedDict

    class _Ordered(nn.Module):
        def forward(self, x):
            return OrderedDict(b=x + 1, a=x * 2)

    net = nn.Sequential(_Ordered())
    cap = FeatureCapture(net, ["0"], clone=True)
    x = torch.randn(1, 2)
    with cap:
        net(x)
    assert type(cap["0"]) is OrderedDict and list(cap["0"]) == ["b", "a"]
    assert torch.equal(cap["0"]["a"], x * 2)


@pytest.mark.parametrize("clone", [False, True])
def test_namedtuple_and_defaultdict_outputs_are_recorded_and_checked(clone):
    """A submodule returning a namedtuple or a defaultdict (a detector of one's own): rebuilding
    them as ``type(obj)(generator)`` raised TypeError in the hook, also without clone (the
    version check walked the output the same way). Their types, fields and factory are kept,
    and an in-place change of a tensor inside is still detected."""
    from collections import defaultdict, namedtuple

    Pred = namedtuple("Pred", ["logits", "boxes"])

    class _Outputs(nn.Module):
        def forward(self, x):
            maps = defaultdict(list, p3=x * 2)
            return Pred(logits=x + 1, boxes=[x * 3]), maps

    net = nn.Sequential(_Outputs())
    cap = FeatureCapture(net, ["0"], clone=clone)
    x = torch.randn(1, 2)
    with cap:
        pred, maps = net(x)
    got_pred, got_maps = cap["0"]
    assert (
        type(got_pred) is Pred
        and torch.equal(got_pred.logits, x + 1)
        and torch.equal(got_pred.boxes[0], x * 3)
    )
    assert (
        type(got_maps) is defaultdict
        and got_maps.default_factory is list
        and torch.equal(got_maps["p3"], x * 2)
    )
    assert (got_pred.logits is pred.logits) != clone
    pred.logits.add_(1)  # after the forward, on the model's own output
    if clone:
        assert torch.equal(cap["0"][0].logits, x + 1)
    else:
        with pytest.raises(RuntimeError, match="in place"):
            cap["0"]


def test_a_failed_forward_leaves_no_taps_and_no_graph():
    """A forward that raises inside the context keeps none of its taps: they would hold the
    failed step's autograd graph alive into the next step."""
    net = Net()
    cap = FeatureCapture(net, ["body"])
    with pytest.raises(ZeroDivisionError):
        with cap:
            net(torch.randn(1, 3, 4, 4, requires_grad=True))
            1 / 0
    assert "body" not in cap


def test_a_tap_called_twice_in_one_forward_is_an_error():
    """A weight-shared submodule applied twice (e.g. per level) would keep only its last call."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.shared(x), self.shared(x[..., :2, :2])

    net = Twice()
    cap = FeatureCapture(net, ["shared"])
    with pytest.raises(RuntimeError, match=r"'shared' \(Conv2d\) was called more than once"):
        with cap:
            net(torch.randn(1, 3, 4, 4))
    assert not net.shared._forward_hooks and "shared" not in cap
    with cap:  # one call per forward, forward after forward: fine
        net.shared(torch.randn(1, 3, 4, 4))
    with cap:
        y = net.shared(torch.randn(1, 3, 4, 4))
    assert torch.equal(cap["shared"], y)


def test_an_entry_of_an_output_dict_replaced_later_does_not_reach_the_tap():
    class Feats(nn.Module):
        def forward(self, x):
            return {"p3": x * 2, "p4": x * 3}

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Feats()

        def forward(self, x):
            f = self.backbone(x)
            f["p3"] = f["p3"] * 0  # out of place: no version counter changes
            f["p9"] = x
            return f

    x = torch.randn(1, 2)
    for clone in (False, True):
        model = Model()
        cap = FeatureCapture(model, ["backbone"], clone=clone)
        with cap:
            model(x)
        assert sorted(cap["backbone"]) == ["p3", "p4"] and torch.equal(cap["backbone"]["p3"], x * 2)


@pytest.mark.parametrize("clone", [False, True])
def test_boxes_and_instances_are_copied_or_checked(clone):
    """An anchor generator's list[Boxes] (GID taps one) and Instances are recorded as new
    structures: ``Boxes.clip`` on the model's own (it replaces ``.tensor``) does not reach the
    tap; ``clone`` copies their tensors, and without it an in-place change of a tensor inside is
    an error when the tap is read."""
    from detectron2.structures import Boxes, Instances

    class Anchors(nn.Module):
        def forward(self, x):
            inst = Instances(
                (8, 8), pred_boxes=Boxes(torch.tensor([[-1.0, -1.0, 9.0, 9.0]])), scores=x[:1]
            )
            return [Boxes(torch.tensor([[-10.0, -10.0, 50.0, 50.0]]))], inst

    net = nn.Sequential(Anchors())
    cap = FeatureCapture(net, ["0"], clone=clone)
    with cap:
        anchors, inst = net(torch.ones(2))
    got_anchors, got_inst = cap["0"]
    assert (
        type(got_anchors[0]) is Boxes
        and type(got_inst) is Instances
        and got_inst.image_size == (8, 8)
    )
    assert (got_anchors[0].tensor is anchors[0].tensor) != clone
    anchors[0].clip((32, 32))
    inst.pred_boxes.clip((8, 8))
    got_anchors, got_inst = cap["0"]
    assert torch.equal(got_anchors[0].tensor, torch.tensor([[-10.0, -10.0, 50.0, 50.0]]))
    assert torch.equal(got_inst.pred_boxes.tensor, torch.tensor([[-1.0, -1.0, 9.0, 9.0]]))
    assert torch.equal(got_inst.scores, torch.ones(1))

    for change in (lambda a, i: a[0].tensor.add_(1), lambda a, i: i.pred_boxes.tensor.mul_(2)):
        cap = FeatureCapture(net, ["0"], clone=clone)
        with cap:
            anchors, inst = net(torch.ones(2))
        change(anchors, inst)
        if clone:
            assert torch.equal(cap["0"][0][0].tensor, torch.tensor([[-10.0, -10.0, 50.0, 50.0]]))
            assert torch.equal(
                cap["0"][1].pred_boxes.tensor, torch.tensor([[-1.0, -1.0, 9.0, 9.0]])
            )
        else:
            with pytest.raises(RuntimeError, match="modified in place"):
                cap["0"]
