"""GID: GI selection on hand-built maps, relation loss formula, FPN levels, response mask."""

import math
import re

import torch
from detectron2.config import LazyCall as L
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage
from torchvision.ops import box_iou

from detkd.losses import GIDDistiller, relation_loss, select_general_instances

import pytest
from conftest import (
    history,
    load_config,
    make_inputs,
    short_train,
    tiny_faster_rcnn_cfg,
    tiny_kd,
    tiny_retinanet_cfg,
)


def test_selection_winners_nms_topk_and_empty_images():
    # 5 predictions, 2 classes, image 100x100.
    t = torch.tensor([[0.9, 0.1], [0.2, 0.1], [0.5, 0.5], [0.0, 0.8], [0.3, 0.3]])
    s = torch.tensor([[0.1, 0.1], [0.9, 0.1], [0.5, 0.4], [0.0, 0.1], [0.3, 0.3]])
    # GI scores: 0.8, 0.7, 0.1, 0.7, 0.0
    tb = torch.tensor(
        [[0, 0, 40, 40], [50, 50, 90, 90], [10, 60, 30, 90], [2, 2, 41, 41], [0, 0, 5, 5]],
        dtype=torch.float,
    )
    sb = tb + torch.tensor([1.0, 1.0, 1.0, 1.0])
    sel = select_general_instances(
        t[None], s[None], tb[None], sb[None], [(100, 100)], topk=10, min_size=10
    )
    boxes, scores = sel[0]
    # r=3 (0.7) overlaps r=0 (0.8) at IoU > 0.3 and is suppressed; r=4 is too small (5 px).
    assert scores.tolist() == pytest.approx([0.8, 0.7, 0.1])
    # r=0: teacher more confident (0.9 > 0.1) -> teacher box; r=1: student -> student box;
    # r=2: 0.5 vs 0.5 is not "teacher higher" -> student box.
    assert boxes.tensor.tolist() == [tb[0].tolist(), sb[1].tolist(), sb[2].tolist()]
    top1 = select_general_instances(t[None], s[None], tb[None], sb[None], [(100, 100)], topk=1)
    assert len(top1[0][0]) == 1 and top1[0][1].item() == pytest.approx(0.8)
    # Clipping to a 30x30 image leaves no box wider than 10 px except r=0 and r=3.
    clipped = select_general_instances(t[None], s[None], tb[None], sb[None], [(30, 30)], topk=10)
    assert clipped[0][0].tensor.tolist() == [[0, 0, 30, 30]]
    empty = select_general_instances(
        t[None], s[None], tb[None], sb[None], [(100, 100)], min_size=60
    )
    assert len(empty[0][0]) == 0 and empty[0][1].numel() == 0


def _relation_reference(s, t):
    n = len(s)

    def dist(x):
        return [[math.dist(x[i].tolist(), x[j].tolist()) for j in range(n)] for i in range(n)]

    ds, dt = dist(s), dist(t)
    phi_s = sum(ds[i][j] for i in range(n) for j in range(n) if i != j) / (n * n - n)
    phi_t = sum(dt[i][j] for i in range(n) for j in range(n) if i != j) / (n * n - n)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                d = abs(ds[i][j] / phi_s - dt[i][j] / phi_t)
                total += 0.5 * d * d if d < 1 else d - 0.5
    return total / (n * n - n)


def test_relation_loss_formula_scale_invariance_and_small_sets():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 20, generator=g, dtype=torch.float64)
    assert relation_loss(3.0 * t, t).item() == pytest.approx(0.0, abs=1e-10)
    s = torch.randn(6, 20, generator=g, dtype=torch.float64)
    got = relation_loss(s, t).item()
    assert got > 0.01
    assert got == pytest.approx(_relation_reference(s, t), rel=1e-9)
    assert relation_loss(s[:2], t[:2]).item() == 0.0


def test_relation_loss_batched_over_images_is_mean_of_per_image_losses():
    g = torch.Generator().manual_seed(1)
    counts = [4, 2, 7, 0, 3]  # images with < 3 GIs are left out of the mean
    s = torch.randn(sum(counts), 12, generator=g, dtype=torch.float64)
    t = torch.randn(sum(counts), 12, generator=g, dtype=torch.float64)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    expected = [
        _relation_reference(s[a : a + n], t[a : a + n]) for a, n in zip(starts, counts) if n >= 3
    ]
    got = relation_loss(s, t, counts).item()
    assert got == pytest.approx(sum(expected) / len(expected), rel=1e-9)
    assert relation_loss(s[:6], t[:6], [2, 2, 2]).item() == 0.0


def _kd(student=None, teacher=None, **kw):
    return tiny_kd("gid", L(GIDDistiller)(**kw), student, teacher)


def test_fpn_level_of_known_box_sizes():
    d = _kd().distillers["gid"]
    sizes = [224, 112, 448, 56, 2000, 16]
    boxes = [Boxes(torch.tensor([[0, 0, float(x), float(x)] for x in sizes]))]
    assert d.box_levels(boxes) == ["p4", "p3", "p5", "p3", "p7", "p3"]
    assert d.adapter.in_channels == 64 and d.adapter.out_channels == 128


def test_fpn_levels_equal_detectron2_assign_boxes_to_levels():
    """GIDDistiller._levels (one area for the batch) equals detectron2's per-image rule, boxes
    at the level boundaries (sqrt(area) = 224 * 2^k) and empty boxes included."""
    from detectron2.modeling.poolers import assign_boxes_to_levels

    d = _kd().distillers["gid"]
    p = d.pooler
    g = torch.Generator().manual_seed(4)
    boxes = []
    for n in (9, 0, 14):
        xy = torch.rand(n, 2, generator=g) * 300
        boxes.append(Boxes(torch.cat([xy, xy + torch.rand(n, 2, generator=g) ** 3 * 1500], 1)))
    edges = torch.tensor([[0.0, 0.0, 224.0 * 2.0**k, 224.0] for k in (-4, -2, -1, 0, 1, 2, 4, 6)])
    near = torch.tensor(
        [
            [0.0, 0.0, 224.0 * 2.0**k + e, 224.0 * 2.0**k + e]
            for k in (-1, 0, 1, 2)
            for e in (-0.3, 0.3)
        ]
    )  # squares just off them
    boxes.append(Boxes(torch.cat([edges, near, torch.tensor([[5.0, 5.0, 5.0, 9.0]])])))
    ref = assign_boxes_to_levels(
        boxes, p.min_level, p.max_level, p.canonical_box_size, p.canonical_level
    )
    got = d._levels(Boxes.cat(boxes).tensor)
    assert got.dtype == torch.int64 and torch.equal(got, ref)
    assert set(ref.tolist()) == {0, 1, 2, 3, 4}  # every level of p3-p7


