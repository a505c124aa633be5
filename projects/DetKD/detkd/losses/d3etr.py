"""
D3ETR: decoder distillation for DETR-style detectors, :paper:`D3ETR` ("D3ETR: Decoder
Distillation for Detection Transformer", Chang et al., arXiv 2211.09768 / IJCAI 2024).

No public implementation exists; this one follows ``METHODS.md`` section 4 (tags there).

MixMatcher = adaptive matching + fixed matching:

* adaptive (group 1, the student's own queries): at every decoder layer, a bipartite
  (Hungarian) match between the teacher's and the student's predictions, with cost
  ``1 * soft-BCE class cost + 5 * L1 + 2 * (-GIoU)``, the class cost summed over the K classes
  (METHODS.md 4.2, DETRDistill's distillation matcher); distillation on the matched pairs.
  With the head's prior-probability bias (logits ~ -4.6) the sum is ~3 on COCO at the start,
  not ~55; a mean over K would divide the class term by 80 and leave the match to the boxes;
* fixed (group 2, auxiliary): the teacher's learned object queries are fed to the student's
  decoder as an extra group that shares its weights but never attends to group 1
  (self-attention per group); query i of group 2 corresponds to teacher query i. Group 2 is
  also trained on the ground truth, with the teacher's assignment at the last decoder layer.
  It exists only in training: evaluation and the exported student use group 1 alone.

Distilled at every layer, for both groups: predictions (class: Bernoulli KL from the teacher's
sigmoid scores, i.e. soft-target BCE minus the teacher's entropy — same gradient, zero when the
student equals the teacher; boxes: L1 and 1 - GIoU), self-attention maps (rows of matched
queries, columns permuted by the match) and cross-attention maps (KL over image positions).

Shape shorthand in this module:

    L: number of decoder layers
    B: number of images
    Nt: teacher queries; Ns: the student's own queries; Na: auxiliary queries (= Nt)
    K: number of classes
    M: attention heads
    HW: image positions of the encoder memory (padded, flattened)

Naming convention:

    logits (L, B, N, K), boxes (L, B, N, 4) normalized cxcywh; sa (B, M, N, N) and
    ca (B, M, N, HW) attention weights of one layer (softmax rows).
"""

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.detr import giou_cxcywh, solve_assignments
from ..utils import host_tensor, index_put_value_
from .base import Distiller, check_flag, check_weight, put_scalar, zero_loss

__all__ = ["D3ETRDistiller", "soft_bce_cost", "bernoulli_kl", "attention_kl", "hungarian_match"]


