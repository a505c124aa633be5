"""
A DETR-style detector for detectron2: Conditional DETR, :paper:`ConditionalDETR` ("Conditional
DETR for Fast Training Convergence", Meng et al., ICCV 2021), written from the paper's math in
detectron2's style, and built so that :class:`detkd.losses.D3ETRDistiller` can read it through
forward hooks:

* ``model.head`` is called once per forward on the stacked decoder states and returns
  ``{"pred_logits": (L, B, Nq, K), "pred_boxes": (L, B, Nq, 4)}`` for every decoder layer;
* ``model.transformer.decoder.layers[i].self_attn`` / ``.cross_attn`` return
  ``(output, weights)`` with per-head softmax weights (B, M, Nq, Nq) / (B, M, Nq, HW);
* ``with model.extra_query_group(queries):`` adds an auxiliary query group (training only) that
  shares the decoder's weights but never attends to the model's own queries. Self-attention is
  then computed group by group (the same numbers as a block mask, without the masked half), and
  its weights are a tuple of per-group blocks ((B, M, N, N), (B, M, N2, N2)).

Shape shorthand in this module:

    B: images; Nq: queries (own + auxiliary); N: the model's own queries
    d: hidden size; M: attention heads; dh = d / M
    H, W: size of the encoder's feature map; HW = H * W
    L: decoder layers; K: classes; G: ground-truth boxes of one image
"""

import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils import comm
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, sigmoid_focal_loss

from ..utils import host_tensor, index_put_value_

__all__ = [
    "ConditionalDETR",
    "ConditionalDETRTransformer",
    "PositionEmbeddingSine",
    "HungarianMatcher",
    "Attention",
    "detr_param_groups",
    "pairwise_giou",
    "paired_giou",
    "giou_cxcywh",
    "solve_assignments",
    "Dropout",
]


_POOL: Dict[Tuple[str, int], ThreadPoolExecutor] = {}
# Below this total of n * m * min(n, m) over a call's (n, m) problems, solve_assignments solves
# them in the calling thread: e.g. 24 problems of 30 x 4 took 0.04 ms there against 0.48 ms
# through a 2-thread pool, 24 of 30 x 30 0.52 against 0.76 ms; 12 of 300 x 300 (D3ETR's
# adaptive matching on the R50 pair) 35 against 21 ms.
SERIAL_ASSIGNMENT_WORK = 1_000_000


def solve_assignments(
    costs: List[np.ndarray], pool: str = "main", stop: Optional[threading.Event] = None
) -> List[Optional[Tuple[np.ndarray, np.ndarray]]]:
    """
    scipy's Hungarian solver (``linear_sum_assignment``) on each cost matrix, the problems spread
    over ``torch.get_num_threads()`` threads (scipy releases the GIL while it solves: a step's
    L*B independent problems then take about 1/threads of the time). Small calls (see
    ``SERIAL_ASSIGNMENT_WORK``) are solved in the calling thread.

    Args:
        costs (list[ndarray]): (n_i, m_i) matrices.
        pool (str): which thread pool: callers that solve at the same time (D3ETR's adaptive
            matching on a host thread, the student's ground-truth matching) use different
            pools, so that neither waits in the other's queue.
        stop (threading.Event or None): once set, problems not yet started are skipped (their
            entry is None): a caller that no longer needs the answer frees the threads.

    Returns:
        list[(ndarray, ndarray) or None]: per matrix, the matched rows (sorted) and columns.
    """

    def solve(c):
        return None if stop is not None and stop.is_set() else linear_sum_assignment(c)

    threads = max(1, torch.get_num_threads())
    # Small problems (ground-truth matching, a few boxes per image) take microseconds each:
    # handing them to threads costs more than solving them here.
    work = sum(c.shape[0] * c.shape[1] * min(c.shape) for c in costs)
    if min(threads, len(costs)) <= 1 or work < SERIAL_ASSIGNMENT_WORK:
        return [solve(c) for c in costs]
    # One pool per name and thread count, whatever the number of problems (it varies with the
    # images that have ground truth, and a pool per count would keep idle threads of each): a
    # call of n problems starts at most n of its threads.
    key = (pool, threads)
    if key not in _POOL:
        _POOL[key] = ThreadPoolExecutor(threads, thread_name_prefix=f"detkd-hungarian-{pool}")
    return list(_POOL[key].map(solve, costs))


def pairwise_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """
    Generalized IoU of every pair, batched over leading dimensions (torchvision's
    ``generalized_box_iou`` for one (N, M) matrix, without a Python loop over the batch).

    Args:
        a (Tensor): (..., N, 4) XYXY; b (Tensor): (..., M, 4) XYXY, same leading dimensions.

    Returns:
        Tensor: (..., N, M).
    """
    a, b = a[..., :, None, :], b[..., None, :, :]
    return paired_giou(a, b)