def test_response_mask_follows_the_anchor_matcher():
    model = _kd()
    student = model.student
    feats = [torch.zeros(1, 64, 128 // s, 128 // s) for s in (8, 16, 32, 64, 128)]
    anchors = student.anchor_generator(feats)
    all_anchors = Boxes.cat(anchors).tensor
    gi = Boxes(torch.tensor([[10.0, 20.0, 50.0, 44.0], all_anchors[500].tolist()]))
    mask = model.distillers["gid"]._response_mask(student, anchors, [gi, Boxes(torch.zeros(0, 4))])
    iou = box_iou(gi.tensor, all_anchors)  # (2, R)
    best = iou.max(dim=1).values
    expected = (iou.max(dim=0).values >= 0.5) | ((iou == best[:, None]) & (iou > 0)).any(dim=0)
    assert mask.shape == (2, len(all_anchors))
    assert torch.equal(mask[0], expected) and mask[0, 500]
    assert not mask[1].any()


def test_heterogeneous_pairs_are_clear_errors():
    fcos = load_config("configs/common/models/tiny_retinanet.py").model  # same pieces, FCOS head
    from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead

    fcos._target_ = FCOS
    del fcos.anchor_generator, fcos.box2box_transform, fcos.anchor_matcher, fcos.input_format
    fcos.head._target_ = FCOSHead
    del fcos.head.num_anchors
    with pytest.raises(
        ValueError, match="different heads.*selection='location', response=False.*PKD or ReviewKD"
    ):
        _kd(teacher=fcos)
    with pytest.raises(ValueError, match=r"different class counts \(3 vs 5\)\. Use"):
        _kd(teacher=tiny_retinanet_cfg(num_classes=5))
    # an R-CNN of 3 classes counts 1 here (its RPN's objectness): the message says why
    with pytest.raises(
        ValueError,
        match=r"different class counts \(1 vs 3\) \(an R-CNN's dense "
        r"predictions are its RPN's: one class, objectness\)",
    ):
        _kd(student=tiny_faster_rcnn_cfg(num_classes=3))
    other = tiny_retinanet_cfg()
    other.anchor_generator.sizes = [[x] for x in [16, 32, 64, 128, 256]]
    other.head.num_anchors = 3
    with pytest.raises(ValueError, match="different anchors"):
        _kd(teacher=other)
    with pytest.raises(ValueError, match="set response=False"):
        _kd(student=fcos, selection="location")
    # FCOS with FCOS works (same family, same locations).
    fcos_model = _kd(student=fcos, teacher=fcos)
    with EventStorage():
        losses = fcos_model(make_inputs())
    assert all(torch.isfinite(v) for v in losses.values())
    # FCOS student, RetinaNet teacher: per-location selection, feature + relation only.
    hetero = _kd(student=fcos, selection="location", response=False)
    assert hetero.distillers["gid"].location_strides == [8, 16, 32, 64, 128]
    with EventStorage() as storage:
        losses = hetero(make_inputs())
        assert storage.latest()["gid/num_instances"][0] == 10.0
    assert "loss_gid_response_cls" not in losses and losses["loss_gid_feat"] > 0
    sum(losses.values()).backward()


def test_location_selection_on_an_aligned_pair_selects_per_anchor_and_says_so():
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    gid_logger = logging.getLogger("detkd.losses.gid")
    gid_logger.addHandler(handler)
    try:
        model = _kd(selection="location")  # two RetinaNets with the same anchors and classes
    finally:
        gid_logger.removeHandler(handler)
    gid = model.distillers["gid"]
    assert gid.location_strides is None and gid.response
    assert [r.levelno for r in records] == [logging.WARNING]
    assert (
        "selected per anchor" in records[0].getMessage()
        and "response term" in records[0].getMessage()
    )
    with EventStorage():
        losses = model(make_inputs())
    assert "loss_gid_response_cls" in losses


def test_per_location_picks_the_best_anchor():
    from detkd.losses.gid import per_location

    # one level, 2 locations x 3 anchors, 2 classes
    logits = torch.tensor(
        [[[0.0, 1.0], [3.0, -1.0], [0.5, 0.5], [-2.0, -2.0], [-1.0, 2.0], [0.0, 0.0]]]
    )
    boxes = torch.arange(24, dtype=torch.float).view(1, 6, 4)
    out = dict(
        logits=logits, boxes=boxes, anchors=[Boxes(torch.zeros(6, 4))], num_anchors=[3], strides=[8]
    )
    scores, bx = per_location(out, [8], class_agnostic=False)
    assert torch.allclose(scores, logits[:, [1, 4]].sigmoid())
    assert torch.equal(bx, boxes[:, [1, 4]])
    agn, _ = per_location(out, [8], class_agnostic=True)
    assert torch.allclose(agn[..., 0], torch.tensor([[3.0, 2.0]]).sigmoid())


def test_gradients_and_empty_selection():
    model = _kd()
    with EventStorage() as storage:
        losses = model(make_inputs(empty=(1,)))
        logged = storage.latest()
    assert set(losses) >= {
        "loss_gid_feat",
        "loss_gid_relation",
        "loss_gid_response_cls",
        "loss_gid_response_reg",
    }
    assert logged["gid/num_instances"][0] == 10.0
    sum(v for k, v in losses.items() if "gid" in k).backward()
    assert model.distillers["gid"].adapter.weight.grad is not None
    assert model.student.head.cls_score.weight.grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())

    none = _kd(min_size=1000.0)  # nothing survives: zero losses with a grad path, no NaN
    with EventStorage():
        losses = none(make_inputs())
    gid = {k: v for k, v in losses.items() if "gid" in k}
    assert all(v.item() == 0.0 for v in gid.values())
    sum(gid.values()).backward()


def test_faster_rcnn_pair_uses_rpn():
    model = _kd(
        student=tiny_faster_rcnn_cfg(), teacher=tiny_faster_rcnn_cfg(width=32, fpn=64), num_levels=4
    )
    d = model.distillers["gid"]
    assert [s for s, _ in d.pairs] == ["p2", "p3", "p4", "p5"]
    with EventStorage():
        losses = model(make_inputs())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.student.proposal_generator.rpn_head.objectness_logits.weight.grad is not None


def test_faster_rcnn_default_levels_are_the_box_heads_p2_to_p5():
    """METHODS.md 3.2: GIs of an R-CNN are pooled from p2-p5 (clamp [2, 5]), the levels its box
    head pools from, not the RPN's p6; a RetinaNet pair keeps all its shared levels."""
    d = _kd(
        student=tiny_faster_rcnn_cfg(), teacher=tiny_faster_rcnn_cfg(width=32, fpn=64)
    ).distillers["gid"]
    assert [s for s, _ in d.pairs] == ["p2", "p3", "p4", "p5"]
    assert (d.pooler.min_level, d.pooler.max_level) == (2, 5)
    assert [s for s, _ in _kd().distillers["gid"].pairs] == ["p3", "p4", "p5", "p6", "p7"]


def test_demo_config_trains_through_kdtrainer(tmp_path):
    trainer, results = short_train("configs/demo/gid_retinanet.py", tmp_path, iters=3)
    assert "bbox" in results
    for key in ("loss_gid_feat", "loss_gid_relation", "loss_gid_response_cls", "gid/num_instances"):
        values = history(trainer, key)
        assert len(values) == 3 and all(v == v for v in values), key


def _select_reference(
    t, s, tb, sb, sizes, topk, nms_thresh, min_size, pre_nms_topk, level_sizes=None
):
    """Per-image GISM with detectron2's ops: the definition the batched code must equal
    (METHODS.md 3.1: the pre-NMS top-k is taken per FPN level, NMS across levels)."""
    from torchvision.ops import nms

    out = []
    for i, (h, w) in enumerate(sizes):
        gi = (t[i] - s[i]).abs().amax(-1)
        b = torch.where((t[i].amax(-1) > s[i].amax(-1))[:, None], tb[i], sb[i])
        bx = Boxes(b.clone())
        bx.clip((h, w))
        ok = ((bx.tensor[:, 2:] - bx.tensor[:, :2]) > min_size).all(1)
        keep = []
        for lvl in torch.arange(len(gi)).split(level_sizes or [len(gi)]):
            idx = lvl[ok[lvl]]
            if len(idx) > pre_nms_topk:
                idx = idx[gi[idx].topk(pre_nms_topk).indices]
            keep.append(idx)
        keep = torch.cat(keep)
        sc = gi[keep]
        k = nms(bx.tensor[keep], sc, nms_thresh)[:topk]
        out.append((bx.tensor[keep][k], sc[k]))
    return out


def test_selection_of_a_batch_equals_per_image_reference():
    g = torch.Generator().manual_seed(5)
    N, R, K = 4, 300, 3
    t, s = torch.rand(N, R, K, generator=g), torch.rand(N, R, K, generator=g)
    xy = torch.rand(N, R, 2, generator=g) * 100 - 10
    tb = torch.cat([xy, xy + torch.rand(N, R, 2, generator=g) * 60], -1)
    sb = tb + torch.randn(N, R, 4, generator=g) * 3
    sizes = [(100, 120), (80, 80), (64, 100), (100, 100)]
    s[3] = t[3]  # no disagreement at all: every GI score is 0
    sb[2] = tb[2] = torch.tensor([0.0, 0.0, 5.0, 5.0])  # image 2: every box too small, no GI
    for topk, pre in ((10, 3000), (4, 50)):
        got = select_general_instances(
            t, s, tb, sb, sizes, topk=topk, nms_thresh=0.3, min_size=10, pre_nms_topk=pre
        )
        ref = _select_reference(t, s, tb, sb, sizes, topk, 0.3, 10, pre)
        assert len(got[0][0]) == topk and len(got[2][0]) == 0
        assert len(got[3][0]) > 0 and not got[3][1].any()  # ties: which boxes win is arbitrary
        for (gb, gs), (rb, rs) in zip(got[:3], ref[:3]):
            assert torch.equal(gs, rs) and torch.equal(gb.tensor, rb)


@pytest.mark.parametrize(
    "thresholds,labels,allow_low",
    [
        ([0.4, 0.5], [0, -1, 1], True),
        ([0.3, 0.7], [0, -1, 1], True),
        ([0.5], [0, 1], False),
        ([0.5], [1, 0], True),
    ],
)
def test_batched_matcher_positives_equal_detectron2_matcher(thresholds, labels, allow_low):
    from detectron2.modeling.matcher import Matcher
    from detectron2.structures import pairwise_iou

    from detkd.losses.gid import batched_matcher_positives

    matcher = Matcher(thresholds, labels, allow_low_quality_matches=allow_low)
    g = torch.Generator().manual_seed(2)
    xy = torch.rand(400, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + torch.rand(400, 2, generator=g) * 40 + 4], 1)
    gts = []
    for n in (5, 0, 1, 9):
        xy = torch.rand(n, 2, generator=g) * 100
        gts.append(Boxes(torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 50 + 2], 1)))
    gts[3].tensor[0] = torch.tensor([500.0, 500.0, 510.0, 510.0])  # overlaps no anchor
    got = batched_matcher_positives(matcher, gts, anchors)
    for i, b in enumerate(gts):  # image 1 has no box: Matcher labels every anchor labels[0]
        _, lab = matcher(pairwise_iou(b, Boxes(anchors)))
        assert torch.equal(got[i], lab == 1), i


