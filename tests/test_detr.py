"""Conditional DETR and D3ETR: matching vs brute force, attention maps, query groups, losses."""

import itertools
import math
import re

import numpy as np
import torch
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.utils.events import EventStorage

from detkd import D3ETRDistiller, DistillationDetector, FeatureCapture, export_student
from detkd.losses.d3etr import bernoulli_kl, hungarian_match, soft_bce_cost

import pytest
from conftest import history, load_config, make_inputs, short_train


def detr_cfg(frozen=False, dropout=0.0):
    model = load_config("configs/common/models/tiny_detr.py").model
    model.transformer.dropout = dropout
    if frozen:  # eval-equivalent backbone, so a student copy equals its teacher
        model.backbone.stem.norm = "FrozenBN"
        model.backbone.stages.norm = "FrozenBN"
    return model


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (5, 3)])
def test_hungarian_equals_brute_force(shape):
    g = torch.Generator().manual_seed(sum(shape))
    for _ in range(5):
        cost = torch.rand(*shape, generator=g)
        (match,) = hungarian_match(cost[None])
        got = cost[match[:, 0], match[:, 1]].sum().item()
        n, m = shape
        if n <= m:
            best = min(
                sum(cost[i, p[i]].item() for i in range(n))
                for p in itertools.permutations(range(m), n)
            )
        else:
            best = min(
                sum(cost[p[j], j].item() for j in range(m))
                for p in itertools.permutations(range(n), m)
            )
        assert len(match) == min(shape) and got == pytest.approx(best, abs=1e-6)


def test_hungarian_match_with_stop_set_skips_the_problems():
    import threading

    cost = torch.rand(6, 5, 7, generator=torch.Generator().manual_seed(0))
    stop = threading.Event()
    solved = hungarian_match(cost, stop=stop)  # not set: the same answer as without it
    assert all(np.array_equal(a, b) for a, b in zip(solved, hungarian_match(cost)))
    stop.set()
    assert hungarian_match(cost, stop=stop) is None


def test_solve_assignments_solves_small_calls_in_the_calling_thread(monkeypatch):
    from scipy.optimize import linear_sum_assignment

    from detkd.modeling import detr

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    rng = np.random.default_rng(0)
    small = [rng.random((30, 4)) for _ in range(24)]  # 24 * 30 * 4 * 4 = 11520 < the threshold
    large = [rng.random((120, 120)) for _ in range(2)]  # 2 * 120^3 = 3.5M > the threshold
    for costs, pool, threaded in ((small, "test-small", False), (large, "test-large", True)):
        got = detr.solve_assignments(costs, pool=pool)
        assert ((pool, 2) in detr._POOL) == threaded
        for (r, c), cost in zip(got, costs):
            rr, cc = linear_sum_assignment(cost)
            assert np.array_equal(r, rr) and np.array_equal(c, cc)
    detr._POOL.pop(("test-large", 2)).shutdown()


def test_solve_assignments_keeps_one_pool_per_name_whatever_the_number_of_problems(monkeypatch):
    """The number of problems varies from step to step (L times the images with ground truth):
    one pool of torch.get_num_threads() threads serves every count, instead of one pool per
    count whose idle threads add up (2 + 3 + 4 = 9 here, 135 at 16 threads)."""
    import threading

    from scipy.optimize import linear_sum_assignment

    from detkd.modeling import detr

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    rng = np.random.default_rng(0)
    pool = "test-bounded"
    for n in (2, 3, 4, 3, 2):
        costs = [rng.random((120, 120)) for _ in range(n)]  # n * 120^3 > the serial threshold
        got = detr.solve_assignments(costs, pool=pool)
        for (r, c), cost in zip(got, costs):
            rr, cc = linear_sum_assignment(cost)
            assert np.array_equal(r, rr) and np.array_equal(c, cc)
    keys = [k for k in detr._POOL if k[0] == pool]
    threads = [t for t in threading.enumerate() if t.name.startswith(f"detkd-hungarian-{pool}_")]
    for k in keys:
        detr._POOL.pop(k).shutdown()
    assert keys == [(pool, 4)]
    assert 2 <= len(threads) <= 4


def test_class_cost_and_bernoulli_kl_formulas():
    g = torch.Generator().manual_seed(0)
    zt, zs = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(
        5, 4, generator=g, dtype=torch.float64
    )
    q = zt.sigmoid()
    ref = torch.zeros(3, 5, dtype=torch.float64)
    for i in range(3):
        for j in range(5):
            p = zs[j].sigmoid()
            ref[i, j] = -(q[i] * p.log() + (1 - q[i]) * (1 - p).log()).sum()
    assert torch.allclose(soft_bce_cost(zt, zs), ref)
    p, qq = zs[:3].sigmoid(), q
    kl = (qq * (qq / p).log() + (1 - qq) * ((1 - qq) / (1 - p)).log()).sum(-1)
    assert torch.allclose(bernoulli_kl(zs[:3], zt), kl)
    assert torch.allclose(bernoulli_kl(zt, zt), torch.zeros(3, dtype=torch.float64))


def _decoder_taps(model):
    names = ["head"]
    for i in range(len(model.transformer.decoder.layers)):
        names += [
            f"transformer.decoder.layers.{i}.self_attn",
            f"transformer.decoder.layers.{i}.cross_attn",
        ]
    return FeatureCapture(model, names)


def test_attention_maps_shapes_rows_and_padding():
    torch.manual_seed(0)
    model = instantiate(detr_cfg()).eval()
    inputs = make_inputs(n=2, size=(128, 160))
    inputs[1]["image"] = inputs[1]["image"][:, :64, :96]  # padded to 128x160 in the batch
    cap = _decoder_taps(model)
    with cap, torch.no_grad():
        model(inputs)
    head = cap["head"]
    assert head["pred_logits"].shape == (3, 2, 30, 3) and head["pred_boxes"].shape == (3, 2, 30, 4)
    sa = cap["transformer.decoder.layers.1.self_attn"][1]
    ca = cap["transformer.decoder.layers.1.cross_attn"][1]
    assert sa.shape == (2, 4, 30, 30) and ca.shape == (2, 4, 30, 8 * 10)  # stride 16 keys
    assert torch.allclose(sa.sum(-1), torch.ones(2, 4, 30), atol=1e-5)
    assert torch.allclose(ca.sum(-1), torch.ones(2, 4, 30), atol=1e-5)
    keys = ca[1].view(4, 30, 8, 10)
    assert keys[:, :, 4:, :].abs().max() == 0 and keys[:, :, :, 6:].abs().max() == 0  # padding


def test_extra_query_group_leaves_own_group_unchanged():
    torch.manual_seed(0)
    model = instantiate(detr_cfg(frozen=True)).train()
    inputs = make_inputs(n=2)
    cap = _decoder_taps(model)
    with cap, torch.no_grad():
        plain_losses = model(inputs)
    plain = {k: v.clone() for k, v in cap["head"].items()}
    plain_sa = cap["transformer.decoder.layers.2.self_attn"][1].clone()
    extra = torch.randn(12, 64)
    with cap, torch.no_grad(), model.extra_query_group(extra):
        losses = model(inputs)
    grouped = cap["head"]
    assert grouped["pred_logits"].shape[2] == 42
    for k in plain:
        assert torch.allclose(grouped[k][:, :, :30], plain[k], atol=1e-5), k
    own, aux = cap["transformer.decoder.layers.2.self_attn"][1]  # per-group blocks
    assert own.shape == (2, 4, 30, 30) and aux.shape == (2, 4, 12, 12)
    torch.testing.assert_close(own, plain_sa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.sum(-1), torch.ones(2, 4, 12))
    # the ground-truth losses are the own group's (the N own queries only, whatever N2)
    assert list(losses) == list(plain_losses)
    for k, v in plain_losses.items():
        torch.testing.assert_close(losses[k], v, atol=1e-5, rtol=1e-5)
    model.eval()
    with torch.no_grad(), model.extra_query_group(extra):
        out = model(inputs)  # the group exists in training only
    assert len(out[0]["instances"]) == 90  # top-k over 30 own queries x 3 classes


@pytest.mark.parametrize("groups", [(5, 5), (6, 3)])
def test_grouped_self_attention_equals_block_mask(groups):
    """Per-group attention (equal groups folded into the batch, unequal ones looped) gives the
    outputs, weights and input gradients of one attention over all queries with a block mask."""
    from detkd.modeling import Attention

    g = torch.Generator().manual_seed(0)
    B, N, D, M = 2, sum(groups), 8, 2
    attn = Attention(qk_dim=D, v_dim=D, num_heads=M).double()
    q, k, v = (
        torch.randn(B, N, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    mask = torch.full((N, N), float("-inf"), dtype=torch.float64)
    start = 0
    for n in groups:
        mask[start : start + n, start : start + n] = 0
        start += n
    out_ref, w_ref = attn(q, k, v, attn_mask=mask)
    out, blocks = attn(q, k, v, groups=groups)
    torch.testing.assert_close(out, out_ref)
    start = 0
    for n, w in zip(groups, blocks):
        torch.testing.assert_close(w, w_ref[:, :, start : start + n, start : start + n])
        start += n
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    dw = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in blocks]
    dw_full = torch.zeros_like(w_ref)
    start = 0
    for n, x in zip(groups, dw):
        dw_full[:, :, start : start + n, start : start + n] = x
        start += n
    got = torch.autograd.grad([out, *blocks], [q, k, v], [dout, *dw])
    ref = torch.autograd.grad([out_ref, w_ref], [q, k, v], [dout, dw_full])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="must split"):
        attn(q, k, v, groups=(N, 1))


def test_cpu_dropout_keep_rate_scale_and_gradient():
    """detkd's CPU dropout: kept elements scaled by 1/(1-p), dropped ones 0, keep rate 1-p, the
    gradient through the same mask; identity in eval mode."""
    from detkd.modeling import Dropout

    torch.manual_seed(0)
    drop = Dropout(0.25)
    x = (torch.rand(400, 500) + 0.5).requires_grad_()
    y = drop(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.005)  # 200k draws: sd ~0.001
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.backward(torch.full_like(y, 3.0))
    torch.testing.assert_close(x.grad, kept.float() * 4.0)
    xb = torch.ones(400, 500, dtype=torch.bfloat16)  # low precision: the draw stays fp32
    assert (drop(xb) != 0).float().mean().item() == pytest.approx(0.75, abs=0.005)
    drop.eval()
    assert drop(x) is x
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_attention_dropout_acts_on_the_weights_in_training_and_heads_must_divide():
    """Attention's dropout (the transformer's dropout) drops attention weights in training:
    the output is (kept weights / (1 - p)) @ v, not weights @ v; eval mode does not drop.
    Dropout(1.0) drops everything (zeros, not 0 * inf); a head count that does not divide the
    widths is an error naming the fix."""
    from detkd.modeling import Attention, Dropout

    g = torch.Generator().manual_seed(0)
    attn = Attention(qk_dim=8, v_dim=8, num_heads=2, dropout=0.5).double()
    q, k, v = (torch.randn(2, 40, 8, generator=g, dtype=torch.float64) for _ in range(3))
    attn.eval()
    out_eval, w = attn(q, k, v)
    attn.train()
    torch.manual_seed(1)
    out, w_train = attn(q, k, v)
    torch.testing.assert_close(w_train, w)  # the returned weights are the undropped ones
    assert not torch.allclose(out, out_eval)
    # the dropped weights that give this output: the same keep mask as a Dropout drawn alike
    drop = Dropout(0.5).train()
    torch.manual_seed(1)
    dropped = drop(w)
    assert 0.4 < (dropped == 0).double().mean().item() < 0.6
    heads_out = dropped @ v.view(2, 40, 2, 4).transpose(1, 2)  # (B, M, Nq, dh)
    ref = attn.out_proj(heads_out.transpose(1, 2).reshape(2, 40, 8))
    torch.testing.assert_close(out, ref)
    x = torch.rand(10, 10) + 0.5
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros(10, 10))
    with pytest.raises(ValueError, match=r"4 heads do not divide qk_dim=10 / v_dim=10"):
        Attention(qk_dim=10, v_dim=10, num_heads=4)