def soft_bce_cost(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """
    Pairwise class cost ``C[i, j] = sum_c BCE(z_jc, q_ic)`` with soft targets q = sigmoid(teacher).

    Args:
        teacher_logits (Tensor): (..., Nt, K).
        student_logits (Tensor): (..., Ns, K).

    Returns:
        Tensor: (..., Nt, Ns).
    """
    q = teacher_logits.sigmoid()
    # BCE(z, q) = q * softplus(-z) + (1 - q) * softplus(z)
    return q @ F.softplus(-student_logits).transpose(-1, -2) + (1 - q) @ F.softplus(
        student_logits
    ).transpose(-1, -2)


def bernoulli_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """
    ``sum_c KL(Bernoulli(sigmoid(z_t)) || Bernoulli(sigmoid(z_s)))`` for paired rows, i.e. the
    soft-target BCE of the student minus the teacher's entropy.

    Args:
        student_logits, teacher_logits (Tensor): (..., K), paired.

    Returns:
        Tensor: (...,) non-negative, 0 where the logits are equal.
    """
    q = teacher_logits.sigmoid()
    bce_s = F.binary_cross_entropy_with_logits(student_logits, q, reduction="none")
    bce_t = F.binary_cross_entropy_with_logits(teacher_logits, q, reduction="none")
    return (bce_s - bce_t).sum(-1)


def attention_kl(teacher_attn: torch.Tensor, student_attn: torch.Tensor) -> torch.Tensor:
    """
    Mean over rows of ``KL(A_t[row] || A_s[row])``: D3ETR's attention-map loss (METHODS.md 4.3)
    written out, a reference for checks; :class:`D3ETRDistiller` computes the same sums in
    fewer passes (``_row_entropy`` and ``_RowCrossEntropy``).

    Args:
        teacher_attn, student_attn (Tensor): (..., Q, S) softmax rows over S keys, paired rows.

    Returns:
        Tensor: scalar.
    """
    log_s = student_attn.clamp(min=1e-12).log()
    kl = torch.xlogy(teacher_attn, teacher_attn) - teacher_attn * log_s  # (..., Q, S)
    return kl.sum(-1).mean()


_EPS = 1e-12


def _row_entropy(p: torch.Tensor) -> torch.Tensor:
    """(..., S) rows -> (...,) ``sum_k p log p`` (the negative entropy), without gradient."""
    with torch.no_grad():  # p log p with 0 log 0 = 0 (xlogy's value, in fewer passes)
        return p.clamp(min=_EPS).log_().mul_(p).sum(-1)


class _RowCrossEntropy(torch.autograd.Function):
    """
    ``sum_blocks sum_{..., r} w[..., r] * sum_k T[..., r, k] * log(max(s_block[..., r, k], 1e-12))``
    for a student map s, blocks ``(rows, cols)`` of it (slices), block-shaped targets T (no
    gradient) and row weights w (broadcast over the block's ``shape[:-1]``).

    Temporaries are block-sized; the backward allocates s's gradient once and writes each
    block's ``w * T / s`` (0 where ``s < 1e-12``, the clamp's gradient) into it. Autograd's
    version of the same formula keeps clamp, log and product tensors, and a full-size zero
    buffer per slice taken of s.
    """

    @staticmethod
    def forward(ctx, s, blocks):
        ctx.save_for_backward(s)
        ctx.blocks = blocks
        total = s.new_zeros(())
        for rows, cols, target, weight in blocks:
            x = s[..., rows, cols].clamp(min=_EPS).log_().mul_(target)
            total = total + (x.sum(-1) * weight).sum()
        return total

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        whole = len(ctx.blocks) == 1 and ctx.blocks[0][:2] == (slice(None), slice(None))
        grad_s = None if whole else torch.zeros_like(s)
        for rows, cols, target, weight in ctx.blocks:
            block = s[..., rows, cols]
            x = block.clamp(min=_EPS)
            torch.div(target, x, out=x)
            x.mul_((grad * weight)[..., None]).masked_fill_(block < _EPS, 0.0)
            if whole:
                return x, None
            grad_s[..., rows, cols] = x
        return grad_s, None


def hungarian_match(
    cost: torch.Tensor, pool: str = "main", stop: Optional[threading.Event] = None
) -> Optional[List[np.ndarray]]:
    """
    Solve one assignment problem per leading index with scipy's Hungarian solver (problems in
    parallel threads, :func:`detkd.modeling.detr.solve_assignments`).

    Args:
        cost (Tensor or ndarray): (P, Nt, Ns).
        pool (str): :func:`detkd.modeling.detr.solve_assignments`'s thread pool.
        stop (threading.Event or None): see :func:`detkd.modeling.detr.solve_assignments`.

    Returns:
        list[ndarray] or None: P arrays of shape (min(Nt, Ns), 2): (teacher index, student
        index), sorted by teacher index; None if ``stop`` was set before all were solved.
    """
    if torch.is_tensor(cost):
        cost = cost.detach().float().cpu().numpy()
    solved = solve_assignments(list(cost), pool, stop)
    if any(rc is None for rc in solved):
        return None
    return [np.stack(rc, axis=1) for rc in solved]


_MATCH_THREAD: List[ThreadPoolExecutor] = []


class _PendingMatch:
    """
    An adaptive matching under way: the (P, Nt, Ns) cost, computed on the device, is copied to
    pinned host memory without blocking, and a host thread waits for that copy and solves the
    P problems (:func:`hungarian_match`) while the caller goes on queueing device work; the
    caller blocks only in :meth:`result`. On the CPU the copy is the tensor itself.

    A match whose step failed before using it is :meth:`cancel`-ed by the next step, so that
    the next match does not queue behind it on the match thread.
    """

    def __init__(self, cost: torch.Tensor, owner):
        self.owner = owner  # what the match belongs to (the step's DistillContext)
        if cost.is_cuda:
            host = torch.empty(cost.shape, dtype=cost.dtype, pin_memory=True)
            host.copy_(cost, non_blocking=True)  # on the cost's device's current stream
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(cost.device))
        else:
            host, copied = cost, None
        self.host = host
        self._stop = stop = threading.Event()

        def solve():
            if copied is not None:
                copied.synchronize()  # releases the GIL while the device catches up
            if stop.is_set():
                return None
            # own pool: see solve_assignments
            return hungarian_match(host.numpy(), pool="d3etr", stop=stop)

        if not _MATCH_THREAD:
            _MATCH_THREAD.append(ThreadPoolExecutor(1, thread_name_prefix="detkd-d3etr-match"))
        self.future = _MATCH_THREAD[0].submit(solve)

    def cancel(self) -> None:
        """Give up the match: problems not yet started are skipped; :meth:`result` then
        raises."""
        self._stop.set()
        self.future.cancel()

    def result(self, device) -> Tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(P, min(Nt, Ns)) teacher and student indices on ``device`` (rows sorted by teacher
        index) and the (P,) mean matched cost of each problem (host)."""
        solved = None if self._stop.is_set() else self.future.result()  # None: cancelled
        if solved is None:
            raise RuntimeError("D3ETR: this adaptive matching was cancelled")
        idx = np.stack(solved)  # (P, min(Nt, Ns), 2)
        cost = self.host.numpy()
        matched = cost[np.arange(len(idx))[:, None], idx[..., 0], idx[..., 1]]  # (P, min(Nt, Ns))
        idx = host_tensor(idx, device)
        return idx[..., 0], idx[..., 1], matched.mean(axis=1)


def _attention_map(taps, layer: int, kind: str, side: str):
    """
    The attention weights of ``transformer.decoder.layers.<layer>.<kind>`` from its recorded
    ``(output, weights)``: per-head (B, M, Q, S) as they are, head-averaged (B, Q, S) (e.g.
    ``nn.MultiheadAttention``'s default ``average_attn_weights=True``) as (B, 1, Q, S); also
    a tuple of such per-group blocks (a grouped self-attention). Anything else is an error
    naming the module and the fix.
    """
    name = f"transformer.decoder.layers.{layer}.{kind}"
    out = taps[name]
    weights = out[1] if isinstance(out, (tuple, list)) and len(out) >= 2 else None

    def as_4d(w):
        if torch.is_tensor(w) and w.dim() in (3, 4):
            return w if w.dim() == 4 else w.unsqueeze(1)
        return None

    if isinstance(weights, (tuple, list)):
        blocks = tuple(as_4d(w) for w in weights)
        if blocks and all(b is not None for b in blocks):
            return blocks
    else:
        found = as_4d(weights)
        if found is not None:
            return found
    what = (
        f"a {type(out).__name__}"
        if not isinstance(out, (tuple, list))
        else (
            f"a {len(out)}-tuple"
            if len(out) < 2
            else f"weights {type(weights).__name__}"
            + (f" of shape {tuple(weights.shape)}" if torch.is_tensor(weights) else "")
        )
    )
    raise ValueError(
        f"D3ETR reads attention weights from the {side}'s {name}, which returned {what}: it "
        "must return (output, weights) with weights the softmax rows, per head (B, M, Q, S) "
        "or averaged over the heads (B, Q, S), padded keys 0 (nn.MultiheadAttention: call it "
        "with need_weights=True, and average_attn_weights=False for per-head maps)"
    )


def _memory_stride(detr) -> Optional[int]:
    """The stride of a DETR's encoder memory (its backbone's ``in_feature``), or None where the
    detector does not say (a DETR-style detector of one's own)."""
    name = getattr(detr, "in_feature", None)
    try:
        return int(detr.backbone.output_shape()[name].stride)
    except (AttributeError, KeyError, TypeError):
        return None


class D3ETRDistiller(Distiller):
    """
    Distill a DETR-style student from a DETR-style teacher with :paper:`D3ETR`'s MixMatcher.

    Requirements (attributes checked in :meth:`bind`, shapes at the first step);
    :class:`detkd.modeling.ConditionalDETR` meets them, and a DETR-style detector of your own
    may too. Both models:

    * ``num_classes`` (K, the same on both sides) and ``num_queries`` (N, own queries);
    * ``head``: a submodule called once per forward, returning ``{"pred_logits": (L, B, N, K),
      "pred_boxes": (L, B, N, 4)}``: the predictions of all L decoder layers (the auxiliary
      ones included, the last layer last), per-class sigmoid logits (no "no object" column: a
      softmax DETR is not supported) and sigmoid-normalised (cx, cy, w, h) boxes in [0, 1];
    * ``transformer.decoder.layers[i]`` (same L on both sides) with submodules ``self_attn``
      and ``cross_attn`` returning ``(output, weights)``: weights the softmax rows, per head
      (B, M, N, N) / (B, M, N, HW), or averaged over the heads (B, N, N) / (B, N, HW)
      (``nn.MultiheadAttention``'s default; compared as one head), padded image positions 0.
      Both memories have the same HW positions (same stride and padding);
    * ``query_embed``: an ``nn.Embedding`` whose (N, D) ``weight`` holds the learned queries.

    The teacher also has ``forward_predictions(images)`` (an ImageList, normalised and padded
    from the teacher's ``pixel_mean``, ``pixel_std`` and size divisibility): it runs backbone,
    encoder, decoder and ``head``, no loss. With ``fixed_matching`` the student also has:

    * ``extra_query_group(queries)``: a context manager; ``queries`` is the teacher's
      ``query_embed.weight`` (Nt, D_t), projected to D_s if the widths differ. Within it, a
      training forward appends these Nt queries to its own as a second group (the same role
      its own ``query_embed`` rows play), in order, after its N own ones: the head returns N +
      Nt queries; the group is blocked from the own queries in self-attention (the map is
      (B, M, N + Nt, N + Nt) with 0 between groups, or a tuple of the per-group blocks) and the
      student's own losses use its first N queries only;
    * ``matcher(logits, boxes, targets)``: (B, Nt, K) and (B, Nt, 4) of the teacher's last
      layer -> per image (prediction indices, target indices) (or a ``match_layers_flat``
      method, see :class:`detkd.modeling.HungarianMatcher`);
    * ``compute_gt_losses(pred_logits, pred_boxes, targets, indices_last_layer=...)``: the
      ground-truth losses of (L, B, Nt, K / 4) predictions, ``indices_last_layer`` the
      matcher's output replacing the match of the last layer; returns ``{"loss_<name>": scalar}``;
    * with ``aux_gt_loss``, ``prepare_targets(instances)``: the list of
      ``batched_inputs[i]["instances"]`` -> the ``targets`` that matcher and
      ``compute_gt_losses`` take.

    Different head counts: attention maps are compared head-averaged. Different query
    counts: adaptive matching still works (a partial match; group 1's
    self-attention term is then skipped, group 2's is kept); different hidden sizes: a trainable
    linear projection maps the teacher's queries for the fixed group (dropped at export).

    Loss keys: ``loss_d3etr_cls``, ``loss_d3etr_l1``, ``loss_d3etr_giou``, ``loss_d3etr_sa``,
    ``loss_d3etr_ca`` (summed over layers and both groups, weighted) and the auxiliary group's
    ground-truth losses ``loss_d3etr_aux_<name>``. The mean matching cost per layer goes to the
    event storage as ``d3etr/match_cost_<l>``.
    """

    def __init__(
        self,
        *,
        cls_weight: float = 1.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        sa_weight: float = 1.0,
        ca_weight: float = 1.0,
        match_cost_class: float = 1.0,
        match_cost_bbox: float = 5.0,
        match_cost_giou: float = 2.0,
        fixed_matching: bool = True,
        aux_gt_loss: bool = True,
    ):
        """
        Args:
            cls_weight, l1_weight, giou_weight (float): prediction distillation weights.
            sa_weight, ca_weight (float): self-/cross-attention distillation weights.
            match_cost_class, match_cost_bbox, match_cost_giou (float): adaptive matching cost
                weights (DETRDistill's distillation matcher: 1, 5, 2).
            fixed_matching (bool): feed the teacher's queries to the student as an auxiliary
                group (the "fixed" half of MixMatcher).
            aux_gt_loss (bool): train the auxiliary group on the ground truth too (with the
                teacher's assignment at the last layer).

        Every weight and matching cost weight must be a finite number >= 0 (0 turns a term
        off; a negative match weight would prefer the worst pairs), the switches True or
        False: a bad value is an error here, naming the argument and its config key.
        """
        super().__init__()
        owner = type(self).__name__
        weights = dict(cls=cls_weight, l1=l1_weight, giou=giou_weight, sa=sa_weight, ca=ca_weight)
        self.weights = {k: check_weight(owner, f"{k}_weight", v) for k, v in weights.items()}
        self.match_weights = tuple(
            check_weight(owner, arg, v)
            for arg, v in (
                ("match_cost_class", match_cost_class),
                ("match_cost_bbox", match_cost_bbox),
                ("match_cost_giou", match_cost_giou),
            )
        )
        self.fixed_matching = check_flag(owner, "fixed_matching", fixed_matching)
        self.aux_gt_loss = check_flag(owner, "aux_gt_loss", aux_gt_loss)
        if aux_gt_loss and not fixed_matching:
            raise ValueError(
                "aux_gt_loss=True (the default) trains the auxiliary query group of "
                "fixed_matching=True on the ground truth; with fixed_matching=False there is no "
                "such group: set aux_gt_loss=False too (adaptive matching only)"
            )
        self.query_proj = None
        self.num_layers = 0  # set by bind (0: unbound, the head's outputs are not checked)
        self.num_classes = None

    @staticmethod
    def _attn_names(num_layers):
        """The capture taps of the decoder layers' self- and cross-attention maps."""
        return [
            f"transformer.decoder.layers.{i}.{kind}"
            for i in range(num_layers)
            for kind in ("self_attn", "cross_attn")
        ]

    def student_taps(self, student):
        return ["head"] + self._attn_names(self.num_layers)

    def teacher_taps(self, teacher):
        return ["head"] + self._attn_names(self.num_layers)

    def bind(self, student, teacher):
        detr = ("head", "transformer", "query_embed", "num_queries", "num_classes")
        group = ("extra_query_group", "matcher", "compute_gt_losses") if self.fixed_matching else ()
        group += ("prepare_targets",) if self.aux_gt_loss else ()
        for side, m in (("student", student), ("teacher", teacher)):
            # the teacher runs up to its head only, through forward_predictions (run_teacher)
            needed = detr + (group if side == "student" else ("forward_predictions",))
            missing = [a for a in needed if not hasattr(m, a)]
            if missing:
                raise TypeError(
                    f"D3ETR needs DETR-style detectors; the {side} ({type(m).__name__}) lacks "
                    f"{missing}. Use detkd.modeling.ConditionalDETR, or implement them as "
                    "D3ETRDistiller's docstring describes."
                )
        ls, lt = len(student.transformer.decoder.layers), len(teacher.transformer.decoder.layers)
        if ls != lt:
            raise ValueError(
                f"D3ETR distills layer by layer: the student has {ls} decoder layers, the teacher "
                f"{lt}. Give the student as many (model.student.transformer.num_decoder_layers="
                f"{lt} for a ConditionalDETR)."
            )
        if student.num_classes != teacher.num_classes:
            raise ValueError(
                f"D3ETR: class-count mismatch (student {student.num_classes}, teacher "
                f"{teacher.num_classes}); the prediction distillation compares class scores one "
                "by one. Use a teacher trained on the student's classes (set num_classes of both "
                "to the data's), or distil features only (PKD, ReviewKD), which need no shared "
                "classes."
            )
        strides = [_memory_stride(m) for m in (student, teacher)]
        if self.weights["ca"] and None not in strides and strides[0] != strides[1]:
            raise ValueError(
                f"D3ETR: the cross-attention maps are compared key by key, over the encoder "
                f"memory's cells, but the student's memory has stride {strides[0]} (in_feature="
                f"{student.in_feature!r}) and the teacher's {strides[1]} (in_feature="
                f"{teacher.in_feature!r}). Give both the same stride (model.student.in_feature), "
                "or set model.distillers.<name>.ca_weight=0 to distil without that term."
            )
        self.num_layers, self.num_classes = ls, student.num_classes
        d_s, d_t = student.query_embed.embedding_dim, teacher.query_embed.embedding_dim
        if self.fixed_matching and d_s != d_t:
            self.query_proj = nn.Linear(d_t, d_s)

    def student_context(self, teacher_taps, ctx):
        """
        Around the student's forward: the auxiliary query group (fixed matching), and a hook
        on the student's head that starts the adaptive matching as soon as the predictions
        exist, so that the Hungarian problems are solved on the host while the device runs
        the rest of the step (the student's ground-truth losses, the auxiliary group's losses).
        """
        self._cancel_pending()  # a match left by a step that failed after starting it
        t_head, Ns = teacher_taps.get("head"), ctx.student.num_queries

        def start(module, inputs, out):
            if t_head is not None:
                self._check_head(t_head, "teacher")
                self._check_head(out, "student")
                self._pending = self._start_match(
                    t_head["pred_logits"],
                    t_head["pred_boxes"],
                    out["pred_logits"][:, :, :Ns],
                    out["pred_boxes"][:, :, :Ns],
                    owner=ctx,
                )

        with contextlib.ExitStack() as stack:  # undone here if entering a part fails
            stack.callback(ctx.student.head.register_forward_hook(start).remove)
            if self.fixed_matching:
                queries = ctx.teacher.query_embed.weight.detach()  # (Nt, d_t)
                if self.query_proj is not None:
                    queries = self.query_proj(queries)
                stack.enter_context(ctx.student.extra_query_group(queries))
            return stack.pop_all()

    def _check_head(self, out, side: str) -> None:
        """The ``head``'s output must be ``{"pred_logits": (L, B, N, K), "pred_boxes": (L, B,
        N, 4)}`` with L the decoder layers (all of them, not the last one alone) and K the
        classes (per-class sigmoid logits, no "no object" column); checked on shapes only."""
        logits = out.get("pred_logits") if isinstance(out, dict) else None
        boxes = out.get("pred_boxes") if isinstance(out, dict) else None
        if not (torch.is_tensor(logits) and torch.is_tensor(boxes)):
            raise ValueError(
                f"D3ETR: the {side}'s head returned a {type(out).__name__}"
                + (f" with keys {sorted(out)}" if isinstance(out, dict) else "")
                + '; it must return {"pred_logits": (L, B, N, K), "pred_boxes": (L, B, N, 4)}'
            )
        shapes = f"pred_logits {tuple(logits.shape)}, pred_boxes {tuple(boxes.shape)}"
        L, K = self.num_layers, self.num_classes
        if (
            logits.dim() != 4
            or boxes.dim() != 4
            or boxes.shape[-1] != 4
            or logits.shape[:3] != boxes.shape[:3]
        ):
            raise ValueError(
                f"D3ETR: the {side}'s head returned {shapes}; it must return (L, B, N, K) and "
                "(L, B, N, 4) normalised (cx, cy, w, h): the predictions of every decoder layer, "
                "stacked"
            )
        if L and logits.shape[0] != L:
            raise ValueError(
                f"D3ETR: the {side}'s head returned {shapes}: {logits.shape[0]} layers of "
                f"predictions for {L} decoder layers (transformer.decoder.layers); it must "
                "return one per decoder layer, the last one last (no encoder or extra outputs)"
            )
        if K is not None and logits.shape[-1] != K:
            raise ValueError(
                f"D3ETR: the {side}'s head returned {shapes}: {logits.shape[-1]} class logits, "
                f"num_classes is {K}. D3ETR's class terms are per-class sigmoid (Bernoulli) "
                "scores, as in focal-loss DETRs; a softmax head with a 'no object' column "
                "(K + 1 logits) is not supported"
            )

    def _cancel_pending(self) -> None:
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is not None:
            pending.cancel()

    # ------------------------------------------------------------------------------------
    def _pair_losses(self, s_logits, s_boxes, t_logits, t_boxes) -> Dict[str, torch.Tensor]:
        """
        Prediction losses of paired queries of every layer: inputs (L, P, K) and (L, P, 4);
        the mean over a layer's pairs, summed over layers.
        """
        if s_logits.shape[1] == 0:
            zero = zero_loss(s_logits)
            return dict(cls=zero, l1=zero, giou=zero)
        giou = giou_cxcywh(s_boxes, t_boxes)
        return dict(
            cls=bernoulli_kl(s_logits, t_logits).mean(1).sum(),
            l1=(s_boxes - t_boxes).abs().sum(-1).mean(1).sum(),
            giou=(1 - giou).mean(1).sum(),
        )

    def _start_match(self, t_logits, t_boxes, s_logits, s_boxes, owner=None) -> _PendingMatch:
        """
        Start the adaptive matching of every layer and image: one batched cost tensor
        ``match_cost_class * soft-BCE class cost + match_cost_bbox * L1 - match_cost_giou * GIoU``
        (1, 5, 2 by default; no gradient), solved on a host
        thread (:class:`_PendingMatch`).

        Args:
            t_logits, t_boxes (Tensor): (L, B, Nt, K / 4); s_logits, s_boxes: (L, B, Ns, K / 4).
        """
        wc, wb, wg = self.match_weights
        # fp32 also when called from the student's forward under autocast (the head hook)
        with torch.no_grad(), torch.autocast(t_logits.device.type, enabled=False):
            low = (torch.float16, torch.bfloat16)
            t_logits, t_boxes, s_logits, s_boxes = (
                x.float() if x.dtype in low else x for x in (t_logits, t_boxes, s_logits, s_boxes)
            )
            cost = wc * soft_bce_cost(t_logits, s_logits)  # summed over the classes
            cost = cost + wb * torch.cdist(t_boxes, s_boxes, p=1)  # (L, B, Nt, Ns)
            cost = cost - wg * giou_cxcywh(t_boxes[..., :, None, :], s_boxes[..., None, :, :])
            return _PendingMatch(cost.flatten(0, 1), owner)  # (L*B, Nt, Ns)

    def _match(self, t_logits, t_boxes, s_logits, s_boxes, pending: Optional[_PendingMatch] = None):
        """
        Adaptive matching of every layer and image (:meth:`_start_match`, unless ``pending``
        already started it).

        Returns:
            (Tensor, Tensor, ndarray): teacher and student indices of the matched pairs, each
            (L, B, P) with P = min(Nt, Ns), rows sorted by teacher index; the (L,) mean matched
            cost per layer.
        """
        L, B = t_logits.shape[:2]
        if pending is None:
            pending = self._start_match(t_logits, t_boxes, s_logits, s_boxes)
        ti, si, mean_cost = pending.result(t_logits.device)
        return ti.view(L, B, -1), si.view(L, B, -1), mean_cost.reshape(L, B).mean(axis=1)

    def forward(self, student_taps, teacher_taps, ctx):
        student = ctx.student
        t_head, s_head = teacher_taps["head"], student_taps["head"]
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is not None and pending.owner is not ctx:  # not this step's: start afresh
            pending.cancel()
            pending = None
        if pending is None:  # the head hook (which checks both heads) did not start this step's
            self._check_head(t_head, "teacher")
            self._check_head(s_head, "student")
        t_logits, t_boxes = t_head["pred_logits"], t_head["pred_boxes"]  # (L, B, Nt, K/4)
        s_logits, s_boxes = s_head["pred_logits"], s_head["pred_boxes"]  # (L, B, Ns+Na, K/4)
        L, B, Nt = t_logits.shape[:3]
        Ns = student.num_queries
        g1_logits, g1_boxes = s_logits[:, :, :Ns], s_boxes[:, :, :Ns]
        if pending is None:
            pending = self._start_match(t_logits, t_boxes, g1_logits, g1_boxes)

        # While the host solves the matching: what does not depend on it (group 2). A failure
        # here gives the match up, so that the host does not go on solving it.
        try:
            if self.fixed_matching:
                a = slice(Ns, Ns + Nt)
                aux = self._pair_losses(
                    s_logits[:, :, a].flatten(1, 2),
                    s_boxes[:, :, a].flatten(1, 2),
                    t_logits.flatten(1, 2),
                    t_boxes.flatten(1, 2),
                )
            aux_gt = {}
            if self.aux_gt_loss:
                aux_gt = self._aux_gt_losses(
                    student, ctx, s_logits[:, :, Ns:], s_boxes[:, :, Ns:], t_logits, t_boxes
                )
        except BaseException:
            pending.cancel()
            raise

        # (L, B, P)
        ti, si, mean_cost = self._match(t_logits, t_boxes, g1_logits, g1_boxes, pending)
        for l, c in enumerate(mean_cost):
            put_scalar(f"d3etr/match_cost_{l}", float(c))

        # Predictions, all layers at once: group 1 on its matched pairs, group 2 query by query.
        lidx = torch.arange(L, device=ti.device)[:, None, None]  # (L, 1, 1)
        bidx = torch.arange(B, device=ti.device)[None, :, None]  # (1, B, 1)
        totals = self._pair_losses(  # matched pairs as (L, B * P, K) logits, (L, B * P, 4) boxes
            g1_logits[lidx, bidx, si].flatten(1, 2),
            g1_boxes[lidx, bidx, si].flatten(1, 2),
            t_logits[lidx, bidx, ti].flatten(1, 2),
            t_boxes[lidx, bidx, ti].flatten(1, 2),
        )
        if self.fixed_matching:
            totals = {k: totals[k] + aux[k] for k in totals}
        totals["sa"], totals["ca"] = 0.0, 0.0
        for l in range(L):  # attention maps come one tensor per layer
            t_sa = _attention_map(teacher_taps, l, "self_attn", "teacher")  # (B, M, Nt, Nt)
            t_ca = _attention_map(teacher_taps, l, "cross_attn", "teacher")  # (B, M, Nt, HW)
            s_sa = _attention_map(student_taps, l, "self_attn", "student")  # (B, M, Nq, Nq), blocks
            s_ca = _attention_map(student_taps, l, "cross_attn", "student")  # (B, M, Nq, HW)
            # s_sa: the whole map, or (with the auxiliary group) a tuple of per-group blocks.
            # Head counts of all four maps (a head-averaged map counts 1): unless all are equal,
            # every map is head-averaged, so that a teacher's averaged map is never compared
            # with each of the student's heads.
            heads = {t_sa.shape[1], t_ca.shape[1], s_ca.shape[1]}
            heads.update(x.shape[1] for x in (s_sa if isinstance(s_sa, (tuple, list)) else (s_sa,)))
            if len(heads) > 1:  # different head counts: compare head averages
                t_sa, t_ca = t_sa.mean(1, keepdim=True), t_ca.mean(1, keepdim=True)
                s_ca = s_ca.mean(1, keepdim=True)
                if isinstance(s_sa, (tuple, list)):
                    s_sa = tuple(x.mean(1, keepdim=True) for x in s_sa)
                else:
                    s_sa = s_sa.mean(1, keepdim=True)
            if self.weights["ca"]:  # ca_weight=0: pairs whose memories differ train too
                if t_ca.shape[-1] != s_ca.shape[-1]:
                    raise ValueError(
                        f"D3ETR: cross-attention key counts differ (teacher {t_ca.shape[-1]}, "
                        f"student {s_ca.shape[-1]}): both memories must have the same stride and "
                        "padding (in_feature, size_divisibility), or set "
                        "model.distillers.<name>.ca_weight=0 to distil without that term"
                    )
                totals["ca"] = totals["ca"] + self._cross_attention_kl(t_ca, s_ca, ti[l], si[l], Ns)
            sa = self._self_attention_kl(t_sa, s_sa, ti[l], si[l], Ns)
            if sa is not None:
                totals["sa"] = totals["sa"] + sa
        for k in ("sa", "ca"):
            if not torch.is_tensor(totals[k]):
                totals[k] = zero_loss(s_logits)

        out = {f"loss_d3etr_{k}": self.weights[k] * v for k, v in totals.items()}
        out.update(aux_gt)
        return out

    # Attention distillation. Each map's terms (group 1 on its matched rows, group 2 row by row)
    # are one KL against targets laid out like blocks of the student's map: the teacher's rows
    # (and, in self-attention, columns) moved to the student queries they are compared with,
    # with per-row weights giving each group's row mean. The student's map then gets one
    # gradient tensor (_RowCrossEntropy), instead of one full-size buffer per slice of it.
    def _cross_attention_kl(self, t_ca, s_ca, ti, si, Ns):
        """
        Args:
            t_ca (Tensor): (B, M, Nt, HW) teacher; s_ca (Tensor): (B, M, Nq, HW) student.
            ti, si (Tensor): (B, P) matched teacher / student queries of group 1.
            Ns (int): the student's own queries (group 2 follows them).

        Returns:
            Tensor: mean row KL of group 1's pairs plus (fixed matching) group 2's.
        """
        B, M, Nt = t_ca.shape[:3]
        P = ti.shape[1]
        bidx = torch.arange(B, device=ti.device)[:, None]  # (B, 1)
        Nq = s_ca.shape[2]
        covered = P == Ns and (Nq == Ns or (self.fixed_matching and Nq == Ns + Nt))
        target = t_ca.new_empty(s_ca.shape) if covered else t_ca.new_zeros(s_ca.shape)
        entropy = _row_entropy(t_ca)  # (B, M, Nt)
        if P == Nt:  # every teacher row, in order (ti = 0..Nt-1): no gather
            target[bidx, :, si] = t_ca.transpose(1, 2)  # (B, P, M, HW) rows moved to the student's
            ent = entropy.sum() / (B * M * P)
        else:
            target[bidx, :, si] = t_ca[bidx, :, ti]
            ent = entropy.gather(2, ti[:, None, :].expand(B, M, P)).sum() / (B * M * P)
        weight = t_ca.new_zeros(B, s_ca.shape[2])
        index_put_value_(weight, (bidx, si), 1.0 / (B * M * P))  # weight[bidx, si] = ..., no sync
        if self.fixed_matching:
            target[:, :, Ns : Ns + Nt] = t_ca
            weight[:, Ns : Ns + Nt] = 1.0 / (B * M * Nt)
            ent = ent + entropy.sum() / (B * M * Nt)
        everything = slice(None)
        return ent - _RowCrossEntropy.apply(
            s_ca, [(everything, everything, target, weight[:, None, :])]
        )

    def _self_attention_kl(self, t_sa, s_sa, ti, si, Ns):
        """
        Like :meth:`_cross_attention_kl` for self-attention (B, M, Nt, Nt) / (B, M, Nq, Nq):
        group 1 needs a full match (columns follow it: the student's key sigma(k) plays the
        teacher's key k), group 2 is the block of the auxiliary queries. None if neither applies.
        ``s_sa`` may also be the tuple of per-group blocks ((B, M, Ns, Ns), (B, M, Nt, Nt)) of a
        grouped self-attention; each block then gets its own (whole-map) cross-entropy.
        """
        B, M, Nt = t_sa.shape[:3]
        full = Nt == Ns
        if not (full or self.fixed_matching):
            return None
        entropy = _row_entropy(t_sa).sum() / (B * M * Nt)
        weight = 1.0 / (B * M * Nt)  # every row of a block is one of Nt rows of its group
        blocks, ent = [], 0.0
        if full:  # target[b, m, si_i, si_j] = t[b, m, i, j] on the own queries' block
            # A full match pairs every teacher row, in order (ti = 0..Nt-1; no device-to-host
            # check), and si is a permutation of the Ns = Nt own queries: the scatters write
            # every element.
            rows = t_sa
            cols = torch.empty_like(rows).scatter_(
                3, si[:, None, None, :].expand(B, M, Nt, Nt), rows
            )
            target = torch.empty_like(rows).scatter_(
                2, si[:, None, :, None].expand(B, M, Nt, Nt), cols
            )
            blocks.append((slice(0, Ns), slice(0, Ns), target, weight))
            ent = ent + entropy
        if self.fixed_matching:
            aux = slice(Ns, Ns + Nt)
            blocks.append((aux, aux, t_sa, weight))
            ent = ent + entropy
        if isinstance(s_sa, (tuple, list)):  # per-group blocks: group g's block is s_sa[g]
            whole = slice(None)
            for block, (_, _, target, w) in zip(s_sa if full else s_sa[1:], blocks):
                ent = ent - _RowCrossEntropy.apply(block, [(whole, whole, target, w)])
            return ent
        return ent - _RowCrossEntropy.apply(s_sa, blocks)

    def _aux_gt_losses(self, student, ctx, aux_logits, aux_boxes, t_logits, t_boxes):
        """Ground-truth losses of the auxiliary group; at the last layer its assignment is the
        teacher's (teacher query i's GT goes to auxiliary query i)."""
        # prepare_targets moves the data loader's (host) instances in one copy per field
        targets = student.prepare_targets([x["instances"] for x in ctx.batched_inputs])
        with torch.no_grad():  # the teacher's assignment, as a (4, P) match where possible
            match_flat = getattr(student.matcher, "match_layers_flat", None)
            if match_flat is not None:
                teacher_indices = match_flat(t_logits[-1:], t_boxes[-1:], targets)
            else:
                teacher_indices = student.matcher(t_logits[-1], t_boxes[-1], targets)
        losses = student.compute_gt_losses(
            aux_logits, aux_boxes, targets, indices_last_layer=teacher_indices
        )
        bad = [k for k in losses if not k.startswith("loss_")]
        if bad:  # renamed loss_d3etr_aux_<name> below: other keys would collide and be lost
            raise ValueError(
                f"D3ETR: the student's compute_gt_losses returned keys {bad}; its keys must be "
                "'loss_<name>' (they become loss_d3etr_aux_<name>)"
            )
        return {"loss_d3etr_aux_" + k[len("loss_") :]: v for k, v in losses.items()}