def test_selection_widens_past_clusters_of_duplicates():
    # 120 near-copies of one box score highest: the first candidates collapse to one GI, and the
    # rest of the top-k must come from far down the ranking (the early-exit NMS must widen).
    g = torch.Generator().manual_seed(3)
    R = 200
    s = torch.zeros(1, R, 1)
    t = torch.linspace(1.0, 0.01, R)[None, :, None]
    tb = torch.tensor([10.0, 10.0, 50.0, 50.0]).repeat(1, R, 1) + torch.rand(1, R, 4, generator=g)
    xy = torch.rand(R - 120, 2, generator=g) * 150
    tb[0, 120:] = torch.cat([xy, xy + 12 + torch.rand(R - 120, 2, generator=g) * 20], -1)
    got = select_general_instances(
        t, s, tb, tb.clone(), [(200, 200)], topk=10, nms_thresh=0.3, min_size=5
    )
    ref = _select_reference(t, s, tb, tb.clone(), [(200, 200)], 10, 0.3, 5, 3000)
    assert len(got[0][0]) == 10
    assert torch.equal(got[0][1], ref[0][1]) and torch.equal(got[0][0].tensor, ref[0][0])


def test_pre_nms_topk_is_per_level():
    # METHODS.md 3.1: the pre-NMS top-k is per FPN level. Level 0 (30 predictions) outscores
    # level 1 (20) everywhere; with a cut of 3 per level, the candidates are level 0's 3 best and
    # level 1's 3 best (a cut of 3 per image would keep level 0's 3 alone).
    R0, R1 = 30, 20
    xy = (
        torch.stack(
            torch.meshgrid(torch.arange(10.0), torch.arange(5.0), indexing="ij"), -1
        ).reshape(-1, 2)
        * 40
    )
    tb = torch.cat([xy, xy + 20], -1)[None]  # (1, 50, 4), no two boxes overlap
    t = torch.cat([torch.linspace(0.9, 0.6, R0), torch.linspace(0.5, 0.1, R1)])[None, :, None]
    s = torch.zeros_like(t)
    got = select_general_instances(
        t,
        s,
        tb,
        tb.clone(),
        [(400, 400)],
        topk=10,
        min_size=5,
        pre_nms_topk=3,
        level_sizes=[R0, R1],
    )[0]
    torch.testing.assert_close(got[1], torch.cat([t[0, :3, 0], t[0, R0 : R0 + 3, 0]]))
    torch.testing.assert_close(got[0].tensor, torch.cat([tb[0, :3], tb[0, R0 : R0 + 3]]))
    one_level = select_general_instances(
        t, s, tb, tb.clone(), [(400, 400)], topk=10, min_size=5, pre_nms_topk=3
    )[0]
    torch.testing.assert_close(one_level[1], t[0, :3, 0])
    with pytest.raises(ValueError, match="do not add up"):
        select_general_instances(t, s, tb, tb, [(400, 400)], level_sizes=[R0, R1 + 1])


@pytest.mark.parametrize("pre", [25, 60, 3000])
def test_selection_per_level_equals_reference_when_widened_past_the_cut(pre):
    # Three levels; near-copies of one box fill each level's top ranks, so the early-exit NMS must
    # widen its candidates past the per-level cut (pre = 25, 60) before it finds 10 GIs.
    g = torch.Generator().manual_seed(11)
    N, sizes_l = 2, [150, 90, 60]
    R = sum(sizes_l)
    t = torch.rand(N, R, 2, generator=g) * 0.5
    s = torch.rand(N, R, 2, generator=g) * 0.5
    xy = torch.rand(N, R, 2, generator=g) * 150
    tb = torch.cat([xy, xy + 12 + torch.rand(N, R, 2, generator=g) * 20], -1)
    for lvl in torch.arange(R).split(sizes_l):  # each level's 20 best: copies of one box
        best = lvl[:20]
        t[:, best, 0] = torch.linspace(1.0, 0.9, 20)
        s[:, best] = 0.0
        tb[:, best] = torch.tensor([10.0, 10.0, 50.0, 50.0]) + torch.rand(N, 20, 4, generator=g)
    sb = tb.clone()
    img = [(200, 200), (180, 190)]
    got = select_general_instances(
        t, s, tb, sb, img, topk=10, min_size=5, pre_nms_topk=pre, level_sizes=sizes_l
    )
    ref = _select_reference(t, s, tb, sb, img, 10, 0.3, 5, pre, level_sizes=sizes_l)
    for (gb, gs), (rb, rs) in zip(got, ref):
        assert len(gs) == 10
        assert torch.equal(gs, rs) and torch.equal(gb.tensor, rb)


def test_pool_equals_detectron2_roipooler_values_and_gradients():
    """GIDDistiller.pool (one gather over all levels) equals ROIPooler(ROIAlignV2) per level."""
    from detectron2.modeling.poolers import ROIPooler

    from detkd.losses.gid import roi_align_gather, roi_align_sampling

    g = torch.Generator().manual_seed(7)
    N, S = 3, 10
    strides, sizes = [8, 16, 32, 64], [(20, 26), (10, 13), (5, 7), (3, 4)]
    feats = [
        torch.randn(N, 6, h, w, generator=g, dtype=torch.float64, requires_grad=True)
        for h, w in sizes
    ]
    boxes = []
    for n in (7, 0, 12):  # an image without GIs; boxes of every level, some crossing the border
        xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 220 - 20
        wh = torch.rand(n, 2, generator=g, dtype=torch.float64) ** 2 * 300 + 1
        boxes.append(Boxes(torch.cat([xy, xy + wh], 1)))
    pooler = ROIPooler(
        S, [1.0 / s for s in strides], 2, "ROIAlignV2", canonical_box_size=224, canonical_level=4
    )
    ref = pooler(feats, boxes)  # (G, C, S, S)

    gid = GIDDistiller(pooler_resolution=S)
    gid.pooler, gid.strides = pooler, strides
    got, got_t = gid.pool(feats, [f.detach() * 2 for f in feats], boxes)  # (G*S*S, C)
    got = got.view(-1, S, S, 6).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        got_t.view(-1, S, S, 6).permute(0, 3, 1, 2), 2 * ref.detach(), rtol=1e-9, atol=1e-9
    )
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    g_ref = torch.autograd.grad((ref * w).sum(), feats)
    g_got = torch.autograd.grad((got * w).sum(), feats)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)

    # A hand-computed bin: one 1x1-bin box on a 2x2 map, sampling points at (0.25, 0.75) px.
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    pos, wt = roi_align_sampling(
        torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float64),
        torch.tensor([0]),
        torch.tensor([0]),
        [(1, 2, 2)],
        [1.0],
        output_size=1,
    )
    # aligned: points at -0.5 + (0.5, 1.5) = 0 and 1 on each axis -> the mean of the 4 pixels
    assert roi_align_gather([f], pos, wt).item() == pytest.approx(2.5)


