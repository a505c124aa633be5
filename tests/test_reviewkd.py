"""ReviewKD: HCL against explicit pooling, ABF shapes, review order, gradients, checkpoints."""

import os
import re

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.utils.events import EventStorage

from detkd import DistillationDetector, export_student
from detkd.losses import ABF, ReviewKDDistiller, hcl_level_loss, hcl_loss

import pytest
from conftest import (
    BackboneOnlyDetector,
    history,
    make_inputs,
    short_train,
    tiny_kd,
    tiny_retinanet_cfg,
)


def _pool(x, p):
    """Adaptive average pooling written out: PyTorch's bins [floor(i*H/p), ceil((i+1)*H/p))."""
    N, C, H, W = x.shape
    out = torch.zeros(N, C, p, p, dtype=x.dtype)
    for i in range(p):
        h0, h1 = (i * H) // p, -((-(i + 1) * H) // p)
        for j in range(p):
            w0, w1 = (j * W) // p, -((-(j + 1) * W) // p)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(dim=(2, 3))
    return out


def _hcl_reference(s, t):
    """HCL as the reference code computes it: the pooled terms of 4x4, 2x2, 1x1 that fit in the
    height, the i-th term used weighted 0.5^i (a skipped size does not use up a weight)."""
    terms = [(((s - t) ** 2).mean(), 1.0)]
    for p in (4, 2, 1):
        if p < s.shape[2]:
            terms.append((((_pool(s, p) - _pool(t, p)) ** 2).mean(), 0.5 ** len(terms)))
    return sum(v * w for v, w in terms) / sum(w for _, w in terms)


@pytest.mark.parametrize("size", [(13, 21), (7, 9), (3, 5), (1, 2)])
def test_hcl_matches_explicit_pooling(size):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    assert hcl_level_loss(s, t).item() == pytest.approx(_hcl_reference(s, t).item(), rel=1e-10)