def paired_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """
    Generalized IoU of paired boxes (the diagonal of :func:`pairwise_giou`, in O(P)). Written
    here because torchvision's paired form (``generalized_box_iou_loss``) does not broadcast,
    which :func:`pairwise_giou` needs, and ``diag(generalized_box_iou)`` is O(P^2).

    Args:
        a, b (Tensor): (..., 4) XYXY, broadcastable.

    Returns:
        Tensor: (...,) in [-1, 1].
    """
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt, rb = torch.max(a[..., :2], b[..., :2]), torch.min(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union
    lt_c, rb_c = torch.min(a[..., :2], b[..., :2]), torch.max(a[..., 2:], b[..., 2:])
    hull = (rb_c - lt_c).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull


def giou_cxcywh(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """
    Generalized IoU of paired boxes given as (cx, cy, w, h) (DETR's box format), broadcast over
    leading dimensions: ``giou_cxcywh(a[..., :, None, :], b[..., None, :, :])`` is the
    pairwise matrix. The value of :func:`paired_giou` on the XYXY corners ``c -+ w / 2``, in
    about half its tensor ops and without a conversion to XYXY: per axis the overlap extent
    ``d = min(hi_a, hi_b) - max(lo_a, lo_b)`` (negative when apart) gives both the
    intersection side ``max(d, 0)`` and the enclosing side ``w_a + w_b - d``
    (``max(x, y) + min(x, y) = x + y``). DETR's losses and matching costs call it a few
    times per decoder step.

    Args:
        a, b (Tensor): (..., 4) cxcywh, broadcastable, widths and heights > 0.

    Returns:
        Tensor: (...,) in [-1, 1].
    """
    ha, hb = a[..., 2:] * 0.5, b[..., 2:] * 0.5
    lo_a, hi_a = a[..., :2] - ha, a[..., :2] + ha  # the XYXY corners, as box_convert rounds them
    lo_b, hi_b = b[..., :2] - hb, b[..., :2] + hb
    # sides from the corners (not w itself): a box's overlap with itself is then its area exactly
    wa, wb = hi_a - lo_a, hi_b - lo_b
    d = torch.min(hi_a, hi_b) - torch.max(lo_a, lo_b)  # (..., 2)
    inter = d.clamp(min=0).prod(-1)
    union = wa.prod(-1) + wb.prod(-1) - inter
    hull = (wa + wb - d).prod(-1)
    return inter / union + union / hull - 1


class MLP(nn.Module):
    """A few linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class PositionEmbeddingSine(nn.Module):
    """
    Normalised sine positional encoding of a padded feature map: DETR's, with the cell
    centres at (i - 0.5) / n as in Deformable DETR. DETR, the official Conditional DETR and
    detrex use i / n: their checkpoints would not carry over exactly (DetKD's DETR teachers are
    trained with this model, configs/D3ETR/conditional_detr_r101_*.py). Teacher and student
    share it.
    Returns (B, 2 * num_pos_feats, H, W) from a padding mask (B, H, W) (True = padding).
    """

    def __init__(
        self, *, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi
    ):
        super().__init__()
        self.num_pos_feats, self.temperature, self.scale = num_pos_feats, temperature, scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        not_mask = (~mask).float()
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        y = (y - 0.5) / (y[:, -1:, :] + 1e-6) * self.scale
        x = (x - 0.5) / (x[:, :, -1:] + 1e-6) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        px, py = x[..., None] / dim_t, y[..., None] / dim_t  # (B, H, W, F)
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


def sine_embed_of_points(points: torch.Tensor, d: int) -> torch.Tensor:
    """(B, Nq, 2) normalised (x, y) -> (B, Nq, d): sine embedding of y then x (d/2 each)."""
    scale, half = 2 * math.pi, d // 2
    dim_t = torch.arange(half, dtype=torch.float32, device=points.device)
    dim_t = 10000 ** (2 * (dim_t // 2) / half)
    px, py = points[..., 0:1] * scale / dim_t, points[..., 1:2] * scale / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=3).flatten(2)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=3).flatten(2)
    return torch.cat((py, px), dim=2)


class _MaskDropout(torch.autograd.Function):
    """Dropout from a uniform draw: ``x * (u < 1 - p) / (1 - p)``; the keep mask (bool) is saved."""

    @staticmethod
    def forward(ctx, x, p):
        # the draw in fp32 whatever x's dtype: a bf16 uniform would round the keep rate
        keep = torch.empty(x.shape, dtype=torch.float32, device=x.device).uniform_() < 1.0 - p
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return torch.where(keep, x, 0.0).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None


class Dropout(nn.Dropout):
    """
    ``nn.Dropout`` with a faster CPU path: on CPU, PyTorch draws the mask with ``bernoulli_``,
    which costs about 2x a uniform draw and a compare (DETR's attention maps make dropout ~10% of
    a CPU training step). The CPU path keeps an element with probability ``1 - p`` (a float32
    uniform draw compared with ``1 - p``) and scales it by ``1 / (1 - p)``, as ``nn.Dropout``;
    other devices use ``nn.Dropout``'s kernels. Same state dict (none).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0.0, 1.0) or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        return _MaskDropout.apply(x, self.p)


class Attention(nn.Module):
    """
    Multi-head scaled dot-product attention on already-projected queries/keys/values, with an
    output projection. Returns the per-head weights so hooks can read them.
    """

    def __init__(self, *, qk_dim: int, v_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if qk_dim % num_heads or v_dim % num_heads:
            raise ValueError(
                f"Attention: {num_heads} heads do not divide qk_dim={qk_dim} / v_dim={v_dim}; "
                "choose a head count that divides the hidden size (ConditionalDETRTransformer: "
                "nhead a divisor of d_model)"
            )
        self.num_heads = num_heads
        self.out_proj = nn.Linear(v_dim, v_dim)
        self.dropout = Dropout(dropout)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        groups: Optional[Sequence[int]] = None,
    ):
        """
        Args:
            q (Tensor): (B, Nq, Dqk); k (Tensor): (B, Nk, Dqk); v (Tensor): (B, Nk, Dv).
            attn_mask (Tensor or None): (Nq, Nk) additive (-inf blocks a pair).
            key_padding_mask (Tensor or None): (B, Nk) bool, True = padded key.
            groups (list[int] or None): self-attention in independent groups: consecutive query
                (= key) counts summing to Nq; a query attends to its own group's keys only.

        Returns:
            (out, weights): (B, Nq, Dv) and (B, M, Nq, Nk) softmax rows (0 on blocked keys); with
            ``groups``, weights is a tuple of per-group blocks (B, M, Ng, Ng).
        """
        if groups is not None and len(groups) > 1:
            out, weights = self._grouped(q, k, v, list(groups))
        else:
            out, weights = self._attend(q, k, v, attn_mask, key_padding_mask)
        return self.out_proj(out), weights

    def _attend(self, q, k, v, attn_mask=None, key_padding_mask=None):
        """Attention before the output projection: (B, Nq, Dv) and weights (B, M, Nq, Nk)."""
        B, Nq, _ = q.shape
        M = self.num_heads
        q = q.view(B, Nq, M, -1).transpose(1, 2)  # (B, M, Nq, dqk)
        k = k.view(B, k.shape[1], M, -1).transpose(1, 2)  # (B, M, Nk, dqk)
        v = v.view(B, v.shape[1], M, -1).transpose(1, 2)  # (B, M, Nk, dv)
        # Scale the (smaller) queries, and mask in place: no extra (B, M, Nq, Nk) tensors.
        logits = (q / math.sqrt(q.shape[-1])) @ k.transpose(-1, -2)  # (B, M, Nq, Nk)
        if attn_mask is not None:
            logits.add_(attn_mask)
        if key_padding_mask is not None:
            logits.masked_fill_(key_padding_mask[:, None, None, :], float("-inf"))
        weights = logits.softmax(dim=-1)
        out = (self.dropout(weights) @ v).transpose(1, 2).reshape(B, Nq, -1)  # (B, Nq, Dv)
        return out, weights

    def _grouped(self, q, k, v, groups):
        """Self-attention per query group: equal groups are folded into the batch, otherwise one
        call per group. Equals a block-diagonal ``attn_mask``, without computing the masked part."""
        B, Nq, _ = q.shape
        if sum(groups) != Nq or k.shape[1] != Nq:
            raise ValueError(
                f"groups {groups} must split the {Nq} queries (= keys) of self-attention"
            )
        G = len(groups)
        if len(set(groups)) == 1:
            n = groups[0]

            def fold(x):  # (B, G*n, D) -> (B*G, n, D)
                return x.reshape(B * G, n, x.shape[-1])

            out, weights = self._attend(fold(q), fold(k), fold(v))
            return out.reshape(B, Nq, -1), weights.view(B, G, *weights.shape[1:]).unbind(1)
        outs, weights = [], []
        for qg, kg, vg in zip(q.split(groups, 1), k.split(groups, 1), v.split(groups, 1)):
            o, w = self._attend(qg, kg, vg)
            outs.append(o)
            weights.append(w)
        return torch.cat(outs, 1), tuple(weights)


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer (DETR's)."""

    def __init__(self, d: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.self_attn = Attention(qk_dim=d, v_dim=d, num_heads=nheads, dropout=dropout)
        self.ffn = nn.Sequential(
            nn.Linear(d, dim_feedforward),
            nn.ReLU(),
            Dropout(dropout),
            nn.Linear(dim_feedforward, d),
        )
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout1, self.dropout2 = Dropout(dropout), Dropout(dropout)

    def forward(self, src, pos, key_padding_mask):
        qk = src + pos
        out, _ = self.self_attn(
            self.q_proj(qk), self.k_proj(qk), self.v_proj(src), key_padding_mask=key_padding_mask
        )
        src = self.norm1(src + self.dropout1(out))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class DecoderLayer(nn.Module):
    """
    Conditional DETR decoder layer: self-attention with content + positional queries/keys;
    cross-attention whose query is [content ; spatial] and key [content ; positional] per head,
    the spatial query being the (scaled) sine embedding of the reference point.
    """

    def __init__(self, d: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.nheads = nheads
        lin = lambda: nn.Linear(d, d)  # noqa: E731
        self.sa_qcontent, self.sa_qpos, self.sa_kcontent, self.sa_kpos, self.sa_v = (
            lin(),
            lin(),
            lin(),
            lin(),
            lin(),
        )
        self.self_attn = Attention(qk_dim=d, v_dim=d, num_heads=nheads, dropout=dropout)
        self.ca_qcontent, self.ca_qpos, self.ca_kcontent, self.ca_kpos, self.ca_v = (
            lin(),
            lin(),
            lin(),
            lin(),
            lin(),
        )
        self.ca_qpos_sine = lin()
        self.cross_attn = Attention(qk_dim=2 * d, v_dim=d, num_heads=nheads, dropout=dropout)
        self.ffn = nn.Sequential(
            nn.Linear(d, dim_feedforward),
            nn.ReLU(),
            Dropout(dropout),
            nn.Linear(dim_feedforward, d),
        )
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2, self.drop3 = Dropout(dropout), Dropout(dropout), Dropout(dropout)

    def forward(
        self, tgt, memory, pos, query_pos, query_sine_embed, is_first, groups, key_padding_mask
    ):
        """tgt/query_pos/query_sine_embed (B, Nq, d); memory/pos (B, HW, d); groups: query group
        sizes (self-attention stays within a group) or None."""
        q = self.sa_qcontent(tgt) + self.sa_qpos(query_pos)
        k = self.sa_kcontent(tgt) + self.sa_kpos(query_pos)
        out, _ = self.self_attn(q, k, self.sa_v(tgt), groups=groups)
        tgt = self.norm1(tgt + self.drop1(out))

        B, Nq, d = tgt.shape
        M = self.nheads
        q, k, k_pos = self.ca_qcontent(tgt), self.ca_kcontent(memory), self.ca_kpos(pos)
        if is_first:  # the first layer also adds the positional query (paper, Sec. 3.3)
            q, k = q + self.ca_qpos(query_pos), k + k_pos
        q_sine = self.ca_qpos_sine(query_sine_embed).view(B, Nq, M, -1)
        q = torch.cat([q.view(B, Nq, M, -1), q_sine], dim=3)  # (B, Nq, M, 2 * d / M)
        # (B, S, M, 2d/M)
        k = torch.cat([k.view(B, -1, M, d // M), k_pos.view(B, -1, M, d // M)], dim=3)
        out, _ = self.cross_attn(
            q.flatten(2), k.flatten(2), self.ca_v(memory), key_padding_mask=key_padding_mask
        )
        tgt = self.norm2(tgt + self.drop2(out))
        return self.norm3(tgt + self.drop3(self.ffn(tgt)))


class Decoder(nn.Module):
    def __init__(self, d, nheads, num_layers, dim_feedforward, dropout):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d, nheads, dim_feedforward, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.query_scale = MLP(d, d, d, 2)
        self.ref_point_head = MLP(d, d, 2, 2)

    def forward(self, tgt, memory, pos, query_pos, groups, key_padding_mask):
        """Returns decoder states (L, B, Nq, d) and reference points (B, Nq, 2) in [0, 1]."""
        reference = self.ref_point_head(query_pos).sigmoid()  # (B, Nq, 2)
        sine = sine_embed_of_points(reference, tgt.shape[-1])  # (B, Nq, d)
        states, out = [], tgt
        for i, layer in enumerate(self.layers):
            scale = 1.0 if i == 0 else self.query_scale(out)
            out = layer(out, memory, pos, query_pos, sine * scale, i == 0, groups, key_padding_mask)
            states.append(self.norm(out))
        return torch.stack(states), reference


class ConditionalDETRTransformer(nn.Module):
    """Encoder + Conditional DETR decoder."""

    def __init__(
        self,
        *,
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=2048,
        dropout=0.1,
    ):
        super().__init__()
        self.encoder = nn.ModuleList(
            EncoderLayer(d_model, nhead, dim_feedforward, dropout)
            for _ in range(num_encoder_layers)
        )
        self.decoder = Decoder(d_model, nhead, num_decoder_layers, dim_feedforward, dropout)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # The positional query enters the first layer's cross-attention only (paper, Sec. 3.3):
        # later layers have no such projection. A parameter that never gets a gradient stops
        # DDP (find_unused_parameters=False, detectron2's default). Dropped after the
        # initialisation loop, so that the other parameters' random initialisation is that of
        # a decoder where every layer had one.
        for layer in self.decoder.layers[1:]:
            layer.ca_qpos = None

    def forward(self, src, pos, key_padding_mask, query_pos, groups=None):
        """
        src/pos (B, HW, d); query_pos (B, Nq, d); groups: query group sizes for the decoder's
        self-attention, or None. Returns states (L, B, Nq, d), reference points (B, Nq, 2).
        """
        memory = src
        for layer in self.encoder:
            memory = layer(memory, pos, key_padding_mask)
        tgt = torch.zeros_like(query_pos)
        return self.decoder(tgt, memory, pos, query_pos, groups, key_padding_mask)


class DETRHead(nn.Module):
    """Class and box prediction of every decoder layer, shared across layers."""

    def __init__(self, d: int, num_classes: int, prior_prob: float = 0.01):
        super().__init__()
        self.class_embed = nn.Linear(d, num_classes)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        self.bbox_embed = MLP(d, d, 4, 3)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def forward(self, states: torch.Tensor, reference: torch.Tensor) -> Dict[str, torch.Tensor]:
        """states (L, B, Nq, d), reference (B, Nq, 2) -> logits (L, B, Nq, K), boxes
        (L, B, Nq, 4)."""
        delta = self.bbox_embed(states)
        xy = delta[..., :2] + inverse_sigmoid(reference)[None]
        boxes = torch.cat([xy, delta[..., 2:]], dim=-1).sigmoid()
        return {"pred_logits": self.class_embed(states), "pred_boxes": boxes}


class HungarianMatcher(nn.Module):
    """Bipartite matching of predictions to ground truth with focal class + L1 + GIoU costs, as
    :paper:`DETR` (Hungarian matching) with Deformable DETR's focal-loss class cost."""

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha=0.25,
        gamma=2.0,
    ):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou, self.alpha, self.gamma = (
            cost_class,
            cost_bbox,
            cost_giou,
            alpha,
            gamma,
        )

    @torch.no_grad()
    def forward(
        self, logits: torch.Tensor, boxes: torch.Tensor, targets: List[Dict]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            logits (Tensor): (B, N, K); boxes (Tensor): (B, N, 4) normalised cxcywh.
            targets (list[dict]): "labels" (G,), "boxes" (G, 4) normalised cxcywh.

        Returns:
            list[(Tensor, Tensor)]: per image, (prediction indices, target indices) of the
            min(N, G) matched pairs.
        """
        return self.match_layers(logits[None], boxes[None], targets)[0]

    @torch.no_grad()
    def match_layers(
        self, logits: torch.Tensor, boxes: torch.Tensor, targets: List[Dict]
    ) -> List[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """
        Match the predictions of several decoder layers at once: one cost tensor against all
        images' ground truth, one copy to the CPU, then scipy's Hungarian solver per layer and
        image on that image's block.

        Args:
            logits (Tensor): (L, B, N, K); boxes (Tensor): (L, B, N, 4) normalised cxcywh.
            targets (list[dict]): B dicts, "labels" (G,), "boxes" (G, 4) normalised cxcywh.

        Returns:
            list[list[(Tensor, Tensor)]]: [layer][image] (prediction indices, target indices).
        """
        L, B = logits.shape[:2]
        empty = torch.zeros(0, dtype=torch.long, device=logits.device)
        found = {}
        solved = self._solve(logits, boxes, targets)
        if solved:
            # all index arrays in one host-to-device copy, then split into views
            flat = [np.asarray(x, dtype=np.int64) for _, _, pair in solved for x in pair]
            parts = host_tensor(np.concatenate(flat), logits.device).split([len(x) for x in flat])
            found = {(l, b): (parts[2 * i], parts[2 * i + 1]) for i, (l, b, _) in enumerate(solved)}
        return [[found.get((l, b), (empty, empty)) for b in range(B)] for l in range(L)]

    @torch.no_grad()
    def match_layers_flat(
        self, logits: torch.Tensor, boxes: torch.Tensor, targets: List[Dict]
    ) -> torch.Tensor:
        """
        :meth:`match_layers` with all matched pairs of all layers and images in one tensor, for
        losses computed over every layer at once (no per-image or per-layer tensor ops).

        Returns:
            Tensor: (4, P) int64 on the device of ``logits``, one column per matched pair:
            layer, image, prediction index, target index into the concatenation of all images'
            targets (image b's target g is ``sum(G_0..G_{b-1}) + g``). Columns are ordered by
            layer, then image, then prediction index.
        """
        starts = np.cumsum([0] + [len(t["labels"]) for t in targets])
        cols = [np.zeros((4, 0), dtype=np.int64)]
        for l, b, (rows, tgt) in self._solve(logits, boxes, targets):
            n = len(rows)
            cols.append(
                np.stack([np.full(n, l), np.full(n, b), rows, tgt + starts[b]]).astype(np.int64)
            )
        return host_tensor(np.concatenate(cols, axis=1), logits.device)  # one host-to-device copy

    def _solve(
        self, logits, boxes, targets
    ) -> List[Tuple[int, int, Tuple[np.ndarray, np.ndarray]]]:
        """(layer, image, (prediction indices, target indices)) of every layer and image that
        has ground truth; the Hungarian problems solved in parallel on the host."""
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            return []
        labels = torch.cat([t["labels"] for t in targets])  # (Gt,)
        # In fp32 also under AMP: in fp16 a score sigmoid rounds to 1 (logit > ~8.3) makes
        # log(1 - p + 1e-8) = log(0) (1e-8 is 0 in fp16), a -inf cost scipy refuses; in bf16 it
        # is log(1e-8), which outweighs the box costs and changes the match.
        with torch.autocast(logits.device.type, enabled=False):
            logits, boxes = logits.float(), boxes.float()
            gt = torch.cat([t["boxes"] for t in targets]).to(boxes)  # (Gt, 4)
            p = logits.sigmoid()[..., labels]  # (L, B, N, Gt)
            neg = (1 - self.alpha) * p**self.gamma * -(1 - p + 1e-8).log()
            pos = self.alpha * (1 - p) ** self.gamma * -(p + 1e-8).log()
            l1 = (boxes[..., :, None, :] - gt).abs().sum(-1)
            cost = self.cost_class * (pos - neg) + self.cost_bbox * l1
            cost = cost - self.cost_giou * giou_cxcywh(boxes[..., :, None, :], gt)
        cost = cost.cpu().numpy()  # one device -> host copy for all layers and images
        starts = np.cumsum([0] + sizes)
        L, B = logits.shape[:2]
        todo = [(l, b) for l in range(L) for b in range(B) if sizes[b]]
        solved = solve_assignments([cost[l, b, :, starts[b] : starts[b + 1]] for l, b in todo])
        return [(l, b, pair) for (l, b), pair in zip(todo, solved)]


def detr_param_groups(
    model: nn.Module, lr: float, backbone_lr_factor: float = 0.1, weight_decay: float = 1e-4
):
    """Optimizer parameter groups with a smaller learning rate for the backbone (ResNet)."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if ".backbone." in f".{name}" else rest).append(p)
    return [
        {"params": rest, "lr": lr, "weight_decay": weight_decay},
        {"params": backbone, "lr": lr * backbone_lr_factor, "weight_decay": weight_decay},
    ]


class ConditionalDETR(nn.Module):
    """
    Implement Conditional DETR (:paper:`ConditionalDETR`) on a detectron2 backbone.

    Training returns the loss dict (sigmoid focal classification, L1 and GIoU box losses after
    Hungarian matching, on the last decoder layer and on every earlier one: ``loss_class``,
    ``loss_bbox``, ``loss_giou``, ``loss_class_0`` ...). Eval returns
    ``[{"instances": Instances}]`` with the top-scoring (query, class) pairs.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        in_feature: str = "res5",
        position_embedding: nn.Module,
        transformer: ConditionalDETRTransformer,
        matcher: HungarianMatcher,
        num_classes: int,
        num_queries: int = 300,
        aux_loss: bool = True,
        loss_class_weight: float = 2.0,
        loss_bbox_weight: float = 5.0,
        loss_giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        select_box_nums_for_evaluation: int = 100,
        pixel_mean: Tuple[float, float, float],
        pixel_std: Tuple[float, float, float],
        input_format: str = "BGR",
        size_divisibility: int = 32,
    ):
        """
        Args:
            backbone: a detectron2 Backbone (e.g. ResNet) that outputs ``in_feature``.
            position_embedding: :class:`PositionEmbeddingSine` with ``num_pos_feats = d / 2``.
            transformer: :class:`ConditionalDETRTransformer` of hidden size d.
            matcher: :class:`HungarianMatcher` used for the ground-truth losses.
            num_classes, num_queries: K and N.
            aux_loss: also supervise every decoder layer but the last.
            loss_*_weight, focal_alpha, focal_gamma: detection loss settings.
            select_box_nums_for_evaluation: detections per image at inference.
            pixel_mean, pixel_std, input_format: input normalisation, as detectron2 models.
            size_divisibility: pad inputs to a multiple of this.
        """
        super().__init__()
        self.backbone = backbone
        self.in_feature = in_feature
        d = transformer.decoder.norm.normalized_shape[0]
        outputs = backbone.output_shape()
        if in_feature not in outputs:
            raise ValueError(
                f"ConditionalDETR: in_feature={in_feature!r} is not an output of the backbone "
                f"({sorted(outputs)}); set in_feature to one of them, or add it to the "
                "backbone's out_features"
            )
        num_pos_feats = getattr(position_embedding, "num_pos_feats", None)
        if num_pos_feats is not None and 2 * num_pos_feats != d:
            raise ValueError(
                f"ConditionalDETR: position_embedding.num_pos_feats={num_pos_feats} gives "
                f"{2 * num_pos_feats}-dim positions, but the transformer's d_model is {d}: set "
                f"num_pos_feats = d_model / 2 = {d // 2}"
            )
        self.input_proj = nn.Conv2d(outputs[in_feature].channels, d, kernel_size=1)
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.query_embed = nn.Embedding(num_queries, d)
        self.head = DETRHead(d, num_classes)
        self.matcher = matcher
        self.num_classes, self.num_queries, self.aux_loss = num_classes, num_queries, aux_loss
        self.loss_weights = dict(
            class_=loss_class_weight, bbox=loss_bbox_weight, giou=loss_giou_weight
        )
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.select_box_nums_for_evaluation = select_box_nums_for_evaluation
        self.input_format = input_format
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self._extra_queries: Optional[torch.Tensor] = None

    @property
    def device(self):
        return self.pixel_mean.device

    @contextlib.contextmanager
    def extra_query_group(self, queries: torch.Tensor):
        """
        Within this context, training forwards add an auxiliary query group.

        Args:
            queries (Tensor): (N2, d) positional queries of the group (e.g. a teacher's
                ``query_embed.weight``). The group shares all weights, is blocked from the own
                queries in self-attention, and never affects the own group's outputs or losses;
                its predictions are the last N2 queries seen by the ``head`` hook.
        """
        self._extra_queries = queries
        try:
            yield
        finally:
            self._extra_queries = None

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.size_divisibility)

    def _queries(self, B: int):
        """Query embeddings (B, Nq, d) and the self-attention query groups [N, N2], or None."""
        q = self.query_embed.weight
        groups = None
        if self.training and self._extra_queries is not None:
            extra = self._extra_queries.to(q)
            groups = [q.shape[0], extra.shape[0]]
            q = torch.cat([q, extra], dim=0)
        return q[None].expand(B, -1, -1), groups

    def forward_predictions(self, images: ImageList) -> Dict[str, torch.Tensor]:
        """
        Backbone, encoder, decoder and head (hooks fire); no loss, no post-processing.

        Returns:
            dict: "pred_logits" (L, B, Nq, K), "pred_boxes" (L, B, Nq, 4) normalised cxcywh.
        """
        x = images.tensor
        B, _, Hp, Wp = x.shape
        pad = torch.ones(B, Hp, Wp, dtype=torch.bool, device=x.device)
        for i, (h, w) in enumerate(images.image_sizes):
            pad[i, :h, :w] = False
        feat = self.backbone(x)[self.in_feature]
        mask = F.interpolate(pad[:, None].float(), size=feat.shape[-2:]).bool()[:, 0]  # (B, H, W)
        pos = self.position_embedding(mask).flatten(2).transpose(1, 2)  # (B, HW, d)
        src = self.input_proj(feat).flatten(2).transpose(1, 2)  # (B, HW, d)
        query_pos, groups = self._queries(B)
        states, reference = self.transformer(src, pos, mask.flatten(1), query_pos, groups)
        return self.head(states, reference)

    def prepare_targets(self, gt_instances: List[Instances]) -> List[Dict[str, torch.Tensor]]:
        """Instances -> {"labels": (G,), "boxes": (G, 4) cxcywh normalised by the image size}."""
        if not gt_instances:
            return []
        sizes = [len(inst) for inst in gt_instances]
        # All images at once, on the instances' device (the data loader's: the CPU).
        # (Gt, 4)
        xyxy = torch.cat([inst.gt_boxes.tensor for inst in gt_instances]).to(torch.float32)
        labels = torch.cat([inst.gt_classes for inst in gt_instances])  # (Gt,)
        scale = [
            [w, h, w, h] for inst, n in zip(gt_instances, sizes) for h, w in [inst.image_size] * n
        ]
        scale = torch.tensor(scale, dtype=torch.float32).reshape(-1, 4).to(xyxy.device)  # (Gt, 4)
        boxes = box_convert(xyxy / scale, "xyxy", "cxcywh")
        # one copy of each to the device
        if boxes.device.type == "cpu" and labels.device.type == "cpu":
            boxes, labels = host_tensor(boxes, self.device), host_tensor(labels, self.device)
        else:
            boxes, labels = boxes.to(self.device), labels.to(self.device)
        return [{"labels": c, "boxes": b} for c, b in zip(labels.split(sizes), boxes.split(sizes))]

    def _gt_losses(self, logits, boxes, targets, match, num_boxes) -> Dict[str, torch.Tensor]:
        """
        Ground-truth losses of S decoder layers at once, from all their matched pairs.

        Args:
            logits (Tensor): (S, B, N, K); boxes (Tensor): (S, B, N, 4).
            match (Tensor): (4, P) layer (0..S-1), image, prediction, target index into the
                concatenated targets (:meth:`HungarianMatcher.match_layers_flat`).

        Returns:
            dict: ``loss_class``, ``loss_bbox``, ``loss_giou``, each (S,): one value per layer.
        """
        # At least in fp32, also under AMP: in bf16 a small box's corners c +- w/2 collapse (GIoU
        # off by ~60 %, NaN for boxes of a few pixels) and the targets would be rounded too.
        # The gradient flows back to the low-precision predictions through the casts.
        dtype = torch.promote_types(boxes.dtype, torch.float32)
        logits, boxes = logits.to(torch.promote_types(logits.dtype, torch.float32)), boxes.to(dtype)
        layer, image, pred, tgt = match.unbind(0)
        labels = torch.cat([t["labels"] for t in targets])  # (Gt,)
        gt = torch.cat([t["boxes"] for t in targets]).to(boxes)  # (Gt, 4)
        onehot = torch.zeros_like(logits)
        index_put_value_(onehot, (layer, image, pred, labels[tgt]), 1.0)  # no host sync
        cls = sigmoid_focal_loss(
            logits, onehot, self.focal_alpha, self.focal_gamma, reduction="none"
        )
        cls = cls.flatten(1).sum(1) / num_boxes  # (S,)
        # (P, 4) matched predictions and their targets
        src, dst = boxes[layer, image, pred], gt[tgt]
        l1 = (src - dst).abs().sum(-1)
        giou = 1 - giou_cxcywh(src, dst)
        terms = torch.stack([l1, giou])  # (2, P)
        box = terms.new_zeros(2, logits.shape[0]).index_add(1, layer, terms) / num_boxes  # (2, S)
        return {
            "loss_class": self.loss_weights["class_"] * cls,
            "loss_bbox": self.loss_weights["bbox"] * box[0],
            "loss_giou": self.loss_weights["giou"] * box[1],
        }

    @staticmethod
    def _flat_match(indices, targets, device) -> torch.Tensor:
        """Per-image (prediction indices, target indices) -> the (4, P) form of
        :meth:`HungarianMatcher.match_layers_flat` (layer row 0)."""
        starts = np.cumsum([0] + [len(t["labels"]) for t in targets])
        cols = [torch.zeros(4, 0, dtype=torch.long, device=device)]
        for b, (p, g) in enumerate(indices):
            p, g = p.to(device=device, dtype=torch.long), g.to(device=device, dtype=torch.long)
            cols.append(
                torch.stack([torch.zeros_like(p), torch.full_like(p, b), p, g + int(starts[b])])
            )
        return torch.cat(cols, 1)

    @staticmethod
    def _num_boxes(targets, device):
        """
        The loss normaliser: ground-truth boxes per process, averaged over all processes (at
        least 1), as DETR does. DDP averages the processes' gradients, so every box then weighs
        1 / (all boxes of the step), whatever the number of processes and however the boxes
        fall on them. A float in one process; a 0-dim tensor (one all-reduce) in several.
        """
        n = float(sum(len(t["labels"]) for t in targets))
        world = comm.get_world_size()
        if world == 1:
            return max(n, 1.0)
        total = torch.tensor(n, dtype=torch.float32, device=device)
        torch.distributed.all_reduce(total)
        return (total / world).clamp_(min=1.0)

    def compute_gt_losses(
        self, pred_logits, pred_boxes, targets, indices_last_layer=None
    ) -> Dict[str, torch.Tensor]:
        """
        Ground-truth losses of predictions of every decoder layer. All layers are matched from
        one cost computation, and their losses computed together (no per-layer or per-image
        tensor ops).

        Args:
            pred_logits (Tensor): (L, B, N, K); pred_boxes (Tensor): (L, B, N, 4).
            targets (list[dict]): from :meth:`prepare_targets`.
            indices_last_layer (Tensor or list[(Tensor, Tensor)] or None): use this assignment
                at the last layer instead of Hungarian matching (D3ETR's auxiliary group takes
                its teacher's): a (4, P) match of :meth:`HungarianMatcher.match_layers_flat`
                (its layer row is ignored) or per-image (prediction indices, target indices).

        Returns:
            dict: ``loss_class``, ``loss_bbox``, ``loss_giou`` of the last layer and
            ``loss_<name>_<l>`` of earlier layers (when ``aux_loss``).
        """
        num_boxes = self._num_boxes(targets, pred_logits.device)
        L = pred_logits.shape[0]
        first = 0 if self.aux_loss else L - 1
        logits, boxes = pred_logits[first:], pred_boxes[first:]  # (S, B, N, .): supervised layers
        S = L - first
        given = indices_last_layer is not None
        parts = []
        if S > given:  # the layers to match: all, or all but the last
            n = S - given
            parts.append(
                self.matcher.match_layers_flat(logits.detach()[:n], boxes.detach()[:n], targets)
            )
        if given:
            last = indices_last_layer
            if not torch.is_tensor(last):
                last = self._flat_match(last, targets, logits.device)
            last = last.clone()
            last[0] = S - 1
            parts.append(last)
        match = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        per_layer = {
            k: v.unbind(0)
            for k, v in self._gt_losses(logits, boxes, targets, match, num_boxes).items()
        }
        losses = {}
        for i in range(S):
            suffix = "" if i == S - 1 else f"_{first + i}"
            losses.update({k + suffix: v[i] for k, v in per_layer.items()})
        return losses

    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_image(batched_inputs)
        out = self.forward_predictions(images)
        logits, boxes = (
            out["pred_logits"][:, :, : self.num_queries],
            out["pred_boxes"][:, :, : self.num_queries],
        )
        if self.training:
            targets = self.prepare_targets([x["instances"] for x in batched_inputs])
            return self.compute_gt_losses(logits, boxes, targets)
        return self.inference(logits[-1], boxes[-1], batched_inputs, images.image_sizes)

    def inference(self, logits, boxes, batched_inputs, image_sizes):
        """Top-k (query, class) pairs per image, boxes scaled back to the input's size."""
        results = []
        K = logits.shape[-1]
        for lg, bx, x, (h, w) in zip(logits, boxes, batched_inputs, image_sizes):
            scores, idx = (
                lg.sigmoid().flatten().topk(min(self.select_box_nums_for_evaluation, lg.numel()))
            )
            q, labels = idx // K, idx % K
            xyxy = box_convert(bx[q], "cxcywh", "xyxy") * torch.tensor(
                [w, h, w, h], device=bx.device, dtype=bx.dtype
            )
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(xyxy)
            inst.pred_boxes.clip((h, w))
            inst.scores, inst.pred_classes = scores, labels
            results.append(
                {"instances": detector_postprocess(inst, x.get("height", h), x.get("width", w))}
            )
        return results
