"""
ReviewKD: knowledge review across FPN levels, :paper:`ReviewKD` ("Distilling Knowledge via
Knowledge Review", Chen et al., CVPR 2021), detection setting (METHODS.md section 2).

The student's FPN levels are reviewed from the deepest to the finest: an attention-based fusion
(ABF) block merges each level with the fused result of the deeper levels, so the output at level
k aggregates student levels k..deepest, and is compared with the teacher's level k by the
hierarchical context loss (HCL). The fused maps serve the loss only: the student's heads still
read its raw FPN features.

Shape shorthand in this module:

    N: number of images in the minibatch
    Cs, Ct: channels of the student's / teacher's FPN levels
    Cm: channels inside an ABF block
    H, W: height and width of one level

Naming convention:

    x: a student level (N, Cs, H, W); residual: the deeper fused map before conv2 (N, Cm, h, w);
    out: a fused map in the teacher's channels (N, Ct, H, W)
"""

import contextlib
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, NaiveSyncBatchNorm, get_norm
from detectron2.utils import comm
from torch import nn

from ..utils import memory_format_of
from .base import (
    Distiller,
    check_num_levels,
    check_pair_by,
    check_positive_int,
    check_weight,
    pair_fpn_levels,
    put_scalar,
)

__all__ = ["ABF", "hcl_loss", "hcl_level_loss", "ReviewKDDistiller"]

_ABF_PRECISIONS = (None, "bf16")
_POOL_SIZES = (4, 2, 1)  # HCL's pyramid; the i-th size used (1-based) weighs 0.5^i