@pytest.mark.parametrize("size", [(13, 21), (25, 42), (7, 3), (3, 5), (1, 2)])
def test_hcl_gradients_equal_autograd_of_the_definition(size):
    """The fused HCL (one pass over s - t, hand-written backward) against autograd through the
    written-out pooling, for student and teacher, odd sizes and maps narrower than a pool."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, *size, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, *size, generator=g, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(3.0 * hcl_level_loss(s, t), [s, t])
    ref = torch.autograd.grad(3.0 * _hcl_reference(s, t), [s, t])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    if size[0] * size[1] <= 100:  # finite differences: small maps only
        assert torch.autograd.gradcheck(hcl_level_loss, (s, t))
    # a teacher without gradient (the usual case) and fp32 inputs
    s32 = s.detach().float().requires_grad_()
    (g32,) = torch.autograd.grad(hcl_level_loss(s32, t.detach().float()), [s32])
    torch.testing.assert_close(g32, ref[0].float() / 3.0, rtol=1e-4, atol=1e-7)


def test_hcl_pooling_operators_cached_per_map_size_and_dtype():
    """The pooling operators are built once per (H, W, dtype): maps of transposed sizes and of
    another dtype, alternating, each get their own (values against the written-out pooling)."""
    from detkd.losses import reviewkd

    g = torch.Generator().manual_seed(2)
    dtypes = [torch.float64, torch.float32]
    maps = [
        torch.randn(1, 2, *hw, generator=g, dtype=dt) for hw in [(9, 14), (14, 9)] for dt in dtypes
    ]
    for _ in range(2):
        for s in maps:
            t = torch.zeros_like(s)
            want = _hcl_reference(s.double(), t.double()).item()
            rel = 1e-10 if s.dtype == torch.float64 else 1e-5
            assert hcl_level_loss(s, t).item() == pytest.approx(want, rel=rel)
    # first built under inference_mode, then used in training (saved for backward)
    with torch.inference_mode():
        hcl_level_loss(torch.ones(1, 2, 11, 6), torch.zeros(1, 2, 11, 6))
    s = torch.ones(1, 2, 11, 6, requires_grad=True)
    hcl_level_loss(s, torch.zeros(1, 2, 11, 6)).backward()
    assert s.grad is not None
    ops = reviewkd._pooling_operators(9, 14, (4, 2, 1), (0.5, 0.25, 0.125), maps[0])
    assert ops is reviewkd._pooling_operators(9, 14, (4, 2, 1), (0.5, 0.25, 0.125), maps[0])
    ah, aw, mask = ops
    assert ah.shape == (7, 9) and aw.shape == (7, 14)
    diagonal = torch.tensor([0.5 / 16] * 4 + [0.25 / 4] * 2 + [0.125], dtype=torch.float64)
    torch.testing.assert_close(mask.diagonal(), diagonal)
    assert mask.sum().item() == pytest.approx(0.5 + 0.25 + 0.125)


def test_hcl_operator_cache_drops_the_least_recently_used(monkeypatch):
    from collections import OrderedDict

    from detkd.losses import reviewkd

    monkeypatch.setattr(reviewkd, "_OPERATORS", OrderedDict())
    monkeypatch.setattr(reviewkd, "_OPERATOR_CACHE_SIZE", 2)
    like = torch.zeros(1)

    def ops(h):
        return reviewkd._pooling_operators(h, 8, (4,), (0.5,), like)

    a, b = ops(8), ops(9)
    assert ops(8) is a  # a used again: b is now the least recently used
    c = ops(10)  # evicts b, keeps a
    assert len(reviewkd._OPERATORS) == 2 and ops(8) is a and ops(10) is c
    assert ops(9) is not b  # rebuilt (evicting 8's, used before 10's)
    assert [k[0] for k in reviewkd._OPERATORS] == [10, 9]


def test_hcl_all_terms_weights_and_sum_over_levels():
    # A constant offset d gives MSE d^2 at every pooling size: the normalised sum is d^2.
    t = torch.randn(2, 4, 16, 16)
    assert hcl_level_loss(t + 0.5, t).item() == pytest.approx(0.25, rel=1e-5)
    # Zero-mean noise per 4x4 cell only shows at full resolution: 1.0 / 1.875 of the MSE.
    noise = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(8, 8).expand(2, 4, 16, 16)
    assert hcl_level_loss(t + noise, t).item() == pytest.approx(1.0 / 1.875, rel=1e-5)
    a, b = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4)
    assert hcl_loss([a, b], [a * 0, b * 0]).item() == pytest.approx(
        hcl_level_loss(a, a * 0).item() + hcl_level_loss(b, b * 0).item(), rel=1e-6
    )


@pytest.mark.parametrize(
    "d, expected",
    [
        # 4x4 (no 4x4 pool): +-1 on 2x2 cells, MSE 1, 2x2-pool MSE 1, 1x1-pool 0
        ([[1.0, 1.0, -1.0, -1.0]] * 2 + [[-1.0, -1.0, 1.0, 1.0]] * 2, (1 + 0.5) / 1.75),
        # 2x4 (1x1 pool only): +-1 per column, MSE 1, 1x1-pool 0
        ([[1.0, -1.0, 1.0, -1.0]] * 2, 1 / 1.5),
    ],
)
def test_hcl_weights_halve_per_used_term_on_maps_too_low_for_4x4(d, expected):
    """As the reference: the weights halve per pooling size *used*, so a map of height 3-4 (4x4
    skipped) weighs 2x2 by 0.5 and 1x1 by 0.25, a map of height 2 weighs 1x1 by 0.5; not the
    0.25 / 0.125 of a size's place in (4, 2, 1)."""
    t = torch.randn(2, 3, len(d), len(d[0]))
    assert hcl_level_loss(t + torch.tensor(d), t).item() == pytest.approx(expected, rel=1e-5)


def test_abf_shapes_with_mismatched_channels_and_deepest_level():
    deepest = ABF(64, 96, 256, fuse=False)
    out, res = deepest(torch.randn(2, 64, 13, 21))
    assert out.shape == (2, 256, 13, 21) and res.shape == (2, 96, 13, 21)
    assert deepest.att is None
    finer = ABF(64, 96, 256, fuse=True)
    out2, res2 = finer(torch.randn(2, 64, 25, 42), res)  # odd sizes: 13 -> 25
    assert out2.shape == (2, 256, 25, 42) and res2.shape == (2, 96, 25, 42)
    with pytest.raises(ValueError, match="residual"):
        finer(torch.randn(2, 64, 25, 42))


def _fusing_abf(g):
    """A float64 ABF(3 -> 4 -> 5) with a residual input and N(0, 1) attention weights (drawn from
    g)."""
    abf = ABF(3, 4, 5, fuse=True).double()
    with torch.no_grad():
        abf.att.weight.normal_(generator=g)
        abf.att.bias.normal_(generator=g)
    return abf