def test_training_losses_empty_images_and_loss_falls_on_shapes():
    torch.manual_seed(0)
    model = instantiate(detr_cfg()).train()
    losses = model(make_inputs(n=2, empty=(1,)))
    assert {"loss_class", "loss_bbox", "loss_giou", "loss_class_0", "loss_giou_1"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    data = load_config("configs/demo/student_detr.py").dataloader.train
    data.update(num_workers=0, total_batch_size=4)
    data.dataset.names.num_images = 16
    inputs = next(iter(instantiate(data)))  # a batch of the shapes data, fixed
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(40):
        total = sum(model(inputs).values())
        first = first if first is not None else total.item()
        opt.zero_grad()
        total.backward()
        opt.step()
    assert total.item() < 0.7 * first
    model.eval()
    with torch.no_grad():
        inst = model(inputs)[0]["instances"]
    b = inst.pred_boxes.tensor
    h, w = inputs[0]["height"], inputs[0]["width"]
    assert (b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()


def _d3etr(student=None, teacher=None, **kw):
    torch.manual_seed(0)
    model = instantiate(
        L(DistillationDetector)(
            student=student or detr_cfg(frozen=True),
            teacher=teacher or detr_cfg(frozen=True),
            distillers={"d3etr": L(D3ETRDistiller)(**kw)},
        )
    ).train()
    return model


def test_d3etr_losses_zero_for_a_copy_positive_after_perturbation():
    model = _d3etr()
    with torch.no_grad():
        for p in model.student.head.parameters():  # distinct queries: the match is unique
            p.normal_(0, 0.5)
    model.teacher.load_state_dict(model.student.state_dict())
    inputs = make_inputs(n=2)
    with EventStorage() as storage:
        losses = model(inputs)
        assert "d3etr/match_cost_0" in storage.latest()
    kd = {k: v for k, v in losses.items() if k.startswith("loss_d3etr") and "aux" not in k}
    assert set(kd) == {f"loss_d3etr_{k}" for k in ("cls", "l1", "giou", "sa", "ca")}
    # ~0, not exactly 0: with the auxiliary group appended (2x the queries) the decoder's matmuls
    # may block differently and round the own group's boxes differently (seen: 7.7e-7 on an AMX
    # CPU, a GIoU term ~1e-4 on small boxes); a wrong match or target gives O(1) (below)
    assert all(abs(v.item()) < 1e-3 for v in kd.values()), kd
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    with EventStorage():
        losses = model(inputs)
    assert all(losses[k].item() > 0.1 for k in kd), {k: losses[k].item() for k in kd}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(k.startswith("loss_d3etr_aux_") for k in losses)


def test_d3etr_different_hidden_size_uses_projection_and_exports_clean(tmp_path):
    teacher = detr_cfg(frozen=True)
    teacher.position_embedding.num_pos_feats = 48
    teacher.transformer.update(d_model=96, nhead=6, dim_feedforward=192)
    model = _d3etr(teacher=teacher)
    assert model.distillers["d3etr"].query_proj.in_features == 96
    with EventStorage():
        losses = model(make_inputs(n=2))
    sum(losses.values()).backward()
    assert model.distillers["d3etr"].query_proj.weight.grad is not None
    from detectron2.checkpoint import DetectionCheckpointer

    DetectionCheckpointer(model, str(tmp_path)).save("run")
    state = export_student(str(tmp_path / "run.pth"), str(tmp_path / "student.pth"))
    assert not any("query_proj" in k or "distillers" in k for k in state)
    fresh = instantiate(detr_cfg(frozen=True))
    inc = fresh.load_state_dict(torch.load(tmp_path / "student.pth", weights_only=False)["model"])
    assert not inc.missing_keys and not inc.unexpected_keys
    model.eval()
    with torch.no_grad():
        out = model(make_inputs(n=1))
    assert len(out[0]["instances"]) == 90  # 30 queries x 3 classes: the own group only


def test_d3etr_needs_detr_pairs():
    from conftest import tiny_retinanet_cfg

    with pytest.raises(TypeError, match="DETR-style"):
        _d3etr(teacher=tiny_retinanet_cfg())
    other = detr_cfg(frozen=True)
    other.num_classes = 5
    with pytest.raises(ValueError, match="class-count mismatch"):
        _d3etr(teacher=other)
    # MixMatcher's fixed matching runs the teacher's queries through the student's decoder
    import types

    real = instantiate(detr_cfg())
    student = types.SimpleNamespace(
        **{
            a: getattr(real, a)
            for a in ("head", "transformer", "query_embed", "num_queries", "num_classes")
        }
    )
    teacher = instantiate(detr_cfg(frozen=True))
    with pytest.raises(
        TypeError,
        match=r"student .*lacks \['extra_query_group', 'matcher', 'compute_gt_losses', "
        r"'prepare_targets'\]",
    ):
        D3ETRDistiller().bind(student, teacher)
    with pytest.raises(
        TypeError, match=r"student .*lacks \['extra_query_group', 'matcher', 'compute_gt_losses'\]"
    ):
        D3ETRDistiller(aux_gt_loss=False).bind(student, teacher)
    D3ETRDistiller(fixed_matching=False, aux_gt_loss=False).bind(student, teacher)
    # the teacher runs to its head through forward_predictions
    with pytest.raises(TypeError, match=r"teacher .*lacks \['forward_predictions'\]"):
        D3ETRDistiller(fixed_matching=False, aux_gt_loss=False).bind(real, student)


def test_d3etr_pair_errors_name_the_fix_and_ca_weight_0_trains_memories_of_other_strides():
    """A student encoding res4 (stride 16) and a teacher res5 (stride 32): bound without a
    word, then the first step stopped on "cross-attention key counts differ", also with
    ca_weight=0, which switches off the one term that compares the memories. Now bind names
    the strides and both fixes, and ca_weight=0 trains (the other terms unchanged); the layer
    and class mismatches name their fixes too."""
    res5 = detr_cfg(frozen=True)
    res5.backbone.out_features = ["res5"]
    res5.in_feature = "res5"
    with pytest.raises(
        ValueError,
        match=(
            r"distillers\['d3etr'\] \(D3ETRDistiller\): D3ETR: the cross-attention maps are "
            r"compared key by "
            r"key.*student's memory has stride 16 \(in_feature='res4'\) and the teacher's 32 "
            r"\(in_feature="
            r"'res5'\).*model\.student\.in_feature.*ca_weight=0"
        ),
    ):
        _d3etr(teacher=res5)
    model = _d3etr(teacher=res5, ca_weight=0.0)
    inputs = make_inputs(2, size=(64, 64))
    with EventStorage(0):
        losses = model(inputs)
    assert float(losses["loss_d3etr_ca"]) == 0.0
    assert all(torch.isfinite(v) for v in losses.values()) and float(losses["loss_d3etr_cls"]) > 0
    sum(losses.values()).backward()

    deeper = detr_cfg(frozen=True)
    deeper.transformer.num_decoder_layers = 4
    with pytest.raises(
        ValueError,
        match=r"the student has 3 decoder layers, the teacher 4\. Give the student as "
        r"many \(model\.student\.transformer\.num_decoder_layers=4",
    ):
        _d3etr(teacher=deeper)
    other = detr_cfg(frozen=True)
    other.num_classes = 5
    with pytest.raises(
        ValueError,
        match=r"class-count mismatch \(student \d+, teacher 5\).*distil features only "
        r"\(PKD, ReviewKD\)",
    ):
        _d3etr(teacher=other)


def test_a_distillers_failure_in_a_step_is_noted_with_its_name(monkeypatch):
    # bind errors named the distiller; an error in its forward (a raw torch one, or of one of
    # two distillers of the same method) did not
    model = _d3etr()

    def broken(*args, **kwargs):
        raise RuntimeError("a raw shape error")

    monkeypatch.setattr(model.distillers["d3etr"], "forward", broken)
    with pytest.raises(RuntimeError, match="a raw shape error") as e, EventStorage(0):
        model(make_inputs(2, size=(64, 64)))
    assert "raised by distillers['d3etr'] (D3ETRDistiller).forward" in e.value.__notes__


@pytest.mark.parametrize("config", ["configs/demo/student_detr.py", "configs/demo/d3etr_detr.py"])
def test_demo_configs_train_and_evaluate(tmp_path, config):
    trainer, results = short_train(config, tmp_path, iters=2)
    assert "bbox" in results
    if "d3etr" in config:
        values = history(trainer, "loss_d3etr_ca")
        assert len(values) == 2 and all(np.isfinite(values))


def test_d3etr_different_query_counts():
    student = detr_cfg(frozen=True)
    student.num_queries = 20  # teacher has 30: partial adaptive match, fixed group of 30
    model = _d3etr(student=student)
    with EventStorage():
        losses = model(make_inputs(n=2))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_d3etr_sa"].item() > 0  # from the fixed group (30 <-> 30 queries)
    sum(losses.values()).backward()
    adaptive_only = _d3etr(student=student, fixed_matching=False, aux_gt_loss=False)
    with EventStorage():
        losses = adaptive_only(make_inputs(n=2))
    sa = losses["loss_d3etr_sa"].item()
    assert sa == 0.0 and math.copysign(1.0, sa) == 1.0  # needs a full permutation: skipped (+0.0)
    assert losses["loss_d3etr_l1"].item() > 0 and losses["loss_d3etr_ca"].item() > 0
    assert not any("aux" in k for k in losses)


def _softmax_rows(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64).softmax(-1)


def _row_kl(p, q):
    """Mean over rows of KL(p || q); rows of p, q: (..., S)."""
    return (p * (p / q).log()).sum(-1).mean()


def _one_layer_taps(head, sa, ca):
    """Taps of a one-layer decoder: the head's predictions and layer 0's attention maps."""
    return {
        "head": head,
        "transformer.decoder.layers.0.self_attn": (None, sa),
        "transformer.decoder.layers.0.cross_attn": (None, ca),
    }


def _spread_boxes(B, N=4):
    """(1, B, N, 4) cxcywh boxes, N = 4 apart on the diagonal: one cost-free identity match."""
    centers = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)[:N]
    boxes = torch.stack(
        [centers, centers, torch.full_like(centers, 0.1), torch.full_like(centers, 0.1)], -1
    )
    return boxes.expand(1, B, N, 4).clone()


def _random_taps(g, L, B, K, M, HW, Nt, nq):
    """Random float64 D3ETR taps of an L-layer decoder (drawn from generator g): teacher and
    student heads ((L, B, n, K) logits, (L, B, n, 4) cxcywh boxes inside the image) and per
    layer M-head self-attention (B, M, n, n) and cross-attention (B, M, n, HW) softmax rows;
    n = Nt teacher and nq student queries, the student's maps requiring gradients."""

    def preds(n):
        boxes = torch.cat(
            [
                torch.rand(L, B, n, 2, generator=g) * 0.6 + 0.2,
                torch.rand(L, B, n, 2, generator=g) * 0.3 + 0.05,
            ],
            -1,
        )
        return torch.randn(L, B, n, K, generator=g, dtype=torch.float64), boxes.double()

    taps = []
    for n in (Nt, nq):
        logits, boxes = preds(n)
        taps.append({"head": {"pred_logits": logits, "pred_boxes": boxes}})
    t_taps, s_taps = taps
    for l in range(L):
        for taps, n, grad in ((t_taps, Nt, False), (s_taps, nq, True)):
            for kind, keys in (("self_attn", n), ("cross_attn", HW)):
                taps[f"transformer.decoder.layers.{l}.{kind}"] = (
                    None,
                    _softmax_rows(B, M, n, keys, g=g).requires_grad_(grad),
                )
    return t_taps, s_taps


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("Nt,Ns", [(4, 4), (3, 4), (4, 3)])
def test_d3etr_losses_equal_a_loop_reference(fixed, Nt, Ns):
    """The batched D3ETR losses against a per-layer, per-image reference with brute-force
    matching and torchvision's GIoU; equal query counts, and a partial adaptive match either
    way (more student or more teacher queries)."""
    from types import SimpleNamespace

    from torchvision.ops import box_convert, generalized_box_iou

    L, B, K, M, HW = 2, 2, 3, 2, 5
    g = torch.Generator().manual_seed(3)
    nq = Ns + Nt if fixed else Ns
    t_taps, s_taps = _random_taps(g, L, B, K, M, HW, Nt, nq)
    t_logits, t_boxes = t_taps["head"]["pred_logits"], t_taps["head"]["pred_boxes"]
    s_logits, s_boxes = s_taps["head"]["pred_logits"], s_taps["head"]["pred_boxes"]
    d = D3ETRDistiller(fixed_matching=fixed, aux_gt_loss=False)
    ctx = SimpleNamespace(student=SimpleNamespace(num_queries=Ns))
    with EventStorage() as storage:
        got = d(s_taps, t_taps, ctx)
        logged = {k: v[0] for k, v in storage.latest().items()}

    def xyxy(b):
        return box_convert(b, "cxcywh", "xyxy")

    ref = {k: 0.0 for k in ("cls", "l1", "giou", "sa", "ca")}
    match_cost = [0.0] * L  # the logged d3etr/match_cost_<l>: mean matched cost, mean over images
    for l in range(L):
        t_sa, t_ca = (
            t_taps[f"transformer.decoder.layers.{l}.self_attn"][1],
            t_taps[f"transformer.decoder.layers.{l}.cross_attn"][1],
        )
        s_sa, s_ca = (
            s_taps[f"transformer.decoder.layers.{l}.self_attn"][1],
            s_taps[f"transformer.decoder.layers.{l}.cross_attn"][1],
        )
        groups = [[]]  # group 1 pairs, then group 2 pairs: (b, teacher i, student j)
        for b in range(B):
            zt, zs = t_logits[l, b], s_logits[l, b, :Ns]
            q, p = zt.sigmoid(), zs.sigmoid()
            cost = torch.zeros(Nt, Ns, dtype=torch.float64)
            for i in range(Nt):
                for j in range(Ns):
                    bce = -(q[i] * p[j].log() + (1 - q[i]) * (1 - p[j]).log()).sum()
                    cost[i, j] = bce + 5 * (t_boxes[l, b, i] - s_boxes[l, b, j]).abs().sum()
            cost -= 2 * generalized_box_iou(xyxy(t_boxes[l, b]), xyxy(s_boxes[l, b, :Ns]))
            if Nt <= Ns:  # every teacher query i gets a student query pm[i]
                pm = min(
                    itertools.permutations(range(Ns), Nt),
                    key=lambda pm: sum(cost[i, pm[i]] for i in range(Nt)),
                )
                pairs = [(i, pm[i]) for i in range(Nt)]
            else:  # every student query j gets a teacher query pm[j]
                pm = min(
                    itertools.permutations(range(Nt), Ns),
                    key=lambda pm: sum(cost[pm[j], j] for j in range(Ns)),
                )
                pairs = sorted((pm[j], j) for j in range(Ns))
            groups[0] += [(b, i, j) for i, j in pairs]
            match_cost[l] += sum(float(cost[i, j]) for i, j in pairs) / len(pairs) / B
            ti, sj = [i for i, _ in pairs], [j for _, j in pairs]
            if Nt == Ns:  # self-attention needs a full permutation
                rows = torch.stack([s_sa[b, :, sj[i], sj] for i in range(Nt)], 1)  # (M, N, N)
                ref["sa"] += _row_kl(t_sa[b], rows) / B
            ref["ca"] += _row_kl(t_ca[b][:, ti], s_ca[b][:, sj]) / B
        if fixed:
            groups.append([(b, i, Ns + i) for b in range(B) for i in range(Nt)])
            ref["sa"] += _row_kl(t_sa, s_sa[:, :, Ns:, Ns:])
            ref["ca"] += _row_kl(t_ca, s_ca[:, :, Ns:])
        for pairs in groups:
            bi, ti, si = (torch.tensor(x) for x in zip(*pairs))
            zt, zs = t_logits[l, bi, ti], s_logits[l, bi, si]
            q, p = zt.sigmoid(), zs.sigmoid()
            ref["cls"] += (q * (q / p).log() + (1 - q) * ((1 - q) / (1 - p)).log()).sum(-1).mean()
            ref["l1"] += (t_boxes[l, bi, ti] - s_boxes[l, bi, si]).abs().sum(-1).mean()
            ref["giou"] += (
                1 - generalized_box_iou(xyxy(s_boxes[l, bi, si]), xyxy(t_boxes[l, bi, ti])).diag()
            ).mean()
    weights = dict(cls=1, l1=5, giou=2, sa=1, ca=1)
    for k, v in ref.items():
        assert got[f"loss_d3etr_{k}"].item() == pytest.approx(weights[k] * float(v), rel=1e-6), k
    for l in range(L):
        assert logged[f"d3etr/match_cost_{l}"] == pytest.approx(match_cost[l], rel=1e-5), l
    # Attention terms: the gradients reaching the student's maps equal those of the reference.
    maps = [
        s_taps[f"transformer.decoder.layers.{l}.{a}"][1]
        for l in range(L)
        for a in ("self_attn", "cross_attn")
    ]
    g_got = torch.autograd.grad(
        got["loss_d3etr_sa"] + 0.7 * got["loss_d3etr_ca"], maps, allow_unused=True
    )
    g_ref = torch.autograd.grad(ref["sa"] + 0.7 * ref["ca"], maps, allow_unused=True)
    for a, b, x in zip(g_got, g_ref, maps):  # unused maps (no self-attention term): no gradient
        torch.testing.assert_close(
            *(torch.zeros_like(x) if y is None else y for y in (a, b)), rtol=1e-9, atol=1e-12
        )
    if fixed:  # a grouped self-attention hands the student's maps over as per-group blocks
        blocked = dict(s_taps)
        for l in range(L):
            sa = s_taps[f"transformer.decoder.layers.{l}.self_attn"][1]
            blocked[f"transformer.decoder.layers.{l}.self_attn"] = (
                None,
                (sa[:, :, :Ns, :Ns], sa[:, :, Ns:, Ns:]),
            )
        with EventStorage():
            got_b = d(blocked, t_taps, ctx)
        assert got_b["loss_d3etr_sa"].item() == pytest.approx(
            got["loss_d3etr_sa"].item(), rel=1e-12
        )
        g_blk = torch.autograd.grad(got_b["loss_d3etr_sa"] + 0.7 * got_b["loss_d3etr_ca"], maps)
        for a, b in zip(g_blk, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_giou_cxcywh_equals_torchvision_values_and_the_xyxy_gradients():
    from torchvision.ops import box_convert, generalized_box_iou

    from detkd.modeling.detr import giou_cxcywh, paired_giou

    g = torch.Generator().manual_seed(3)
    a = torch.cat(
        [torch.rand(2, 7, 2, generator=g), torch.rand(2, 7, 2, generator=g) * 0.6 + 0.01], -1
    )
    b = torch.cat(
        [torch.rand(2, 5, 2, generator=g), torch.rand(2, 5, 2, generator=g) * 0.6 + 0.01], -1
    )
    # hand-made pairs: identical, nested, disjoint along x, touching, apart on both axes
    a[0, :5] = torch.tensor(
        [
            [0.5, 0.5, 0.2, 0.2],
            [0.5, 0.5, 0.4, 0.4],
            [0.2, 0.5, 0.1, 0.1],
            [0.2, 0.5, 0.2, 0.2],
            [0.1, 0.1, 0.1, 0.1],
        ]
    )
    b[0, :5] = torch.tensor(
        [
            [0.5, 0.5, 0.2, 0.2],
            [0.5, 0.5, 0.1, 0.2],
            [0.4, 0.5, 0.1, 0.1],
            [0.4, 0.5, 0.2, 0.2],
            [0.9, 0.9, 0.1, 0.1],
        ]
    )
    pairwise = giou_cxcywh(a[:, :, None, :], b[:, None, :, :])  # (2, 7, 5)
    for i in range(2):
        ref = generalized_box_iou(
            box_convert(a[i], "cxcywh", "xyxy"), box_convert(b[i], "cxcywh", "xyxy")
        )
        torch.testing.assert_close(pairwise[i], ref, atol=1e-6, rtol=0)
    # by hand: identical 1; nested 0.02 / 0.16 (hull = union = the larger box); apart on x by
    # one width (hull 0.3 x 0.1, union 0.02): -0.01 / 0.03; touching: 0 - (0.08 - 0.08) / 0.08;
    # apart on both axes: 0 - (0.81 - 0.02) / 0.81
    hand = torch.tensor([1.0, 0.125, -1 / 3, 0.0, -(0.81 - 0.02) / 0.81])
    torch.testing.assert_close(giou_cxcywh(a[0, :5], b[0, :5]), hand, atol=1e-6, rtol=0)
    # gradients equal those through the XYXY formulation (away from its max/min ties)
    x, y = a[1, :5].clone().requires_grad_(), b[1].clone().requires_grad_()
    w = torch.rand(5, generator=g)
    gx, gy = torch.autograd.grad((giou_cxcywh(x, y) * w).sum(), (x, y))
    rx, ry = torch.autograd.grad(
        (paired_giou(box_convert(x, "cxcywh", "xyxy"), box_convert(y, "cxcywh", "xyxy")) * w).sum(),
        (x, y),
    )
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gy, ry, atol=1e-5, rtol=1e-5)


def test_pairwise_giou_and_batched_matcher_equal_torchvision_and_per_layer():
    from torchvision.ops import generalized_box_iou

    from detkd.modeling import HungarianMatcher
    from detkd.modeling.detr import paired_giou, pairwise_giou

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3, 5, 2, generator=g)
    a = torch.cat([xy, xy + torch.rand(3, 5, 2, generator=g) + 0.01], -1)
    xy = torch.rand(3, 4, 2, generator=g)
    b = torch.cat([xy, xy + torch.rand(3, 4, 2, generator=g) + 0.01], -1)
    got = pairwise_giou(a, b)
    for i in range(3):
        assert torch.allclose(got[i], generalized_box_iou(a[i], b[i]), atol=1e-6)
        assert torch.allclose(
            paired_giou(a[i, :4], b[i]), generalized_box_iou(a[i, :4], b[i]).diag(), atol=1e-6
        )
    matcher = HungarianMatcher()
    logits = torch.randn(3, 2, 6, 4, generator=g)
    boxes = torch.rand(3, 2, 6, 4, generator=g) * 0.5 + 0.1
    targets = [
        {"labels": torch.tensor([0, 3, 1]), "boxes": torch.rand(3, 4, generator=g) * 0.5 + 0.1},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    batched = matcher.match_layers(logits, boxes, targets)
    for l in range(3):
        lg, bx, t = logits[l, 0], boxes[l, 0], targets[0]
        p = lg.sigmoid()[:, t["labels"]]
        cost = 2 * (0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p**2 * -(1 - p + 1e-8).log())
        cost = (
            cost
            + 5 * torch.cdist(bx, t["boxes"], p=1)
            - 2 * generalized_box_iou(box_convert_xyxy(bx), box_convert_xyxy(t["boxes"]))
        )
        rows, cols = batched[l][0]
        best = min(
            sum(cost[r, c].item() for c, r in enumerate(pm))
            for pm in itertools.permutations(range(6), 3)
        )
        assert len(rows) == 3 and cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-5)
        assert len(batched[l][1][0]) == 0