@pytest.mark.parametrize("counts", [[4, 4, 4], [5, 2, 4, 1]])
def test_relation_loss_gradient_matches_finite_differences(counts):
    # The custom Gram backward and the uniform (view) / padded (gather) paths.
    g = torch.Generator().manual_seed(11)
    s = torch.randn(sum(counts), 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(sum(counts), 7, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: relation_loss(x, t, counts), (s,))


@pytest.mark.parametrize("counts", [[4, 4, 4], [5, 2, 0, 4, 1], [2, 1]])
def test_feature_and_relation_losses_equal_separate_autograd_terms(counts):
    """The fused feature + relation pass equals the squared error and relation_loss computed
    with plain autograd, values and gradients (uniform, padded and no-relation batches)."""
    from detkd.losses.gid import feature_and_relation_losses

    g = torch.Generator().manual_seed(len(counts))
    n = sum(counts)
    s = torch.randn(n, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(n, 9, generator=g, dtype=torch.float64)
    sse, rel = feature_and_relation_losses(s, t, counts)
    ref_sse, ref_rel = ((s - t) ** 2).sum(), relation_loss(s, t, counts)
    assert sse.item() == pytest.approx(ref_sse.item(), rel=1e-12)
    assert rel.item() == pytest.approx(ref_rel.item(), rel=1e-12, abs=1e-15)
    got = torch.autograd.grad(0.3 * sse + 2.0 * rel, s)[0]
    ref = torch.autograd.grad(0.3 * ref_sse + 2.0 * ref_rel, s)[0]
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # a second backward through the same graph (retain_graph) gives the same gradient
    sse, rel = feature_and_relation_losses(s, t, counts)
    first = torch.autograd.grad(0.3 * sse + 2.0 * rel, s, retain_graph=True)[0]
    second = torch.autograd.grad(0.3 * sse + 2.0 * rel, s)[0]
    torch.testing.assert_close(first, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second, ref, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: sum(feature_and_relation_losses(x, t, counts)), (s,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gi_losses_of_half_precision_features_are_computed_in_float32(dtype):
    """The public GI losses on fp16/bf16 features (METHODS: loss arithmetic in fp32): the SSE of
    10 + 10 GIs of 25,600 values overflowed fp16 (inf, the relation NaN) and bf16's Gram
    distances gave a relation 15x too large. Values equal the float32 computation on the same
    (rounded) inputs; the gradient comes back in the features' dtype."""
    from detkd.losses.gid import feature_and_relation_losses

    g = torch.Generator().manual_seed(0)
    counts = [10, 10]
    s = (torch.randn(20, 25600, generator=g) * 4).to(dtype).requires_grad_()
    t = (s.detach().float() + 0.01 * torch.randn(20, 25600, generator=g)).to(dtype)
    sse, rel = feature_and_relation_losses(s, t, counts)
    ref_sse, ref_rel = feature_and_relation_losses(s.detach().float(), t.float(), counts)
    assert sse.dtype == rel.dtype == torch.float32 and torch.isfinite(sse) and torch.isfinite(rel)
    assert sse.item() == pytest.approx(ref_sse.item(), rel=1e-5)
    assert rel.item() == pytest.approx(ref_rel.item(), rel=1e-4, abs=1e-9)
    assert relation_loss(s, t, counts).item() == pytest.approx(ref_rel.item(), rel=1e-4, abs=1e-9)
    (grad,) = torch.autograd.grad(sse + rel, s)
    assert grad.dtype == dtype and torch.isfinite(grad).all()


@pytest.mark.parametrize("counts", [[5, 5], [5, 2, 4]])
def test_relation_loss_of_identical_gis_is_the_definitions_not_rounding_noise(counts):
    """GIs of equal features (a flat image region): every distance is 0, on both sides a
    relation loss of 0. From Gram matrices of the raw float32 features the distances were
    rounding residues of |x|^2 and, normalised by their own mean, gave ~1 (0.9-1.8). With one
    student GI moved, the hand computation: an image of n GIs has 2(n-1) pairs at n/2 times the
    mean distance (SmoothL1(n/2 - 1) against the teacher's 1 each) and the others at ~0 (0.5
    each): 0.7 for n = 5, 0.5 for n = 4; images of fewer than 3 GIs are left out."""
    from detkd.losses.gid import feature_and_relation_losses

    g = torch.Generator().manual_seed(0)
    s = torch.cat([(30 * torch.randn(1, 490, generator=g)).expand(n, -1) for n in counts])
    t = torch.cat([(30 * torch.randn(1, 490, generator=g)).expand(n, -1) for n in counts])
    for loss in (
        lambda a: relation_loss(a, t, counts),
        lambda a: feature_and_relation_losses(a, t, counts)[1],
    ):
        a = s.clone().requires_grad_()
        got = loss(a)
        assert got.item() == 0.0
        assert torch.equal(torch.autograd.grad(got, a)[0], torch.zeros_like(a))
        moved = s.clone()
        moved[[sum(counts[:i]) for i in range(len(counts))], 0] += 0.3  # each image's first GI
        expected = [{5: 0.7, 4: 0.5}[n] for n in counts if n >= 3]
        assert loss(moved.requires_grad_()).item() == pytest.approx(
            sum(expected) / len(expected), rel=1e-4
        )


def test_one_shared_box_decoding_equals_decoding_both_models():
    """GISM with one decoding (of each prediction's more confident model's deltas) selects
    exactly the boxes that decoding both models and choosing boxes selects; the losses and
    their gradients are the same."""
    model = _kd()
    d = model.distillers["gid"]
    assert d.shared_decoding  # same anchors and box transform
    inputs = make_inputs(n=3, boxes_per_image=3, seed=4)
    results = []
    for shared in (True, False):
        d.shared_decoding = shared
        model.zero_grad(set_to_none=True)
        with EventStorage() as storage:
            losses = {k: v for k, v in model(inputs).items() if "gid" in k}
            logged = {k: v[0] for k, v in storage.latest().items() if k.startswith("gid/")}
        sum(losses.values()).backward()
        results.append((losses, logged, model.student.head.cls_score.weight.grad.clone()))
    (a, la, ga), (b, lb, gb) = results
    assert la == lb and la["gid/num_instances"] > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(ga, gb)
    # a different box transform (weights) on one side: each model decodes its own boxes
    student, teacher = model.student, model.teacher
    teacher.box2box_transform = type(student.box2box_transform)(weights=(2.0, 2.0, 1.0, 1.0))
    assert not GIDDistiller._same_box_transform(student, teacher)


def test_response_regression_compares_boxes_when_the_box_transforms_differ():
    """A teacher whose box transform has other weights encodes the same box as other deltas: its
    boxes are encoded again as the student's deltas. Here the teacher is the student with its
    regression outputs doubled and weights (2, 2, 2, 2): the same boxes, so the regression term
    is 0 (raw deltas gave loss_gid_response_reg 2.5)."""
    teacher = tiny_retinanet_cfg()
    teacher.box2box_transform.weights = [2.0] * 4
    model = _kd(teacher=teacher)
    d = model.distillers["gid"]
    assert d.reencode_teacher_deltas and not d.shared_decoding
    student, teacher = model.student, model.teacher
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():
        teacher.head.bbox_pred.weight.mul_(2.0)
        teacher.head.bbox_pred.bias.mul_(2.0)
    for m in student.modules():  # batch statistics would make the student's maps differ
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    inputs = make_inputs(n=2, boxes_per_image=3, seed=4)
    with EventStorage() as storage:
        losses = model(inputs)
        assert storage.latest()["gid/num_response_positives"][0] > 0
    assert losses["loss_gid_response_reg"].item() == pytest.approx(0.0, abs=1e-5)
    d.reencode_teacher_deltas = False  # the raw deltas of two encodings
    with EventStorage():
        assert model(inputs)["loss_gid_response_reg"].item() > 0.5
    # a scale_clamp of its own does not change what a delta means; another type does
    from detectron2.modeling.box_regression import Box2BoxTransform, Box2BoxTransformLinear

    teacher.box2box_transform = Box2BoxTransform(weights=(1.0,) * 4, scale_clamp=2.0)
    assert GIDDistiller._same_deltas(student, teacher)
    teacher.box2box_transform = Box2BoxTransformLinear()
    assert not GIDDistiller._same_deltas(student, teacher)


def test_a_model_without_dense_head_or_rpn_is_refused_with_the_alternatives():
    """GID selects from dense predictions: an R-CNN on precomputed proposals (no RPN) failed with
    a bare AttributeError; it is refused like a backbone-only model, naming PKD / ReviewKD."""
    from detectron2.layers import ShapeSpec

    from conftest import BackboneOnlyDetector

    no_rpn = tiny_faster_rcnn_cfg()
    no_rpn.proposal_generator = None
    with pytest.raises(
        TypeError, match=r"student \(GeneralizedRCNN\) has no dense head or RPN.*PKD or ReviewKD"
    ):
        _kd(student=no_rpn, teacher=tiny_faster_rcnn_cfg())
    d = GIDDistiller()
    backbone_only = BackboneOnlyDetector({"p3": ShapeSpec(channels=8, stride=8)})
    with pytest.raises(TypeError, match=r"teacher \(BackboneOnlyDetector\) has no dense head"):
        d.bind(_kd().student, backbone_only)


def test_gt_overlap_ratio_counts_gis_over_half_iou_with_their_own_images_gt():
    from types import SimpleNamespace

    from detectron2.structures import Instances

    d = _kd().distillers["gid"]

    def image(gt):
        inst = Instances((100, 100))
        inst.gt_boxes = Boxes(torch.tensor(gt, dtype=torch.float32).reshape(-1, 4))
        return {"instances": inst}

    # image 0: GI 1 equals its GT (IoU 1), GI 2 has IoU 0.5 with it (not > 0.5);
    # image 1: its GI equals image 0's GT but image 1 has no GT; image 2: no instances.
    gis = [
        Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]])),
        Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]])),
        Boxes(torch.tensor([[50.0, 50.0, 60.0, 60.0]])),
    ]
    ctx = SimpleNamespace(batched_inputs=[image([0, 0, 10, 10]), image([]), {"instances": None}])
    with EventStorage() as storage:
        d._log_selection(gis, ctx)
        logged = storage.latest()
    assert logged["gid/num_instances"][0] == pytest.approx(4 / 3)
    assert logged["gid/gt_overlap_ratio"][0] == pytest.approx(1 / 4)
    with EventStorage() as storage:
        d._log_selection([Boxes(torch.zeros(0, 4))] * 3, ctx)
        assert "gid/gt_overlap_ratio" not in storage.latest()


def test_flatten_levels_rows_and_contiguous_gradients():
    """Rows are (image, y, x) positions level after level, channels last; the maps' gradients
    are contiguous NCHW (a channels-last gradient would spread through the student's backward)."""
    from detkd.losses.gid import flatten_levels

    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 3, h, w, generator=g, requires_grad=True) for h, w in ((4, 5), (2, 3))]
    rows = flatten_levels(maps)
    assert rows.shape == (2 * 20 + 2 * 6, 3)
    assert torch.equal(rows[1 * 20 + 2 * 5 + 3], maps[0][1, :, 2, 3])  # image 1, y 2, x 3
    assert torch.equal(rows[40 + 6 + 4], maps[1][1, :, 1, 1])
    weights = torch.randn(rows.shape, generator=g)
    (rows * weights).sum().backward()
    for m in maps:
        assert m.grad.is_contiguous()
    assert torch.equal(maps[0].grad[1, :, 2, 3], weights[1 * 20 + 2 * 5 + 3])
    # a channels-last map (a channels-last student) gets a channels-last gradient
    cl = maps[0].detach().to(memory_format=torch.channels_last).requires_grad_()
    flatten_levels([cl]).sum().backward()
    assert cl.grad.is_contiguous(memory_format=torch.channels_last) and not cl.grad.is_contiguous()


