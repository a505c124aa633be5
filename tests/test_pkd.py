"""PKD loss values against independent formulas, and level pairing of the distiller."""

import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec

from detkd.losses import PKDDistiller, pair_fpn_levels, pkd_level_loss, pkd_loss

import pytest
from conftest import BackboneOnlyDetector


def _one_minus_pearson(s, t):
    """mean over channels of (1 - r_c), r_c from numpy's corrcoef over all N*H*W values."""
    C = s.shape[1]
    s = s.transpose(0, 1).reshape(C, -1).double().numpy()
    t = t.transpose(0, 1).reshape(C, -1).double().numpy()
    r = [np.corrcoef(s[c], t[c])[0, 1] for c in range(C)]
    return float(np.mean(1 - np.array(r))), s.shape[1]


def test_pkd_equals_one_minus_pearson():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 6, 7, generator=g)
    s = 0.5 * t + torch.randn(2, 5, 6, 7, generator=g)  # partly correlated
    expected, M = _one_minus_pearson(s, t)
    got = pkd_level_loss(s, t).item()
    # L = (M-1)/M * mean_c(1 - r_c) exactly, up to the 1e-6 added to the std.
    assert got == pytest.approx((M - 1) / M * expected, rel=1e-4)
    assert 0.3 < got < 1.5