@pytest.mark.parametrize(
    "sizes", [((4, 6), (8, 12)), ((13, 21), (25, 42)), ((4, 6), (8, 11)), ((4, 6), (7, 12))]
)
def test_abf_fusion_equals_concatenated_attention(sizes):
    """The split attention conv (u part at full, residual part at the residual's resolution) and
    the broadcast 2x step give ReviewKD's fusion on [u; nearest(r)]: values and all gradients."""
    g = torch.Generator().manual_seed(0)
    (h, w), (H, W) = sizes
    abf = _fusing_abf(g)
    x = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 4, h, w, generator=g, dtype=torch.float64, requires_grad=True)

    def reference(x, res):
        u = abf.conv1(x)
        r = torch.nn.functional.interpolate(res, size=(H, W), mode="nearest")
        a = torch.sigmoid(abf.att(torch.cat([u, r], dim=1)))
        u = u * a[:, 0:1] + r * a[:, 1:2]
        return abf.conv2(u), u

    params = [x, res, abf.att.weight, abf.att.bias, abf.conv1.weight, abf.conv2.weight]
    got, ref = abf(x, res), reference(x, res)
    dy = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in ref]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    for a, b in zip(torch.autograd.grad(got, params, dy), torch.autograd.grad(ref, params, dy)):
        torch.testing.assert_close(a, b)


def _kd(student=None, teacher=None, **kw):
    return tiny_kd("reviewkd", L(ReviewKDDistiller)(**kw), student, teacher)


def test_review_order_deepest_first():
    model = _kd()
    d = model.distillers["reviewkd"]
    assert [s for s, _ in d.pairs] == ["p3", "p4", "p5", "p6", "p7"]
    assert d.abfs["p7"].att is None and d.abfs["p3"].att is not None
    d.eval()  # BN in eval: outputs depend on the inputs only
    feats = {f"p{k}": torch.randn(2, 64, 2 ** (8 - k), 2 ** (8 - k)) for k in range(3, 8)}
    base = d.review(feats)
    deep = d.review(dict(feats, p7=feats["p7"] + 1.0))
    fine = d.review(dict(feats, p3=feats["p3"] + 1.0))
    assert all(not torch.allclose(deep[k], base[k]) for k in base)  # reaches every level
    assert not torch.allclose(fine["p3"], base["p3"])
    assert all(torch.equal(fine[k], base[k]) for k in ("p4", "p5", "p6", "p7"))


def test_gradients_reach_student_and_abf_not_teacher():
    model = _kd()
    with EventStorage():
        losses = model(make_inputs())
    assert losses["loss_reviewkd"] > 0
    losses["loss_reviewkd"].backward()
    assert all(p.grad is not None for p in model.distillers.parameters())
    assert model.student.backbone.fpn_output3.weight.grad is not None
    assert model.student.head.cls_score.weight.grad is None  # the head never sees ABF outputs
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())


def test_checkpoint_round_trip_and_export_without_abf(tmp_path):
    model = _kd()
    for p in model.distillers.parameters():
        p.data.normal_()
    DetectionCheckpointer(model, str(tmp_path)).save("run")
    other = _kd()
    DetectionCheckpointer(other).load(str(tmp_path / "run.pth"))
    for (k, a), b in zip(
        model.distillers.state_dict().items(), other.distillers.state_dict().values()
    ):
        assert torch.equal(a, b), k
    state = export_student(str(tmp_path / "run.pth"), str(tmp_path / "student.pth"))
    assert not any("abf" in k for k in state)
    fresh = instantiate(tiny_retinanet_cfg())
    inc = fresh.load_state_dict(torch.load(tmp_path / "student.pth", weights_only=False)["model"])
    assert not inc.missing_keys and not inc.unexpected_keys


def test_demo_config_trains_through_kdtrainer(tmp_path):
    trainer, results = short_train("configs/demo/reviewkd_retinanet.py", tmp_path, iters=3)
    assert "bbox" in results
    values = history(trainer, "loss_reviewkd")
    assert len(values) == 3 and all(v > 0 and v == v for v in values)
    assert os.path.isfile(tmp_path / "model_final_student.pth")