def test_distiller_losses_equal_a_reference_written_from_the_definitions():
    """The four GID losses of one step, with the default weights (METHODS.md 3.5: 5e-4, 40, 0.1,
    1.0) and selection settings (3.1: K = 10, NMS 0.3, side > 10 px), against a reference built
    from the captured head outputs with detectron2's own pieces: per-image GISM with
    torchvision NMS, ROIPooler (ROIAlignV2, 10x10), the adapter as a 1x1 conv, the written-out
    relation loss per image, the student's anchor Matcher, and BCE / L1 written out."""
    import torch.nn.functional as F
    from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
    from detectron2.modeling.poolers import ROIPooler
    from detectron2.structures import pairwise_iou

    model = _kd(teacher=tiny_retinanet_cfg(width=32))  # equal FPN channels (64)
    d = model.distillers["gid"]
    # METHODS.md 3.2 / [INFER]: with equal channels the linear adapter starts as the identity
    assert torch.equal(d.adapter.weight[:, :, 0, 0], torch.eye(64)) and not d.adapter.bias.any()
    with torch.no_grad():  # a non-trivial adapter, so that the reference must apply it
        d.adapter.weight.add_(0.05 * torch.randn_like(d.adapter.weight))
        d.adapter.bias.normal_(0, 0.1)
    saved = []
    d.register_forward_hook(lambda m, args, out: saved.append((args, out)))
    with EventStorage() as storage:
        model(make_inputs(n=2, size=(96, 128), boxes_per_image=2, seed=1))
    logged = {k: v[0] for k, v in storage.latest().items()}
    (s_taps, t_taps, ctx), got = saved[0]
    student, teacher = model.student, model.teacher
    K = student.num_classes

    def flat(taps):
        cls, reg = taps["head"]
        return (
            torch.cat([permute_to_N_HWA_K(x, K) for x in cls], 1).detach(),
            torch.cat([permute_to_N_HWA_K(x, 4) for x in reg], 1).detach(),
        )

    (zs, ds), (zt, dt) = flat(s_taps), flat(t_taps)
    anchors = Boxes.cat(s_taps["anchor_generator"]).tensor
    sb = torch.stack([student.box2box_transform.apply_deltas(x, anchors) for x in ds])
    tb = torch.stack([teacher.box2box_transform.apply_deltas(x, anchors) for x in dt])
    sizes = ctx.teacher_images.image_sizes
    sel = _select_reference(zt.sigmoid(), zs.sigmoid(), tb, sb, sizes, 10, 0.3, 10.0, 3000)
    boxes = [Boxes(b) for b, _ in sel]
    counts = [len(b) for b in boxes]
    assert all(n >= 3 for n in counts)  # every image has a relation term

    levels = ["p3", "p4", "p5", "p6", "p7"]
    pooler = ROIPooler(
        10,
        [1.0 / 2**k for k in range(3, 8)],
        2,
        "ROIAlignV2",
        canonical_box_size=224,
        canonical_level=4,
    )
    with torch.no_grad():
        ps = pooler([s_taps["backbone"][k] for k in levels], boxes)  # (G, C, 10, 10)
        pt = pooler([t_taps["backbone"][k] for k in levels], boxes)
        ps = F.conv2d(ps, d.adapter.weight, d.adapter.bias)
    G = sum(counts)
    feat = ((ps - pt) ** 2).sum() / (G * 100)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    rel = sum(
        _relation_reference(ps[a : a + n].flatten(1).double(), pt[a : a + n].flatten(1).double())
        for a, n in zip(starts, counts)
    ) / len(counts)

    pos = torch.stack(
        [student.anchor_matcher(pairwise_iou(b, Boxes(anchors)))[1] == 1 for b in boxes]
    )
    n_pos = int(pos.sum())
    assert n_pos > 0
    z, q = zs[pos], zt[pos].sigmoid()
    cls = -(q * F.logsigmoid(z) + (1 - q) * F.logsigmoid(-z)).sum() / n_pos
    reg = (ds[pos] - dt[pos]).abs().sum() / n_pos

    expected = {
        "loss_gid_feat": 5e-4 * feat,
        "loss_gid_relation": 40.0 * rel,
        "loss_gid_response_cls": 0.1 * cls,
        "loss_gid_response_reg": 1.0 * reg,
    }
    for k, v in expected.items():
        assert got[k].item() == pytest.approx(float(v), rel=1e-4), k
    # the logged diagnostics: GIs and response positives per image
    assert logged["gid/num_instances"] == pytest.approx(G / 2)
    assert logged["gid/num_response_positives"] == pytest.approx(n_pos / 2)


def test_selection_of_float64_inputs_equals_float32():
    # select_general_instances is public: float64 scores and boxes (e.g. a float64 check of the
    # losses) select what float32 ones do, instead of failing in torchvision's NMS on mixed dtypes
    g = torch.Generator().manual_seed(8)
    t, s = torch.rand(2, 200, 3, generator=g), torch.rand(2, 200, 3, generator=g)
    xy = torch.rand(2, 200, 2, generator=g) * 80
    tb = torch.cat([xy, xy + 12 + torch.rand(2, 200, 2, generator=g) * 30], -1)
    sb = tb + torch.rand(2, 200, 4, generator=g) * 4
    got32 = select_general_instances(t, s, tb, sb, [(100, 100), (90, 120)])
    got64 = select_general_instances(
        t.double(), s.double(), tb.double(), sb.double(), [(100, 100), (90, 120)]
    )
    for (b32, s32), (b64, s64) in zip(got32, got64):
        assert len(b32) == 10 and s64.dtype == torch.float64
        assert torch.equal(b64.tensor, b32.tensor) and torch.allclose(s64, s32.double())


def test_selection_drops_sides_of_10_px_and_keeps_larger():
    # METHODS.md 3.1: drop boxes with a side <= 10 px
    t = torch.tensor([[[0.9], [0.8], [0.7]]])
    s = torch.zeros(1, 3, 1)
    tb = torch.tensor([[[0.0, 0.0, 10.0, 30.0], [50.0, 50.0, 60.5, 80.0], [0.0, 50.0, 30.0, 60.0]]])
    boxes, scores = select_general_instances(t, s, tb, tb, [(100, 100)])[0]
    assert boxes.tensor.tolist() == [[50.0, 50.0, 60.5, 80.0]]


def test_batched_matcher_positives_at_exactly_the_threshold():
    # IoU exactly 0.5 is positive for RetinaNet's matcher ([0.4, 0.5], low <= IoU < high bands)
    from detectron2.modeling.matcher import Matcher

    from detkd.losses.gid import batched_matcher_positives

    matcher = Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 19.0], [0.0, 0.0, 10.0, 21.0]])
    gt = Boxes(torch.tensor([[0.0, 0.0, 10.0, 20.0]]))  # IoU 0.5, 0.95, 0.952 (the best)
    got = batched_matcher_positives(matcher, [gt], anchors)
    _, lab = matcher(box_iou(gt.tensor, anchors))
    assert torch.equal(got[0], lab == 1) and got[0, 0]


# ---- FCOS, Faster R-CNN (RPN) and selection="location": losses against references written from
# the definitions with detectron2's own pieces (the models' label assignment, box transforms,
# ROIPooler, torchvision NMS), on two images of different sizes.


def _fcos_cfg(width=16, fpn=64, num_classes=3):
    from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead

    model = tiny_retinanet_cfg(width=width, fpn=fpn, num_classes=num_classes)
    model._target_ = FCOS
    del model.anchor_generator, model.box2box_transform, model.anchor_matcher, model.input_format
    model.head._target_ = FCOSHead
    del model.head.num_anchors
    return model