def _pool_matrix(n: int, p: int, like: torch.Tensor) -> torch.Tensor:
    """
    (p, n) matrix of 1-D adaptive average pooling of n positions to p bins: row i averages
    PyTorch's bin [floor(i*n/p), ceil((i+1)*n/p)).
    """
    i = torch.arange(p, device=like.device)
    start, end = (i * n) // p, -((-(i + 1) * n) // p)
    pos = torch.arange(n, device=like.device)
    inside = (pos >= start[:, None]) & (pos < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


# (H, W, sizes, weights, device, dtype) -> the pooling operators of _HCLLevelLoss. A training run
# sees a few map sizes per level (padding to size_divisibility), so this stays small; past
# _OPERATOR_CACHE_SIZE entries (multi-scale training with many sizes) the least recently used
# entry is dropped.
_OPERATORS: "OrderedDict[tuple, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]" = OrderedDict()
_OPERATOR_CACHE_SIZE = 256


def _pooling_operators(H: int, W: int, sizes, weights, like: torch.Tensor):
    """
    The stacked pooling matrices ``ah`` (P, H) and ``aw`` (P, W) of all pooling sizes (P = sum of
    sizes) and the (P, P) block-diagonal weight mask: ``w / p^2`` on size p's diagonal block,
    0 elsewhere. Built once per map size, device and dtype (they cost ~40 small kernels).
    """
    key = (H, W, sizes, weights, like.device, like.dtype)
    ops = _OPERATORS.get(key)
    if ops is not None:
        _OPERATORS.move_to_end(key)
    else:
        while len(_OPERATORS) >= _OPERATOR_CACHE_SIZE:
            _OPERATORS.popitem(last=False)
        # normal tensors also when first built under inference_mode: training saves them later
        with torch.inference_mode(False):
            ah = torch.cat([_pool_matrix(H, p, like) for p in sizes])
            aw = torch.cat([_pool_matrix(W, p, like) for p in sizes])
            blocks = [
                torch.full((p, p), w / (p * p), dtype=like.dtype) for p, w in zip(sizes, weights)
            ]
            mask = torch.block_diag(*blocks).to(like.device)
        ops = _OPERATORS[key] = (ah, aw, mask)
    return ops


class _HCLLevelLoss(torch.autograd.Function):
    """
    HCL of one level from the difference ``d = student - teacher`` alone (adaptive average
    pooling is linear: ``AAP(s) - AAP(t) = AAP(d)``). All pooling sizes come from one pass over
    ``d``: ``Y = A_h d A_w^T`` (N, C, P, P) with the sizes' pooling matrices stacked, size p's
    pools being Y's p x p diagonal block, so that the pooled terms are
    ``sum(Y^2 * mask) / (N C)`` with the block-diagonal weight mask of
    :func:`_pooling_operators`. The backward writes the gradient once:
    ``c0 d + A_h^T (2 Y * mask / (N C)) A_w``. Autograd's version allocates a zero-filled
    full-size buffer per pooling size and for the MSE (p2 of a 1333x800 input is 200x336).
    """

    @staticmethod
    def forward(ctx, student, teacher, sizes, weights):
        d = student - teacher  # (N, C, H, W)
        N, C, H, W = d.shape
        flat = d.reshape(-1)
        loss = torch.dot(flat, flat) / d.numel()
        pooled = ah = aw = mask = None
        if sizes:
            ah, aw, mask = _pooling_operators(H, W, sizes, weights, d)
            pooled = ah @ (d @ aw.t())  # (N, C, P, P)
            loss = loss + (pooled.square() * mask).sum() / (N * C)
        ctx.save_for_backward(d, ah, aw, pooled, mask)
        ctx.total = 1.0 + sum(weights)
        return loss / ctx.total

    @staticmethod
    def backward(ctx, grad):
        d, ah, aw, pooled, mask = ctx.saved_tensors
        N, C = d.shape[:2]
        g = grad / ctx.total
        if pooled is not None:
            y = pooled * mask * (g * 2.0 / (N * C))  # (N, C, P, P), 0 off the diagonal blocks
            grad_s = ah.t() @ (y @ aw)  # (N, C, H, W)
            grad_s.addcmul_(d, g * (2.0 / d.numel()))  # + the full-resolution MSE's gradient
        else:
            grad_s = d * (g * 2.0 / d.numel())
        grad_t = -grad_s if ctx.needs_input_grad[1] else None
        return grad_s, grad_t, None, None


def hcl_level_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """
    Hierarchical context loss of one level: full-resolution MSE plus MSE of adaptive-average-
    pooled maps at 4x4, 2x2, 1x1, a pooling size being skipped when it is not smaller than the
    map's height; the sizes used weigh 0.5, 0.25, 0.125 in turn (as the reference: a map of height
    3 or 4 weighs 2x2 by 0.5 and 1x1 by 0.25); normalised by the sum of the weights used.

    Args:
        student, teacher (Tensor): (N, C, H, W) of equal shape (the teacher is cast to the
            student's dtype; half-precision maps are computed in float32).

    Returns:
        Tensor: scalar.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"HCL: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    sizes = tuple(size for size in _POOL_SIZES if size < student.shape[2])
    weights = tuple(0.5 ** (i + 1) for i in range(len(sizes)))
    if student.dtype in (torch.float16, torch.bfloat16):
        # summed in float32 (METHODS: distillation-loss arithmetic in fp32): the sum of squares
        # of a p2 map overflows fp16; autograd casts the gradient back to the student's dtype
        student = student.float()
    return _HCLLevelLoss.apply(student, teacher.to(student.dtype), sizes, weights)


def hcl_loss(
    student_feats: Union[torch.Tensor, Sequence[torch.Tensor]],
    teacher_feats: Union[torch.Tensor, Sequence[torch.Tensor]],
) -> torch.Tensor:
    """HCL summed over paired levels (each (N, C, H, W)). Returns a scalar."""
    if isinstance(student_feats, torch.Tensor):
        student_feats, teacher_feats = [student_feats], [teacher_feats]
    if len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"HCL: {len(student_feats)} student vs {len(teacher_feats)} teacher levels"
        )
    return sum(hcl_level_loss(s, t) for s, t in zip(student_feats, teacher_feats))


class _Recast(torch.autograd.Function):
    """
    ``x.to(dtype, memory_format)`` whose backward hands on the gradient in x's own dtype and
    memory format, in one copy each way. Autograd's own cast would return a channels-last
    gradient to the student's NCHW FPN map (slowing the student's whole backward), and hand a
    BatchNorm of channels-last maps an NCHW gradient (BatchNorm's slow mixed-layout backward).

    Args:
        x (Tensor): (N, C, H, W); dtype (torch.dtype); memory_format (torch.memory_format).
    """

    @staticmethod
    def forward(ctx, x, dtype, memory_format):
        ctx.dtype = x.dtype
        ctx.memory_format = memory_format_of(x)
        return x.to(dtype=dtype, memory_format=memory_format)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(dtype=ctx.dtype, memory_format=ctx.memory_format), None, None


class ABF(nn.Module):
    """
    Attention-based fusion of one level (:paper:`ReviewKD`'s ABF).

    ``u = BN(conv1x1(x))``; if a residual from the deeper level is given, it is resized (nearest)
    to ``u``'s size, two spatial attention maps ``a = sigmoid(conv1x1([u; r]))`` are predicted and
    ``u = u * a0 + r * a1``; the output is ``BN(conv3x3(u))`` in the teacher's channels, and ``u``
    is the residual handed to the next finer level.
    """

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool, norm: str = "BN"
    ):
        """
        Args:
            in_channels (int): the student level's channels (Cs).
            mid_channels (int): channels of the fused residual (Cm).
            out_channels (int): the teacher level's channels (Ct).
            fuse (bool): False for the deepest level (no residual input).
            norm (str): detectron2 norm name for conv1/conv2 ("BN", "SyncBN", "GN", ...).
        """
        super().__init__()
        self.conv1 = Conv2d(
            in_channels, mid_channels, 1, bias=False, norm=get_norm(norm, mid_channels)
        )
        self.conv2 = Conv2d(
            mid_channels, out_channels, 3, padding=1, bias=False, norm=get_norm(norm, out_channels)
        )
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_uniform_(conv.weight, a=1)
        self.att = Conv2d(2 * mid_channels, 2, 1) if fuse else None

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x (Tensor): student level, (N, Cs, H, W).
            residual (Tensor or None): deeper fused map (N, Cm, h, w); required iff fusing.

        Returns:
            (out, residual): (N, Ct, H, W) compared with the teacher, and (N, Cm, H, W).
        """
        u = self.conv1(x)
        if self.att is not None:
            if residual is None:
                raise ValueError("ABF built with fuse=True needs the deeper level's residual")
            u = self._fuse(u, residual)
        return self.conv2(u), u

    def _fuse(self, u: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """
        ``u * a0 + r * a1`` with ``r`` the residual resized (nearest) to u's size and
        ``a = sigmoid(att([u; r]))``. Computed without the concatenation and, for the usual exact
        2x size step, without the resized residual: the attention conv is split into its u part
        and its r part, and a 1x1 conv commutes with nearest resizing, so the r part runs at the
        residual's resolution; ``r * a1`` is a broadcast over the 2x2 cells.

        Args:
            u (Tensor): (N, Cm, H, W); residual (Tensor): (N, Cm, h, w).
        """
        N, C, H, W = u.shape
        h, w = residual.shape[-2:]
        weight = self.att.weight  # (2, 2 * Cm, 1, 1): [u part, r part]
        logits_u = F.conv2d(u, weight[:, :C], self.att.bias)  # (N, 2, H, W)
        logits_r = F.conv2d(residual, weight[:, C:])  # (N, 2, h, w)
        if (H, W) == (2 * h, 2 * w) and memory_format_of(u) is torch.channels_last:
            return self._fuse_2x_channels_last(u, residual, logits_u, logits_r)
        if (H, W) == (2 * h, 2 * w):  # nearest 2x: output (i, j) reads (i // 2, j // 2)
            a = (logits_u.view(N, 2, h, 2, w, 2) + logits_r[:, :, :, None, :, None]).sigmoid()
            fused = (residual[:, :, :, None, :, None] * a[:, 1:2]).view(N, C, H, W)
            return fused.addcmul_(u, a[:, 0:1].reshape(N, 1, H, W))
        # other sizes (e.g. 13 -> 25): the exact target size, as F.interpolate's nearest rule
        a = (logits_u + F.interpolate(logits_r, size=(H, W), mode="nearest")).sigmoid()
        r = F.interpolate(residual, size=(H, W), mode="nearest")
        return (r * a[:, 1:2]).addcmul_(u, a[:, 0:1])

    @staticmethod
    def _fuse_2x_channels_last(u, residual, logits_u, logits_r) -> torch.Tensor:
        """:meth:`_fuse`'s exact 2x step for channels-last maps (``abf_precision="bf16"``): the
        same broadcast over the 2x2 cells, computed on the maps' (N, H, W, C) views, so that the
        result stays channels-last (the NCHW views cannot split a channels-last map's H and W).

        Args:
            u (Tensor): (N, Cm, H, W); residual (Tensor): (N, Cm, H/2, W/2); logits_u (Tensor):
                (N, 2, H, W); logits_r (Tensor): (N, 2, H/2, W/2); all channels-last.
        """
        N, C, H, W = u.shape
        h, w = residual.shape[-2:]
        a = (  # (N, h, 2, w, 2, 2): cell (i, j) of the 2x2 block of residual pixel (y, x)
            logits_u.permute(0, 2, 3, 1).reshape(N, h, 2, w, 2, 2)
            + logits_r.permute(0, 2, 3, 1)[:, :, None, :, None, :]
        ).sigmoid()
        r = residual.permute(0, 2, 3, 1)[:, :, None, :, None, :]  # (N, h, 1, w, 1, Cm)
        fused = (r * a[..., 1:2]).reshape(N, H, W, C)
        fused = fused.addcmul_(u.permute(0, 2, 3, 1), a[..., 0:1].reshape(N, H, W, 1))
        return fused.permute(0, 3, 1, 2)  # (N, Cm, H, W), channels-last


class ReviewKDDistiller(Distiller):
    """
    Distill the FPN features of any detectron2 detector pair with :paper:`ReviewKD`.

    Only the teacher's backbone (+FPN) runs. Student and teacher levels are paired by stride
    (default, all shared levels) or by index; one :class:`ABF` per paired level maps the student's
    channels to the teacher's, so differing channel counts (e.g. a 64- or 128-channel student FPN
    against a 256-channel teacher) need no extra adapter. ABF parameters train with the student,
    are saved in run checkpoints (``distillers.<name>.abfs.*``) and are dropped by student export.

    Loss: ``loss_reviewkd = loss_weight * sum_k HCL(out_k, teacher_k)``; per-level values go to the
    event storage as ``reviewkd/<student level>``.
    """

    resizes_levels = True  # see Distiller

    def __init__(
        self,
        *,
        loss_weight: float = 1.0,
        num_levels: Optional[int] = None,
        pair_by: str = "stride",
        mid_channels: Optional[int] = None,
        norm: str = "BN",
        abf_precision: Optional[str] = None,
    ):
        """
        Args:
            loss_weight (float): lambda (R50 1.0, R18 1.2, MobileNetV2 2.0 for Faster R-CNN);
                a finite number >= 0 (0 turns the loss off).
            num_levels (int or None): review the first ``num_levels`` pairs (finest first); None
                for all shared levels (p2-p6 / p3-p7 as the paper). A positive int.
            pair_by (str): "stride" or "index", see :func:`pair_fpn_levels`. Index pairs of
                different strides (e.g. a RetinaNet student's p3-p7 with an R-CNN teacher's p2-p6)
                compare the fused map resized bilinearly to the teacher level's size ([INFER], as
                PKD does; the paper pairs equal strides).
            mid_channels (int or None): ABF inner channels, one width for the whole review
                chain (each level's fused residual feeds the next finer ABF); default the
                teacher's channels (256 for an FPN), the largest of its paired levels' when they
                differ (a teacher backbone without FPN, e.g. res3-res5). A positive int.
            norm (str): norm of the ABF convs. "BN" (METHODS.md 2.2) uses each process's
                batch statistics; "SyncBN" pools them over GPUs, "naiveSyncBN" also over CPU
                processes (``--num-gpus N`` without CUDA), where "SyncBN" is refused.
            abf_precision (str or None): None runs the ABFs in the training step's precision
                (fp32, or AMP's). "bf16" runs them in bfloat16 on channels-last maps even in an
                fp32 step: mixed precision for the ABFs alone (their weights, gradients and
                optimizer state stay fp32, the HCL loss is computed in fp32, the student's maps
                get fp32 NCHW gradients). Fast where the hardware has bf16 matrix units (CPU
                AMX, GPU tensor cores): on a 2-core AMX CPU the p2 ABF's 3x3 conv runs ~7x
                faster. Not the paper's arithmetic; results within bf16 rounding. fp16 is not
                offered: outside AMP no grad scaler guards its gradients against underflow.

        Bad values are errors here, naming the argument (and its config key).
        """
        super().__init__()
        owner = type(self).__name__
        loss_weight = check_weight(owner, "loss_weight", loss_weight)
        check_num_levels(num_levels, owner)
        check_pair_by(pair_by, owner)
        if mid_channels is not None:  # None, not 0, means the teacher's channels
            mid_channels = check_positive_int(
                owner, "mid_channels", mid_channels, "or None for the teacher's channels"
            )
        if isinstance(norm, str) and norm:
            try:  # unknown names were a KeyError('bn') from detectron2 at bind
                get_norm(norm, 32)
            except KeyError:
                raise ValueError(
                    f"ReviewKD: norm must be a detectron2 norm name (detectron2.layers.get_norm: "
                    f"'BN', 'SyncBN', 'naiveSyncBN', 'GN', 'FrozenBN', ...; case matters) "
                    f"(model.distillers.<name>.norm), got {norm!r}"
                ) from None
        if abf_precision not in _ABF_PRECISIONS:
            raise ValueError(
                f"ReviewKD: abf_precision must be None (the training step's precision) or 'bf16', "
                f"got {abf_precision!r}"
                + (
                    ": fp16 outside AMP has no grad scaler; train with AMP (train.amp.enabled) "
                    "instead, the ABFs then follow it"
                    if abf_precision == "fp16"
                    else ""
                )
            )
        self.abf_precision = abf_precision
        self.loss_weight = loss_weight
        self.num_levels = num_levels
        self.pair_by = pair_by
        self.mid_channels = mid_channels
        self.norm = norm
        self.pairs: List[Tuple[str, str]] = []
        self._equal_stride: Dict[str, bool] = {}  # per student level of self.pairs
        self.abfs = nn.ModuleDict()

    def bind(self, student, teacher):
        s_shapes, t_shapes = student.backbone.output_shape(), teacher.backbone.output_shape()
        self.pairs = pair_fpn_levels(
            s_shapes, t_shapes, num_levels=self.num_levels, pair_by=self.pair_by
        )
        self._equal_stride = {s: s_shapes[s].stride == t_shapes[t].stride for s, t in self.pairs}
        deepest = self.pairs[-1][0]
        mid = self.mid_channels or max(t_shapes[t].channels for _, t in self.pairs)
        if self.norm == "GN":  # detectron2's get_norm: 32 groups, which must divide the channels
            teacher = {t: t_shapes[t].channels for _, t in self.pairs if t_shapes[t].channels % 32}
            if teacher:
                raise ValueError(
                    f"ReviewKD: norm='GN' normalises the ABFs' output convolutions (the teacher's "
                    f"channels) in 32 groups, which must divide them; the teacher's {teacher} are "
                    "not multiples of 32. Set model.distillers.<name>.norm='BN' (or another norm)."
                )
            if mid % 32:
                given = (
                    "" if self.mid_channels else " (mid_channels=None: the teacher's widest level)"
                )
                raise ValueError(
                    f"ReviewKD: norm='GN' normalises the ABFs' middle convolutions in 32 groups, "
                    f"which must divide their channels; mid_channels is {mid}{given}. Set "
                    "model.distillers.<name>.mid_channels to a multiple of 32, or norm='BN'."
                )
        for s, t in self.pairs:
            self.abfs[s] = ABF(
                s_shapes[s].channels, mid, t_shapes[t].channels, fuse=s != deepest, norm=self.norm
            )

    def review(self, student_feats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """
        Run the review chain, deepest level first.

        Args:
            student_feats (dict[str, Tensor]): the student's FPN dict, level -> (N, Cs, H, W).

        Returns:
            dict[str, Tensor]: fused map per paired student level, (N, Ct, H, W) in the
            teacher's channels at the student level's size; with ``abf_precision`` set, fp32
            NCHW maps computed in that precision.
        """
        bf16 = self.abf_precision == "bf16"
        precision = contextlib.nullcontext()  # None: the caller's precision
        if bf16:
            device_type = next(iter(student_feats.values())).device.type
            precision = torch.autocast(device_type, dtype=torch.bfloat16)
        outs, residual = {}, None
        with precision:
            for s, _ in reversed(self.pairs):
                x = student_feats[s]
                if bf16:  # one copy into bf16 NHWC; fp32 NCHW gradients back
                    x = _Recast.apply(x, torch.bfloat16, torch.channels_last)
                outs[s], residual = self.abfs[s](x, residual)
        if bf16:
            nchw = torch.contiguous_format
            outs = {s: _Recast.apply(o, torch.float32, nchw) for s, o in outs.items()}
        return outs

    def _check_batch_statistics(self, student_feats: Dict[str, torch.Tensor]) -> None:
        """A BatchNorm of an ABF cannot train on one value per channel (one image, a 1x1 map:
        the deepest levels of small images); say so instead of BatchNorm's generic error. A
        synchronized BatchNorm in a multi-process run has the values of every process."""
        if not self.training:
            return
        synced = (nn.SyncBatchNorm, NaiveSyncBatchNorm) if comm.get_world_size() > 1 else ()
        for s, _ in self.pairs:
            x = student_feats[s]
            if x.shape[0] * x.shape[2] * x.shape[3] != 1:  # the common case: no module scan
                continue
            if any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, synced)
                for m in self.abfs[s].modules()
            ):
                raise ValueError(
                    f"ReviewKD: the student's level '{s}' is a 1x1 map of one image, and the "
                    f"BatchNorm of its ABF (norm={self.norm!r}) cannot train on one value per "
                    "channel. Use norm='GN', leave the level out with num_levels, or train with "
                    "more images per device or larger images."
                )

    def forward(self, student_taps, teacher_taps, ctx) -> Dict[str, torch.Tensor]:
        self._check_batch_statistics(student_taps["backbone"])
        # the ABFs are trainable layers like the student's: its precision (or abf_precision)
        with ctx.amp():
            fused = self.review(student_taps["backbone"])
        fused = {k: v.float() for k, v in fused.items()}  # the loss in fp32
        feats_t = teacher_taps["backbone"]
        total = 0.0
        for s, t in self.pairs:
            out, ref = fused[s], feats_t[t]
            if out.shape[2:] != ref.shape[2:]:
                if self._equal_stride[s]:
                    # the models pad to different size divisibilities: both grids start at the
                    # image's corner with one stride, so the part both cover is aligned cell for
                    # cell (a resize would shift the image by up to the extra padding)
                    h, w = min(out.shape[2], ref.shape[2]), min(out.shape[3], ref.shape[3])
                    out, ref = out[:, :, :h, :w], ref[:, :, :h, :w]
                else:  # pair_by="index" across strides: as PKD does
                    out = F.interpolate(
                        out, size=ref.shape[2:], mode="bilinear", align_corners=False
                    )
            level = hcl_level_loss(out, ref)
            put_scalar(f"reviewkd/{s}", level)
            total = total + level
        return {"loss_reviewkd": self.loss_weight * total}