@pytest.mark.parametrize("dtype, r", [(torch.float16, 0.99), (torch.bfloat16, 0.999)])
def test_pkd_of_half_precision_maps_is_computed_in_float32(dtype, r):
    """Maps in fp16 / bf16 are upcast before the per-channel sums: in fp16 a channel's sum of
    squares over 2 * 64 * 64 values of std 4 (~1.3e5) overflowed to inf and the loss was NaN; in
    bf16 the closed form's difference of nearly equal terms was off by about 2x at r = 0.999."""
    g = torch.Generator().manual_seed(0)
    t = 4 * torch.randn(2, 3, 64, 64, generator=g)
    s = r * t + 4 * (1 - r * r) ** 0.5 * torch.randn(2, 3, 64, 64, generator=g)
    s, t = s.to(dtype).requires_grad_(), t.to(dtype)
    expected, M = _one_minus_pearson(s.detach().float(), t.float())  # of the half-precision values
    got = pkd_level_loss(s, t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx((M - 1) / M * expected, rel=1e-3)
    (grad,) = torch.autograd.grad(got, [s])
    assert grad.dtype == dtype and torch.isfinite(grad.float()).all()


def test_pkd_identical_and_anticorrelated():
    t = torch.randn(3, 4, 5, 5)
    assert pkd_level_loss(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
    M = 3 * 5 * 5
    # r = -1 on every channel: loss = (M-1)/M * 2
    assert pkd_level_loss(-t, t).item() == pytest.approx(2 * (M - 1) / M, rel=1e-4)


def test_pkd_level_with_one_value_per_channel_is_zero_not_nan():
    """Batch 1 and a 1x1 map (p7 of a small image): each channel's one value is its mean, so
    both standardised maps are 0 (a constant channel), the loss 0 and its gradient 0; the
    unbiased std alone would be 0 / 0 = NaN and stop training. The map next to it still counts."""
    s = torch.randn(1, 4, 1, 1, requires_grad=True)
    t = torch.randn(1, 4, 1, 1)
    loss = pkd_level_loss(s, t)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    big_s, big_t = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    total = pkd_loss([big_s, s.detach()], [big_t, t])
    assert total.item() == pytest.approx(pkd_level_loss(big_s, big_t).item(), rel=1e-6)


@pytest.mark.parametrize("value", [0.1, 3.7, 123.456])
def test_pkd_of_constant_float32_maps_equals_the_hand_computation(value):
    """A constant channel (e.g. an image of one colour) standardises to zeros: a constant
    student against any teacher gives (M-1)/(2M) (the teacher's standardised map, mean square
    (M-1)/M, halved), two constant maps 0 with gradient 0, and the gradient is the float64
    definition's. In float32, centring left a rounding residue that 1 / (std + 1e-6) scaled up:
    0.506 instead of 0.4875 at 3.7, 0.074 instead of 0 for two constant maps (the definition
    itself: 29.6 at 123.456)."""
    from detkd.losses.pkd import _standardize_channels

    g = torch.Generator().manual_seed(0)
    N, C, H, W = 2, 3, 4, 5
    M = N * H * W
    t = torch.randn(N, C, H, W, generator=g)
    const = torch.full((N, C, H, W), value)
    std_t = t.double().transpose(0, 1).reshape(C, -1).std(dim=1)
    expected = float(((M - 1) / (2 * M) * (std_t / (std_t + 1e-6)) ** 2).mean())

    def definition(a, b):
        return F.mse_loss(_standardize_channels(a), _standardize_channels(b)) / 2

    for loss in (pkd_level_loss, definition):
        s = const.clone().requires_grad_()
        got = loss(s, t)
        assert got.item() == pytest.approx(expected, rel=1e-6)
        s64 = const.double().requires_grad_()
        (grad64,) = torch.autograd.grad(definition(s64, t.double()), s64)
        torch.testing.assert_close(
            torch.autograd.grad(got, s)[0], grad64.float(), rtol=1e-4, atol=1e-3
        )
        assert loss(t.clone().requires_grad_(), const).item() == pytest.approx(expected, rel=1e-6)
        s = const.clone().requires_grad_()
        both = loss(s, torch.full_like(const, -2.3))
        assert both.item() == 0.0
        assert torch.equal(torch.autograd.grad(both, s)[0], torch.zeros_like(s))


def test_pkd_invariant_to_per_channel_affine_teacher():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    scale = torch.tensor([0.1, 3.0, 7.0, 0.5]).view(1, 4, 1, 1)
    shift = torch.tensor([5.0, -2.0, 0.3, 100.0]).view(1, 4, 1, 1)
    base = pkd_level_loss(s, t)
    assert pkd_level_loss(s, t * scale + shift).item() == pytest.approx(base.item(), rel=1e-4)
    assert pkd_level_loss(s * scale - shift, t).item() == pytest.approx(base.item(), rel=1e-4)
    # but not to a sign flip of one channel
    flip = torch.tensor([1.0, -1.0, 1.0, 1.0]).view(1, 4, 1, 1)
    assert abs(pkd_level_loss(s, t * flip).item() - base.item()) > 1e-3


def test_pkd_resizes_student_bilinearly_and_sums_levels():
    g = torch.Generator().manual_seed(2)
    s1, t1 = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 8, 10, generator=g)
    s2, t2 = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    up = F.interpolate(s1, size=(8, 10), mode="bilinear", align_corners=False)
    assert pkd_level_loss(s1, t1).item() == pytest.approx(pkd_level_loss(up, t1).item(), rel=1e-6)
    total = pkd_loss([s1, s2], [t1, t2]).item()
    assert total == pytest.approx(
        pkd_level_loss(up, t1).item() + pkd_level_loss(s2, t2).item(), rel=1e-6
    )


def test_pkd_resizes_maps_that_differ_in_width_only():
    # (4, 5) vs (4, 6): the heights agree, so comparing heights alone skipped the resize and
    # broadcast a width-1 map over the other (a wrong value) or failed on a raw shape error
    g = torch.Generator().manual_seed(4)
    t = torch.randn(2, 3, 4, 6, generator=g)
    for w in (5, 1):
        s = torch.randn(2, 3, 4, w, generator=g)
        up = F.interpolate(s, size=(4, 6), mode="bilinear", align_corners=False)
        assert pkd_level_loss(s, t).item() == pytest.approx(pkd_level_loss(up, t).item(), rel=1e-6)
        down = F.interpolate(t, size=(4, w), mode="bilinear", align_corners=False)
        got = pkd_level_loss(s, t, resize_student=False).item()
        assert got == pytest.approx(pkd_level_loss(s, down).item(), rel=1e-6)


def test_pkd_gradient_through_statistics():
    # Gradients flow through the student's mean and std (not detached): check numerically.
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: pkd_level_loss(x, t), (s,))


def _shapes(names, strides, channels):
    return {n: ShapeSpec(channels=channels, stride=s) for n, s in zip(names, strides)}


RCNN = _shapes(["p2", "p3", "p4", "p5", "p6"], [4, 8, 16, 32, 64], 256)
RETINA = _shapes(["p3", "p4", "p5", "p6", "p7"], [8, 16, 32, 64, 128], 256)