def test_abfs_follow_mixed_precision_and_the_loss_stays_fp32():
    """Under AMP the ABFs run in the step's low precision (as cheap as the student's layers);
    the HCL loss is computed in fp32 and stays close to the fp32 value."""
    model = _kd()
    model.distillers.eval()  # BN statistics fixed: both runs see the same ABF function
    dtypes = []
    hook = (
        model.distillers["reviewkd"]
        .abfs["p3"]
        .conv2.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    )
    inputs = make_inputs()
    with EventStorage():
        full = model(inputs)["loss_reviewkd"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(inputs)["loss_reviewkd"]
    hook.remove()
    assert dtypes == [torch.float32, torch.bfloat16]
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(full.item(), rel=0.05)


def test_index_pairs_of_different_strides_compare_the_resized_fused_map():
    # a RetinaNet student (p3-p7) from a Faster R-CNN teacher (p2-p6) paired by index: each
    # fused map is resized to its teacher level (it was a raw shape error in HCL)
    import torch.nn.functional as F

    from conftest import tiny_faster_rcnn_cfg

    torch.manual_seed(0)
    model = instantiate(
        L(DistillationDetector)(
            student=tiny_retinanet_cfg(),
            teacher=tiny_faster_rcnn_cfg(width=32, fpn=128),
            distillers={"reviewkd": L(ReviewKDDistiller)(pair_by="index", num_levels=3)},
        )
    ).train()
    d = model.distillers["reviewkd"]
    assert d.pairs == [("p3", "p2"), ("p4", "p3"), ("p5", "p4")]
    inputs = make_inputs()
    with EventStorage() as storage:
        loss = model(inputs)["loss_reviewkd"]
        logged = {k: v[0] for k, v in storage.latest().items() if k.startswith("reviewkd/")}
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert model.student.backbone.fpn_output3.weight.grad is not None
    with torch.no_grad():  # the same value from the review chain, resized by hand
        s = model.student.backbone(model.student.preprocess_image(inputs).tensor)
        t = model.teacher.backbone(model.teacher_images(inputs).tensor)
        fused = d.review(s)
        levels = {
            a: hcl_level_loss(
                F.interpolate(fused[a], size=t[b].shape[2:], mode="bilinear", align_corners=False),
                t[b],
            )
            for a, b in d.pairs
        }
    assert fused["p3"].shape[2:] != t["p2"].shape[2:]
    assert loss.item() == pytest.approx(sum(levels.values()).item(), rel=1e-5)
    # per-level values are logged under the student level's name (reviewkd/p3 for the pair (p3, p2))
    assert sorted(logged) == ["reviewkd/p3", "reviewkd/p4", "reviewkd/p5"]
    for a in levels:
        assert logged[f"reviewkd/{a}"] == pytest.approx(levels[a].item(), rel=1e-5)


def _Det(channels):
    from detectron2.layers import ShapeSpec

    return BackboneOnlyDetector(
        {f"p{k}": ShapeSpec(channels=channels, stride=2**k) for k in (3, 4, 5)}
    )


def test_distiller_loss_is_weight_times_summed_hcl_and_abfs_default_to_teacher_channels():
    """loss_reviewkd = lambda * sum_k HCL(ABF chain output_k, teacher_k) (METHODS.md 2.4), with
    the written-out HCL; the ABFs' inner channels default to the teacher's (2.2: mid = out)."""
    import contextlib
    from types import SimpleNamespace

    torch.manual_seed(0)
    d = ReviewKDDistiller(loss_weight=2.5)
    d.bind(_Det(8), _Det(16))
    assert d.pairs == [("p3", "p3"), ("p4", "p4"), ("p5", "p5")]
    assert all(
        abf.conv1.out_channels == 16 and abf.conv2.in_channels == 16 for abf in d.abfs.values()
    )
    d.eval()  # BN statistics fixed: review() below computes the same maps
    g = torch.Generator().manual_seed(1)
    s = {f"p{k}": torch.randn(2, 8, 2 ** (8 - k), 2 ** (8 - k), generator=g) for k in (3, 4, 5)}
    t = {f"p{k}": torch.randn(2, 16, 2 ** (8 - k), 2 ** (8 - k), generator=g) for k in (3, 4, 5)}
    ctx = SimpleNamespace(amp=contextlib.nullcontext)
    got = d({"backbone": s}, {"backbone": t}, ctx)["loss_reviewkd"]
    with torch.no_grad():
        fused = d.review(s)
        expected = sum(_hcl_reference(fused[k].double(), t[k].double()) for k in s)
    assert got.item() == pytest.approx(2.5 * expected.item(), rel=1e-5)


def test_abfs_share_one_inner_width_when_the_teachers_levels_differ_in_channels():
    """Each level's fused residual feeds the next finer ABF, so the chain has one inner width:
    by default the widest paired teacher level's (a teacher without FPN: res3-res5 of 16, 32, 64
    channels here). Per-level widths failed at the first step with a bare conv shape error."""
    import contextlib
    from types import SimpleNamespace

    from detectron2.layers import ShapeSpec

    torch.manual_seed(0)
    widths = {"res3": (16, 3), "res4": (32, 4), "res5": (64, 5)}
    teacher = BackboneOnlyDetector(
        {n: ShapeSpec(channels=c, stride=2**k) for n, (c, k) in widths.items()}
    )
    d = ReviewKDDistiller()
    d.bind(_Det(8), teacher)
    assert d.pairs == [("p3", "res3"), ("p4", "res4"), ("p5", "res5")]
    assert {k: (a.conv1.out_channels, a.conv2.out_channels) for k, a in d.abfs.items()} == {
        "p3": (64, 16),
        "p4": (64, 32),
        "p5": (64, 64),
    }
    d.eval()
    g = torch.Generator().manual_seed(1)
    s = {f"p{k}": torch.randn(2, 8, 2 ** (8 - k), 2 ** (8 - k), generator=g) for k in (3, 4, 5)}
    t = {
        n: torch.randn(2, c, 2 ** (8 - k), 2 ** (8 - k), generator=g)
        for n, (c, k) in widths.items()
    }
    got = d({"backbone": s}, {"backbone": t}, SimpleNamespace(amp=contextlib.nullcontext))[
        "loss_reviewkd"
    ]
    with torch.no_grad():
        fused = d.review(s)
        expected = sum(_hcl_reference(fused[k].double(), t[n].double()) for k, n in d.pairs)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    d2 = ReviewKDDistiller(mid_channels=24)  # an explicit width is kept for every level
    d2.bind(_Det(8), teacher)
    assert {a.conv1.out_channels for a in d2.abfs.values()} == {24}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hcl_of_half_precision_maps_is_computed_in_float32(dtype):
    """A (1, 4, 64, 64) difference of variance ~8 has a sum of squares ~1.3e5, past fp16's
    65504: summed in fp16 the loss was inf. The maps are upcast; the gradient comes back in the
    input's dtype."""
    g = torch.Generator().manual_seed(0)
    s = (2 * torch.randn(1, 4, 64, 64, generator=g)).to(dtype).requires_grad_()
    t = (2 * torch.randn(1, 4, 64, 64, generator=g)).to(dtype)
    got = hcl_level_loss(s, t)
    expected = _hcl_reference(s.detach().double(), t.double()).item()
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)
    (grad,) = torch.autograd.grad(got, [s])
    assert grad.dtype == dtype and torch.isfinite(grad.float()).all()