def box_convert_xyxy(b):
    from torchvision.ops import box_convert

    return box_convert(b, "cxcywh", "xyxy")


def _reference_gt_losses(model, logits, boxes, targets, indices_per_layer, num_boxes):
    """Per layer and per image, written out with torchvision's focal loss and GIoU matrix."""
    from torchvision.ops import generalized_box_iou, sigmoid_focal_loss

    out = []
    for l, indices in enumerate(indices_per_layer):
        onehot = torch.zeros_like(logits[l])
        l1 = giou = 0.0
        for b, (p, g) in enumerate(indices):
            onehot[b, p, targets[b]["labels"][g]] = 1.0
            src, dst = boxes[l, b, p], targets[b]["boxes"][g]
            l1 = l1 + (src - dst).abs().sum()
            if len(p):
                giou = (
                    giou
                    + (
                        1 - generalized_box_iou(box_convert_xyxy(src), box_convert_xyxy(dst)).diag()
                    ).sum()
                )
        # METHODS.md 4.1: focal loss with alpha = 0.25, gamma = 2 (the model's defaults)
        cls = sigmoid_focal_loss(logits[l], onehot, 0.25, 2.0, reduction="sum")
        out.append(
            {
                "loss_class": 2 * cls / num_boxes,
                "loss_bbox": 5 * l1 / num_boxes,
                "loss_giou": 2 * giou / num_boxes,
            }
        )
    return out


@pytest.mark.parametrize("aux_loss", [True, False])
def test_all_layer_gt_losses_equal_a_per_layer_per_image_reference(aux_loss):
    model = instantiate(detr_cfg())
    model.aux_loss = aux_loss
    g = torch.Generator().manual_seed(3)
    L, B, N, K = 3, 3, 7, 3
    logits = torch.randn(L, B, N, K, generator=g).requires_grad_()
    boxes = (torch.rand(L, B, N, 4, generator=g) * 0.4 + 0.2).requires_grad_()
    sizes = [3, 0, 2]  # an image without ground truth
    targets = [
        {
            "labels": torch.randint(0, K, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g) * 0.4 + 0.2,
        }
        for n in sizes
    ]
    num_boxes = 5.0
    # the flat match lists exactly match_layers' pairs, with targets indexed in the concatenation
    per_layer = model.matcher.match_layers(logits.detach(), boxes.detach(), targets)
    flat = model.matcher.match_layers_flat(logits.detach(), boxes.detach(), targets)
    starts = [0, 3, 3]
    expect = [
        (l, b, int(p), int(t) + starts[b])
        for l in range(L)
        for b in range(B)
        for p, t in zip(*per_layer[l][b])
    ]
    assert [tuple(c) for c in flat.t().tolist()] == expect
    # min(N, G) pairs per image and layer
    assert flat.dtype == torch.long and flat.shape == (4, L * (3 + 0 + 2))

    # a given last-layer assignment (D3ETR's teacher assignment), as per-image pairs or flat
    given = [
        (torch.tensor([6, 0, 2]), torch.tensor([1, 2, 0])),
        (torch.zeros(0, dtype=torch.long),) * 2,
        (torch.tensor([4, 5]), torch.tensor([1, 0])),
    ]
    given_flat = model._flat_match(given, targets, "cpu")
    assert given_flat.tolist() == [[0] * 5, [0, 0, 0, 2, 2], [6, 0, 2, 4, 5], [1, 2, 0, 4, 3]]
    for last in (None, given, given_flat):
        got = model.compute_gt_losses(logits, boxes, targets, indices_last_layer=last)
        layers = list(range(L)) if aux_loss else [L - 1]
        indices = [per_layer[l] if (l < L - 1 or last is None) else given for l in layers]
        ref = _reference_gt_losses(
            model, logits[layers], boxes[layers], targets, indices, num_boxes
        )
        names = [
            k + ("" if l == L - 1 else f"_{l}")
            for l in layers
            for k in ("loss_class", "loss_bbox", "loss_giou")
        ]
        assert list(got) == names
        want = {
            k + ("" if l == L - 1 else f"_{l}"): v
            for l, r in zip(layers, ref)
            for k, v in r.items()
        }
        for k in names:
            assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7), (k, got[k], want[k])
        # gradients too (weighted sum of all terms, one backward each)
        w = torch.arange(1.0, len(names) + 1)
        ga = torch.autograd.grad(sum(wi * got[k] for wi, k in zip(w, names)), (logits, boxes))
        gb = torch.autograd.grad(sum(wi * want[k] for wi, k in zip(w, names)), (logits, boxes))
        for a, b in zip(ga, gb):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_prepare_targets_normalises_each_image_by_its_size():
    from detectron2.structures import Boxes, Instances

    model = instantiate(detr_cfg())
    a = Instances(
        (100, 200),
        gt_boxes=Boxes(torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 200.0, 100.0]])),
        gt_classes=torch.tensor([2, 0]),
    )
    empty = Instances(
        (64, 64), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0, dtype=torch.long)
    )
    c = Instances(
        (50, 40),
        gt_boxes=Boxes(torch.tensor([[4.0, 5.0, 8.0, 25.0]])),
        gt_classes=torch.tensor([1]),
    )
    t = model.prepare_targets([a, empty, c])
    assert [x["labels"].tolist() for x in t] == [[2, 0], [], [1]]
    # (cx, cy, w, h) / (W, H, W, H)
    assert torch.allclose(
        t[0]["boxes"],
        torch.tensor([[30 / 200, 40 / 100, 40 / 200, 40 / 100], [0.5, 0.5, 1.0, 1.0]]),
    )
    assert t[1]["boxes"].shape == (0, 4)
    assert torch.allclose(t[2]["boxes"], torch.tensor([[6 / 40, 15 / 50, 4 / 40, 20 / 50]]))
    assert model.prepare_targets([]) == []