def test_level_pairing_by_stride_and_index():
    assert pair_fpn_levels(RETINA, RCNN, num_levels=4) == [
        ("p3", "p3"),
        ("p4", "p4"),
        ("p5", "p5"),
        ("p6", "p6"),
    ]
    assert pair_fpn_levels(RETINA, RCNN, num_levels=4, pair_by="index") == [
        ("p3", "p2"),
        ("p4", "p3"),
        ("p5", "p4"),
        ("p6", "p5"),
    ]
    assert len(pair_fpn_levels(RETINA, RCNN)) == 4  # all shared strides
    # the hint names the count that fits, its override, and pairing by order where that has
    # enough pairs (RetinaNet p3-p7 and R-CNN p2-p6 share 4 strides, by order 5 pairs)
    with pytest.raises(
        ValueError,
        match=r"only 4 pairs exist .* with pair_by='stride': set num_levels=4 \(the override "
        r"model\.distillers\.<name>\.num_levels=4\) or None for every pair "
        r"\(model\.distillers\.<name>\.num_levels=null\), or pair the levels by order "
        r"\(pair_by='index': 5 pairs\)\.$",
    ):
        pair_fpn_levels(RETINA, RCNN, num_levels=5)
    assert len(pair_fpn_levels(RETINA, RCNN, num_levels=5, pair_by="index")) == 5
    with pytest.raises(ValueError, match=r"only 5 pairs .*=null\)\.$"):  # no other pairing
        pair_fpn_levels(RETINA, RCNN, num_levels=6, pair_by="index")
    c5 = _shapes(["res5"], [32], 2048)
    odd = _shapes(["q"], [12], 256)
    with pytest.raises(ValueError, match="share no stride.*pair_by='index'"):
        pair_fpn_levels(odd, c5)
    with pytest.raises(ValueError, match="no feature.*'p9'"):
        pair_fpn_levels(RETINA, RCNN, student_levels=["p9"])
    # a slice bound before: -1 distilled all pairs but the coarsest, 0 none (PKD then failed
    # on a loss of Python float 0.0, ReviewKD on an IndexError)
    for bad in (-1, 0, 2.0, True):
        with pytest.raises(ValueError, match=rf"num_levels must be a positive int .* got {bad!r}"):
            pair_fpn_levels(RETINA, RCNN, num_levels=bad)
    assert len(pair_fpn_levels(RETINA, RCNN, num_levels=1)) == 1


_Det = BackboneOnlyDetector


