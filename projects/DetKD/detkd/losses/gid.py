"""
GID: General Instance Distillation, :paper:`GID` ("General Instance Distillation for Object
Detection", Dai et al., CVPR 2021); METHODS.md section 3.

Each iteration, general instances (GIs) are selected where teacher and student disagree most
(GISM); then three kinds of knowledge are distilled on them: ROIAlign features, the relation
between the features of an image's GIs, and the dense head's responses at the predictions that
the detector's own label assignment would make positive for the GI boxes.

Shape shorthand in this module:

    N: number of images
    R: number of dense predictions of one image (anchors or locations, all levels)
    K: number of classes (1 for RPN objectness)
    G: number of GIs of one image (<= topk); Gt: of the whole batch
    C: teacher FPN channels; S: pooled size (10)

Naming convention:

    scores (N, R, K) sigmoid probabilities; boxes (N, R, 4) absolute XYXY;
    anchors: list[Boxes] per level (R_l, 4); logits / deltas (N, R, K) / (N, R, 4)
"""

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import batched_nms, cat
from detectron2.modeling.box_regression import Box2BoxTransform, Box2BoxTransformLinear
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes, pairwise_iou
from torch import nn

from ..utils import host_tensor, memory_format_of
from .base import (
    Distiller,
    check_flag,
    check_fraction,
    check_num_levels,
    check_positive_int,
    check_weight,
    pair_fpn_levels,
    put_scalar,
    zero_loss,
)

logger = logging.getLogger(__name__)

__all__ = [
    "GIDDistiller",
    "select_general_instances",
    "general_instance_scores",
    "select_from_scores",
    "decode_boxes",
    "relation_loss",
    "dense_outputs",
    "per_location",
    "batched_matcher_positives",
    "roi_align_sampling",
    "roi_align_gather",
    "feature_and_relation_losses",
]


def dense_outputs(model: nn.Module, taps: Dict, decode: bool = True) -> Dict:
    """
    Flatten a detector's dense predictions captured by hooks.

    Args:
        model: a RetinaNet, FCOS, or GeneralizedRCNN (its RPN).
        taps (dict): outputs of :func:`GIDDistiller.taps` of ``model``.
        decode (bool): also decode every prediction's box (else "boxes" is None).

    Returns:
        dict with "logits" (N, R, K), "deltas" (N, R, 4), "anchors" (list[Boxes] per level),
        "boxes" (N, R, 4) decoded XYXY or None, "box2box" (the model's box transform),
        "num_anchors" (list[int], anchors per location per level), "strides" (list[int]),
        "centerness" (N, R, 1) logits of an FCOS head, else None.
    """
    centerness = None
    if isinstance(model, GeneralizedRCNN):
        rpn = model.proposal_generator
        objectness, deltas = taps["proposal_generator.rpn_head"]
        logits = cat([o.permute(0, 2, 3, 1).flatten(1) for o in objectness], dim=1)[..., None]
        deltas = cat([permute_to_N_HWA_K(d, 4) for d in deltas], dim=1)  # (N, R, 4)
        anchors, b2b, gen = (
            taps["proposal_generator.anchor_generator"],
            rpn.box2box_transform,
            rpn.anchor_generator,
        )
    else:
        dims = [model.num_classes, 4, 1] if isinstance(model, FCOS) else [model.num_classes, 4]
        preds = model._transpose_dense_predictions(taps["head"], dims)
        logits, deltas = cat(preds[0], dim=1), cat(preds[1], dim=1)  # (N, R, K), (N, R, 4)
        if isinstance(model, FCOS):
            centerness = cat(preds[2], dim=1)  # (N, R, 1)
        anchors, b2b, gen = (
            taps["anchor_generator"],
            model.box2box_transform,
            model.anchor_generator,
        )
    boxes = decode_boxes(b2b, deltas, anchors) if decode else None
    return dict(
        logits=logits,
        deltas=deltas,
        anchors=anchors,
        boxes=boxes,
        box2box=b2b,
        num_anchors=list(gen.num_anchors),
        strides=list(gen.strides),
        centerness=centerness,
    )


def decode_boxes(box2box, deltas: torch.Tensor, anchors: List[Boxes]) -> torch.Tensor:
    """(N, R, 4) deltas (no gradient taken) at the anchors of every level -> (N, R, 4) XYXY
    boxes."""
    N, R = deltas.shape[:2]
    all_anchors = Boxes.cat(anchors).tensor  # (R, 4)
    return box2box.apply_deltas(deltas.detach().reshape(-1, 4), all_anchors.repeat(N, 1)).view(
        N, R, 4
    )