def _spread_fcos(model, seed):
    """Boxes of 10-20 px at p3 (a fresh FCOS regresses ~0: no box would pass the 10 px filter) and
    confident, varied class and centerness scores."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.bbox_pred.bias.copy_(
            torch.tensor([1.5, 1.2, 1.8, 1.4]) + 0.3 * torch.rand(4, generator=g)
        )
        model.head.bbox_pred.weight.mul_(30)
        model.head.cls_score.weight.mul_(100)
        model.head.ctrness.weight.mul_(50)


def _spread_retinanet(model):
    with torch.no_grad():
        model.head.cls_score.weight.mul_(100)
        model.head.bbox_pred.weight.mul_(10)


def _run_recording(model):
    """One training step on two images of different sizes; returns the distiller's inputs, its
    losses and the GIs it selected."""
    d = model.distillers["gid"]
    with torch.no_grad():  # a non-trivial adapter, so that the reference must apply it
        d.adapter.weight.add_(0.05 * torch.randn_like(d.adapter.weight))
        d.adapter.bias.normal_(0, 0.1)
    saved, selected = [], []
    select = d._select
    d._select = lambda *a: selected.append(select(*a)) or selected[-1]
    d.register_forward_hook(lambda m, args, out: saved.append((args, out)))
    inputs = make_inputs(n=1, size=(96, 128), seed=1) + make_inputs(n=1, size=(70, 100), seed=2)
    with EventStorage():
        losses = model(inputs)
    (s_taps, t_taps, ctx), got = saved[0]
    assert [tuple(s) for s in ctx.teacher_images.image_sizes] == [(96, 128), (70, 100)]
    return losses, got, s_taps, t_taps, ctx, [b.tensor for b, _ in selected[0]]


def _feature_relation_reference(d, s_fpn, t_fpn, boxes, levels):
    """METHODS.md 3.2 / 3.3 with ROIPooler (ROIAlignV2, 10x10, canonical 224 at level 4) and the
    adapter as a 1x1 conv; the relation per image (>= 3 GIs), averaged over those images."""
    import torch.nn.functional as F
    from detectron2.modeling.poolers import ROIPooler

    pooler = ROIPooler(
        10,
        [1.0 / 2 ** int(k[1:]) for k in levels],
        2,
        "ROIAlignV2",
        canonical_box_size=224,
        canonical_level=4,
    )
    with torch.no_grad():
        ps = pooler([s_fpn[k] for k in levels], [Boxes(b) for b in boxes])
        pt = pooler([t_fpn[k] for k in levels], [Boxes(b) for b in boxes])
        ps = F.conv2d(ps, d.adapter.weight, d.adapter.bias)
    counts = [len(b) for b in boxes]
    feat = ((ps - pt) ** 2).sum() / (sum(counts) * 100)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    rels = [
        _relation_reference(ps[a : a + n].flatten(1).double(), pt[a : a + n].flatten(1).double())
        for a, n in zip(starts, counts)
        if n >= 3
    ]
    return float(feat), sum(rels) / len(rels), counts


def _soft_bce(z, target):
    import torch.nn.functional as F

    return float(-(target * F.logsigmoid(z) + (1 - target) * F.logsigmoid(-z)).sum())


def test_fcos_pair_losses_equal_a_reference_written_from_the_definitions():
    """FCOS student and teacher: GIs from the sigmoid class scores (METHODS.md 3.1) and boxes
    decoded by Box2BoxTransformLinear; response positives from FCOS's own label_anchors with the
    GIs as ground truth; soft BCE on class logits, L1 on the ltrb deltas and soft BCE on the
    centerness logits (target: the teacher's sigmoid centerness; METHODS.md 3.4)."""
    from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
    from detectron2.structures import Instances

    model = _kd(student=_fcos_cfg(), teacher=_fcos_cfg(width=32))
    _spread_fcos(model.student, 1)
    _spread_fcos(model.teacher, 2)
    losses, got, s_taps, t_taps, ctx, gi_boxes = _run_recording(model)
    student, teacher, K = model.student, model.teacher, model.student.num_classes

    def flat(taps):
        return [
            torch.cat([permute_to_N_HWA_K(x, k) for x in maps], 1).detach()
            for maps, k in zip(taps["head"], (K, 4, 1))
        ]

    (zs, ds, cs), (zt, dt, ct) = flat(s_taps), flat(t_taps)
    anchors = student.anchor_generator([s_taps["backbone"][k] for k in student.head_in_features])
    flat_anchors = Boxes.cat(anchors).tensor
    sb = torch.stack([student.box2box_transform.apply_deltas(x, flat_anchors) for x in ds])
    tb = torch.stack([teacher.box2box_transform.apply_deltas(x, flat_anchors) for x in dt])
    sel = _select_reference(
        zt.sigmoid(), zs.sigmoid(), tb, sb, ctx.teacher_images.image_sizes, 10, 0.3, 10.0, 3000
    )
    boxes = [b for b, _ in sel]
    assert [len(b) for b in boxes] == [10, 10]
    assert all(torch.allclose(g, r) for g, r in zip(gi_boxes, boxes))
    feat, rel, _ = _feature_relation_reference(
        model.distillers["gid"],
        s_taps["backbone"],
        t_taps["backbone"],
        boxes,
        ["p3", "p4", "p5", "p6", "p7"],
    )
    gts = []
    for b in boxes:
        inst = Instances((1, 1))
        inst.gt_boxes, inst.gt_classes = Boxes(b), torch.zeros(len(b), dtype=torch.long)
        gts.append(inst)
    labels, _ = student.label_anchors(anchors, gts)
    pos = torch.stack(labels) != K  # FCOS: no ignored locations
    n_pos = int(pos.sum())
    assert pos.sum(1).min() > 0
    expected = {
        "loss_gid_feat": 5e-4 * feat,
        "loss_gid_relation": 40.0 * rel,
        "loss_gid_response_cls": 0.1 * _soft_bce(zs[pos], zt[pos].sigmoid()) / n_pos,
        "loss_gid_response_reg": 1.0 * float((ds[pos] - dt[pos]).abs().sum()) / n_pos,
        "loss_gid_response_ctr": 0.1 * _soft_bce(cs[pos], ct[pos].sigmoid()) / n_pos,
    }
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].item() == pytest.approx(v, rel=1e-4), k
    sum(v for k, v in losses.items() if "gid" in k).backward()
    assert student.head.ctrness.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_fcos_response_ctr_weight():
    model = _kd(student=_fcos_cfg(), teacher=_fcos_cfg(width=32), response_ctr_weight=0.0)
    _spread_fcos(model.student, 1)
    _spread_fcos(model.teacher, 2)
    with EventStorage():
        losses = model(make_inputs())
    assert losses["loss_gid_response_ctr"].item() == 0.0 and losses["loss_gid_response_cls"] > 0


def test_faster_rcnn_pair_losses_equal_a_reference_written_from_the_definitions():
    """GeneralizedRCNN: GIs from the RPN's objectness (C = 1) and the proposals its own
    _decode_proposals makes; features and relation on p2-p5 (FPN levels clamped to [2, 5]);
    response positives from the RPN's anchor Matcher (0.3 / 0.7, low-quality matches), soft BCE
    on objectness and L1 on the RPN deltas (METHODS.md 3.4)."""
    from detectron2.structures import pairwise_iou

    model = _kd(
        student=tiny_faster_rcnn_cfg(), teacher=tiny_faster_rcnn_cfg(width=32), num_levels=4
    )
    for m in (model.student, model.teacher):  # varied, unsaturated objectness
        with torch.no_grad():
            m.proposal_generator.rpn_head.objectness_logits.weight.mul_(15)
            m.proposal_generator.rpn_head.anchor_deltas.weight.mul_(20)
    losses, got, s_taps, t_taps, ctx, gi_boxes = _run_recording(model)
    rpn_s, rpn_t = model.student.proposal_generator, model.teacher.proposal_generator

    def flat(taps, rpn):  # as RPN.forward flattens its head's outputs
        obj, deltas = taps["proposal_generator.rpn_head"]
        obj = torch.cat([o.permute(0, 2, 3, 1).flatten(1) for o in obj], 1).detach()
        deltas = [
            x.view(x.shape[0], -1, 4, *x.shape[-2:]).permute(0, 3, 4, 1, 2).flatten(1, -2).detach()
            for x in deltas
        ]
        return obj, deltas

    (os_, ds), (ot, dt) = flat(s_taps, rpn_s), flat(t_taps, rpn_t)
    anchors = rpn_s.anchor_generator([s_taps["backbone"][k] for k in rpn_s.in_features])
    sb = torch.cat(rpn_s._decode_proposals(anchors, ds), 1)
    tb = torch.cat(rpn_t._decode_proposals(anchors, dt), 1)
    ds, dt = torch.cat(ds, 1), torch.cat(dt, 1)
    sel = _select_reference(
        ot.sigmoid()[..., None],
        os_.sigmoid()[..., None],
        tb,
        sb,
        ctx.teacher_images.image_sizes,
        10,
        0.3,
        10.0,
        3000,
    )
    boxes = [b for b, _ in sel]
    assert [len(b) for b in boxes] == [10, 10]
    assert all(torch.allclose(g, r) for g, r in zip(gi_boxes, boxes))
    feat, rel, _ = _feature_relation_reference(
        model.distillers["gid"],
        s_taps["backbone"],
        t_taps["backbone"],
        boxes,
        ["p2", "p3", "p4", "p5"],
    )
    all_anchors = Boxes.cat(anchors)
    pos = torch.stack(
        [rpn_s.anchor_matcher(pairwise_iou(Boxes(b), all_anchors))[1] == 1 for b in boxes]
    )
    n_pos = int(pos.sum())
    assert pos.sum(1).min() > 0
    expected = {
        "loss_gid_feat": 5e-4 * feat,
        "loss_gid_relation": 40.0 * rel,
        "loss_gid_response_cls": 0.1 * _soft_bce(os_[pos], ot[pos].sigmoid()) / n_pos,
        "loss_gid_response_reg": 1.0 * float((ds[pos] - dt[pos]).abs().sum()) / n_pos,
    }
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].item() == pytest.approx(v, rel=1e-4), k
    sum(v for k, v in losses.items() if "gid" in k).backward()
    assert model.student.proposal_generator.rpn_head.anchor_deltas.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())