def test_mid_channels_is_a_positive_int_or_none():
    """mid_channels=0 was read as unset: ABFs of the teacher's 16 channels, without a word."""
    d = ReviewKDDistiller(mid_channels=4)
    d.bind(_Det(8), _Det(16))
    assert all(a.conv1.out_channels == 4 and a.conv2.in_channels == 4 for a in d.abfs.values())
    for bad in (0, -8, 4.0):
        with pytest.raises(
            ValueError,
            match=rf"mid_channels must be an int >= 1 \(or None for the teacher's channels\) "
            rf"\(model\.distillers\.<name>\.mid_channels\), got {bad!r}",
        ):
            ReviewKDDistiller(mid_channels=bad)


def test_abf_convs_use_kaiming_uniform_with_a_1():
    """METHODS.md 2.2: conv1 / conv2 weights from kaiming_uniform_(a=1): U(-b, b) with
    b = sqrt(6 / ((1 + a^2) fan_in)) = sqrt(3 / fan_in)."""
    torch.manual_seed(0)
    abf = ABF(64, 64, 64, fuse=True)
    for conv, fan_in in ((abf.conv1, 64), (abf.conv2, 64 * 9)):
        bound = (3.0 / fan_in) ** 0.5
        w = conv.weight.abs()
        assert w.max().item() <= bound * (1 + 1e-6)
        assert w.max().item() > 0.99 * bound  # 4096+ draws: P(max < 0.99 b) = 0.99^4096 ~ 1e-18