@torch.no_grad()
def per_location(
    out: Dict, strides: List[int], class_agnostic: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Reduce dense predictions to one per feature-map location (for pairs whose heads differ in
    anchors per location, e.g. an FCOS student and a RetinaNet teacher): at each location the
    anchor with the highest class score gives the scores and the box.

    Args:
        out (dict): :func:`dense_outputs` of one model.
        strides (list[int]): the levels to keep, by stride, in this order.
        class_agnostic (bool): reduce the K class scores to their max (K = 1).

    Returns:
        (scores (N, R', K'), boxes (N, R', 4)), R' = number of locations of those levels.
    """
    scores_all, boxes_all = out["logits"].detach().sigmoid(), out["boxes"]
    sizes = [len(a) for a in out["anchors"]]
    scores_l, boxes_l = scores_all.split(sizes, dim=1), boxes_all.split(sizes, dim=1)
    level = {st: i for i, st in enumerate(out["strides"])}
    res_s, res_b = [], []
    for st in strides:
        i = level[st]
        N, R, K = scores_l[i].shape
        A = out["num_anchors"][i]
        sc = scores_l[i].view(N, R // A, A, K)  # (N, HW, A, K)
        best = sc.amax(dim=3).argmax(dim=2)  # (N, HW)
        sc = torch.gather(sc, 2, best[:, :, None, None].expand(N, R // A, 1, K)).squeeze(2)
        bx = torch.gather(  # (N, HW, 1, 4)
            boxes_l[i].view(N, R // A, A, 4), 2, best[:, :, None, None].expand(N, R // A, 1, 4)
        )
        res_s.append(sc.amax(dim=2, keepdim=True) if class_agnostic else sc)
        res_b.append(bx.squeeze(2))
    return cat(res_s, dim=1), cat(res_b, dim=1)


@torch.no_grad()
def general_instance_scores(
    t_scores: torch.Tensor, s_scores: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    GISM's per-prediction quantities.

    Args:
        t_scores, s_scores (Tensor): (N, R, K) probabilities at the same predictions.

    Returns:
        (Tensor, Tensor): GI scores ``max_c |P_t - P_s|`` (N, R), and (N, R) bool, where the
        teacher is the more confident model (``max_c P_t > max_c P_s``: its box is the GI box).
    """
    teacher_wins = t_scores.amax(dim=-1) > s_scores.amax(dim=-1)
    gi = (t_scores - s_scores).abs_().amax(dim=-1)
    return gi, teacher_wins


@torch.no_grad()
def select_general_instances(
    t_scores: torch.Tensor,
    s_scores: torch.Tensor,
    t_boxes: torch.Tensor,
    s_boxes: torch.Tensor,
    image_sizes: List[Tuple[int, int]],
    *,
    topk: int = 10,
    nms_thresh: float = 0.3,
    min_size: float = 10.0,
    pre_nms_topk: int = 3000,
    level_sizes: Optional[List[int]] = None,
) -> List[Tuple[Boxes, torch.Tensor]]:
    """
    General Instance Selection Module (GISM), paper form.

    GI score of prediction r: ``max_c |P_t[r, c] - P_s[r, c]|``; GI box: the box of whichever
    model is more confident there (``max_c P_t > max_c P_s`` -> teacher's box). Per image: clip
    to the image, drop boxes with a side <= ``min_size``, keep the ``pre_nms_topk`` best of each
    FPN level, run class-agnostic NMS across levels at ``nms_thresh`` and keep the ``topk`` best.

    Args:
        t_scores, s_scores (Tensor): (N, R, K) probabilities at the same predictions.
        t_boxes, s_boxes (Tensor): (N, R, 4) XYXY boxes decoded by each model.
        image_sizes (list[(h, w)]): unpadded image sizes.
        level_sizes (list[int] or None): predictions per FPN level, in the order of R (sum R);
            None: all R predictions are one level.

    Returns:
        list[(Boxes, Tensor)]: per image, the GI boxes (G, 4) and GI scores (G,), best first,
        G <= topk (0 for an image where nothing survives).
    """
    gi, teacher_wins = general_instance_scores(t_scores, s_scores)
    boxes = torch.where(teacher_wins[..., None], t_boxes, s_boxes)  # (N, R, 4)
    return select_from_scores(
        gi,
        boxes,
        image_sizes,
        topk=topk,
        nms_thresh=nms_thresh,
        min_size=min_size,
        pre_nms_topk=pre_nms_topk,
        level_sizes=level_sizes,
    )


@torch.no_grad()
def select_from_scores(
    gi: torch.Tensor,
    boxes: torch.Tensor,
    image_sizes: List[Tuple[int, int]],
    *,
    topk: int = 10,
    nms_thresh: float = 0.3,
    min_size: float = 10.0,
    pre_nms_topk: int = 3000,
    level_sizes: Optional[List[int]] = None,
) -> List[Tuple[Boxes, torch.Tensor]]:
    """
    The second half of :func:`select_general_instances`: from (N, R) GI scores and the (N, R, 4)
    GI boxes (each prediction's box of the more confident model), per image clip, size filter,
    per-level top-k, NMS and the ``topk`` survivors.
    """
    N, R = gi.shape
    device = gi.device
    # All images at once: clip, size filter, per-image top-k, one NMS keyed by image.
    hw = host_tensor(image_sizes, device, boxes.dtype)  # (N, 2)
    limit = hw.flip(1).repeat(1, 2)[:, None, :]  # (N, 1, 4): w, h, w, h
    boxes = torch.min(boxes.clamp(min=0), limit)
    wh = boxes[..., 2:] - boxes[..., :2]
    gi = gi.masked_fill(~(wh > min_size).all(dim=-1), float("-inf"))
    level_sizes = [R] if level_sizes is None else list(level_sizes)
    if sum(level_sizes) != R:
        raise ValueError(f"GID: level sizes {level_sizes} do not add up to the {R} predictions")
    k = sum(min(pre_nms_topk, r) for r in level_sizes)  # candidates per image
    # Greedy NMS keeps a box iff no higher-scored *kept* box overlaps it, so its first `topk`
    # survivors depend only on the candidates up to the topk-th survivor: run it on the best m
    # candidates and widen m (4x) only for the images where fewer than topk survive and more
    # candidates exist. Same result as NMS over all k candidates, at a fraction of the cost
    # of sorting k candidates and of NMS's O(k^2). While m <= pre_nms_topk, an image's best m
    # are all within their levels' pre_nms_topk best (fewer than m predictions outrank any of
    # them), so the per-level cut is applied only once m grows past it.
    finite = torch.isfinite(gi)
    n_cand = sum(f.sum(dim=1).clamp(max=pre_nms_topk) for f in finite.split(level_sizes, dim=1))
    n_cand = n_cand.tolist()  # (N,) one host sync
    kept: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * N
    todo, m = list(range(N)), min(k, 4 * topk)
    cut = max(level_sizes) <= pre_nms_topk  # no level has more predictions than its cut
    while todo:
        if m > pre_nms_topk and not cut:
            gi, cut = _keep_top_per_level(gi, level_sizes, pre_nms_topk), True
        rows = host_tensor(todo, device) if len(todo) < N else None
        g, b = (gi, boxes) if rows is None else (gi[rows], boxes[rows])
        scores, idx = g.topk(m, dim=1)  # (n, m), best first
        cand = torch.gather(b, 1, idx[..., None].expand(-1, -1, 4))  # (n, m, 4)
        kept_l, sizes = _nms_top(cand, scores, nms_thresh, topk)
        short = []
        for j, i in enumerate(todo):
            if sizes[j] < topk and n_cand[i] > m:
                short.append(i)
            else:
                kept[i] = kept_l[j]
        todo, m = short, min(k, 4 * m)
    return [(Boxes(b), sc) for b, sc in kept]


def _keep_top_per_level(gi: torch.Tensor, level_sizes: List[int], k: int) -> torch.Tensor:
    """(N, R) scores with all but the ``k`` best of each image's level set to ``-inf``."""
    out = torch.full_like(gi, float("-inf"))
    for src, dst in zip(gi.split(level_sizes, dim=1), out.split(level_sizes, dim=1)):
        if src.shape[1] <= k:
            dst.copy_(src)
        else:
            val, idx = src.topk(k, dim=1)
            dst.scatter_(1, idx, val)
    return out


def _nms_top(cand, scores, nms_thresh: float, topk: int):
    """
    Class-agnostic NMS per image on (N, m, 4) candidates sorted by (N, m) scores (``-inf`` =
    dropped), all images in one ``batched_nms`` keyed by image; the ``topk`` best survivors.

    Returns:
        (list[(Tensor, Tensor)], list[int]): per image, boxes (G, 4) and scores (G,); G per image.
    """
    N, m = scores.shape
    device = scores.device
    # The finite candidates: one nonzero (a boolean mask per tensor synchronises once each)
    ok = torch.isfinite(scores).flatten().nonzero().squeeze(1)  # (P,) in (image, rank) order
    cand, scores = cand.flatten(0, 1).index_select(0, ok), scores.flatten().index_select(0, ok)
    image = torch.div(ok, m, rounding_mode="floor")  # (P,)
    # by score, all images together; detectron2's batched_nms runs on fp32 boxes, and torchvision
    # wants scores of the boxes' dtype (float64 inputs would fail)
    kept = batched_nms(cand, scores.float(), image, nms_thresh)
    kept = kept[torch.sort(image[kept], stable=True).indices]  # grouped by image, score order kept
    # per-image counts without bincount (on CUDA it reads the largest index first: a sync)
    counts = torch.zeros(N, dtype=torch.long, device=device)
    counts.scatter_add_(0, image[kept], torch.ones_like(kept))  # (N,)
    rank = torch.arange(len(kept), device=device) - (counts.cumsum(0) - counts)[image[kept]]
    sizes = counts.clamp(max=topk).tolist()  # one host sync for the whole batch
    # the survivors of rank < topk, in order, without a boolean mask (its size is sum(sizes))
    kept = kept[torch.sort((rank >= topk).to(torch.uint8), stable=True).indices[: sum(sizes)]]
    return list(zip(cand[kept].split(sizes), scores[kept].split(sizes))), sizes


def roi_align_sampling(
    boxes: torch.Tensor,
    image_index: torch.Tensor,
    level: torch.Tensor,
    level_sizes: List[Tuple[int, int, int]],
    scales: List[float],
    output_size: int,
    sampling_ratio: int = 2,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Detectron2's ``ROIAlignV2`` pooling (torchvision ``roi_align(aligned=True)``) of boxes on
    several FPN levels, written as a sparse linear map: each output bin is a weighted sum of
    ``4 * sampling_ratio**2`` feature-map positions (the bilinear corners of its sampling
    points, out-of-map points weighted 0, 1 / sampling_ratio**2 averaging folded in).

    The positions index the rows of :func:`flatten_levels` (all levels' maps, channels last), so
    :func:`roi_align_gather` pools every box of every level and image in one gather, and the
    same indices serve the student and the teacher when their maps have equal sizes. This is
    ROIPooler's result (tested to float precision) without its per-level loop, and its backward
    is the transposed gather (a bag sum per map row) instead of torchvision's slow CPU
    ``roi_align`` backward.

    Args:
        boxes (Tensor): (G, 4) XYXY in input-image pixels.
        image_index (Tensor): (G,) long, the image of each box.
        level (Tensor): (G,) long, the level of each box (index into ``level_sizes``).
        level_sizes (list[(N, H, W)]): each level's batch size and map size.
        scales (list[float]): each level's 1 / stride.
        output_size (int): S, bins per side. sampling_ratio (int): points per bin side.

    Returns:
        (Tensor, Tensor): positions (G * S * S, 4 * sampling_ratio**2) long and their weights
        (same shape), rows ordered (box, bin row, bin column).
    """
    device, dtype = boxes.device, boxes.dtype
    G, S, sr = boxes.shape[0], output_size, sampling_ratio
    first = [0]  # first row of each level's maps in flatten_levels
    for n, h, w in level_sizes[:-1]:
        first.append(first[-1] + n * h * w)
    # per level: H, W, first row (long); 1 / stride (float): two host-to-device copies
    per_level = host_tensor([[h, w, f] for (_, h, w), f in zip(level_sizes, first)], device)[level]
    H, W = per_level[:, 0], per_level[:, 1]  # (G,)
    offset = per_level[:, 2] + image_index * H * W  # (G,) first row of the box's map
    scale = host_tensor(scales, device, dtype)[level]  # (G,)
    start = boxes[:, :2] * scale[:, None] - 0.5  # (G, 2) x, y; aligned=True shifts by half a pixel
    bin_size = (boxes[:, 2:] - boxes[:, :2]) * scale[:, None] / S  # (G, 2)
    t = (torch.arange(S * sr, device=device, dtype=dtype) + 0.5) / sr  # (S*sr,) in bin units

    def axis(j, size):  # sampling points along x (j=0) or y (j=1) -> corner indices, weights
        v = start[:, j, None] + t * bin_size[:, j, None]  # (G, S*sr)
        limit = size[:, None].to(dtype)
        inside = (v >= -1.0) & (v <= limit)  # roi_align gives 0 further out
        v = torch.minimum(v.clamp(min=0), limit - 1)
        lo = v.floor()
        frac = v - lo
        idx = torch.stack([lo, torch.minimum(lo + 1, limit - 1)], -1).long()  # (G, S*sr, 2)
        w = torch.stack([1 - frac, frac], -1) * inside[..., None]
        return idx.view(G, S, 2 * sr), w.view(G, S, 2 * sr)  # (G, S bins, sr points x 2 corners)

    xi, xw = axis(0, W)
    yi, yw = axis(1, H)
    pos = (
        offset[:, None, None, None, None]
        + (yi * W[:, None, None])[:, :, None, :, None]
        + xi[:, None, :, None, :]
    )
    weight = yw[:, :, None, :, None] * xw[:, None, :, None, :] / (sr * sr)  # (G, S, S, 2sr, 2sr)
    return pos.reshape(G * S * S, 4 * sr * sr), weight.reshape(G * S * S, 4 * sr * sr)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a gradient in the map's own memory format.

    The gradient of a channels-last view of an (NCHW) FPN map is itself channels-last; added to
    the head's gradient of the same map, it would give the student's whole backward
    channels-last gradients, and slower convolution backward passes."""

    @staticmethod
    def forward(ctx, x):
        ctx.memory_format = memory_format_of(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.memory_format)


def flatten_levels(features: List[torch.Tensor]) -> torch.Tensor:
    """[(N, C, H_l, W_l)] -> (sum_l N * H_l * W_l, C): every level's map, channels last (the
    maps' gradients keep the maps' memory format)."""
    rows = []
    for f in features:
        if f.requires_grad and torch.is_grad_enabled():
            f = _ContiguousGrad.apply(f)
        rows.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
    return cat(rows, dim=0)


class _WeightedGather(torch.autograd.Function):
    """``out[r] = sum_k weight[r, k] * x[pos[r, k]]``; the backward is the transposed gather."""

    @staticmethod
    def forward(ctx, x, pos, weight):
        ctx.save_for_backward(pos, weight)
        ctx.rows = x.shape[0]
        return F.embedding_bag(pos, x, per_sample_weights=weight, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        pos, weight = ctx.saved_tensors
        # grad_x[i] = sum over the (r, k) with pos[r, k] = i of weight[r, k] * grad[r]: a gather
        # of grad's rows in bags, one bag per row of x (sorted positions, empty bags give 0).
        # One pass over (R * P) lookups, no (R, C) product per sampling corner to index-add.
        flat = pos.flatten()
        # A fixed summation order (stable: reproducible runs); int32 keys sort ~1.6x faster.
        order = torch.argsort(
            flat.int() if ctx.rows <= torch.iinfo(torch.int32).max else flat, stable=True
        )
        if flat.is_cuda:  # bincount would synchronise (it reads the largest index first)
            counts = torch.zeros(ctx.rows, dtype=flat.dtype, device=flat.device)
            counts.scatter_add_(0, flat, torch.ones_like(flat))
        else:
            counts = torch.bincount(flat, minlength=ctx.rows)
        offsets = counts.cumsum(0).sub_(counts)
        rows = torch.div(order, pos.shape[1], rounding_mode="floor")
        grad_x = F.embedding_bag(
            rows, grad.contiguous(), offsets, mode="sum", per_sample_weights=weight.flatten()[order]
        )
        return grad_x, None, None


def roi_align_gather(
    features: List[torch.Tensor], pos: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """
    Pool boxes from FPN maps with the sampling of :func:`roi_align_sampling`.

    Args:
        features (list[Tensor]): the levels (N, C, H_l, W_l) that ``level_sizes`` described.
        pos, weight (Tensor): (G * S * S, P) from :func:`roi_align_sampling`.

    Returns:
        Tensor: (G * S * S, C), channels last: row (g * S + i) * S + j is bin (i, j) of box g.
    """
    x = flatten_levels(features)
    if torch.is_grad_enabled() and x.requires_grad:
        return _WeightedGather.apply(x, pos, weight)
    return F.embedding_bag(pos, x, per_sample_weights=weight, mode="sum")


class _ImageBlocks:
    """
    Where each image's GIs sit among the batch's rows, for per-image relations.

    Attributes:
        keep (list[int]): images with at least 3 GIs (M of them); G: the most GIs of one.
        uniform (bool): every image has exactly G GIs (rows reshape to (M, G, D)).
        first (Tensor): (Gt,) the first row of each row's image (when not uniform).
        rows (Tensor): (M, G) row of each slot (padding slots -> row 0).
        pair (Tensor): (M, G, G) bool, real off-diagonal pairs; n_pairs (Tensor): (M,).
    """

    def __init__(self, counts: List[int], device, dtype):
        self.counts = counts
        self.keep = [i for i, g in enumerate(counts) if g >= 3]
        if not self.keep:
            return
        G = self.G = max(counts[i] for i in self.keep)
        self.uniform = len(self.keep) == len(counts) and all(c == G for c in counts)
        first = [sum(counts[:i]) for i in range(len(counts))]  # each image's first row
        if not self.uniform:  # one host-to-device copy: per-row shifts without a loop over images
            self.first = host_tensor([f for f, c in zip(first, counts) for _ in range(c)], device)
        starts_n = host_tensor([[first[i], counts[i]] for i in self.keep], device)  # (M, 2)
        starts, n = starts_n[:, 0], starts_n[:, 1]  # (M,) first row, GIs of each kept image
        slot = torch.arange(G, device=device)
        valid = slot[None, :] < n[:, None]  # (M, G)
        self.rows = torch.where(
            valid, starts[:, None] + slot[None, :], torch.zeros_like(valid, dtype=torch.long)
        )
        self.pair = (
            valid[:, :, None] & valid[:, None, :] & ~torch.eye(G, dtype=torch.bool, device=device)
        )
        self.n_pairs = self.pair.sum(dim=(1, 2)).to(dtype)

    def grams(self, gram: torch.Tensor) -> torch.Tensor:
        """(M, G, G) per-image Gram blocks from :func:`_gram`'s output."""
        if self.uniform:
            return gram
        return gram[self.rows[:, :, None], self.rows[:, None, :]]


def _shifted(x: torch.Tensor, blocks: _ImageBlocks) -> torch.Tensor:
    """
    (Gt, D) rows, each image's minus its first row (detached): the distances the Gram matrix
    gives are the same, and so is their gradient (a fixed shift of every point leaves them
    unchanged), but ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` no longer cancels large norms: GIs of
    equal features are exactly 0 apart, not a rounding residue of ``|x|^2`` (which the
    normalisation by the residues' mean made a relation loss of ~1 for two sets of identical
    GIs, where the definition's is 0). (Two close GIs far from the first still lose digits to
    float32 rounding of their distance.)
    """
    if blocks.uniform:
        x = x.reshape(len(blocks.keep), blocks.G, -1)
        return (x - x[:, :1].detach()).reshape(-1, x.shape[-1])
    return x - x.detach().index_select(0, blocks.first)


def _gram(x: torch.Tensor, blocks: _ImageBlocks) -> torch.Tensor:
    """(Gt, D) rows -> the Gram matrix of the rows shifted by :func:`_shifted`: (M, G, G)
    per-image blocks when uniform, else (Gt, Gt)."""
    x = _shifted(x, blocks)
    if blocks.uniform:
        x = x.reshape(len(blocks.keep), blocks.G, -1)
    return x @ x.transpose(-1, -2)


class _SquaredErrorAndGram(torch.autograd.Function):
    """
    ``(sum((a - t)^2), _gram(a))`` for GI features a (trainable) and t (teacher,
    constant): the feature loss's sum and the student Gram matrix the relation loss reads, with
    one backward that writes one (Gt, D) tensor, ``2 g_sse (a - t) + (g + g^T) @ a'`` (a': the
    shifted rows). (Autograd writes the squared-error gradient, each Gram operand's gradient
    and their sum separately: each a (Gt, D) tensor, the largest ones in GID's step.)
    """

    @staticmethod
    def forward(ctx, a, t, blocks):
        diff = a - t
        flat = diff.flatten()
        ctx.blocks = blocks
        gram = _gram(a, blocks) if blocks.keep else a.new_zeros(0)
        # a itself, not its shifted copy (a second (Gt, D) tensor kept until backward); not the
        # teacher's t: nothing of it is kept for backward
        ctx.save_for_backward(a, diff)
        return torch.dot(flat, flat), gram

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_sse, g_gram):
        a, diff = ctx.saved_tensors
        grad = diff * (2 * g_sse)
        if ctx.blocks.keep and g_gram is not None:
            # (g + g^T) @ a' with a' = a - a_0 (each image's rows minus its first row), written
            # as (g + g^T) @ a - rowsum(g + g^T) a_0: no shifted copy of a
            sym = g_gram + g_gram.transpose(-1, -2)
            rowsum = sym.sum(dim=-1, keepdim=True)
            if ctx.blocks.uniform:
                M, G = len(ctx.blocks.keep), ctx.blocks.G
                grad3, a3 = grad.view(M, G, -1), a.view(M, G, -1)
                grad3.baddbmm_(sym, a3).addcmul_(rowsum, a3[:, :1], value=-1.0)
            else:
                grad.addmm_(sym, a).addcmul_(
                    rowsum, a.index_select(0, ctx.blocks.first), value=-1.0
                )
        return grad, None, None


def _normalized_distances(gram: torch.Tensor, blocks: _ImageBlocks) -> torch.Tensor:
    """
    (M, G, G) Gram blocks -> Euclidean distances ``sqrt(max(d^2, 1e-12))`` of the real pairs
    (``d^2 = |x_i|^2 + |x_j|^2 - 2 x_i.x_j``: no (G, G, D) difference tensor), each image's
    divided by its mean (phi); zero outside real pairs.
    """
    sq = gram.diagonal(dim1=-2, dim2=-1)  # (M, G) squared norms
    d2 = sq[..., :, None] + sq[..., None, :] - 2 * gram
    d = d2.clamp(min=1e-12).sqrt() * blocks.pair
    phi = d.sum(dim=(1, 2)) / blocks.n_pairs
    return d / phi.clamp(min=1e-12)[:, None, None]


def _relation_from_grams(
    gram_s: torch.Tensor, gram_t: torch.Tensor, blocks: _ImageBlocks
) -> torch.Tensor:
    """The relation loss (see :func:`relation_loss`) from the (M, G, G) Gram blocks."""
    ds, dt = _normalized_distances(gram_s, blocks), _normalized_distances(gram_t, blocks)
    per = (F.smooth_l1_loss(ds, dt, beta=1.0, reduction="none") * blocks.pair).sum(dim=(1, 2))
    return (per / blocks.n_pairs).mean()


def _in_float32(student: torch.Tensor, teacher: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Half-precision GI features in float32 (METHODS: distillation-loss arithmetic in fp32; a
    feature SSE overflows fp16, bf16's Gram distances lose the relation); the teacher in the
    student's dtype. Autograd casts the gradient back to the student's dtype."""
    if student.dtype in (torch.float16, torch.bfloat16):
        student = student.float()
    return student, teacher.to(student.dtype)


def relation_loss(
    student: torch.Tensor, teacher: torch.Tensor, counts: Optional[List[int]] = None
) -> torch.Tensor:
    """
    GID relation loss (RKD distance loss with Huber beta = 1).

    ``D_ij`` = Euclidean distance between the GI features i and j of one image, normalised by
    the mean of that image's off-diagonal distances (phi); an image's loss = mean over i != j of
    ``SmoothL1(D_s_ij / phi_s, D_t_ij / phi_t)``; images with fewer than 3 instances are left
    out and the result is the mean over the others (0 when none is left). All images are
    computed together from Gram matrices (no loop over images, no (G, G, D) differences).

    Args:
        student, teacher (Tensor): (Gt, D) flattened GI features, the images' GIs one after the
            other (half-precision ones are computed in float32).
        counts (list[int] or None): GIs per image (sum = Gt); None: all rows are one image.

    Returns:
        Tensor: scalar.
    """
    student, teacher = _in_float32(student, teacher)
    counts = [student.shape[0]] if counts is None else list(counts)
    blocks = _ImageBlocks(counts, student.device, student.dtype)
    if not blocks.keep:
        return zero_loss(student)
    with torch.no_grad():
        gram_t = blocks.grams(_gram(teacher, blocks))
    gram_s = blocks.grams(_gram(student, blocks))
    return _relation_from_grams(gram_s, gram_t, blocks)


def feature_and_relation_losses(
    student: torch.Tensor, teacher: torch.Tensor, counts: List[int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    GID's feature term ``sum ||s_i - t_i||^2`` (unnormalised) and :func:`relation_loss`, sharing
    one backward pass over the features (:class:`_SquaredErrorAndGram`).

    Args:
        student (Tensor): (Gt, D) adapted student GI features; teacher (Tensor): (Gt, D)
            (half-precision ones are computed in float32).
        counts (list[int]): GIs per image.

    Returns:
        (Tensor, Tensor): the squared-error sum and the relation loss (scalars).
    """
    student, teacher = _in_float32(student, teacher)
    blocks = _ImageBlocks(list(counts), student.device, student.dtype)
    sse, gram_s = _SquaredErrorAndGram.apply(student, teacher.detach(), blocks)
    if not blocks.keep:
        return sse, zero_loss(student)
    with torch.no_grad():
        gram_t = blocks.grams(_gram(teacher, blocks))
    return sse, _relation_from_grams(blocks.grams(gram_s), gram_t, blocks)


def batched_matcher_positives(
    matcher, gt_boxes: List[Boxes], anchors: torch.Tensor
) -> torch.Tensor:
    """
    Positive labels of detectron2's :class:`Matcher` for every image at once (equal to calling
    ``matcher(pairwise_iou(gt, anchors))`` per image and taking ``labels == 1``).

    Args:
        matcher (Matcher): its ``thresholds``, ``labels`` and ``allow_low_quality_matches``.
        gt_boxes (list[Boxes]): per image, (G_i, 4) boxes taken as ground truth.
        anchors (Tensor): (R, 4) XYXY, shared by the images.

    Returns:
        Tensor: (N, R) bool.
    """
    N, R, device = len(gt_boxes), anchors.shape[0], anchors.device
    counts = host_tensor([len(b) for b in gt_boxes], device)
    # (N, G, 4), zero boxes as padding: IoU 0 with every anchor, below any real IoU's max
    padded = [b.tensor.to(anchors.dtype) for b in gt_boxes] + [anchors.new_zeros(1, 4)]
    gt = torch.nn.utils.rnn.pad_sequence(padded, batch_first=True)[:N]
    valid = torch.arange(gt.shape[1], device=device) < counts[:, None]  # (N, G)
    # pairwise_iou's values (0 where boxes do not intersect) in (N, G, R) tensors, one
    # coordinate at a time and in place: no broadcast over a trailing pair dimension.
    gx1, gy1, gx2, gy2 = (c[..., None] for c in gt.unbind(-1))  # (N, G, 1) each
    ax1, ay1, ax2, ay2 = anchors.t().contiguous()  # (R,) each
    inter = torch.min(gx2, ax2).sub_(torch.max(gx1, ax1)).clamp_(min=0)
    inter.mul_(torch.min(gy2, ay2).sub_(torch.max(gy1, ay1)).clamp_(min=0))  # (N, G, R)
    union = ((gx2 - gx1) * (gy2 - gy1) + (ax2 - ax1) * (ay2 - ay1)).sub_(inter)
    # inter > 0 implies union >= inter > 0 (unchanged by the clamp); inter = 0 gives 0 / union = 0
    iou = inter.div_(union.clamp_(min=torch.finfo(union.dtype).tiny))
    best = iou.amax(dim=1)  # (N, R) best IoU per anchor
    # Matcher's bands are disjoint: the positives are the anchors in a band labelled 1.
    positive = torch.zeros(N, R, dtype=torch.bool, device=device)
    th = list(matcher.thresholds)
    for label, low, high in zip(matcher.labels, th[:-1], th[1:]):
        if label == 1:
            positive |= (best >= low) & (best < high)
    # An image without boxes: Matcher gives every anchor labels[0].
    has_gt = valid.any(dim=1, keepdim=True)  # (N, 1)
    positive &= has_gt
    if matcher.labels[0] == 1:
        positive |= ~has_gt
    if matcher.allow_low_quality_matches:
        highest = iou.amax(dim=2, keepdim=True)  # (N, G, 1) best IoU per box
        highest.masked_fill_(~valid[..., None], float("nan"))  # padding matches no anchor
        positive |= (iou == highest).any(dim=1)
    return positive


class GIDDistiller(Distiller):
    """
    Distill with :paper:`GID`: GI selection, ROIAlign feature, relation and response losses.

    Works for RetinaNet, FCOS (dense head) and GeneralizedRCNN (RPN objectness and anchors)
    students and teachers. GISM needs both models' predictions at the same anchors/locations:
    the same detector family with the same anchor generator and class count (checked in
    :meth:`bind`, with a clear error), or ``selection="location"`` for different dense heads
    (feature and relation terms only). Feature and relation terms also work across FPN channel
    counts (a trainable 1x1 adapter after ROIAlign, identity-initialised when channels are equal
    — [INFER]: linear as the paper says, and cheaper than the port's 3x3 conv on whole maps).
    The relation term pairs the GIs of each image and averages the images' losses ([INFER],
    the paper's reading, METHODS.md 3.3); the port pairs all GIs of the batch. The response's
    L1 compares raw anchor deltas (METHODS.md 3.4); where the two box transforms encode a box as
    different deltas (other weights or types), the teacher's decoded boxes are encoded as the
    student's deltas first ([INFER]: raw deltas of two encodings would pull the student towards
    boxes the teacher did not predict).

    Loss keys: ``loss_gid_feat``, ``loss_gid_relation``, ``loss_gid_response_cls``,
    ``loss_gid_response_reg``, and for FCOS ``loss_gid_response_ctr`` (soft BCE on the
    centerness logits, METHODS.md 3.4). Event storage: ``gid/num_instances`` (GIs per image),
    ``gid/gt_overlap_ratio`` (share of GIs with IoU > 0.5 with a ground-truth box of their image)
    and, with the response term, ``gid/num_response_positives`` (response-mask positives per
    image).
    """

    def __init__(
        self,
        *,
        feat_weight: float = 5e-4,
        relation_weight: float = 40.0,
        response_cls_weight: float = 0.1,
        response_reg_weight: float = 1.0,
        response_ctr_weight: Optional[float] = None,
        response: bool = True,
        selection: str = "anchor",
        topk: int = 10,
        nms_thresh: float = 0.3,
        min_size: float = 10.0,
        pre_nms_topk: int = 3000,
        pooler_resolution: int = 10,
        num_levels: Optional[int] = None,
    ):
        """
        Args:
            feat_weight, relation_weight (float): lambda_1, lambda_2 (METHODS.md 3.5).
            response_cls_weight, response_reg_weight (float): lambda_3 * alpha, lambda_3 * beta.
            response_ctr_weight (float or None): FCOS only, the weight of the soft BCE on the
                centerness logits (target: the teacher's sigmoid centerness; METHODS.md 3.4);
                None: ``response_cls_weight`` ([INFER]: FCOS weighs its own centerness and
                classification losses equally).
            response (bool): distill the head's responses (needs identical anchors and classes).
            selection (str): "anchor" (the paper: GI scores per anchor, same anchors on both
                sides) or "location" ([INFER] for pairs of different dense heads, e.g. an FCOS
                student and a RetinaNet teacher: one prediction per location of the levels of
                equal stride, the best anchor of each; class-agnostic when the class counts
                differ; needs ``response=False``). A pair with aligned heads (same family,
                anchors and classes) is selected per anchor either way, with a warning.
            topk (int): GIs per image (K). nms_thresh (float): GI NMS IoU.
            min_size (float): drop GI boxes with a side <= min_size pixels.
            pre_nms_topk (int): candidates per FPN level and image before NMS.
            pooler_resolution (int): ROIAlign output size.
            num_levels (int or None): FPN levels used for ROIAlign (finest first; pairs of
                equal stride), e.g. 4 for Faster R-CNN (p2-p5); None: the levels a
                GeneralizedRCNN student's box head pools from (``roi_heads.box_in_features``,
                p2-p5: METHODS.md 3.2's clamp [2, 5]), all shared levels for other students.

        Checked here, a bad value being an error naming the argument and its config key: the
        weights are finite numbers >= 0 (0 turns a term off); ``topk``, ``pre_nms_topk`` and
        ``pooler_resolution`` ints >= 1 (0 GIs or candidates would silently turn GID off);
        ``nms_thresh`` in [0, 1]; ``min_size`` a finite number >= 0; ``num_levels`` a positive
        int or None.
        """
        super().__init__()
        owner = type(self).__name__
        if response_ctr_weight is None:
            response_ctr_weight = response_cls_weight
        weights = dict(
            feat=("feat_weight", feat_weight),
            relation=("relation_weight", relation_weight),
            cls=("response_cls_weight", response_cls_weight),
            reg=("response_reg_weight", response_reg_weight),
            ctr=("response_ctr_weight", response_ctr_weight),
        )
        self.weights = {k: check_weight(owner, arg, v) for k, (arg, v) in weights.items()}
        self.response = check_flag(owner, "response", response)
        self.topk = check_positive_int(owner, "topk", topk, "GIs per image")
        self.nms_thresh = check_fraction(owner, "nms_thresh", nms_thresh)
        self.min_size = check_weight(owner, "min_size", min_size)
        self.pre_nms_topk = check_positive_int(
            owner, "pre_nms_topk", pre_nms_topk, "GI candidates per FPN level and image"
        )
        self.pooler_resolution = check_positive_int(
            owner, "pooler_resolution", pooler_resolution, "the ROIAlign output size"
        )
        self.num_levels = check_num_levels(num_levels, owner)
        if not isinstance(selection, str) or selection not in ("anchor", "location"):
            raise ValueError(f"GID: selection must be 'anchor' or 'location', got {selection!r}")
        self.selection = selection
        self.location_strides = None  # set in bind() for selection="location"
        self.class_agnostic = False
        self.pairs: List[Tuple[str, str]] = []
        self.shared_decoding = False  # set in bind(): one box decoding for both models
        # set in bind(): the two box transforms encode a box as different deltas (other weights,
        # or other types), so the teacher's boxes are encoded again in the student's deltas
        self.reencode_teacher_deltas = False
        self.adapter: Optional[nn.Conv2d] = None

    @staticmethod
    def taps(model) -> List[str]:
        """The submodules whose outputs GID reads on ``model``."""
        if isinstance(model, GeneralizedRCNN):
            return [
                "backbone",
                "proposal_generator.rpn_head",
                "proposal_generator.anchor_generator",
            ]
        return ["backbone", "head", "anchor_generator"]

    def student_taps(self, student):
        return self.taps(student)

    def teacher_taps(self, teacher):
        return self.taps(teacher)

    @staticmethod
    def _dense(model, attr: str):
        """``attr`` (anchor generator, box transform, anchor matcher) of the part that makes
        ``model``'s dense predictions: the RPN of a GeneralizedRCNN, else the model."""
        owner = model.proposal_generator if isinstance(model, GeneralizedRCNN) else model
        return getattr(owner, attr)

    @classmethod
    def _anchors_of(cls, model):
        """The anchor generator whose anchors index the dense predictions of ``model``."""
        return cls._dense(model, "anchor_generator")

    @classmethod
    def _same_anchors(cls, a, b) -> bool:
        ga, gb = cls._anchors_of(a), cls._anchors_of(b)
        return (
            list(ga.strides) == list(gb.strides)
            and ga.offset == gb.offset
            and len(ga.cell_anchors) == len(gb.cell_anchors)
            and all(
                x.shape == y.shape and torch.equal(x, y)
                for x, y in zip(ga.cell_anchors, gb.cell_anchors)
            )
        )

    @classmethod
    def _same_box_transform(cls, a, b) -> bool:
        ta, tb = cls._dense(a, "box2box_transform"), cls._dense(b, "box2box_transform")
        return (
            type(ta) is type(tb) is Box2BoxTransform
            and tuple(ta.weights) == tuple(tb.weights)
            and ta.scale_clamp == tb.scale_clamp
        )

    @classmethod
    def _same_deltas(cls, a, b) -> bool:
        """Whether a box has the same deltas under both models' box transforms (a different
        ``scale_clamp`` only bounds decoding: it does not change what a delta means)."""
        ta, tb = cls._dense(a, "box2box_transform"), cls._dense(b, "box2box_transform")
        if type(ta) is not type(tb):
            return False
        if isinstance(ta, Box2BoxTransform):
            return tuple(ta.weights) == tuple(tb.weights)
        if isinstance(ta, Box2BoxTransformLinear):
            return ta.normalize_by_size == tb.normalize_by_size
        return False  # a transform of its own: encoded again, which is right for any

    def bind(self, student, teacher):
        for side, m in (("student", student), ("teacher", teacher)):
            no_rpn = (
                isinstance(m, GeneralizedRCNN) and getattr(m, "proposal_generator", None) is None
            )
            if no_rpn or (
                not isinstance(m, (GeneralizedRCNN, FCOS)) and not hasattr(m, "anchor_generator")
            ):
                raise TypeError(
                    f"GID: the {side} ({type(m).__name__}) has no dense head or RPN, whose "
                    "predictions GID selects its instances from (RetinaNet, FCOS, a "
                    "GeneralizedRCNN with an RPN); distil its features with PKD or ReviewKD"
                )
        same_family = isinstance(student, GeneralizedRCNN) == isinstance(
            teacher, GeneralizedRCNN
        ) and (isinstance(student, FCOS) == isinstance(teacher, FCOS))
        k = lambda m: 1 if isinstance(m, GeneralizedRCNN) else m.num_classes  # noqa: E731
        problems = []
        if not same_family:
            problems.append(
                f"different heads ({type(student).__name__} vs {type(teacher).__name__})"
            )
        elif not self._same_anchors(student, teacher):
            problems.append("different anchors")
        if k(student) != k(teacher):
            rcnn = isinstance(student, GeneralizedRCNN) or isinstance(teacher, GeneralizedRCNN)
            rpn = (
                " (an R-CNN's dense predictions are its RPN's: one class, objectness)"
                if rcnn
                else ""
            )
            problems.append(f"different class counts ({k(student)} vs {k(teacher)}){rpn}")
        if problems and self.selection == "location":
            if self.response:
                raise ValueError(
                    f"GID: this pair has {', '.join(problems)}; responses cannot be distilled: set "
                    "response=False (feature and relation terms remain)"
                )
            s_str = self._anchors_of(student).strides
            t_str = set(self._anchors_of(teacher).strides)
            self.location_strides = [x for x in s_str if x in t_str]
            self.class_agnostic = k(student) != k(teacher)
            if not self.location_strides:
                raise ValueError("GID: the two heads share no prediction stride")
            problems = []
        elif self.selection == "location":
            logger.warning(
                "GID: selection='location' is for pairs whose dense heads differ; this pair has "
                "the same head family, anchors and classes, so GIs are selected per anchor (the "
                "paper's selection, the same as selection='anchor')%s.",
                ", with the response term" if self.response else "",
            )
        elif problems:
            raise ValueError(
                "GID selects general instances from teacher and student predictions at the same "
                "anchors/locations, and distills responses there; this pair has "
                f"{', '.join(problems)}. "
                "Use a student and teacher of the same detector family, anchors and classes, or "
                "set selection='location', response=False for such heterogeneous pairs (GIs "
                "selected per feature-map location of the shared strides; feature and relation "
                "terms only), or "
                "use PKD or ReviewKD (response=False alone only removes the response term: anchor "
                "selection still needs aligned predictions)."
            )
        self.shared_decoding = self.selection == "anchor" and self._same_box_transform(
            student, teacher
        )
        self.reencode_teacher_deltas = (
            self.selection == "anchor" and self.response and not self._same_deltas(student, teacher)
        )
        s_shapes, t_shapes = student.backbone.output_shape(), teacher.backbone.output_shape()
        roi_levels = None  # an R-CNN pools from its box head's levels (p2-p5, not the RPN's p6)
        if self.num_levels is None and isinstance(student, GeneralizedRCNN):
            roi_levels = getattr(student.roi_heads, "box_in_features", None)
        # roi_levels only restricts the student's side (strict=False): GID pairs those of its
        # levels that the teacher has
        self.pairs = pair_fpn_levels(
            s_shapes, t_shapes, num_levels=self.num_levels, student_levels=roi_levels, strict=False
        )
        strides = [s_shapes[s].stride for s, _ in self.pairs]
        pyramid = all(b == 2 * a for a, b in zip(strides, strides[1:]))
        if not pyramid or any(int(st) != st or int(st) & (int(st) - 1) for st in strides):
            raise ValueError(
                f"GID: the paired levels {self.pairs} have strides {strides}; ROIAlign pools each "
                "GI from one level of a pyramid (detectron2's ROIPooler rule), which needs "
                "consecutive power-of-2 strides (e.g. 8, 16, 32). Keep a run of consecutive "
                "strides with num_levels (finest first), or give the student a backbone with such "
                "levels (e.g. an FPN)."
            )
        self.strides = strides
        self.pooler = ROIPooler(
            output_size=self.pooler_resolution,
            scales=[1.0 / s for s in strides],
            sampling_ratio=2,
            pooler_type="ROIAlignV2",
            canonical_box_size=224,
            canonical_level=4,
        )
        cs = {s_shapes[s].channels for s, _ in self.pairs}
        ct = {t_shapes[t].channels for _, t in self.pairs}
        if len(cs) != 1 or len(ct) != 1:
            raise ValueError(
                f"GID: the paired levels {self.pairs} must share one channel count per model "
                f"(student {sorted(cs)}, teacher {sorted(ct)}): one 1x1 adapter serves every "
                "level. Keep levels of one width with num_levels (finest first)"
            )
        cs, ct = cs.pop(), ct.pop()
        self.adapter = nn.Conv2d(cs, ct, kernel_size=1)
        if cs == ct:
            with torch.no_grad():
                self.adapter.weight.copy_(torch.eye(ct)[:, :, None, None])
                self.adapter.bias.zero_()

    def _levels(self, boxes: torch.Tensor) -> torch.Tensor:
        """
        (B, 4) XYXY boxes of all images -> (B,) int64 index into :attr:`pairs`: detectron2's
        ``assign_boxes_to_levels`` (the FPN paper's eq. 1, ROIPooler's rule) on the concatenated
        boxes, one area for the batch instead of one per image.
        """
        p = self.pooler
        size = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
        level = torch.floor(p.canonical_level + torch.log2(size / p.canonical_box_size + 1e-8))
        return level.clamp_(min=p.min_level, max=p.max_level).to(torch.int64) - p.min_level

    def box_levels(self, boxes: List[Boxes]) -> List[str]:
        """The student FPN level each box is pooled from (detectron2's ROIPooler rule)."""
        return [self.pairs[int(i)][0] for i in self._levels(Boxes.cat(boxes).tensor)]

    def pool(
        self, s_feats: List[torch.Tensor], t_feats: List[torch.Tensor], boxes: List[Boxes]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        ROIAlign (detectron2 ``ROIPooler`` semantics: ROIAlignV2, FPN level rule of
        :attr:`pooler`) of the GI boxes on the paired student and teacher levels; one gather
        per side (:func:`roi_align_gather`), sampling positions shared when the maps' sizes
        match.

        Args:
            s_feats (list[Tensor]): the paired student levels, finest first, each (N, Cs, Hl, Wl).
            t_feats (list[Tensor]): the paired teacher levels, each (N, Ct, Hl', Wl').
            boxes (list[Boxes]): per image, its Gi GI boxes (Gi, 4) XYXY in input pixels;
                Gt = sum Gi.

        Returns:
            (Tensor, Tensor): (Gt * S * S, Cs) student and (Gt * S * S, Ct) teacher rows.
        """
        all_boxes = cat([b.tensor for b in boxes], dim=0)
        level = self._levels(all_boxes)
        device = s_feats[0].device
        counts = [len(b) for b in boxes]
        image = torch.repeat_interleave(  # output_size: no host sync
            torch.arange(len(boxes), device=device),
            host_tensor(counts, device),
            output_size=sum(counts),
        )
        all_boxes = all_boxes.to(s_feats[0].dtype)
        scales = [1.0 / s for s in self.strides]
        sampling = {}

        def gather(feats):
            sizes = [(f.shape[0], f.shape[2], f.shape[3]) for f in feats]
            key = tuple(sizes)
            if key not in sampling:
                sampling[key] = roi_align_sampling(
                    all_boxes, image, level, sizes, scales, self.pooler_resolution, sampling_ratio=2
                )
            return roi_align_gather(feats, *sampling[key])

        s_roi = gather(s_feats)
        with torch.no_grad():
            t_roi = gather(t_feats)
        return s_roi, t_roi

    def _response_mask(self, student, anchors: List[Boxes], gi_boxes: List[Boxes]) -> torch.Tensor:
        """(N, R) bool: predictions the student's own label assignment makes positive for the
        GI boxes taken as ground truth."""
        if isinstance(student, FCOS):  # FCOS's own center-sampling assignment, per image
            R = sum(len(a) for a in anchors)
            device = anchors[0].tensor.device
            return torch.stack(
                [
                    (
                        student._match_anchors(b, anchors).amax(dim=0) > 0
                        if len(b)
                        else torch.zeros(R, dtype=torch.bool, device=device)
                    )
                    for b in gi_boxes
                ]
            )
        return batched_matcher_positives(
            self._dense(student, "anchor_matcher"), gi_boxes, Boxes.cat(anchors).tensor
        )

    def _select(self, s_out: Dict, t_out: Dict, image_sizes) -> List[Tuple[Boxes, torch.Tensor]]:
        """GISM on the two models' dense outputs (its (N, R, K) score tensors are freed on
        return)."""
        sel_args = dict(
            topk=self.topk,
            nms_thresh=self.nms_thresh,
            min_size=self.min_size,
            pre_nms_topk=self.pre_nms_topk,
        )
        if self.location_strides is not None:
            t_sc, t_bx = per_location(t_out, self.location_strides, self.class_agnostic)
            s_sc, s_bx = per_location(s_out, self.location_strides, self.class_agnostic)
            if t_sc.shape[1] != s_sc.shape[1]:
                raise ValueError(
                    f"GID: {t_sc.shape[1]} teacher vs {s_sc.shape[1]} student locations; both must "
                    "see the same padded image size (same size_divisibility)"
                )
            level = {st: i for i, st in enumerate(t_out["strides"])}
            sizes = [  # locations per level
                len(t_out["anchors"][level[st]]) // t_out["num_anchors"][level[st]]
                for st in self.location_strides
            ]
            return select_general_instances(
                t_sc, s_sc, t_bx, s_bx, image_sizes, level_sizes=sizes, **sel_args
            )
        sel_args["level_sizes"] = [len(a) for a in t_out["anchors"]]
        t_sc, s_sc = t_out["logits"].sigmoid(), s_out["logits"].detach().sigmoid()
        if not self.shared_decoding:
            return select_general_instances(
                t_sc, s_sc, t_out["boxes"], s_out["boxes"], image_sizes, **sel_args
            )
        # One decoding, of each prediction's more confident model.
        gi, teacher_wins = general_instance_scores(t_sc, s_sc)
        del t_sc, s_sc
        deltas = torch.where(teacher_wins[..., None], t_out["deltas"], s_out["deltas"].detach())
        boxes = decode_boxes(t_out["box2box"], deltas, t_out["anchors"])
        return select_from_scores(gi, boxes, image_sizes, **sel_args)

    def forward(self, student_taps, teacher_taps, ctx) -> Dict[str, torch.Tensor]:
        student, teacher = ctx.student, ctx.teacher
        decode = not self.shared_decoding
        s_out, t_out = dense_outputs(student, student_taps, decode), dense_outputs(
            teacher, teacher_taps, decode
        )
        selected = self._select(s_out, t_out, ctx.teacher_images.image_sizes)
        gi_boxes = [b for b, _ in selected]
        self._log_selection(gi_boxes, ctx)

        # Feature and relation: ROIAlign of the GI boxes on both FPNs, (Gt * S * S, C) rows.
        s_feats = [student_taps["backbone"][s] for s, _ in self.pairs]
        t_feats = [teacher_taps["backbone"][t] for _, t in self.pairs]
        s_roi, t_roi = self.pool(s_feats, t_feats, gi_boxes)
        # The 1x1 adapter as a linear map on channels-last rows (it commutes with ROIAlign).
        s_roi = F.linear(s_roi, self.adapter.weight.flatten(1), self.adapter.bias)
        counts = [len(b) for b in gi_boxes]
        n_total, bins = sum(counts), self.pooler_resolution**2
        # Per GI: its S*S bins x C channels flattened (an order that distances do not see).
        sse, rel = feature_and_relation_losses(
            s_roi.reshape(n_total, bins * s_roi.shape[1]),
            t_roi.reshape(n_total, bins * t_roi.shape[1]),
            counts,
        )
        if n_total:
            feat = sse / (n_total * bins)
        else:
            feat = zero_loss(s_roi, *self.adapter.parameters())
        losses = {
            "loss_gid_feat": self.weights["feat"] * feat,
            "loss_gid_relation": self.weights["relation"] * rel,
        }
        if self.response and self.location_strides is None:
            mask = self._response_mask(student, s_out["anchors"], gi_boxes)  # (N, R)
            idx = mask.flatten().nonzero().squeeze(1)  # (P,) positives, (image, prediction) order
            n_pos = max(len(idx), 1)

            def rows(x):  # (N, R, D) -> (P, D)
                return x.flatten(0, 1).index_select(0, idx)

            s_logits, t_logits = rows(s_out["logits"]), rows(t_out["logits"])  # (P, K)
            cls = F.binary_cross_entropy_with_logits(s_logits, t_logits.sigmoid(), reduction="sum")
            t_deltas = rows(t_out["deltas"])  # (P, 4)
            if self.reencode_teacher_deltas:  # the teacher's boxes as the student's deltas
                anchors = Boxes.cat(s_out["anchors"]).tensor  # (R, 4), the same on both sides
                t_deltas = (
                    s_out["box2box"]
                    .get_deltas(anchors[idx % len(anchors)], rows(t_out["boxes"]))
                    .to(t_deltas.dtype)
                )
            reg = (rows(s_out["deltas"]) - t_deltas).abs().sum()
            put_scalar("gid/num_response_positives", len(idx) / len(mask))
            losses["loss_gid_response_cls"] = self.weights["cls"] * cls / n_pos
            losses["loss_gid_response_reg"] = self.weights["reg"] * reg / n_pos
            if s_out["centerness"] is not None:  # FCOS (same family: the teacher is FCOS too)
                s_ctr, t_ctr = rows(s_out["centerness"]), rows(t_out["centerness"])  # (P, 1)
                ctr = F.binary_cross_entropy_with_logits(s_ctr, t_ctr.sigmoid(), reduction="sum")
                losses["loss_gid_response_ctr"] = self.weights["ctr"] * ctr / n_pos
        return losses

    def _log_selection(self, gi_boxes: List[Boxes], ctx) -> None:
        n = sum(len(b) for b in gi_boxes)
        put_scalar("gid/num_instances", n / max(len(gi_boxes), 1))
        if not n:
            return
        # One IoU matrix between the batch's GI boxes and ground-truth boxes, pairs across
        # images zeroed: the best IoU of each GI with a box of its own image.
        # No host sync: host data goes through host_tensor, the ratio is logged as a tensor.
        gts = [x.get("instances") for x in ctx.batched_inputs]
        gts = [torch.zeros(0, 4) if g is None else g.gt_boxes.tensor for g in gts]
        device, dtype = gi_boxes[0].tensor.device, gi_boxes[0].tensor.dtype
        n_gt = [len(g) for g in gts]
        overlap = 0.0
        if sum(n_gt):
            if all(g.device.type == "cpu" for g in gts):  # the data loader's boxes: one copy
                gt = host_tensor(torch.cat(gts), device, dtype)
            else:
                gt = cat([g.to(device, dtype) for g in gts])
            gt_image = torch.repeat_interleave(host_tensor(n_gt, device), output_size=sum(n_gt))
            n_gi = host_tensor([len(b) for b in gi_boxes], device)
            gi_image = torch.repeat_interleave(n_gi, output_size=n)
            iou = pairwise_iou(Boxes.cat(gi_boxes), Boxes(gt))
            iou.masked_fill_(gi_image[:, None] != gt_image[None, :], 0.0)  # (Gt, total GT boxes)
            overlap = (iou.amax(dim=1) > 0.5).sum()
        put_scalar("gid/gt_overlap_ratio", overlap / n)