def _per_location_reference(model, taps, strides, class_agnostic):
    """From the head's raw (N, A*K, H, W) maps: at each location the anchor whose best class
    probability is highest gives the location's class probabilities (or their max) and its box,
    decoded by the model's own transform from the anchor generator's anchor there."""
    from detectron2.modeling.meta_arch import GeneralizedRCNN

    if isinstance(model, GeneralizedRCNN):
        rpn = model.proposal_generator
        obj, reg = taps["proposal_generator.rpn_head"]
        cls = [o[:, :, None] for o in obj]
        gen, b2b, names = rpn.anchor_generator, rpn.box2box_transform, rpn.in_features
    else:
        cls = [x.view(x.shape[0], -1, model.num_classes, *x.shape[-2:]) for x in taps["head"][0]]
        reg = taps["head"][1]
        gen, b2b, names = model.anchor_generator, model.box2box_transform, model.head_in_features
    anchors = gen([taps["backbone"][k] for k in names])
    scores, boxes = [], []
    for st in strides:
        i = list(gen.strides).index(st)
        p = cls[i].detach().sigmoid()  # (N, A, K, H, W)
        N, A, K, H, W = p.shape
        d = reg[i].detach().view(N, A, 4, H, W)
        a = p.amax(dim=2).argmax(dim=1).flatten(1)  # (N, H*W)
        n, loc = torch.arange(N)[:, None], torch.arange(H * W)[None, :]
        p = p.flatten(3).permute(0, 3, 1, 2)[n, loc, a]  # (N, HW, A, K) -> picked (N, HW, K)
        d = d.flatten(3).permute(0, 3, 1, 2)[n, loc, a]  # (N, HW, 4)
        anc = anchors[i].tensor.view(H * W, A, 4)[loc, a]  # (N, HW, 4)
        boxes.append(b2b.apply_deltas(d.reshape(-1, 4), anc.reshape(-1, 4)).view(N, H * W, 4))
        scores.append(p.amax(-1, keepdim=True) if class_agnostic else p)
    return torch.cat(scores, 1), torch.cat(boxes, 1)


@pytest.mark.parametrize(
    "pair", ["fcos_from_retinanet", "fcos_from_retinanet_5_classes", "retinanet_from_faster_rcnn"]
)
def test_location_selection_losses_equal_a_reference_written_from_the_definitions(pair):
    """selection='location': one prediction per location of the shared strides (the best anchor
    of each), class-agnostic when the class counts differ; feature and relation terms only."""
    if pair == "retinanet_from_faster_rcnn":
        model = _kd(
            student=tiny_retinanet_cfg(),
            teacher=tiny_faster_rcnn_cfg(width=32),
            selection="location",
            response=False,
        )
        _spread_retinanet(model.student)
        with torch.no_grad():
            model.teacher.proposal_generator.rpn_head.objectness_logits.weight.mul_(15)
        strides, agnostic, levels = [8, 16, 32, 64], True, ["p3", "p4", "p5", "p6"]
    else:
        classes = 5 if pair.endswith("5_classes") else 3
        model = _kd(
            student=_fcos_cfg(),
            teacher=tiny_retinanet_cfg(width=32, num_classes=classes),
            selection="location",
            response=False,
        )
        _spread_fcos(model.student, 1)
        _spread_retinanet(model.teacher)
        strides, agnostic, levels = (
            [8, 16, 32, 64, 128],
            classes != 3,
            ["p3", "p4", "p5", "p6", "p7"],
        )
    d = model.distillers["gid"]
    assert d.location_strides == strides and d.class_agnostic == agnostic
    losses, got, s_taps, t_taps, ctx, gi_boxes = _run_recording(model)
    ts, tb = _per_location_reference(model.teacher, t_taps, strides, agnostic)
    ss, sb = _per_location_reference(model.student, s_taps, strides, agnostic)
    assert ts.shape[-1] == ss.shape[-1] == (1 if agnostic else 3)
    sel = _select_reference(ts, ss, tb, sb, ctx.teacher_images.image_sizes, 10, 0.3, 10.0, 3000)
    boxes = [b for b, _ in sel]
    assert sum(len(b) >= 3 for b in boxes) >= 1  # a relation term
    assert len(gi_boxes) == 2 and all(torch.allclose(g, r) for g, r in zip(gi_boxes, boxes))
    t_fpn = {s: t_taps["backbone"][t] for s, t in d.pairs}
    feat, rel, _ = _feature_relation_reference(d, s_taps["backbone"], t_fpn, boxes, levels)
    assert set(got) == {"loss_gid_feat", "loss_gid_relation"}
    assert got["loss_gid_feat"].item() == pytest.approx(5e-4 * feat, rel=1e-4)
    assert got["loss_gid_relation"].item() == pytest.approx(40.0 * rel, rel=1e-4)
    sum(v for k, v in losses.items() if "gid" in k).backward()
    assert model.student.backbone.bottom_up.stem.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())


@pytest.mark.parametrize("family", ["fcos", "faster_rcnn", "location"])
def test_no_general_instance_gives_zero_losses_with_a_gradient_path(family):
    if family == "fcos":
        model = _kd(student=_fcos_cfg(), teacher=_fcos_cfg(width=32), min_size=1000.0)
    elif family == "faster_rcnn":
        model = _kd(
            student=tiny_faster_rcnn_cfg(),
            teacher=tiny_faster_rcnn_cfg(width=32),
            num_levels=4,
            min_size=1000.0,
        )
    else:
        model = _kd(
            student=_fcos_cfg(),
            teacher=tiny_retinanet_cfg(num_classes=5),
            min_size=1000.0,
            selection="location",
            response=False,
        )
    with EventStorage() as storage:
        losses = model(make_inputs(empty=(1,)))
        assert storage.latest()["gid/num_instances"][0] == 0.0
    gid = {k: v for k, v in losses.items() if "gid" in k}
    assert len(gid) == {"fcos": 5, "faster_rcnn": 4, "location": 2}[family]
    # +0.0: a zero loss does not log as -0.0 (a negative sum times 0)
    assert all(v.item() == 0.0 and math.copysign(1.0, v.item()) == 1.0 for v in gid.values()), gid
    sum(gid.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())


def test_distiller_defaults_are_the_ports_hyperparameters():
    """METHODS.md 3.1-3.5: K = 10 GIs per image, NMS IoU 0.3, sides <= 10 px dropped, 3000
    candidates before NMS, 10x10 ROIAlign; weights 5e-4 / 40 / 0.1 / 1.0 (centerness as cls)."""
    d = GIDDistiller()
    assert (d.topk, d.nms_thresh, d.min_size, d.pre_nms_topk, d.pooler_resolution) == (
        10,
        0.3,
        10.0,
        3000,
        10,
    )
    assert d.weights == dict(feat=5e-4, relation=40.0, cls=0.1, reg=1.0, ctr=0.1)
    assert d.response and d.selection == "anchor"


@pytest.mark.parametrize("selection", ["anchor", "location"])
def test_distiller_cuts_candidates_per_fpn_level(selection):
    """GIDDistiller passes its models' FPN level sizes to the selection: with pre_nms_topk=5 the
    candidates are each level's 5 best (METHODS.md 3.1), not the image's 5 best."""
    from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K

    teacher = _fcos_cfg(width=32) if selection == "anchor" else tiny_retinanet_cfg(width=32)
    model = _kd(
        student=_fcos_cfg(),
        teacher=teacher,
        pre_nms_topk=5,
        min_size=1.0,
        nms_thresh=0.9,
        selection=selection,
        response=False,
    )
    _spread_fcos(model.student, 1)
    if selection == "anchor":
        _spread_fcos(model.teacher, 2)
    else:  # confident scores; boxes near its anchors (varied, unlike _spread_retinanet's)
        with torch.no_grad():
            model.teacher.head.cls_score.weight.mul_(100)
    _, _, s_taps, t_taps, ctx, gi_boxes = _run_recording(model)
    feats = [s_taps["backbone"][k] for k in model.student.head_in_features]
    # one prediction per location (FCOS: one anchor per location; the RetinaNet teacher's is
    # checked against its own reference above), so the level sizes are the maps' H * W
    level_sizes = [f.shape[-2] * f.shape[-1] for f in feats]
    anchors = Boxes.cat(model.student.anchor_generator(feats)).tensor
    K = model.student.num_classes

    def scores_boxes(m, taps, seed_model):
        if selection == "location" and seed_model is model.teacher:
            return _per_location_reference(m, taps, [8, 16, 32, 64, 128], False)
        z = torch.cat([permute_to_N_HWA_K(x, K) for x in taps["head"][0]], 1).detach()
        d = torch.cat([permute_to_N_HWA_K(x, 4) for x in taps["head"][1]], 1).detach()
        return z.sigmoid(), torch.stack([m.box2box_transform.apply_deltas(x, anchors) for x in d])

    ss, sb = scores_boxes(model.student, s_taps, model.student)
    ts, tb = scores_boxes(model.teacher, t_taps, model.teacher)
    sizes = ctx.teacher_images.image_sizes
    ref = [
        b
        for b, _ in _select_reference(
            ts, ss, tb, sb, sizes, 10, 0.9, 1.0, 5, level_sizes=level_sizes
        )
    ]
    per_image = [b for b, _ in _select_reference(ts, ss, tb, sb, sizes, 10, 0.9, 1.0, 5)]
    assert all(len(b) > 5 for b in ref)  # more than one level's 5 candidates survive
    assert all(len(b) <= 5 for b in per_image)  # what a cut of 5 per image would give
    assert [len(g) for g in gi_boxes] == [len(r) for r in ref]
    assert all(torch.allclose(g, r) for g, r in zip(gi_boxes, ref))