def test_d3etr_match_started_from_the_student_head_equals_a_synchronous_match(monkeypatch):
    """The adaptive matching starts in a hook on the student's head (solved on a host thread
    while the step goes on); the losses and gradients equal those of a match started in the
    distiller's forward, and the mean matched costs are logged per layer."""
    from detkd.losses import d3etr

    model = _d3etr()
    with torch.no_grad():
        for p in model.student.head.parameters():
            p.normal_(0, 0.5)
    inputs = make_inputs(n=2)
    owners = []
    start = d3etr.D3ETRDistiller._start_match

    def spy(self, *args, owner=None, hook=True):
        owners.append(owner)
        return start(self, *args, owner=owner) if (owner is None or hook) else None

    runs = []
    for hook in (True, False):

        def start_or_drop(self, *a, owner=None, _h=hook):
            return spy(self, *a, owner=owner, hook=_h)

        monkeypatch.setattr(d3etr.D3ETRDistiller, "_start_match", start_or_drop)
        model.zero_grad(set_to_none=True)
        with EventStorage() as storage:
            losses = model(inputs)
            n_layers = len(model.student.transformer.decoder.layers)
            costs = [storage.latest()[f"d3etr/match_cost_{l}"][0] for l in range(n_layers)]
        sum(losses.values()).backward()
        grads = [p.grad.clone() for p in model.student.parameters() if p.grad is not None]
        runs.append((losses, costs, grads))
    # run 1: started from the head hook, with the step's context; run 2: the hook's start is
    # dropped (None), so the forward starts the match itself (owner None)
    assert (
        owners[0] is not None and owners[1] is not None and owners[2] is None and len(owners) == 3
    )
    (l1, c1, g1), (l2, c2, g2) = runs
    assert l1.keys() == l2.keys() and all(torch.equal(l1[k], l2[k]) for k in l1)
    assert c1 == c2 and all(c > 0 for c in c1)
    assert len(g1) == len(g2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_d3etr_failure_inside_the_distiller_cancels_its_match(monkeypatch):
    """A failure in the distiller's own forward after it took the step's pending match (here in
    the auxiliary group's ground-truth losses) cancels that match: the host thread does not go
    on solving it (before, it was neither used nor cancelled)."""
    from detkd.losses import d3etr

    model = _d3etr()
    started = []
    real_start = d3etr.D3ETRDistiller._start_match

    def spy(self, *args, **kwargs):
        started.append(real_start(self, *args, **kwargs))
        return started[-1]

    monkeypatch.setattr(d3etr.D3ETRDistiller, "_start_match", spy)
    calls = []
    real = type(model.student).compute_gt_losses

    def fail_in_the_distiller(*args, **kwargs):  # 1st call: the student's losses; 2nd: D3ETR's
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("failure inside the distiller")
        return real(model.student, *args, **kwargs)

    monkeypatch.setattr(model.student, "compute_gt_losses", fail_in_the_distiller)
    with EventStorage(), pytest.raises(RuntimeError, match="inside the distiller"):
        model(make_inputs(n=2))
    assert len(started) == 1 and model.distillers["d3etr"]._pending is None
    with pytest.raises(RuntimeError, match="cancelled"):
        started[0].result(torch.device("cpu"))


def test_d3etr_match_left_by_a_failed_step_is_cancelled_not_solved(monkeypatch):
    """A step that fails after the head hook started its match leaves that match queued on the
    match thread; the next step cancels it, so its problems are never solved (the next match
    does not wait behind them) and the next step's losses equal those of a fresh model."""
    import threading

    from detkd.losses import d3etr
    from detkd.modeling import detr as detr_mod

    model = _d3etr()
    with torch.no_grad():
        for p in model.student.head.parameters():
            p.normal_(0, 0.5)
    inputs = make_inputs(n=2)
    with EventStorage():
        expected = {k: v.detach() for k, v in model(inputs).items()}

    solved = []
    real = detr_mod.linear_sum_assignment

    def counting(c):
        solved.append(threading.current_thread().name)
        return real(c)

    monkeypatch.setattr(detr_mod, "linear_sum_assignment", counting)
    # hold the match thread so that the failed step's match cannot start before it is cancelled
    gate = threading.Event()
    blocker = d3etr._MATCH_THREAD[0].submit(gate.wait)

    def fail(*args, **kwargs):
        raise RuntimeError("failure after the head")

    monkeypatch.setattr(model.student, "compute_gt_losses", fail)
    with EventStorage(), pytest.raises(RuntimeError, match="failure after the head"):
        model(inputs)
    stale = model.distillers["d3etr"]._pending
    assert stale is not None and not stale.future.done()
    monkeypatch.undo()
    monkeypatch.setattr(detr_mod, "linear_sum_assignment", counting)

    def release(*args, **kwargs):
        gate.set()  # the new match is queued by now (started in the head hook)
        return type(model.student).compute_gt_losses(model.student, *args, **kwargs)

    monkeypatch.setattr(model.student, "compute_gt_losses", release)
    with EventStorage():
        losses = model(inputs)
    blocker.result(timeout=10)
    assert stale.future.cancelled() or stale.future.result() is None
    with pytest.raises(RuntimeError, match="cancelled"):
        stale.result(torch.device("cpu"))
    n_layers, n_images = len(model.student.transformer.decoder.layers), 2
    match_solves = [n for n in solved if "d3etr" in n]
    assert len(match_solves) == n_layers * n_images  # the new match only, not the stale one
    assert losses.keys() == expected.keys()
    assert all(torch.allclose(losses[k], expected[k]) for k in losses)


def _num_boxes_worker(rank, init_file, out_dir, logits, boxes, targets):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = instantiate(detr_cfg())
        mine = slice(rank, rank + 1)  # image `rank` on process `rank`
        losses = model.compute_gt_losses(logits[:, mine], boxes[:, mine], targets[mine])
        torch.save({k: float(v) for k, v in losses.items()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gt_losses_normalise_by_the_boxes_of_all_processes(tmp_path):
    # two processes, one image each (1 and 4 boxes): DDP averages their losses (gradients), and
    # that average must equal one process's loss over both images (every box weighs 1/5),
    # not 1/2 for the lone box and 1/8 for each of the four
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(5)
    L, N, K = 3, 6, 3
    logits = torch.randn(L, 2, N, K, generator=g)
    boxes = torch.rand(L, 2, N, 4, generator=g) * 0.4 + 0.2
    targets = [
        {
            "labels": torch.randint(0, K, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g) * 0.4 + 0.2,
        }
        for n in (1, 4)
    ]
    mp.spawn(
        _num_boxes_worker,
        args=(str(tmp_path / "init"), str(tmp_path), logits, boxes, targets),
        nprocs=2,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    single = instantiate(detr_cfg()).compute_gt_losses(logits, boxes, targets)
    assert set(ranks[0]) == set(single) and len(single) == 3 * L
    for k, v in single.items():
        assert (ranks[0][k] + ranks[1][k]) / 2 == pytest.approx(float(v), rel=1e-5), k


def test_matcher_default_costs_are_focal_2_l1_5_giou_2():
    """METHODS.md 4.1: Hungarian cost 2 * focal + 5 * L1 - 2 * GIoU. Two predictions near the
    two targets' boxes but each confident in the other's class: with class weight 2 the classes
    decide the match, with weight 1 the boxes would."""
    from torchvision.ops import generalized_box_iou

    from detkd.modeling import HungarianMatcher

    gt = torch.tensor([[0.3, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]])
    labels = torch.tensor([0, 1])
    logits = torch.tensor([[-2.0, 2.0], [2.0, -2.0]])  # prediction 0 says class 1, 1 says 0
    boxes = torch.tensor([[0.315, 0.5, 0.2, 0.2], [0.485, 0.5, 0.2, 0.2]])

    def best(class_weight):
        p = logits.sigmoid()[:, labels]  # (2 predictions, 2 targets)
        focal = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p**2 * -(1 - p + 1e-8).log()
        cost = class_weight * focal + 5 * torch.cdist(boxes, gt, p=1)
        cost = cost - 2 * generalized_box_iou(box_convert_xyxy(boxes), box_convert_xyxy(gt))
        return min(
            itertools.permutations(range(2)),
            key=lambda pm: sum(cost[i, pm[i]].item() for i in range(2)),
        )

    assert best(2.0) == (1, 0) and best(1.0) == (0, 1)  # the case discriminates the weight
    rows, cols = HungarianMatcher()(logits[None], boxes[None], [{"labels": labels, "boxes": gt}])[0]
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}


@pytest.mark.parametrize(
    "dtype, confident, expected", [(torch.bfloat16, 7.0, 1), (torch.float16, 9.0, 0)]
)
def test_matcher_costs_in_fp32_for_low_precision_predictions(dtype, confident, expected):
    """Under AMP the student's logits and boxes are fp16 / bf16. Costs in that precision: in
    fp16 a sigmoid of a logit > ~8.3 rounds to 1 and log(1 - p + 1e-8) is log(0) (a -inf cost:
    scipy's "matrix contains invalid numeric entries"); in bf16 p rounds to 1 from logit ~6.2
    and the focal term becomes -log(1e-8) = 18.4 instead of ~the logit, outweighing the boxes.
    One target of class 0; prediction 0 more confident but 1/8 off, prediction 1 exact (all
    inputs exact in both dtypes). Float64 costs (focal 2, L1 5, GIoU 2): -10.524 / -10.959
    with logits 7 / 6 (prediction 1 matched), -13.538 / -10.959 with 9 / 6 (prediction 0)."""
    from detkd.modeling import HungarianMatcher

    gt = torch.tensor([[0.5, 0.5, 0.25, 0.25]])
    logits = torch.tensor([[[confident, -3.0], [6.0, -3.0]]], dtype=dtype)
    boxes = torch.tensor([[[0.625, 0.5, 0.25, 0.25], [0.5, 0.5, 0.25, 0.25]]], dtype=dtype)
    targets = [{"labels": torch.tensor([0]), "boxes": gt}]
    rows, cols = HungarianMatcher()(logits, boxes, targets)[0]
    assert (rows.tolist(), cols.tolist()) == ([expected], [0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gt_box_losses_of_low_precision_predictions_are_computed_in_float32(dtype):
    """Under AMP the head's boxes come in bf16 / fp16; the ground-truth L1 and GIoU are computed
    in float32 against float32 targets. In bf16 the corners c +- w/2 of small boxes collapsed:
    GIoU was off by ~60 % (NaN for boxes of a few pixels) and the targets were rounded too."""
    model = instantiate(detr_cfg())
    model.aux_loss = False
    g = torch.Generator().manual_seed(5)
    G, N, K = 6, 10, 3
    gt = torch.cat(
        [torch.rand(G, 2, generator=g) * 0.8 + 0.1, torch.rand(G, 2, generator=g) * 0.006 + 0.004],
        -1,
    )
    targets = [{"labels": torch.randint(0, K, (G,), generator=g), "boxes": gt}]
    boxes = torch.rand(1, 1, N, 4, generator=g) * 0.3 + 0.1
    boxes[0, 0, :G] = gt + 0.0005 * torch.randn(G, 4, generator=g)  # near-converged small boxes
    logits = torch.randn(1, 1, N, K, generator=g)
    low_logits, low_boxes = logits.to(dtype).requires_grad_(), boxes.to(dtype).requires_grad_()
    match = [(torch.arange(G), torch.arange(G))]
    got = model.compute_gt_losses(low_logits, low_boxes, targets, indices_last_layer=match)
    # the reference: the same low-precision values, in float64, against the float64 targets
    ref_logits, ref_boxes = (
        low_logits.detach().double().requires_grad_(),
        low_boxes.detach().double().requires_grad_(),
    )
    (want,) = _reference_gt_losses(
        model, ref_logits, ref_boxes, [{**targets[0], "boxes": gt.double()}], [match], float(G)
    )
    for k in ("loss_class", "loss_bbox", "loss_giou"):
        assert got[k].dtype == torch.float32
        assert got[k].item() == pytest.approx(want[k].item(), rel=1e-4), k
    ga = torch.autograd.grad(got["loss_giou"] + got["loss_bbox"], low_boxes)[0]
    gb = torch.autograd.grad(want["loss_giou"] + want["loss_bbox"], ref_boxes)[0]
    assert ga.dtype == dtype
    torch.testing.assert_close(ga.double(), gb.to(dtype).double(), rtol=2e-2, atol=1e-2)


def test_attention_is_scaled_dot_product_per_head():
    """softmax(q_h k_h^T / sqrt(d_h)) per head, padded keys weighted 0, then the output
    projection of the concatenated heads."""
    from detkd.modeling import Attention

    g = torch.Generator().manual_seed(0)
    attn = Attention(qk_dim=8, v_dim=6, num_heads=2).double().eval()
    q = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    out, weights = attn(q, k, v, key_padding_mask=pad)
    heads, maps = [], []
    for h in range(2):
        qh, kh, vh = q[..., 4 * h : 4 * h + 4], k[..., 4 * h : 4 * h + 4], v[..., 3 * h : 3 * h + 3]
        logits = qh @ kh.transpose(1, 2) / 2.0  # sqrt(d_h) = sqrt(4)
        logits = logits.masked_fill(pad[:, None, :], float("-inf"))
        w = logits.softmax(-1)
        maps.append(w)
        heads.append(w @ vh)
    torch.testing.assert_close(weights, torch.stack(maps, 1))
    torch.testing.assert_close(out, attn.out_proj(torch.cat(heads, -1)))
    assert weights[1, :, :, 3:].abs().max() == 0


@pytest.mark.parametrize("matcher", ["match_layers_flat", "plain call"])
def test_d3etr_auxiliary_group_takes_the_teachers_assignment_at_the_last_layer(matcher):
    """METHODS.md 4.2: the auxiliary group's ground-truth losses use its own Hungarian match at
    earlier layers and, at the last layer, the GT that teacher query i was matched to (the
    standard matcher on the teacher's final predictions) for auxiliary query i. Also through a
    student whose matcher is a plain callable (no ``match_layers_flat``, the documented
    fallback; a mutation matching the teacher's second-to-last layer there passed every test)."""
    from types import SimpleNamespace

    model = instantiate(detr_cfg())
    student = model
    if matcher == "plain call":
        student = SimpleNamespace(
            matcher=lambda logits, boxes, targets: model.matcher(logits, boxes, targets),
            prepare_targets=model.prepare_targets,
            compute_gt_losses=model.compute_gt_losses,  # its own layers: model.matcher's flat path
        )
    d = D3ETRDistiller()
    g = torch.Generator().manual_seed(4)
    L, B, N, K = 3, 2, 30, 3

    def preds():
        return torch.randn(L, B, N, K, generator=g), torch.rand(L, B, N, 4, generator=g) * 0.4 + 0.2

    (aux_logits, aux_boxes), (t_logits, t_boxes) = preds(), preds()
    inputs = make_inputs(n=B, boxes_per_image=3, seed=2)
    got = d._aux_gt_losses(
        student, SimpleNamespace(batched_inputs=inputs), aux_logits, aux_boxes, t_logits, t_boxes
    )
    targets = model.prepare_targets([x["instances"] for x in inputs])
    own = [model.matcher(aux_logits[l], aux_boxes[l], targets) for l in range(L)]
    teacher = model.matcher(t_logits[-1], t_boxes[-1], targets)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(own[-1], teacher))  # they differ here
    ref = _reference_gt_losses(model, aux_logits, aux_boxes, targets, own[:-1] + [teacher], 6.0)
    want = {
        f"loss_d3etr_aux_{k[len('loss_'):]}" + ("" if l == L - 1 else f"_{l}"): v
        for l, r in enumerate(ref)
        for k, v in r.items()
    }
    assert set(got) == set(want)
    for k in want:
        assert got[k].item() == pytest.approx(want[k].item(), rel=1e-5), k


def test_d3etr_different_head_counts_compare_head_averaged_maps():
    """A 2-head teacher and a 1-head student: the attention terms are the KL of the head-averaged
    teacher rows against the student's (here an identity match: the predictions are equal)."""
    from types import SimpleNamespace

    B, N, K, HW = 2, 4, 3, 5
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, B, N, K, generator=g, dtype=torch.float64)
    boxes = _spread_boxes(B, N)
    t_sa, t_ca = _softmax_rows(B, 2, N, N, g=g), _softmax_rows(B, 2, N, HW, g=g)
    s_sa, s_ca = _softmax_rows(B, 1, N, N, g=g), _softmax_rows(B, 1, N, HW, g=g)
    head = {"pred_logits": logits, "pred_boxes": boxes}
    t_taps, s_taps = _one_layer_taps(head, t_sa, t_ca), _one_layer_taps(head, s_sa, s_ca)
    d = D3ETRDistiller(fixed_matching=False, aux_gt_loss=False)
    with EventStorage():
        got = d(s_taps, t_taps, SimpleNamespace(student=SimpleNamespace(num_queries=N)))
    assert got["loss_d3etr_l1"].item() == 0.0  # identity match

    assert got["loss_d3etr_sa"].item() == pytest.approx(
        _row_kl(t_sa.mean(1), s_sa[:, 0]).item(), rel=1e-9
    )
    assert got["loss_d3etr_ca"].item() == pytest.approx(
        _row_kl(t_ca.mean(1), s_ca[:, 0]).item(), rel=1e-9
    )


def test_d3etr_baseline_trains_on_detrs_augmentation():
    """The Conditional DETR recipe (DETR's make_coco_transforms): flip, then half the images
    resized to a short edge of 480..800 (step 32, max 1333) and half first resized to 400/500/600,
    randomly cropped to sides of 384..600 px, then resized the same way."""
    from detectron2.data import transforms as T

    data = load_config("configs/D3ETR/conditional_detr_r50_12ep.py").dataloader
    augs = T.AugmentationList(instantiate(data.train.mapper.augmentations))
    np.random.seed(0)
    shorts, cropped = set(), 0
    for _ in range(200):
        aug = T.AugInput(np.zeros((300, 450, 3), dtype=np.uint8))
        augs(aug)
        h, w = aug.image.shape[:2]
        shorts.add(min(h, w))
        cropped += abs(w / h - 1.5) > 0.02  # a crop changes the aspect ratio (almost surely)
    assert shorts <= set(range(480, 801, 32)) and {480, 800} <= shorts
    assert 60 < cropped < 140  # about half


def test_conditional_detr_backbone_trains_res3_to_res5_only():
    """DETR's backbone (as the official Conditional DETR's) trains layer2..layer4 only: the stem
    and res2 are frozen, all BN layers are frozen."""
    from detectron2.layers import FrozenBatchNorm2d

    backbone = instantiate(load_config("configs/common/models/conditional_detr.py").model.backbone)
    for name, p in backbone.named_parameters():
        assert p.requires_grad == (name.split(".")[0] in ("res3", "res4", "res5")), name
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())


def test_d3etr_adaptive_match_cost_sums_the_class_cost_over_classes():
    """METHODS.md 4.2: the adaptive matching cost is 1 * sum_c soft-BCE + 5 * L1 - 2 * GIoU (the
    class cost summed over the K classes, as DETRDistill's distillation matcher). Two COCO-sized
    (K = 80) teacher queries of different classes, and two student queries with those classes
    whose boxes are swapped and slightly off: the class term decides the match. A class cost
    divided by K (about 0.05 here) would let the boxes pair the queries across classes."""
    from torchvision.ops import box_convert, generalized_box_iou

    K = 80
    t_logits = torch.full((1, 1, 2, K), -6.0, dtype=torch.float64)
    t_logits[0, 0, 0, 3], t_logits[0, 0, 1, 7] = 3.0, 3.0  # teacher 0: class 3, teacher 1: class 7
    s_logits = t_logits.clone()  # student 0: class 3, student 1: class 7
    t_boxes = torch.tensor([[[[0.30, 0.5, 0.2, 0.2], [0.70, 0.5, 0.2, 0.2]]]], dtype=torch.float64)
    s_boxes = torch.tensor([[[[0.68, 0.5, 0.2, 0.2], [0.32, 0.5, 0.2, 0.2]]]], dtype=torch.float64)

    q, p = t_logits[0, 0].sigmoid(), s_logits[0, 0].sigmoid()
    xyxy = lambda b: box_convert(b, "cxcywh", "xyxy")  # noqa: E731
    cost = torch.zeros(2, 2, dtype=torch.float64)
    for i in range(2):
        for j in range(2):
            bce = -(q[i] * p[j].log() + (1 - q[i]) * (1 - p[j]).log()).sum()
            cost[i, j] = bce + 5 * (t_boxes[0, 0, i] - s_boxes[0, 0, j]).abs().sum()
    cost -= 2 * generalized_box_iou(xyxy(t_boxes[0, 0]), xyxy(s_boxes[0, 0]))
    best = min(
        itertools.permutations(range(2)), key=lambda pm: sum(cost[i, pm[i]] for i in range(2))
    )
    assert best == (0, 1)  # the classes decide
    d = D3ETRDistiller()
    ti, si, mean_cost = d._match(t_logits, t_boxes, s_logits, s_boxes)
    assert ti[0, 0].tolist() == [0, 1] and si[0, 0].tolist() == list(best)
    assert mean_cost[0] == pytest.approx(float(cost[0, 0] + cost[1, 1]) / 2, rel=1e-9)


def test_attention_kl_is_teacher_to_student_kl_averaged_over_rows():
    """attention_kl(A_t, A_s) = mean over rows of KL(A_t[row] || A_s[row]) (METHODS.md 4.3),
    hand-computed; a teacher's zero entry contributes 0 (0 log 0 = 0)."""
    import math

    from detkd.losses.d3etr import attention_kl

    t = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    s = torch.tensor([[0.25, 0.5, 0.25], [0.5, 0.25, 0.25]], dtype=torch.float64)
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.5)
    row1 = 0.2 * math.log(0.2 / 0.5) + 0.3 * math.log(0.3 / 0.25) + 0.5 * math.log(0.5 / 0.25)
    assert attention_kl(t, s).item() == pytest.approx((row0 + row1) / 2, rel=1e-12)
    assert attention_kl(t[None, None], s[None, None]).item() == pytest.approx(
        (row0 + row1) / 2, rel=1e-12
    )
    assert attention_kl(t, t).item() == pytest.approx(0.0, abs=1e-15)
    # a tiny student weight (above the 1e-12 clamp) is taken as it is: KL 0.5 * log(0.5 / 1e-9)
    tiny = torch.tensor([[1e-9, 0.5, 0.5 - 1e-9]], dtype=torch.float64)
    half = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    assert attention_kl(half, tiny).item() == pytest.approx(0.5 * math.log(0.5 / 1e-9), rel=1e-9)


def test_d3etr_loss_weights_scale_their_own_terms():
    """Each of cls/l1/giou/sa/ca_weight multiplies its own loss term only (the loop reference
    test uses the defaults, where sa_weight == ca_weight)."""
    from types import SimpleNamespace

    L, B, K, M, HW, N = 2, 2, 3, 2, 5, 4
    g = torch.Generator().manual_seed(11)

    def preds(n):
        boxes = torch.cat(
            [
                torch.rand(L, B, n, 2, generator=g) * 0.6 + 0.2,
                torch.rand(L, B, n, 2, generator=g) * 0.3 + 0.05,
            ],
            -1,
        )
        return torch.randn(L, B, n, K, generator=g, dtype=torch.float64), boxes.double()

    t_logits, t_boxes = preds(N)
    s_logits, s_boxes = preds(2 * N)  # own group + auxiliary group
    t_taps = {"head": {"pred_logits": t_logits, "pred_boxes": t_boxes}}
    s_taps = {"head": {"pred_logits": s_logits, "pred_boxes": s_boxes}}
    for l in range(L):
        t_taps[f"transformer.decoder.layers.{l}.self_attn"] = (None, _softmax_rows(B, M, N, N, g=g))
        t_taps[f"transformer.decoder.layers.{l}.cross_attn"] = (
            None,
            _softmax_rows(B, M, N, HW, g=g),
        )
        s_taps[f"transformer.decoder.layers.{l}.self_attn"] = (
            None,
            _softmax_rows(B, M, 2 * N, 2 * N, g=g),
        )
        s_taps[f"transformer.decoder.layers.{l}.cross_attn"] = (
            None,
            _softmax_rows(B, M, 2 * N, HW, g=g),
        )
    ctx = SimpleNamespace(student=SimpleNamespace(num_queries=N))
    keys = ("cls", "l1", "giou", "sa", "ca")
    unit = D3ETRDistiller(aux_gt_loss=False, **{f"{k}_weight": 1.0 for k in keys})
    weights = dict(cls=0.3, l1=1.7, giou=2.9, sa=0.6, ca=4.1)
    weighted = D3ETRDistiller(aux_gt_loss=False, **{f"{k}_weight": w for k, w in weights.items()})
    with EventStorage():
        base, got = unit(s_taps, t_taps, ctx), weighted(s_taps, t_taps, ctx)
    for k in keys:
        assert base[f"loss_d3etr_{k}"].item() > 1e-3, k
        assert got[f"loss_d3etr_{k}"].item() == pytest.approx(
            weights[k] * base[f"loss_d3etr_{k}"].item(), rel=1e-12
        ), k


def test_d3etr_auxiliary_group_runs_the_teachers_queries():
    """MixMatcher's fixed group is the teacher's learned queries (METHODS.md 4.2), also when the
    hidden sizes are equal (no projection): for a student equal to the teacher except for its
    query embeddings, the auxiliary group's predictions are the teacher's, and the own group's
    are not."""
    model = _d3etr(aux_gt_loss=False)
    model.teacher.load_state_dict(model.student.state_dict())
    with torch.no_grad():
        model.teacher.query_embed.weight.normal_(0, 1.0)
    heads = {}
    hooks = [
        m.head.register_forward_hook(lambda mod, i, out, side=side: heads.__setitem__(side, out))
        for side, m in (("student", model.student), ("teacher", model.teacher))
    ]
    try:
        with EventStorage():
            model(make_inputs(n=2))
    finally:
        for h in hooks:
            h.remove()
    Ns = model.student.num_queries
    for k in ("pred_logits", "pred_boxes"):
        s, t = heads["student"][k].detach(), heads["teacher"][k]
        assert s.shape[2] == Ns + t.shape[2]
        torch.testing.assert_close(s[:, :, Ns:], t, atol=1e-5, rtol=1e-5)
        assert (s[:, :, :Ns] - t).abs().max() > 1e-2


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("Nt,Ns", [(4, 4), (3, 4), (4, 3)])
def test_d3etr_attention_targets_never_read_uninitialised_memory(fixed, Nt, Ns):
    """The attention targets are allocated uninitialised only where every element is written
    (a full match); with a partial match, the student's unmatched rows (weight 0) must read
    zeros. Under deterministic mode torch fills uninitialised memory with NaN: the losses and
    their gradients must come out finite and equal to a normal run's."""
    from types import SimpleNamespace

    L, B, K, M, HW = 2, 2, 3, 2, 5
    g = torch.Generator().manual_seed(5)
    nq = Ns + Nt if fixed else Ns
    t_taps, s_taps = _random_taps(g, L, B, K, M, HW, Nt, nq)
    maps = [
        s_taps[f"transformer.decoder.layers.{l}.{a}"][1]
        for l in range(L)
        for a in ("self_attn", "cross_attn")
    ]
    d = D3ETRDistiller(fixed_matching=fixed, aux_gt_loss=False)
    ctx = SimpleNamespace(student=SimpleNamespace(num_queries=Ns))

    def run():
        with EventStorage():
            out = d(s_taps, t_taps, ctx)
        total = out["loss_d3etr_sa"] + out["loss_d3etr_ca"]
        grads = torch.autograd.grad(total, maps, allow_unused=True)
        return total.detach(), [
            torch.zeros_like(m) if x is None else x for x, m in zip(grads, maps)
        ]

    ref_total, ref_grads = run()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.utils.deterministic.fill_uninitialized_memory
        total, grads = run()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert torch.isfinite(total) and total.item() == pytest.approx(ref_total.item(), rel=1e-12)
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("fixed", [False, True])
def test_d3etr_student_with_more_heads_is_compared_head_averaged(fixed):
    """A 1-head teacher and a 3-head student: the student's maps are averaged over its heads
    (self-attention also when it comes as per-group blocks of the auxiliary group); identity
    match (equal predictions)."""
    from types import SimpleNamespace

    B, N, K, HW = 2, 4, 3, 5
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, B, N, K, generator=g, dtype=torch.float64)
    boxes = _spread_boxes(B, N)
    nq = 2 * N if fixed else N
    t_sa, t_ca = _softmax_rows(B, 1, N, N, g=g), _softmax_rows(B, 1, N, HW, g=g)
    own_sa, aux_sa = _softmax_rows(B, 3, N, N, g=g), _softmax_rows(B, 3, N, N, g=g)
    s_ca = _softmax_rows(B, 3, nq, HW, g=g)
    s_sa = (own_sa, aux_sa) if fixed else own_sa  # a grouped self-attention's per-group blocks
    s_head = {
        "pred_logits": torch.cat([logits] * (nq // N), 2),
        "pred_boxes": torch.cat([boxes] * (nq // N), 2),
    }
    t_taps = _one_layer_taps({"pred_logits": logits, "pred_boxes": boxes}, t_sa, t_ca)
    s_taps = _one_layer_taps(s_head, s_sa, s_ca)
    d = D3ETRDistiller(fixed_matching=fixed, aux_gt_loss=False)
    with EventStorage():
        got = d(s_taps, t_taps, SimpleNamespace(student=SimpleNamespace(num_queries=N)))
    assert got["loss_d3etr_l1"].item() == 0.0  # identity match

    want_sa = _row_kl(t_sa[:, 0], own_sa.mean(1))
    want_ca = _row_kl(t_ca[:, 0], s_ca[:, :, :N].mean(1))
    if fixed:
        want_sa = want_sa + _row_kl(t_sa[:, 0], aux_sa.mean(1))
        want_ca = want_ca + _row_kl(t_ca[:, 0], s_ca[:, :, N:].mean(1))
    assert got["loss_d3etr_sa"].item() == pytest.approx(want_sa.item(), rel=1e-9)
    assert got["loss_d3etr_ca"].item() == pytest.approx(want_ca.item(), rel=1e-9)


@pytest.mark.parametrize("fixed", [False, True])
def test_d3etr_takes_head_averaged_3d_attention_maps(fixed):
    """nn.MultiheadAttention's default weights are averaged over the heads, (B, Q, S): they are
    maps of one head (METHODS.md 4.1: head-averaged maps on both sides). A per-head other side
    is averaged too. Identity match (equal predictions)."""
    from types import SimpleNamespace

    B, N, K, HW = 2, 4, 3, 5
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, B, N, K, generator=g, dtype=torch.float64)
    boxes = _spread_boxes(B, N)
    nq = 2 * N if fixed else N
    t_sa, t_ca = _softmax_rows(B, N, N, g=g), _softmax_rows(B, N, HW, g=g)  # head-averaged
    own_sa, aux_sa = _softmax_rows(B, 2, N, N, g=g), _softmax_rows(B, 2, N, N, g=g)
    s_ca = _softmax_rows(B, 2, nq, HW, g=g)
    s_head = {
        "pred_logits": torch.cat([logits] * (nq // N), 2),
        "pred_boxes": torch.cat([boxes] * (nq // N), 2),
    }
    t_taps = _one_layer_taps({"pred_logits": logits, "pred_boxes": boxes}, t_sa, t_ca)
    d = D3ETRDistiller(fixed_matching=fixed, aux_gt_loss=False)
    ctx = SimpleNamespace(student=SimpleNamespace(num_queries=N))
    want_sa = _row_kl(t_sa, own_sa.mean(1))
    want_ca = _row_kl(t_ca, s_ca[:, :, :N].mean(1))
    if fixed:
        want_sa = want_sa + _row_kl(t_sa, aux_sa.mean(1))
        want_ca = want_ca + _row_kl(t_ca, s_ca[:, :, N:].mean(1))
    # the student per head (2 heads), then head-averaged too (a full map, or per-group blocks)
    full_sa = torch.zeros(B, 2, nq, nq, dtype=torch.float64)
    full_sa[:, :, :N, :N] = own_sa
    if fixed:
        full_sa[:, :, N:, N:] = aux_sa
    for s_sa, ca in [(full_sa, s_ca), (full_sa.mean(1), s_ca.mean(1))] + (
        [((own_sa.mean(1), aux_sa.mean(1)), s_ca.mean(1))] if fixed else []
    ):
        with EventStorage():
            got = d(_one_layer_taps(s_head, s_sa, ca), t_taps, ctx)
        assert got["loss_d3etr_l1"].item() == 0.0  # identity match
        assert got["loss_d3etr_sa"].item() == pytest.approx(want_sa.item(), rel=1e-9)
        assert got["loss_d3etr_ca"].item() == pytest.approx(want_ca.item(), rel=1e-9)
    # an attention module returning its output alone (or no weights) is named, with the fix
    for bad in [s_ca, (s_ca, None)]:
        taps = _one_layer_taps(s_head, full_sa, s_ca)
        taps["transformer.decoder.layers.0.cross_attn"] = bad
        with (
            EventStorage(),
            pytest.raises(
                ValueError,
                match=r"student's transformer.decoder.layers.0.cross_attn.*need_weights=True",
            ),
        ):
            d(taps, t_taps, ctx)


def test_d3etr_mixed_per_head_and_averaged_modules_compare_head_averages():
    """Each attention module may return per-head or head-averaged maps. Unless all four maps
    (teacher and student, self- and cross-attention) have one head count, all are averaged:
    a teacher's averaged cross-attention was compared with each student head (here every student
    head equals it, so the KL of the averages is 0 but 1.27 was returned), and an averaged
    student self-attention beside per-head ones failed in the row cross-entropy."""
    from types import SimpleNamespace

    B, N, K, HW, M = 2, 4, 3, 5, 2
    g = torch.Generator().manual_seed(4)
    head = {
        "pred_logits": torch.randn(1, B, N, K, generator=g, dtype=torch.float64),
        "pred_boxes": _spread_boxes(B, N),
    }
    t_sa, t_ca_avg = _softmax_rows(B, M, N, N, g=g), _softmax_rows(B, N, HW, g=g)
    s_sa, s_ca = _softmax_rows(B, M, N, N, g=g), _softmax_rows(B, M, N, HW, g=g)
    d = D3ETRDistiller(fixed_matching=False, aux_gt_loss=False)
    ctx = SimpleNamespace(student=SimpleNamespace(num_queries=N))
    equal_heads = t_ca_avg[:, None].expand(B, M, N, HW).clone()
    cases = [  # (student sa, student ca, teacher sa, teacher ca)
        (s_sa, equal_heads, t_sa, t_ca_avg),  # the teacher's cross-attention averaged
        (s_sa.mean(1), s_ca, t_sa, equal_heads),  # the student's self-attention averaged
    ]
    for ssa, sca, tsa, tca in cases:
        with EventStorage():
            got = d(_one_layer_taps(head, ssa, sca), _one_layer_taps(head, tsa, tca), ctx)
        avg = lambda x: x if x.dim() == 3 else x.mean(1)  # noqa: E731
        assert got["loss_d3etr_sa"].item() == pytest.approx(
            _row_kl(avg(tsa), avg(ssa)).item(), rel=1e-9
        )
        assert got["loss_d3etr_ca"].item() == pytest.approx(
            _row_kl(avg(tca), avg(sca)).item(), rel=1e-9, abs=1e-12
        )
    assert _row_kl(t_ca_avg, equal_heads.mean(1)).item() == pytest.approx(0.0, abs=1e-12)


class _OwnDETR(torch.nn.Module):
    """A DETR-style detector written from D3ETRDistiller's documented protocol alone:
    nn.MultiheadAttention (head-averaged weights by default), no encoder, a stride-16 conv
    backbone, sigmoid class logits, its own matcher, targets and ground-truth losses."""

    def __init__(self, d=32, heads=4, layers=2, num_queries=5, num_classes=3, head=None):
        super().__init__()
        from torch import nn

        conv = lambda i, o: nn.Conv2d(i, o, 3, 2, 1)  # noqa: E731
        self.backbone = nn.Sequential(
            conv(3, 8), nn.ReLU(), conv(8, 8), nn.ReLU(), conv(8, 8), nn.ReLU(), conv(8, d)
        )
        self.transformer = nn.Module()
        self.transformer.decoder = nn.Module()
        self.transformer.decoder.layers = nn.ModuleList(
            nn.ModuleDict(
                dict(
                    self_attn=nn.MultiheadAttention(d, heads, batch_first=True),
                    cross_attn=nn.MultiheadAttention(d, heads, batch_first=True),
                )
            )
            for _ in range(layers)
        )
        self.query_embed = nn.Embedding(num_queries, d)
        self.cls, self.box = nn.Linear(d, num_classes), nn.Linear(d, 4)
        self.head = head or (
            lambda hs: {"pred_logits": self.cls(hs), "pred_boxes": self.box(hs).sigmoid()}
        )
        self.head = self.head if isinstance(self.head, nn.Module) else _Lambda(self.head)
        self.num_queries, self.num_classes, self.input_format, self.size_divisibility = (
            num_queries,
            num_classes,
            "BGR",
            32,
        )
        self.register_buffer("pixel_mean", torch.tensor([103.5, 116.3, 123.7]).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor([57.4, 57.1, 58.4]).view(3, 1, 1), False)
        self.extra = None

    @property
    def device(self):
        return self.pixel_mean.device

    @__import__("contextlib").contextmanager
    def extra_query_group(self, queries):
        self.extra = queries
        try:
            yield
        finally:
            self.extra = None

    def forward_predictions(self, images):
        x = images.tensor
        pad = torch.ones(x.shape[0], *x.shape[2:], dtype=torch.bool)
        for i, (h, w) in enumerate(images.image_sizes):
            pad[i, :h, :w] = False
        f = self.backbone(x)
        kpm = (
            torch.nn.functional.interpolate(pad[:, None].float(), size=f.shape[-2:])
            .bool()[:, 0]
            .flatten(1)
        )
        mem = f.flatten(2).transpose(1, 2)
        q, mask = self.query_embed.weight, None
        if self.training and self.extra is not None:
            n, q = q.shape[0], torch.cat([q, self.extra])
            mask = torch.ones(len(q), len(q), dtype=torch.bool)
            mask[:n, :n] = mask[n:, n:] = False  # True: blocked
        qpos = q[None].expand(x.shape[0], -1, -1)
        tgt, states = torch.zeros_like(qpos), []
        for layer in self.transformer.decoder.layers:
            tgt = tgt + layer["self_attn"](tgt + qpos, tgt + qpos, tgt, attn_mask=mask)[0]
            tgt = tgt + layer["cross_attn"](tgt + qpos, mem, mem, key_padding_mask=kpm)[0]
            states.append(tgt)
        return self.head(torch.stack(states))

    def prepare_targets(self, instances):
        from torchvision.ops import box_convert

        scale = lambda i: torch.tensor(i.image_size[::-1] * 2, dtype=torch.float32)  # noqa: E731
        return [
            dict(
                labels=i.gt_classes,
                boxes=box_convert(i.gt_boxes.tensor / scale(i), "xyxy", "cxcywh"),
            )
            for i in instances
        ]

    def matcher(self, logits, boxes, targets):  # the cheapest valid assignment: by index
        return [(torch.arange(min(len(t["labels"]), logits.shape[1])),) * 2 for t in targets]

    def compute_gt_losses(self, logits, boxes, targets, indices_last_layer=None):
        losses = {}
        for l in range(logits.shape[0]):
            idx = (
                indices_last_layer
                if l == logits.shape[0] - 1 and indices_last_layer is not None
                else self.matcher(logits[l], boxes[l], targets)
            )
            l1 = sum(
                (boxes[l, b, p] - t["boxes"][g]).abs().sum()
                for b, ((p, g), t) in enumerate(zip(idx, targets))
            )
            losses[f"loss_bbox_{l}"] = l1 + 0 * logits[l].sum()
        return losses

    def forward(self, batched_inputs):
        from detectron2.structures import ImageList

        images = ImageList.from_tensors(
            [(x["image"] - self.pixel_mean) / self.pixel_std for x in batched_inputs], 32
        )
        out = self.forward_predictions(images)
        N = self.num_queries
        targets = self.prepare_targets([x["instances"] for x in batched_inputs])
        return self.compute_gt_losses(
            out["pred_logits"][:, :, :N], out["pred_boxes"][:, :, :N], targets
        )


class _Lambda(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _own_kd(student, teacher, **kw):
    torch.manual_seed(0)
    return DistillationDetector(
        student=student, teacher=teacher, distillers={"d3etr": D3ETRDistiller(**kw)}
    ).train()


def test_d3etr_on_a_detector_of_ones_own_following_the_documented_protocol():
    """Student and teacher copies of a protocol-following DETR (head-averaged maps): every
    distillation term is 0, with and without the auxiliary group (its ground-truth losses are
    there); paired with a ConditionalDETR teacher (other width, heads, queries), all terms
    are finite and train the projection."""
    for kw in [dict(fixed_matching=False, aux_gt_loss=False), {}]:
        torch.manual_seed(0)
        student, teacher = _OwnDETR(), _OwnDETR()
        teacher.load_state_dict(student.state_dict())
        with EventStorage():
            losses = _own_kd(student, teacher, **kw)(make_inputs(n=2))
        kd = {
            k: v.item() for k, v in losses.items() if k.startswith("loss_d3etr") and "aux" not in k
        }
        assert len(kd) == 5 and all(abs(v) < 1e-6 for v in kd.values()), kd
        assert ("loss_d3etr_aux_bbox_1" in losses) == ("fixed_matching" not in kw)
    model = _own_kd(_OwnDETR(heads=2, layers=3, num_queries=8), instantiate(detr_cfg()))
    with EventStorage():
        losses = model(make_inputs(n=2))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.distillers["d3etr"].query_proj.weight.grad.abs().sum() > 0


def test_d3etr_names_a_head_that_breaks_the_protocol():
    """A softmax head (K + 1 logits: DETR's 'no object' column) was distilled as K + 1
    sigmoid classes without a word; a head returning the last layer only crashed deep."""
    softmax = _OwnDETR(num_classes=3)
    softmax.cls = torch.nn.Linear(32, 4)
    last_only = _OwnDETR()
    last_only.head = _Lambda(
        lambda hs: {
            "pred_logits": last_only.cls(hs[-1]),
            "pred_boxes": last_only.box(hs[-1]).sigmoid(),
        }
    )
    one_layer = _OwnDETR()
    one_layer.head = _Lambda(
        lambda hs: {
            "pred_logits": one_layer.cls(hs[-1:]),
            "pred_boxes": one_layer.box(hs[-1:]).sigmoid(),
        }
    )
    for teacher, match in [
        (softmax, r"teacher's head .*4 class logits, num_classes is 3.*sigmoid"),
        (last_only, r"teacher's head returned pred_logits \(1, 5, 3\).*\(L, B, N, K\)"),
        (one_layer, r"teacher's head .*1 layers of predictions for 2 decoder layers"),
    ]:
        for kw in [dict(fixed_matching=False, aux_gt_loss=False), {}]:
            with EventStorage(), pytest.raises(ValueError, match=match):
                _own_kd(_OwnDETR(), teacher, **kw)(make_inputs(n=1))


def test_d3etr_names_gt_loss_keys_without_loss_prefix():
    """compute_gt_losses keys are renamed loss_d3etr_aux_<name>: 'bbox_0' and 'bbox_1' both
    became 'loss_d3etr_aux_' and one of them was dropped without a word."""
    student = _OwnDETR()
    own = student.compute_gt_losses
    student.compute_gt_losses = lambda *a, **k: {
        n[len("loss_") :]: v for n, v in own(*a, **k).items()
    }
    with (
        EventStorage(),
        pytest.raises(ValueError, match=r"compute_gt_losses returned keys \['bbox_0', 'bbox_1'\]"),
    ):
        _own_kd(student, _OwnDETR())(make_inputs(n=1))


def test_conditional_detr_refuses_mismatched_sizes_naming_the_fix():
    """A position embedding of another width than d_model failed in the first forward with a
    bare broadcast error ("The size of tensor a (64) must match the size of tensor b (96)"), an
    in_feature the backbone does not output with a bare KeyError('res5'), and a head count
    that does not divide d_model with an AssertionError without a message."""
    cfg = detr_cfg()  # d_model 64, num_pos_feats 32, in_feature res4, 4 heads
    cfg.position_embedding.num_pos_feats = 48
    with pytest.raises(
        ValueError,
        match=r"num_pos_feats=48 gives 96-dim positions, but the "
        r"transformer's d_model is 64: set num_pos_feats = d_model / 2 = 32",
    ):
        instantiate(cfg)
    cfg = detr_cfg()
    cfg.in_feature = "res5"
    with pytest.raises(
        ValueError, match=r"in_feature='res5' is not an output of the backbone " r"\(\['res4'\]\)"
    ):
        instantiate(cfg)
    cfg = detr_cfg()
    cfg.transformer.nhead = 6
    with pytest.raises(ValueError, match=r"6 heads do not divide qk_dim=64 / v_dim=64"):
        instantiate(cfg)
    model = instantiate(detr_cfg()).eval()  # the config's own sizes
    out = model([{"image": torch.rand(3, 64, 80) * 255}])
    assert len(out) == 1 and len(out[0]["instances"]) == 30 * 3  # every (query, class) pair


def test_row_cross_entropy_gradient_is_zero_where_the_student_map_is_below_the_clamp():
    """The attention terms' log(max(s, 1e-12)) has no gradient where s < 1e-12 (a student
    weight of exactly 0, e.g. a masked position, against a teacher weight > 0): the hand-written
    backward gives 0 there, as autograd on the definition, not teacher / 1e-12 = 3e11. Elsewhere
    the gradient is w * T / s."""
    from detkd.losses.d3etr import _RowCrossEntropy

    s = torch.tensor([[[0.0, 0.25, 0.75], [0.5, 0.5, 0.0]]], dtype=torch.float64)
    s.requires_grad_()
    t = torch.tensor([[[0.2, 0.3, 0.5], [0.6, 0.4, 0.0]]], dtype=torch.float64)
    w = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    whole = slice(None)
    first_row = [(slice(0, 1), whole, t[:, :1], w[:, :1])]  # a block: rows 0:1
    for blocks, rows in (([(whole, whole, t, w)], slice(None)), (first_row, slice(0, 1))):
        got = _RowCrossEntropy.apply(s, blocks)
        ref = (w[:, rows, None] * t[:, rows] * s[:, rows].clamp(min=1e-12).log()).sum()
        assert got.item() == pytest.approx(ref.item(), rel=1e-12)
        (g_got,) = torch.autograd.grad(got, s)
        (g_ref,) = torch.autograd.grad(ref, s)
        torch.testing.assert_close(g_got, g_ref, rtol=1e-12, atol=0.0)
        assert g_got[0, 0, 0] == 0.0
    assert g_got[0, 0, 1].item() == pytest.approx(0.5 * 0.3 / 0.25)


def test_inverse_sigmoid_and_head_boxes_from_the_reference_point():
    """inverse_sigmoid(x) = log(x / (1 - x)), both clamped at 1e-5; the head's box centre is
    sigmoid(delta_xy + logit(reference)) = r e^delta / (r e^delta + 1 - r), its size
    sigmoid(delta_wh)."""
    from detkd.modeling.detr import DETRHead, inverse_sigmoid

    got = inverse_sigmoid(torch.tensor([0.0, 1e-6, 0.3, 1.0], dtype=torch.float64))
    want = [math.log(1e-5), math.log(1e-5 / (1 - 1e-6)), math.log(0.3 / 0.7), -math.log(1e-5)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    # inputs are clamped to [0, 1] first
    got = inverse_sigmoid(torch.tensor([-0.5, 1.5], dtype=torch.float64))
    want = torch.tensor([math.log(1e-5), -math.log(1e-5)], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    head = DETRHead(8, 2).double()
    bias = torch.tensor([0.5, -1.0, 0.2, -0.3], dtype=torch.float64)
    with torch.no_grad():
        head.bbox_embed.layers[-1].bias.copy_(bias)  # the last layer's weight is 0: delta = bias
    ref = torch.tensor([[[0.05, 0.5], [0.3, 0.97], [0.6, 0.2]]], dtype=torch.float64)
    states = torch.randn(2, 1, 3, 8, dtype=torch.float64)
    out = head(states, ref)
    e = bias[:2].exp()
    xy = ref * e / (ref * e + 1 - ref)
    wh = torch.sigmoid(bias[2:]).expand(3, 2)
    assert out["pred_boxes"].shape == (2, 1, 3, 4)
    for l in range(2):
        torch.testing.assert_close(out["pred_boxes"][l, 0], torch.cat([xy[0], wh], -1))
    torch.testing.assert_close(out["pred_logits"], head.class_embed(states))


def test_point_sine_embedding_equals_the_position_embedding_at_cell_centres():
    """Conditional DETR's spatial query lives in the keys' positional space: the sine embedding
    of the normalised point ((j + 0.5) / W, (i + 0.5) / H) is the sine position embedding of
    cell (i, j) of an unpadded H x W map (y features first, then x)."""
    from detkd.modeling.detr import PositionEmbeddingSine, sine_embed_of_points

    H, W, d = 3, 5, 16
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    pos = PositionEmbeddingSine(num_pos_feats=d // 2)(mask)  # (1, d, H, W)
    i, j = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    points = torch.stack([(j + 0.5) / W, (i + 0.5) / H], -1).reshape(1, H * W, 2)
    got = sine_embed_of_points(points, d)  # (1, HW, d)
    torch.testing.assert_close(got, pos.flatten(2).transpose(1, 2), atol=1e-5, rtol=0)
    # by hand: feature 0 is sin(2 pi y), feature d / 2 + 3 is cos(2 pi x / 10000^(2 / 8))
    y, x = 0.5 / H, 1.5 / W
    assert got[0, 1, 0].item() == pytest.approx(math.sin(2 * math.pi * y), abs=1e-6)
    want = math.cos(2 * math.pi * x / 10000 ** (2 / 8))
    assert got[0, 1, d // 2 + 3].item() == pytest.approx(want, abs=1e-6)


def test_conditional_decoder_cross_attention_inputs_follow_the_paper():
    """Conditional DETR (Sec. 3.3) read through hooks on a 3-layer decoder: reference points
    s = sigmoid(MLP(query_pos)); per head, cross-attention query [content ; lambda_q * PE(s)],
    lambda_q = 1 at the first layer and query_scale(previous layer output) after; key
    [content ; PE(position)]; the first layer also adds the positional query and key to the
    content parts; the states are the decoder norm of each layer's output."""
    from detkd.modeling.detr import ConditionalDETRTransformer, sine_embed_of_points

    torch.manual_seed(0)
    d, M, B, Nq, HW = 8, 2, 2, 4, 5
    tr = (
        ConditionalDETRTransformer(
            d_model=d,
            nhead=M,
            num_encoder_layers=1,
            num_decoder_layers=3,
            dim_feedforward=16,
            dropout=0.0,
        )
        .double()
        .eval()
    )
    dec = tr.decoder
    src = torch.randn(B, HW, d, dtype=torch.float64)
    pos = torch.randn(B, HW, d, dtype=torch.float64)
    query_pos = torch.randn(B, Nq, d, dtype=torch.float64)
    seen = {}
    hooks = [tr.encoder[-1].register_forward_hook(lambda m, a, o: seen.__setitem__("memory", o))]
    for i, layer in enumerate(dec.layers):
        hooks += [
            layer.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("in", i), a[0])),
            layer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("out", i), o)),
            layer.norm1.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("sa", i), o)),
            layer.cross_attn.register_forward_pre_hook(
                lambda m, a, i=i: seen.__setitem__(("ca", i), a)
            ),
        ]
    with torch.no_grad():
        states, reference = tr(src, pos, torch.zeros(B, HW, dtype=torch.bool), query_pos)
        for h in hooks:
            h.remove()
        ref = dec.ref_point_head(query_pos).sigmoid()
        torch.testing.assert_close(reference, ref)
        sine = sine_embed_of_points(ref, d)
        memory = seen["memory"]
        for i, layer in enumerate(dec.layers):
            tgt = seen[("sa", i)]
            q_content, k_content = layer.ca_qcontent(tgt), layer.ca_kcontent(memory)
            if i == 0:
                q_content = q_content + layer.ca_qpos(query_pos)
                k_content = k_content + layer.ca_kpos(pos)
                scale = 1.0
            else:
                assert torch.equal(seen[("in", i)], seen[("out", i - 1)])
                scale = dec.query_scale(seen[("out", i - 1)])
            q_sine = layer.ca_qpos_sine(sine * scale)
            k_pos = layer.ca_kpos(pos)
            q_want = torch.cat([q_content.view(B, Nq, M, -1), q_sine.view(B, Nq, M, -1)], 3)
            k_want = torch.cat([k_content.view(B, HW, M, -1), k_pos.view(B, HW, M, -1)], 3)
            q, k, v = seen[("ca", i)]
            torch.testing.assert_close(q, q_want.flatten(2))
            torch.testing.assert_close(k, k_want.flatten(2))
            torch.testing.assert_close(v, layer.ca_v(memory))
            torch.testing.assert_close(states[i], dec.norm(seen[("out", i)]))


def test_inference_keeps_the_top_query_class_pairs_of_the_last_layer_in_input_pixels():
    """Top-k over all (query, class) sigmoid scores: index q * K + c; boxes cxcywh -> XYXY in the
    padded-free image (h, w), clipped, then rescaled to the requested output size."""
    model = instantiate(detr_cfg())
    model.select_box_nums_for_evaluation = 3
    logits = torch.tensor([[[-1.0, 2.0], [0.5, -3.0], [3.0, -2.0]]])  # (B=1, N=3, K=2)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.9, 0.25, 0.4, 0.1], [0.25, 0.75, 0.1, 0.2]]])
    # image of h = 40, w = 80 shown at 80 x 160: every coordinate doubles
    (out,) = model.inference(logits, boxes, [{"height": 80, "width": 160}], [(40, 80)])
    inst = out["instances"]
    assert inst.image_size == (80, 160)
    torch.testing.assert_close(inst.scores, torch.sigmoid(torch.tensor([3.0, 2.0, 0.5])))
    assert inst.pred_classes.tolist() == [0, 1, 0]
    # query 2: (20, 30, 8, 8) px -> (16, 26, 24, 34); query 0: (40, 20, 16, 16) -> (32, 12, 48, 28);
    # query 1: (72, 10, 32, 4) -> (56, 8, 88, 12), clipped at x = 80
    want = torch.tensor([[16.0, 26, 24, 34], [32, 12, 48, 28], [56, 8, 80, 12]]) * 2
    torch.testing.assert_close(inst.pred_boxes.tensor, want)

    # the model's eval forward reports the last decoder layer's predictions
    model.eval()
    images = [{"image": torch.rand(3, 48, 64) * 255, "height": 48, "width": 64}]
    with torch.no_grad():
        (got,) = model(images)
        pred = model.forward_predictions(model.preprocess_image(images))
        last = pred["pred_logits"][-1], pred["pred_boxes"][-1]
        (want,) = model.inference(*last, images, [(48, 64)])
    assert not torch.equal(pred["pred_logits"][0], pred["pred_logits"][-1])
    got, want = got["instances"], want["instances"]
    torch.testing.assert_close(got.scores, want.scores)
    torch.testing.assert_close(got.pred_boxes.tensor, want.pred_boxes.tensor)


def test_matcher_minimises_the_documented_cost_on_random_problems():
    """Over 40 random problems (8 predictions, 3 targets, 4 classes), the matcher's assignment
    has the least total of 2 * focal + 5 * L1 - 2 * GIoU (METHODS.md 4.1) among all 336
    assignments, the focal term written out: 0.25 (1 - p)^2 (-log p) - 0.75 p^2 (-log(1 - p))."""
    from torchvision.ops import generalized_box_iou

    from detkd.modeling import HungarianMatcher

    g = torch.Generator().manual_seed(11)
    matcher = HungarianMatcher()
    for _ in range(40):
        logits = torch.randn(8, 4, generator=g, dtype=torch.float64) * 3
        boxes = torch.rand(8, 4, generator=g, dtype=torch.float64) * 0.4 + 0.1
        gt = torch.rand(3, 4, generator=g, dtype=torch.float64) * 0.4 + 0.1
        labels = torch.randint(0, 4, (3,), generator=g)
        p = logits.sigmoid()[:, labels]
        focal = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p**2 * -(1 - p + 1e-8).log()
        cost = 2 * focal + 5 * torch.cdist(boxes, gt, p=1)
        cost = cost - 2 * generalized_box_iou(box_convert_xyxy(boxes), box_convert_xyxy(gt))
        rows, cols = matcher(logits[None], boxes[None], [{"labels": labels, "boxes": gt}])[0]
        perms = itertools.permutations(range(8), 3)
        best = min(sum(cost[r, c].item() for c, r in enumerate(pm)) for pm in perms)
        assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-6)


def _reference_attention(attn, q, k, v, key_padding_mask=None):
    """softmax(q_h k_h^T / sqrt(dh)) v_h per head (padded keys left out), then out_proj."""
    B, Nq, D = q.shape
    M = attn.num_heads
    heads = lambda x: x.view(B, x.shape[1], M, -1).transpose(1, 2)  # noqa: E731
    qh, kh, vh = heads(q), heads(k), heads(v)
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    out = (logits.softmax(-1) @ vh).transpose(1, 2).reshape(B, Nq, -1)
    return attn.out_proj(out)


def test_encoder_layer_and_decoder_self_attention_follow_detr():
    """DETR's post-norm encoder layer: queries and keys from src + pos, values from src alone,
    padded keys masked, out = norm2(x + FFN(x)) with x = norm1(src + attention); the Conditional
    DETR decoder layer's self-attention: query content(tgt) + pos(query_pos), key the same with
    its own projections, value from tgt, x = norm1(tgt + attention), each query group apart."""
    from detkd.modeling.detr import DecoderLayer, EncoderLayer

    torch.manual_seed(0)
    d, M, B, HW = 8, 2, 2, 6
    enc = EncoderLayer(d, M, 16, 0.0).double().eval()
    for p in enc.parameters():  # LayerNorms away from the identity
        torch.nn.init.normal_(p)
    src, pos = (torch.randn(B, HW, d, dtype=torch.float64) for _ in range(2))
    pad = torch.zeros(B, HW, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        got = enc(src, pos, pad)
        qk = src + pos
        x = enc.norm1(
            src
            + _reference_attention(
                enc.self_attn, enc.q_proj(qk), enc.k_proj(qk), enc.v_proj(src), pad
            )
        )
        want = enc.norm2(x + enc.ffn(x))
    torch.testing.assert_close(got, want)

    dec = DecoderLayer(d, M, 16, 0.0).double().eval()
    for p in dec.parameters():
        torch.nn.init.normal_(p)
    tgt, query_pos = (torch.randn(B, 5, d, dtype=torch.float64) for _ in range(2))
    seen = {}
    dec.norm1.register_forward_hook(lambda m, a, o: seen.__setitem__("norm1", (a[0], o)))
    memory = torch.randn(B, HW, d, dtype=torch.float64)
    sine = torch.randn(B, 5, d, dtype=torch.float64)
    for groups in (None, [3, 2]):
        with torch.no_grad():
            dec(tgt, memory, pos, query_pos, sine, True, groups, pad)
            q = dec.sa_qcontent(tgt) + dec.sa_qpos(query_pos)
            k = dec.sa_kcontent(tgt) + dec.sa_kpos(query_pos)
            v = dec.sa_v(tgt)
            if groups is None:
                out = _reference_attention(dec.self_attn, q, k, v)
            else:  # each group attends to its own queries only
                out = torch.cat(
                    [
                        _reference_attention(dec.self_attn, *(x[:, s] for x in (q, k, v)))
                        for s in (slice(0, 3), slice(3, 5))
                    ],
                    1,
                )
        torch.testing.assert_close(seen["norm1"][0], tgt + out)
        torch.testing.assert_close(seen["norm1"][1], dec.norm1(tgt + out))
    # the layer's output: norm3(x + FFN(x)) of the cross-attention block's x = norm2(...)
    dec.norm2.register_forward_hook(lambda m, a, o: seen.__setitem__("norm2", o))
    with torch.no_grad():
        got = dec(tgt, memory, pos, query_pos, sine, False, None, pad)
        x = seen["norm2"]
        torch.testing.assert_close(got, dec.norm3(x + dec.ffn(x)))


def test_conditional_detr_decoder_starts_from_zero_content_and_every_parameter_trains():
    """The decoder's content queries start at 0 (Conditional DETR: the positional queries
    enter through query_pos only), and every parameter gets a gradient from the ground-truth
    losses: the positional query projection exists in the first decoder layer only (an unused
    one stops DDP, find_unused_parameters=False)."""
    torch.manual_seed(0)
    model = instantiate(detr_cfg()).train()
    first = []
    model.transformer.decoder.layers[0].register_forward_pre_hook(lambda m, a: first.append(a[0]))
    losses = model(make_inputs(n=2))
    sum(losses.values()).backward()
    assert len(first) == 1 and first[0].abs().max() == 0
    assert [l.ca_qpos is not None for l in model.transformer.decoder.layers] == [True, False, False]
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_detr_head_prior_param_groups_and_eval_without_the_auxiliary_group():
    """The class bias starts at the focal-loss prior -log((1 - 0.01) / 0.01) (every score 0.01);
    detr_param_groups gives the backbone lr * backbone_lr_factor and the rest lr; in eval mode
    extra_query_group adds no queries (the head sees the model's own N)."""
    from detkd.modeling import detr_param_groups
    from detkd.modeling.detr import DETRHead

    head = DETRHead(8, 3)
    torch.testing.assert_close(head.class_embed.bias, torch.full((3,), -math.log(99.0)))
    torch.manual_seed(0)
    model = instantiate(detr_cfg())
    rest, backbone = detr_param_groups(model, lr=1e-4, backbone_lr_factor=0.1)
    assert (rest["lr"], backbone["lr"]) == (1e-4, pytest.approx(1e-5))

    def ids(prefix):
        return {id(p) for n, p in model.named_parameters() if n.startswith(prefix)}

    assert {id(p) for p in backbone["params"]} == ids("backbone.")
    assert {id(p) for p in rest["params"]} == ids("") - ids("backbone.")
    model.eval()
    images = model.preprocess_image(make_inputs(n=1))
    with torch.no_grad(), model.extra_query_group(torch.randn(12, 64)):
        out = model.forward_predictions(images)
    assert out["pred_logits"].shape == (3, 1, 30, 3)


def test_gt_losses_of_a_batch_without_boxes_are_finite():
    """A batch whose images have no ground truth (DETR's normaliser is at least 1): the class
    loss pushes every score down (finite, > 0), the box losses are 0 (no matched pairs)."""
    torch.manual_seed(0)
    model = instantiate(detr_cfg()).train()
    losses = model(make_inputs(n=2, empty=(0, 1)))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_class"] > 0 and losses["loss_bbox"] == 0 and losses["loss_giou"] == 0


def test_gt_losses_of_a_given_last_layer_assignment_by_hand():
    """compute_gt_losses with the last layer's assignment given (D3ETR's auxiliary group):
    per-image (prediction, target) pairs index the concatenated targets from each image's
    offset, equal the (4, P) form, leave the caller's tensor unchanged; the class loss is the
    focal loss with the model's focal_alpha / focal_gamma, written out, over num_boxes."""
    torch.manual_seed(0)
    model = instantiate(detr_cfg())
    model.focal_alpha, model.focal_gamma = 0.6, 1.5
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]])},
        {
            "labels": torch.tensor([0, 2]),
            "boxes": torch.tensor([[0.5, 0.6, 0.3, 0.1], [0.2, 0.7, 0.1, 0.3]]),
        },
    ]
    logits = torch.randn(3, 2, 30, 3)
    boxes = torch.rand(3, 2, 30, 4) * 0.5 + 0.1
    pairs = [(torch.tensor([4]), torch.tensor([0])), (torch.tensor([7, 2]), torch.tensor([1, 0]))]
    flat = torch.tensor([[0, 0, 0], [0, 1, 1], [4, 7, 2], [0, 2, 1]])
    given = model.compute_gt_losses(logits, boxes, targets, indices_last_layer=pairs)
    from_flat = model.compute_gt_losses(logits, boxes, targets, indices_last_layer=flat)
    assert torch.equal(flat, torch.tensor([[0, 0, 0], [0, 1, 1], [4, 7, 2], [0, 2, 1]]))
    for k in ("loss_class", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(given[k], from_flat[k])
    gt = torch.cat([t["boxes"] for t in targets])
    src = boxes[2, [0, 1, 1], [4, 7, 2]]
    torch.testing.assert_close(given["loss_bbox"], 5.0 * (src - gt[[0, 2, 1]]).abs().sum() / 3)
    onehot = torch.zeros(2, 30, 3)
    onehot[0, 4, 1] = onehot[1, 7, 2] = onehot[1, 2, 0] = 1.0
    p = logits[2].sigmoid()
    ce = -(onehot * p.log() + (1 - onehot) * (1 - p).log())
    p_t = p * onehot + (1 - p) * (1 - onehot)
    a_t = 0.6 * onehot + 0.4 * (1 - onehot)
    focal = (a_t * ce * (1 - p_t) ** 1.5).sum() / 3
    torch.testing.assert_close(given["loss_class"], 2.0 * focal)


_D3ETR_WEIGHTS = [
    "cls_weight",
    "l1_weight",
    "giou_weight",
    "sa_weight",
    "ca_weight",
    "match_cost_class",
    "match_cost_bbox",
    "match_cost_giou",
]


@pytest.mark.parametrize("arg", _D3ETR_WEIGHTS)
@pytest.mark.parametrize("bad", ["abc", None, -1, float("nan"), float("inf"), True])
def test_d3etr_weights_must_be_finite_non_negative_numbers(arg, bad):
    """A string or None weight failed at the first step; a negative loss weight trained the
    student away from the teacher, a negative match weight matched the worst pairs."""
    with pytest.raises(
        ValueError,
        match=rf"D3ETRDistiller: {arg} must be a finite number >= 0 "
        rf"\(model\.distillers\.<name>\.{arg}\), got {re.escape(repr(bad))}$",
    ):
        D3ETRDistiller(**{arg: bad})


def test_d3etr_zero_weights_are_allowed_and_switches_must_be_bools():
    d = D3ETRDistiller(cls_weight=0, match_cost_class=0, l1_weight=3)
    assert d.weights["cls"] == 0.0 and d.weights["l1"] == 3.0 and d.match_weights == (0.0, 5.0, 2.0)
    for arg in ("fixed_matching", "aux_gt_loss"):
        with pytest.raises(
            ValueError, match=rf"D3ETRDistiller: {arg} must be True or False .* got 'no'"
        ):
            D3ETRDistiller(**{arg: "no"})  # a string: true