def test_abf_batch_norm_on_one_value_per_channel_is_a_clear_error():
    """One 64x64 image: p6 and p7 are 1x1 maps, on which the ABFs' BatchNorm cannot train. The
    error names the level and the ways out; GroupNorm ABFs train."""
    inputs = make_inputs(n=1, size=(64, 64))
    model = _kd()
    match = r"ReviewKD: the student's level 'p6' is a 1x1 map.*norm='GN'"
    with EventStorage(), pytest.raises(ValueError, match=match):
        model(inputs)
    model = _kd(norm="GN")
    with EventStorage():
        losses = model(inputs)
    assert torch.isfinite(losses["loss_reviewkd"])


def test_synced_abf_batch_norm_of_several_processes_trains_on_1x1_maps(monkeypatch):
    """norm='SyncBN' in a multi-process run normalises over every process's values: one 1x1 map
    per process trains there; a single process, or plain BN, is still the clear error."""
    from detkd.losses import reviewkd

    feats = {f"p{i}": torch.randn(1, 64, 1, 1) for i in range(3, 8)}  # the student's FPN, 1x1
    synced, local = _kd(norm="naiveSyncBN").distillers["reviewkd"], _kd().distillers["reviewkd"]
    with pytest.raises(ValueError, match="1x1 map of one image"):
        synced._check_batch_statistics(feats)
    monkeypatch.setattr(reviewkd.comm, "get_world_size", lambda: 2)
    synced._check_batch_statistics(feats)
    with pytest.raises(ValueError, match="1x1 map of one image"):
        local._check_batch_statistics(feats)


def test_abf_convs_are_followed_by_batch_norm():
    """METHODS.md 2.2: conv1 and conv2 are each followed by BatchNorm (no activation). In train
    mode at init (BN weight 1, bias 0) the residual u = BN(conv1(x)) and the output BN(conv2(u))
    have per-channel batch mean 0 and biased variance 1."""
    torch.manual_seed(0)
    abf = ABF(3, 4, 5, fuse=False).train()
    x = 3.0 * torch.randn(2, 3, 6, 7) + 2.0
    out, u = abf(x)
    for y in (u, out):
        torch.testing.assert_close(
            y.mean(dim=(0, 2, 3)), torch.zeros(y.shape[1]), rtol=0, atol=1e-5
        )
        torch.testing.assert_close(
            y.var(dim=(0, 2, 3), unbiased=False), torch.ones(y.shape[1]), rtol=0, atol=1e-3
        )


def test_batch_norm_check_passes_in_eval_and_for_two_images():
    """The 1x1-map error is for training on one value per channel only: two images of 1x1 maps
    train, and a model in eval mode (BN on running statistics) reviews 1x1 maps of one image."""
    d = _kd().distillers["reviewkd"]
    two = {f"p{i}": torch.randn(2, 64, 1, 1) for i in range(3, 8)}
    d.train()._check_batch_statistics(two)
    one = {f"p{i}": torch.randn(1, 64, 1, 1) for i in range(3, 8)}
    with pytest.raises(ValueError, match="1x1 map of one image"):
        d._check_batch_statistics(one)
    d.eval()._check_batch_statistics(one)
    assert d.review(one)["p3"].shape[2:] == (1, 1)


def test_default_pairs_are_by_stride_over_all_shared_levels():
    """ReviewKD compares each fused map with the teacher at the same level (METHODS.md 2.3): a
    p3-p7 student and a p2-p6 teacher pair p3-p6 by stride by default, not index-wise."""
    from detectron2.layers import ShapeSpec

    student = BackboneOnlyDetector(
        {f"p{k}": ShapeSpec(channels=8, stride=2**k) for k in range(3, 8)}
    )
    teacher = BackboneOnlyDetector(
        {f"p{k}": ShapeSpec(channels=8, stride=2**k) for k in range(2, 7)}
    )
    d = ReviewKDDistiller()
    d.bind(student, teacher)
    assert d.pairs == [("p3", "p3"), ("p4", "p4"), ("p5", "p5"), ("p6", "p6")]
    assert d.loss_weight == 1.0