def test_roi_align_sampling_points_exactly_on_the_minus_1_and_size_bounds_count():
    """torchvision's roi_align (ROIAlignV2) samples a point at exactly -1 or exactly the map size
    (clamped to the edge pixel) and gives 0 only further out. Box [-3, 7] on a 4x4 map, one bin,
    2x2 points: -3.5 + (2.5, 7.5) = -1 and 4 on each axis -> pixels 0 and 3 -> the corners' mean
    (0 + 3 + 12 + 15) / 4 = 7.5; a box 0.001 wider on each side has every point outside: 0."""
    from torchvision.ops import roi_align

    from detkd.losses.gid import roi_align_gather, roi_align_sampling

    f = torch.arange(16.0, dtype=torch.float64).view(1, 1, 4, 4)
    for box, expected in (
        ([-3.0, -3.0, 7.0, 7.0], 7.5),
        ([-3.001, -3.001, 7.001, 7.001], 0.0),
        ([-3.0, 0.0, 7.0, 2.0], 3.5),
    ):  # y points at 0.5 and 1.5: rows 0-2
        b = torch.tensor([box], dtype=torch.float64)
        one = torch.tensor([0])
        pos, wt = roi_align_sampling(b, one, one, [(1, 4, 4)], [1.0], output_size=1)
        rois = torch.cat([torch.zeros(1, 1, dtype=torch.float64), b], 1)
        ref = roi_align(f, rois, 1, 1.0, 2, aligned=True)
        assert ref.item() == pytest.approx(expected, abs=1e-12)
        assert roi_align_gather([f], pos, wt).item() == pytest.approx(expected, abs=1e-12), box


def test_flatten_levels_gives_a_non_leaf_map_its_gradient_in_the_maps_memory_format():
    """The FPN maps are non-leaf tensors: the gradient reaching them is read with a hook (a
    leaf's .grad is re-laid out to the leaf's strides by autograd whatever backward gives).
    NCHW map -> NCHW-contiguous gradient, channels-last map -> channels-last gradient."""
    from detkd.losses.gid import flatten_levels

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    w = torch.randn(2 * 4 * 5, 3, generator=g)
    nchw, cl = torch.contiguous_format, torch.channels_last
    for fmt, other in ((nchw, cl), (cl, nchw)):
        m = (x * 1.0).contiguous(memory_format=fmt)
        seen = []
        m.register_hook(seen.append)
        (flatten_levels([m]) * w).sum().backward()
        assert seen[0].is_contiguous(memory_format=fmt)
        assert not seen[0].is_contiguous(memory_format=other)
        assert torch.equal(seen[0], w.view(2, 4, 5, 3).permute(0, 3, 1, 2))


def test_batched_matcher_positives_at_exactly_the_threshold_that_ends_a_positive_band():
    # labels [1, 0]: IoU < 0.5 is positive, exactly 0.5 is not (low <= IoU < high bands)
    from detectron2.modeling.matcher import Matcher

    from detkd.losses.gid import batched_matcher_positives

    matcher = Matcher([0.5], [1, 0], allow_low_quality_matches=False)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 19.0], [0.0, 0.0, 10.0, 5.0]])
    gt = Boxes(torch.tensor([[0.0, 0.0, 10.0, 20.0]]))  # IoU 0.5, 0.95, 0.25
    got = batched_matcher_positives(matcher, [gt], anchors)
    _, lab = matcher(box_iou(gt.tensor, anchors))
    assert got[0].tolist() == (lab == 1).tolist() == [False, False, True]


def test_fpn_level_clamps_at_the_coarsest_level():
    d = _kd().distillers["gid"]
    # sqrt(area) past 224 * 2^4 (eq. 1 gives level 8 and more): the coarsest level, p7
    big = Boxes(torch.tensor([[0.0, 0.0, 4e3, 4e3], [0.0, 0.0, 1e5, 1e5], [0, 0, 3583.0, 3583.0]]))
    assert d.box_levels([big]) == ["p7", "p7", "p7"]


def test_anchor_offset_and_box_transform_clamp_differences_are_seen():
    """A teacher whose anchors are shifted (anchor offset 0.5 vs 0) predicts at other anchors:
    bind rejects it. A teacher whose box transform clamps differently decodes its own boxes
    (no shared decoding)."""
    other = tiny_retinanet_cfg()
    other.anchor_generator.offset = 0.5
    with pytest.raises(ValueError, match="different anchors"):
        _kd(teacher=other)
    other = tiny_retinanet_cfg()
    other.box2box_transform.scale_clamp = 2.0
    model = _kd(teacher=other)
    assert model.teacher.box2box_transform.scale_clamp == 2.0
    assert not model.distillers["gid"].shared_decoding and _kd().distillers["gid"].shared_decoding


def test_pre_nms_topk_cuts_a_level_of_exactly_one_more_prediction():
    # levels of 3 predictions, pre_nms_topk 2: each level's third is no candidate
    t = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])[None, :, None]
    x = torch.arange(6.0)[:, None] * 30
    tb = torch.cat([x, torch.zeros(6, 1), x + 20, torch.full((6, 1), 20.0)], 1)[None]
    boxes, scores = select_general_instances(
        t, torch.zeros_like(t), tb, tb, [(50, 200)], pre_nms_topk=2, level_sizes=[3, 3]
    )[0]
    assert scores.tolist() == pytest.approx([0.9, 0.8, 0.6, 0.5])
    assert boxes.tensor[:, 0].tolist() == [0.0, 30.0, 90.0, 120.0]


_GID_WEIGHTS = [
    "feat_weight",
    "relation_weight",
    "response_cls_weight",
    "response_reg_weight",
    "response_ctr_weight",
]


@pytest.mark.parametrize("arg", _GID_WEIGHTS)
@pytest.mark.parametrize("bad", ["abc", -1, float("nan"), float("inf"), True])
def test_weights_must_be_finite_non_negative_numbers(arg, bad):
    """A string weight failed at the first step, a negative one trained the student away from
    the teacher (or, for response weights, from its responses)."""
    with pytest.raises(
        ValueError,
        match=rf"GIDDistiller: {arg} must be a finite number >= 0 "
        rf"\(model\.distillers\.<name>\.{arg}\), got {re.escape(repr(bad))}$",
    ):
        GIDDistiller(**{arg: bad})


def test_weight_none_is_an_error_but_response_ctr_weight_none_follows_the_cls_weight():
    with pytest.raises(
        ValueError, match=r"GIDDistiller: feat_weight must be a finite number >= 0 .* got None"
    ):
        GIDDistiller(feat_weight=None)
    d = GIDDistiller(response_cls_weight=0.3, response_ctr_weight=None, feat_weight=0)
    assert d.weights["ctr"] == 0.3 and d.weights["feat"] == 0.0  # 0 turns a term off


@pytest.mark.parametrize("arg", ["topk", "pre_nms_topk", "pooler_resolution"])
@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "10", None])
def test_counts_and_sizes_must_be_ints_of_at_least_one(arg, bad):
    """topk=0 and pre_nms_topk=0 selected no GI: every GID loss 0, without a word;
    pooler_resolution=0 failed at the first step on a reshape."""
    with pytest.raises(
        ValueError,
        match=rf"GIDDistiller: {arg} must be an int >= 1 \(.*\) "
        rf"\(model\.distillers\.<name>\.{arg}\), got {re.escape(repr(bad))}$",
    ):
        GIDDistiller(**{arg: bad})
    assert getattr(GIDDistiller(**{arg: 1}), arg) == 1


def test_thresholds_switches_and_levels_are_checked_at_construction():
    for bad in (1.5, -0.1, float("nan"), "0.3"):
        msg = (
            rf"GIDDistiller: nms_thresh must be a number in \[0, 1\] .* got {re.escape(repr(bad))}"
        )
        with pytest.raises(ValueError, match=msg):
            GIDDistiller(nms_thresh=bad)
    with pytest.raises(
        ValueError, match=r"GIDDistiller: min_size must be a finite number >= 0 .* got -1"
    ):
        GIDDistiller(min_size=-1)
    with pytest.raises(
        ValueError, match=r"GIDDistiller: response must be True or False .* got 'False'"
    ):
        GIDDistiller(response="False")  # a string: true
    with pytest.raises(
        ValueError, match=r"GIDDistiller: num_levels must be a positive int .* got 0"
    ):
        GIDDistiller(num_levels=0)
    with pytest.raises(
        ValueError, match=r"GID: selection must be 'anchor' or 'location', got 'box'"
    ):
        GIDDistiller(selection="box")  # was checked at bind only
    d = GIDDistiller(nms_thresh=1, min_size=0)
    assert (d.nms_thresh, d.min_size) == (1.0, 0.0)