def test_distiller_adapters_only_where_channels_differ_and_weight():
    student = _Det(_shapes(["p3", "p4", "p5", "p6", "p7"], [8, 16, 32, 64, 128], 64))
    teacher = _Det(RCNN)
    d = PKDDistiller(loss_weight=6.0)
    d.bind(student, teacher)
    assert d.pairs == [("p3", "p3"), ("p4", "p4"), ("p5", "p5"), ("p6", "p6")]
    assert sorted(d.adapters.keys()) == ["p3", "p4", "p5", "p6"]
    assert d.adapters["p3"].in_channels == 64 and d.adapters["p3"].out_channels == 256
    same = PKDDistiller(loss_weight=10.0)
    same.bind(_Det(RETINA), teacher)
    assert len(same.adapters) == 0

    g = torch.Generator().manual_seed(4)
    s_feats = {
        n: torch.randn(2, 256, 64 // sp, 64 // sp, generator=g)
        for n, sp in zip(["p3", "p4", "p5", "p6", "p7"], [8, 8, 8, 8, 8])
    }
    t_feats = {
        n: torch.randn(2, 256, 64 // sp, 64 // sp, generator=g)
        for n, sp in zip(["p2", "p3", "p4", "p5", "p6"], [8, 8, 8, 8, 8])
    }
    out = same({"backbone": s_feats}, {"backbone": t_feats}, ctx=None)
    expected = 10.0 * pkd_loss(
        [s_feats[k] for k in ["p3", "p4", "p5", "p6"]],
        [t_feats[k] for k in ["p3", "p4", "p5", "p6"]],
    )
    assert out["loss_pkd"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_pkd_gradient_matches_finite_differences_and_autograd_on_the_definition():
    """The closed-form backward of the PKD loss against gradcheck and plain autograd."""
    from detkd.losses.pkd import _standardize_channels

    g = torch.Generator().manual_seed(4)
    t = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) * 3 + 1
    s = (0.4 * t + torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: pkd_level_loss(x, t), (s,))
    ref = F.mse_loss(_standardize_channels(s), _standardize_channels(t)) / 2
    got = pkd_level_loss(s, t)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(got, s)[0], torch.autograd.grad(ref, s)[0], rtol=1e-10, atol=1e-14
    )
    # fp32, as in training: same value and gradient as autograd up to float rounding
    s32, t32 = s.detach().float().requires_grad_(), t.float()
    ref32 = F.mse_loss(_standardize_channels(s32), _standardize_channels(t32)) / 2
    got32 = pkd_level_loss(s32, t32)
    assert got32.item() == pytest.approx(ref32.item(), rel=1e-5)
    torch.testing.assert_close(
        torch.autograd.grad(got32, s32)[0], torch.autograd.grad(ref32, s32)[0], rtol=1e-4, atol=1e-7
    )


def test_distiller_defaults_are_alpha_6_on_the_first_4_levels():
    """METHODS.md 1.4-1.5: alpha = 6 by default and the first four level pairs (p6 unused for a
    Faster R-CNN pair); the value against the Pearson formula, level by level."""
    d = PKDDistiller()
    d.bind(_Det(RCNN), _Det(RCNN))
    assert d.pairs == [("p2", "p2"), ("p3", "p3"), ("p4", "p4"), ("p5", "p5")]
    g = torch.Generator().manual_seed(5)
    names = ["p2", "p3", "p4", "p5", "p6"]
    t_feats = {n: torch.randn(2, 256, 3, 4, generator=g) for n in names}
    s_feats = {n: 0.3 * t_feats[n] + torch.randn(2, 256, 3, 4, generator=g) for n in names}
    out = d({"backbone": s_feats}, {"backbone": t_feats}, ctx=None)["loss_pkd"].item()
    expected = 0.0
    for n in names[:4]:
        mean_1_minus_r, M = _one_minus_pearson(s_feats[n], t_feats[n])
        expected += (M - 1) / M * mean_1_minus_r
    assert out == pytest.approx(6.0 * expected, rel=1e-4)


def test_pkd_trainable_teacher_map_gets_the_gradient_of_the_definition():
    """A teacher map that requires grad (e.g. a learnt target) gets the loss's gradient too."""
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = (
        0.5 * s.detach() + torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    ).requires_grad_()
    assert torch.autograd.gradcheck(pkd_level_loss, (s, t))
    (gt,) = torch.autograd.grad(pkd_level_loss(s, t), t)
    assert gt.abs().max() > 1e-3


def test_distiller_level_restrictions_pair_the_given_levels_of_each_side():
    """student_levels / teacher_levels restrict each side to its own list, then pair by index
    (the student's p4, p5 with the teacher's p3, p5)."""
    d = PKDDistiller(
        loss_weight=2.0,
        num_levels=None,
        pair_by="index",
        student_levels=["p4", "p5"],
        teacher_levels=["p3", "p5"],
    )
    d.bind(_Det(RETINA), _Det(RCNN))
    assert d.pairs == [("p4", "p3"), ("p5", "p5")]
    g = torch.Generator().manual_seed(7)
    t_feats = {n: torch.randn(2, 256, 4, 5, generator=g) for n in RCNN}
    s_feats = {n: torch.randn(2, 256, 4, 5, generator=g) for n in RETINA}
    s_feats["p4"] = s_feats["p4"] + 0.8 * t_feats["p3"]  # correlated with its own pair only
    out = d({"backbone": s_feats}, {"backbone": t_feats}, ctx=None)["loss_pkd"].item()
    expected = 0.0
    for s, t in [("p4", "p3"), ("p5", "p5")]:
        mean_1_minus_r, M = _one_minus_pearson(s_feats[s], t_feats[t])
        expected += (M - 1) / M * mean_1_minus_r
    assert out == pytest.approx(2.0 * expected, rel=1e-4)


def test_distiller_resize_student_false_resizes_the_teacher_map():
    """PKDDistiller(resize_student=False): a teacher map of another size is resized (bilinear)
    to the student's, instead of the student's to the teacher's (the default)."""
    g = torch.Generator().manual_seed(8)
    t_feats = {n: torch.randn(2, 256, 8, 10, generator=g) for n in RCNN}
    s_feats = {n: torch.randn(2, 256, 4, 5, generator=g) for n in RETINA}
    t_small = F.interpolate(t_feats["p2"], size=(4, 5), mode="bilinear", align_corners=False)
    s_feats["p3"] = s_feats["p3"] + t_small  # correlated with the downsized teacher map
    for resize_student in (False, True):
        d = PKDDistiller(
            loss_weight=1.0, num_levels=1, pair_by="index", resize_student=resize_student
        )
        d.bind(_Det(RETINA), _Det(RCNN))
        assert d.pairs == [("p3", "p2")]
        out = d({"backbone": s_feats}, {"backbone": t_feats}, ctx=None)["loss_pkd"].item()
        if resize_student:
            s, t = (
                F.interpolate(s_feats["p3"], size=(8, 10), mode="bilinear", align_corners=False),
                t_feats["p2"],
            )
        else:
            s, t = s_feats["p3"], t_small
        mean_1_minus_r, M = _one_minus_pearson(s, t)
        assert out == pytest.approx((M - 1) / M * mean_1_minus_r, rel=1e-4), resize_student


def test_pkd_trainable_teacher_map_gives_the_same_value_as_a_constant_one():
    """The autograd path taken for a teacher map that requires grad computes the same loss,
    (M-1)/M * mean_c (1 - r_c), as the closed-form path of a constant teacher map."""
    g = torch.Generator().manual_seed(9)
    t = torch.randn(2, 3, 4, 5, generator=g)
    s = 0.5 * t + torch.randn(2, 3, 4, 5, generator=g)
    mean_1_minus_r, M = _one_minus_pearson(s, t)
    trainable = pkd_level_loss(s, t.clone().requires_grad_()).item()
    assert trainable == pytest.approx((M - 1) / M * mean_1_minus_r, rel=1e-4)
    assert trainable == pytest.approx(pkd_level_loss(s, t).item(), rel=1e-5)


def test_level_pairing_orders_levels_by_stride_not_by_dict_order():
    """Shapes given coarsest first (a dict in any order) are still paired finest first."""
    s_shapes = _shapes(["p5", "p3", "p4"], [32, 8, 16], 256)
    t_shapes = _shapes(["p4", "p2", "p3"], [16, 4, 8], 256)
    assert pair_fpn_levels(s_shapes, t_shapes, pair_by="index") == [
        ("p3", "p2"),
        ("p4", "p3"),
        ("p5", "p4"),
    ]
    assert pair_fpn_levels(s_shapes, t_shapes, num_levels=1) == [("p3", "p3")]


def test_distiller_logs_each_level_under_the_student_levels_name():
    """Per-level values go to the event storage as pkd/<student level>: with index pairing the
    student's p3 (paired with the teacher's p2) logs as pkd/p3, its value the level's loss."""
    from detectron2.utils.events import EventStorage

    d = PKDDistiller(loss_weight=3.0, num_levels=2, pair_by="index")
    d.bind(_Det(RETINA), _Det(RCNN))
    assert d.pairs == [("p3", "p2"), ("p4", "p3")]
    g = torch.Generator().manual_seed(10)
    t_feats = {n: torch.randn(2, 4, 3, 4, generator=g) for n in RCNN}
    s_feats = {n: torch.randn(2, 4, 3, 4, generator=g) for n in RETINA}
    with EventStorage() as storage:
        out = d({"backbone": s_feats}, {"backbone": t_feats}, ctx=None)["loss_pkd"].item()
        logged = {k: v.latest() for k, v in storage.histories().items()}
    assert sorted(logged) == ["pkd/p3", "pkd/p4"]
    expected = {s: pkd_level_loss(s_feats[s], t_feats[t]).item() for s, t in d.pairs}
    for s in ("p3", "p4"):
        assert logged[f"pkd/{s}"] == pytest.approx(expected[s], rel=1e-6)
    assert out == pytest.approx(3.0 * (expected["p3"] + expected["p4"]), rel=1e-6)


def test_distiller_applies_its_adapter_to_the_student_map():
    """A student level of other channels goes through its 1x1 adapter before the loss: the loss
    equals the level loss of conv1x1(student map) against the teacher map."""
    d = PKDDistiller(loss_weight=1.0, num_levels=1)
    d.bind(_Det(_shapes(["p3"], [8], 3)), _Det(_shapes(["p3"], [8], 5)))
    g = torch.Generator().manual_seed(11)
    s = {"p3": torch.randn(2, 3, 4, 5, generator=g)}
    t = {"p3": torch.randn(2, 5, 4, 5, generator=g)}
    with torch.no_grad():
        d.adapters["p3"].weight.copy_(torch.randn(5, 3, 1, 1, generator=g))
        d.adapters["p3"].bias.copy_(torch.randn(5, generator=g))
        adapted = F.conv2d(s["p3"], d.adapters["p3"].weight, d.adapters["p3"].bias)
        out = d({"backbone": s}, {"backbone": t}, ctx=None)["loss_pkd"].item()
    mean_1_minus_r, M = _one_minus_pearson(adapted, t["p3"])
    assert out == pytest.approx((M - 1) / M * mean_1_minus_r, rel=1e-4)


def test_pkd_of_constant_channels_of_different_values_is_centred_per_channel():
    """Each channel is shifted by its own first value: channels constant at different values
    (0.1, 3.7, 123.456 in float32) standardise to zeros, student side or teacher side, in the
    closed form and in the definition (a shift by one value for all channels left a rounding
    residue that 1 / (std + 1e-6) scaled up)."""
    from detkd.losses.pkd import _standardize_channels

    g = torch.Generator().manual_seed(12)
    N, C, H, W = 2, 3, 4, 5
    M = N * H * W
    const = torch.tensor([0.1, 3.7, 123.456]).view(1, C, 1, 1).expand(N, C, H, W).contiguous()
    assert torch.equal(_standardize_channels(const), torch.zeros(C, M))
    t = torch.randn(N, C, H, W, generator=g)
    std_t = t.double().transpose(0, 1).reshape(C, -1).std(dim=1)
    expected = float(((M - 1) / (2 * M) * (std_t / (std_t + 1e-6)) ** 2).mean())

    def definition(a, b):
        return F.mse_loss(_standardize_channels(a), _standardize_channels(b)) / 2

    other = torch.tensor([-2.3, 55.5, 0.7]).view(1, C, 1, 1).expand(N, C, H, W).contiguous()
    for loss in (pkd_level_loss, definition):
        assert loss(const.clone().requires_grad_(), t).item() == pytest.approx(expected, rel=1e-6)
        assert loss(t.clone().requires_grad_(), const).item() == pytest.approx(expected, rel=1e-6)
        s = const.clone().requires_grad_()
        both = loss(s, other)
        assert both.item() == 0.0
        assert torch.equal(torch.autograd.grad(both, s)[0], torch.zeros_like(s))


def test_pkd_refuses_maps_of_different_batch_or_channels():
    """A student map of another batch size (or channels) is an error, not a broadcast value."""
    t = torch.randn(2, 3, 4, 4)
    for s in (torch.randn(1, 3, 4, 4), torch.randn(2, 4, 4, 4)):
        with pytest.raises(ValueError, match="differ in batch size or channels"):
            pkd_level_loss(s, t)


@pytest.mark.parametrize("bad", ["abc", None, -1, -0.5, float("nan"), float("inf"), True, [6.0]])
def test_loss_weight_must_be_a_finite_non_negative_number(bad):
    """ "abc" failed at the first step (a TypeError from `"abc" * tensor`), None likewise, and -1
    was accepted: it trained the student away from the teacher."""
    with pytest.raises(
        ValueError,
        match=r"PKDDistiller: loss_weight must be a finite number >= 0 "
        rf"\(model\.distillers\.<name>\.loss_weight\), got {re.escape(repr(bad))}$",
    ):
        PKDDistiller(loss_weight=bad)


def test_loss_weight_zero_turns_the_loss_off_and_ints_are_weights():
    assert PKDDistiller(loss_weight=6).loss_weight == 6.0
    d = PKDDistiller(loss_weight=0, num_levels=1)
    d.bind(_Det(RETINA), _Det(RCNN))
    feats = {n: torch.randn(2, 256, 3, 4) for n in ("p2", "p3")}
    out = d({"backbone": feats}, {"backbone": feats}, ctx=None)["loss_pkd"]
    assert torch.is_tensor(out) and out.item() == 0.0


def test_none_written_on_the_command_line_is_named_with_its_spelling():
    """README: "set num_levels=None with explicit lists". As an override, None is the string
    'None' (the parser reads YAML, whose None is null): the error said "... or None ..., got
    'None'". It now names null, which works."""
    from detectron2.config import LazyConfig, instantiate

    from conftest import REPO

    cfg = LazyConfig.load(os.path.join(REPO, "configs/demo/pkd_retinanet.py"))
    levels = [
        "model.distillers.pkd.student_levels=[p3,p4]",
        "model.distillers.pkd.teacher_levels=[p3,p4]",
    ]
    bad = LazyConfig.apply_overrides(cfg, levels + ["model.distillers.pkd.num_levels=None"])
    with pytest.raises(
        ValueError,
        match=r"got 'None' \(the string 'None': an override writes None as null, "
        r"'model\.distillers\.<name>\.num_levels=null'\)",
    ):
        instantiate(bad.model.distillers.pkd)
    cfg = LazyConfig.load(os.path.join(REPO, "configs/demo/pkd_retinanet.py"))
    good = LazyConfig.apply_overrides(cfg, levels + ["model.distillers.pkd.num_levels=null"])
    assert instantiate(good.model.distillers.pkd).num_levels is None
    with pytest.raises(
        ValueError, match=r"student_levels must be a list .*got 'None' \(the string 'None'.*=null"
    ):
        PKDDistiller(student_levels="None")
    from detkd import GIDDistiller

    with pytest.raises(ValueError, match=r"response_ctr_weight must be .*got 'None' \(the string"):
        GIDDistiller(response_ctr_weight="None")


def test_other_arguments_are_checked_at_construction():
    """num_levels and pair_by were checked only at bind; resize_student="False" (a string) was
    true and resized the student."""
    with pytest.raises(
        ValueError, match=r"PKDDistiller: num_levels must be a positive int .* got 0"
    ):
        PKDDistiller(num_levels=0)
    with pytest.raises(
        ValueError, match=r"PKDDistiller: pair_by must be 'stride' or 'index', got 'order'"
    ):
        PKDDistiller(pair_by="order")
    with pytest.raises(
        ValueError, match=r"PKDDistiller: resize_student must be True or False .* got 'False'"
    ):
        PKDDistiller(resize_student="False")
    with pytest.raises(ValueError, match=r"resize_student must be True or False .* got 2"):
        PKDDistiller(resize_student=2)
    import numpy as np

    for value, want in ((1, True), (0, False), (np.bool_(True), True), (np.bool_(False), False)):
        assert PKDDistiller(resize_student=value).resize_student is want


@pytest.mark.parametrize("arg", ["student_levels", "teacher_levels"])
def test_level_lists_must_be_lists_of_names(arg):
    """The override `model.distillers.pkd.student_levels=p3` gives the string "p3", which was
    split into the features 'p' and '3' ("no feature(s) ['p', '3']") at bind."""
    msg = (
        rf"{arg} must be a list of level names, e.g. \[p3\] "
        rf"\(override: 'model\.distillers\.<name>\.{arg}=\[p3\]'\).* got 'p3'"
    )
    with pytest.raises(ValueError, match="PKDDistiller: " + msg):
        PKDDistiller(**{arg: "p3"})
    with pytest.raises(ValueError, match=msg):
        pair_fpn_levels(RETINA, RCNN, **{arg: "p3"})
    with pytest.raises(
        ValueError, match=rf"PKDDistiller: {arg} must be a list of level names.* got \['p3', 3\]"
    ):
        PKDDistiller(**{arg: ["p3", 3]})
    with pytest.raises(ValueError, match=rf"{arg} is empty: list the levels .* or set it to None"):
        PKDDistiller(**{arg: []})
    with pytest.raises(ValueError, match=rf"{arg} lists \['p3'\] more than once"):
        PKDDistiller(**{arg: ["p3", "p4", "p3"]})


def test_level_lists_from_a_config_are_accepted():
    """A list from a LazyConfig override is an omegaconf ListConfig; a tuple is fine too."""
    from omegaconf import ListConfig

    d = PKDDistiller(
        num_levels=None, student_levels=ListConfig(["p4", "p3"]), teacher_levels=("p3", "p4")
    )
    d.bind(_Det(RETINA), _Det(RCNN))
    assert d.pairs == [("p3", "p3"), ("p4", "p4")]


def test_a_listed_level_without_a_partner_is_an_error():
    """Explicitly listed levels were dropped without a word when they found no partner: by
    stride, student [p3, p4] with teacher [p3] distilled p3 alone; by index, with teacher [p5],
    p3 -> p5 alone."""
    d = PKDDistiller(num_levels=None, student_levels=["p3", "p4"], teacher_levels=["p3"])
    with pytest.raises(
        ValueError,
        match=r"student_levels lists \[\('p4', 16\)\], but no teacher level has that stride .*"
        r"Add the teacher's level of that stride to teacher_levels, remove \['p4'\] from "
        r"student_levels, or pair the levels by order with pair_by='index'",
    ):
        d.bind(_Det(RETINA), _Det(RCNN))
    d = PKDDistiller(
        num_levels=None, pair_by="index", student_levels=["p3", "p4"], teacher_levels=["p5"]
    )
    with pytest.raises(
        ValueError,
        match=r"student_levels lists 2 levels \['p3', 'p4'\], the teacher side has 1 \(\['p5'\]\); "
        r"pair_by='index' .* leaves \['p4'\] without a partner",
    ):
        d.bind(_Det(RETINA), _Det(RCNN))
    # the teacher's side too: a RetinaNet student has no level of the teacher's p2's stride
    with pytest.raises(
        ValueError, match=r"teacher_levels lists \[\('p2', 4\)\], but no student level"
    ):
        pair_fpn_levels(RETINA, RCNN, teacher_levels=["p2", "p3"], strict=True)
    with pytest.raises(
        ValueError, match=r"teacher_levels lists 3 levels .* leaves \['p4'\] without"
    ):
        pair_fpn_levels(
            RETINA,
            RCNN,
            pair_by="index",
            student_levels=["p3", "p4"],
            teacher_levels=["p2", "p3", "p4"],
            strict=True,
        )
    # strict=False (the function's default, GID's box-head levels): the lists only restrict
    # each side, as before; any iterable of names is a list of levels
    lists = dict(student_levels=["p3", "p4"], teacher_levels=["p3"])
    assert pair_fpn_levels(RETINA, RCNN, **lists) == [("p3", "p3")]
    assert pair_fpn_levels(RETINA, RCNN, student_levels=RETINA.keys(), num_levels=2) == [
        ("p3", "p3"),
        ("p4", "p4"),
    ]
    assert pair_fpn_levels(RETINA, RCNN, student_levels=(n for n in ["p5"])) == [("p5", "p5")]
    # a list on one side: the other side's unlisted levels may stay unpaired
    assert pair_fpn_levels(RETINA, RCNN, student_levels=["p4", "p5"], strict=True) == [
        ("p4", "p4"),
        ("p5", "p5"),
    ]
    assert pair_fpn_levels(RETINA, RCNN, pair_by="index", teacher_levels=["p4"], strict=True) == [
        ("p3", "p4")
    ]


def test_a_listed_level_cut_off_by_num_levels_is_an_error():
    """PKD's default num_levels=4 silently dropped the fifth of five listed levels."""
    d = PKDDistiller(student_levels=["p3", "p4", "p5", "p6", "p7"], pair_by="index")
    with pytest.raises(
        ValueError,
        match=r"num_levels=4 keeps the first 4 of the level pairs .* leaves out \['p7'\] listed in "
        r"student_levels: set num_levels=None",
    ):
        d.bind(_Det(RETINA), _Det(RCNN))
    with pytest.raises(
        ValueError, match=r"only 1 pair exists .*: set num_levels=1 .* or None for every pair"
    ):
        PKDDistiller(student_levels=["p3"], teacher_levels=["p3"]).bind(_Det(RETINA), _Det(RCNN))
    d = PKDDistiller(
        student_levels=["p3", "p4", "p5", "p6", "p7"], pair_by="index", num_levels=None
    )
    d.bind(_Det(RETINA), _Det(RCNN))
    assert d.pairs == [("p3", "p2"), ("p4", "p3"), ("p5", "p4"), ("p6", "p5"), ("p7", "p6")]