def test_hcl_casts_the_teacher_to_the_students_dtype():
    """A float64 teacher map against a float32 student: the loss is float32 (the teacher cast
    first), with the float64 value up to float32 rounding."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 9, 10, generator=g)
    t = torch.randn(2, 3, 9, 10, generator=g, dtype=torch.float64)
    got = hcl_level_loss(s, t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(
        _hcl_reference(s.double(), t.float().double()).item(), rel=1e-5
    )


@pytest.mark.parametrize("sizes", [((4, 6), (8, 12)), ((1, 1), (2, 2)), ((13, 21), (25, 42))])
def test_abf_fusion_of_channels_last_maps_equals_the_nchw_fusion_and_stays_channels_last(sizes):
    """abf_precision="bf16" fuses channels-last maps: the exact 2x step on their (N, H, W, C)
    views (NCHW views cannot split a channels-last map's H and W) and the general path give
    the NCHW fusion's values and gradients, and a channels-last result."""
    g = torch.Generator().manual_seed(0)
    (h, w), (H, W) = sizes
    abf = _fusing_abf(g)
    u = torch.randn(2, 4, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 4, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    ref = abf._fuse(u, r)
    got = abf._fuse(
        u.contiguous(memory_format=torch.channels_last),
        r.contiguous(memory_format=torch.channels_last),
    )
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    torch.testing.assert_close(got, ref)
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    params = [u, r, abf.att.weight, abf.att.bias]
    for a, b in zip(torch.autograd.grad(got, params, dy), torch.autograd.grad(ref, params, dy)):
        torch.testing.assert_close(a, b)


def _review_loss_and_grads(d, s, t):
    out = d.review(s)
    loss = hcl_loss([out[k] for k in s], [t[k] for k in s])
    return out, loss, torch.autograd.grad(loss, [*s.values(), *d.parameters()])


def test_abf_precision_bf16_runs_the_abfs_in_bf16_channels_last_and_returns_fp32_nchw():
    """abf_precision="bf16": the ABFs' convs run in bfloat16 on channels-last maps in an fp32
    step; review() hands back fp32 NCHW maps, the student's maps get fp32 NCHW gradients, the
    ABF weights and their gradients stay fp32, and every value is the fp32 chain's within bf16
    rounding (~2^-8 relative), not equal to it."""
    torch.manual_seed(0)
    ref, low = ReviewKDDistiller(), ReviewKDDistiller(abf_precision="bf16")
    for d in (ref, low):
        d.bind(_Det(8), _Det(16))
        d.eval()  # BN statistics fixed: both chains compute the same function
    low.load_state_dict(ref.state_dict())
    seen = []
    hooks = [
        conv.register_forward_hook(
            lambda m, i, o: seen.append((i[0].dtype, o.dtype, o.is_contiguous()))
        )
        for d in (ref, low)
        for abf in d.abfs.values()
        for conv in (abf.conv1, abf.conv2)
    ]
    g = torch.Generator().manual_seed(1)
    s = {
        f"p{k}": torch.randn(2, 8, 2 ** (8 - k), 2 ** (8 - k), generator=g, requires_grad=True)
        for k in (3, 4, 5)
    }
    t = {f"p{k}": torch.randn(2, 16, 2 ** (8 - k), 2 ** (8 - k), generator=g) for k in (3, 4, 5)}
    out_ref, loss_ref, grads_ref = _review_loss_and_grads(ref, s, t)
    n = len(seen)
    out_low, loss_low, grads_low = _review_loss_and_grads(low, s, t)
    for h in hooks:
        h.remove()
    assert seen[:n] == [(torch.float32, torch.float32, True)] * 6
    # channels-last maps (N, C, 8+, 8+)
    assert seen[n:] == [(torch.bfloat16, torch.bfloat16, False)] * 6
    assert all(o.dtype == torch.float32 and o.is_contiguous() for o in out_low.values())
    assert all(p.dtype == torch.float32 for p in low.parameters())
    assert loss_low.dtype == torch.float32
    assert (
        loss_low.item() == pytest.approx(loss_ref.item(), rel=1e-2)
        and loss_low.item() != loss_ref.item()
    )
    # autograd.grad: the raw gradient, no leaf re-layout
    for a, b in zip(grads_low[:3], grads_ref[:3]):
        assert a.is_contiguous()  # the student's maps: NCHW gradients
    for a, b in zip(grads_low, grads_ref):
        assert a.dtype == torch.float32
        assert 0 < ((a - b).norm() / b.norm()).item() < 3e-2
    for k in s:
        assert 0 < ((out_low[k] - out_ref[k]).norm() / out_ref[k].norm()).item() < 2e-2


def test_abf_precision_bf16_in_a_training_step_of_the_wrapper():
    """Through DistillationDetector: the fp32 step's loss_reviewkd is fp32 and within bf16
    rounding of the fp32 ABFs' value, and the student's FPN gets an fp32 gradient in its own
    (NCHW) layout."""
    model, low = _kd(), _kd(abf_precision="bf16")
    low.load_state_dict(model.state_dict())
    inputs = make_inputs()
    values = []
    for m in (model, low):
        m.distillers.eval()  # BN statistics fixed: both runs see the same ABF function
        with EventStorage():
            loss = m(inputs)["loss_reviewkd"]
        loss.backward()
        values.append(loss)
    grad = low.student.backbone.fpn_output3.weight.grad
    assert values[1].dtype == torch.float32 and values[1].item() == pytest.approx(
        values[0].item(), rel=1e-2
    )
    assert grad.dtype == torch.float32 and grad.is_contiguous()
    ref = model.student.backbone.fpn_output3.weight.grad
    assert 0 < ((grad - ref).norm() / ref.norm()).item() < 3e-2


@pytest.mark.parametrize("bad", ["fp16", "float16", "fp32", torch.bfloat16])
def test_abf_precision_is_none_or_bf16(bad):
    with pytest.raises(ValueError, match=r"abf_precision must be None .* or 'bf16'") as e:
        ReviewKDDistiller(abf_precision=bad)
    assert ("grad scaler" in str(e.value)) == (bad == "fp16")


@pytest.mark.parametrize("bad", ["abc", None, -1, float("nan"), float("inf"), False])
def test_loss_weight_must_be_a_finite_non_negative_number(bad):
    """ "abc" and None failed at the first step, -1 trained the student away from the teacher."""
    with pytest.raises(
        ValueError,
        match=r"ReviewKDDistiller: loss_weight must be a finite number >= 0 "
        rf"\(model\.distillers\.<name>\.loss_weight\), got {re.escape(repr(bad))}$",
    ):
        ReviewKDDistiller(loss_weight=bad)
    assert ReviewKDDistiller(loss_weight=0).loss_weight == 0.0  # turns the loss off
    assert ReviewKDDistiller(loss_weight=2).loss_weight == 2.0


def test_num_levels_pair_by_and_norm_are_checked_at_construction():
    """num_levels and pair_by were checked at bind only; an unknown norm name was a bare
    KeyError('bn') from detectron2's get_norm at bind."""
    with pytest.raises(
        ValueError, match=r"ReviewKDDistiller: num_levels must be a positive int .* got -1"
    ):
        ReviewKDDistiller(num_levels=-1)
    with pytest.raises(
        ValueError, match=r"ReviewKDDistiller: pair_by must be 'stride' or 'index', got 'order'"
    ):
        ReviewKDDistiller(pair_by="order")
    with pytest.raises(
        ValueError, match=r"ReviewKD: norm must be a detectron2 norm name .* got 'bn'"
    ):
        ReviewKDDistiller(norm="bn")
    for norm in ("BN", "GN", "SyncBN", "naiveSyncBN", ""):
        ReviewKDDistiller(norm=norm)


def test_group_norm_with_channels_not_divisible_by_32_names_the_setting():
    """norm='GN' (32 groups) with mid_channels=48, or a teacher FPN of 80 channels: torch's
    "num_channels (48) must be divisible by num_groups (32)" named neither the setting nor the
    fix (with mid_channels unset, the user never wrote 48 or 80)."""
    with pytest.raises(
        ValueError,
        match=r"ReviewKD: norm='GN' normalises the ABFs' middle convolutions in 32 "
        r"groups.*mid_channels is 48\. Set model\.distillers\.<name>\.mid_channels "
        r"to a multiple of 32, or norm='BN'",
    ):
        _kd(norm="GN", mid_channels=48)
    with pytest.raises(
        ValueError,
        match=r"the teacher's \{'p3': 80, .*'p7': 80\} are not multiples of 32\. Set "
        r"model\.distillers\.<name>\.norm='BN'",
    ):
        _kd(teacher=tiny_retinanet_cfg(width=32, fpn=80), norm="GN")
    model = _kd(teacher=tiny_retinanet_cfg(width=32, fpn=96), norm="GN", mid_channels=64)
    assert model.distillers["reviewkd"].abfs["p3"].att is not None  # multiples of 32: built
