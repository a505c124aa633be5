"""
PKD: feature imitation through the Pearson correlation coefficient, :paper:`PKD`
("PKD: General Distillation Framework for Object Detectors via Pearson Correlation
Coefficient", Cao et al., NeurIPS 2022).

Shape shorthand in this module:

    N: number of images in the minibatch
    C: channels of a feature map (student maps are adapted to the teacher's C)
    H, W: height and width of one FPN level (the teacher's, after resizing the student)
    M: N * H * W, the number of values of one channel

Naming convention:

    feat_s, feat_t: student / teacher feature maps of one level, shape (N, C, H, W)
    norm_s, norm_t: the same after per-channel standardisation, shape (C, M)
"""

from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    Distiller,
    check_flag,
    check_level_names,
    check_num_levels,
    check_pair_by,
    check_weight,
    pair_fpn_levels,
    put_scalar,
)

__all__ = ["pkd_loss", "pkd_level_loss", "PKDDistiller"]


def _standardize_channels(feat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """
    Standardise each channel over the batch and spatial positions.

    Args:
        feat (Tensor): shape (N, C, H, W).

    Returns:
        Tensor: shape (C, M), each row with mean 0 and unbiased std ``s / (s + eps)`` ~ 1.
        Gradients flow through the mean and std (they are not detached). With M = 1 (batch 1
        and a 1x1 map) a channel's one value is its mean: std 0 and a zero row, as for any
        constant channel (the unbiased std itself would be 0 / 0).
    """
    C = feat.shape[1]
    x = feat.transpose(0, 1).reshape(C, -1)  # (C, M)
    # Shifted by each channel's first value (the result is shift-invariant): a constant
    # channel is then exactly 0. Its float32 mean is not always its value, and the rounding
    # residue, divided by std + eps ~ eps, gave it a row of arbitrary size instead of zeros.
    x = x - x[:, :1]
    mean = x.mean(dim=1, keepdim=True)
    # unbiased, as the reference
    std = x.std(dim=1, keepdim=True, correction=1 if x.shape[1] > 1 else 0)
    return (x - mean) / (std + eps)


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def pkd_level_loss(
    feat_s: torch.Tensor, feat_t: torch.Tensor, resize_student: bool = True
) -> torch.Tensor:
    """
    PKD loss of one level: ``mse(norm_s, norm_t) / 2`` ~ ``(M-1)/M * mean_c (1 - r_c)`` with
    ``r_c`` the Pearson correlation of channel c between student and teacher.

    Args:
        feat_s (Tensor): student map, shape (N, C, Hs, Ws).
        feat_t (Tensor): teacher map, shape (N, C, H, W). If ``(Hs, Ws) != (H, W)`` the
            student map is resized bilinearly to (H, W) (``resize_student=True``) or the teacher
            map to (Hs, Ws) otherwise.
        resize_student (bool): which map is resized when the sizes differ (see feat_t).

    Returns:
        Tensor: scalar.
    """
    # Half-precision maps are summed in float32 (METHODS: distillation-loss arithmetic in fp32): a
    # sum over N*H*W values of a p2 map overflows fp16, and bf16 loses the difference of the
    # closed form's nearly equal terms. The gradient is cast back to the input's dtype by autograd.
    feat_s, feat_t = _as_float32(feat_s), _as_float32(feat_t)
    if feat_s.shape[:2] != feat_t.shape[:2]:
        raise ValueError(
            f"PKD: student map {tuple(feat_s.shape)} and teacher map {tuple(feat_t.shape)} "
            "differ in batch size or channels (use an adapter for channels)"
        )
    if feat_s.shape[2:] != feat_t.shape[2:]:  # also maps of equal height, other width
        if resize_student:
            feat_s = F.interpolate(
                feat_s, size=feat_t.shape[2:], mode="bilinear", align_corners=False
            )
        else:
            feat_t = F.interpolate(
                feat_t, size=feat_s.shape[2:], mode="bilinear", align_corners=False
            )
    if feat_t.requires_grad:  # a trainable "teacher": plain autograd on the definition
        return F.mse_loss(_standardize_channels(feat_s), _standardize_channels(feat_t)) / 2
    return _PKDLevelLoss.apply(feat_s, feat_t)


class _PKDLevelLoss(torch.autograd.Function):
    """
    ``mse(norm_s, norm_t) / 2`` for a student map s and a constant teacher map t, (N, C, H, W)
    each, from per-channel sums, with a closed-form backward.

    Per channel c (M = N*H*W values, Q = sum of squared deviations = (M-1) var,
    a = 1 / (std + eps), cov = sum (s - mean_s)(t - mean_t))::

        sum_m (norm_s - norm_t)^2 = a_s^2 Q_s - 2 a_s a_t cov + a_t^2 Q_t

    and the gradient with respect to s is ``(s - mean_s) A_c + (t - mean_t) B_c + D_c``
    (derived from the same expression). The forward writes the centred maps and three
    products that are summed at once, the backward one map; autograd on the standardised maps
    writes about ten maps and reduces with ``std`` (slow on CPUs). Equal to the definition,
    value and gradient (tested).
    """

    @staticmethod
    def forward(ctx, s, t):
        eps = 1e-6  # added to the std, as _standardize_channels
        dims, C = (0, 2, 3), s.shape[1]
        M = s.numel() // C
        # Centred maps, then plain sums (torch.var_mean over dims (0, 2, 3) is ~20x slower on CPU).
        # Each channel shifted by its first value first, as _standardize_channels: a constant
        # channel is centred to exact zeros, not to a rounding residue that 1 / (std + eps)
        # would scale up (float32 maps of one value gave losses from 0.07 to 0.9, not 0).
        sc = s - s[:1, :, :1, :1]
        sc.sub_(sc.mean(dim=dims, keepdim=True))
        tc = t - t[:1, :, :1, :1]
        tc.sub_(tc.mean(dim=dims, keepdim=True))
        q_s, q_t = (sc * sc).sum(dim=dims), (tc * tc).sum(dim=dims)  # (C,) = (M - 1) var
        cov = (sc * tc).sum(dim=dims)
        # M = 1 (batch 1, a 1x1 map): q = 0 and std 0, a constant channel (not 0 / 0)
        std_s, std_t = (q_s / max(M - 1, 1)).sqrt(), (q_t / max(M - 1, 1)).sqrt()
        a_s, a_t = 1.0 / (std_s + eps), 1.0 / (std_t + eps)
        per_channel = a_s**2 * q_s - 2 * a_s * a_t * cov + a_t**2 * q_t
        ctx.save_for_backward(sc, tc, std_s, a_s, a_t, cov, tc.sum(dim=dims))
        return per_channel.sum() / (2 * C * M)

    @staticmethod
    def backward(ctx, grad):
        sc, tc, std_s, a_s, a_t, cov, sum_tc = ctx.saved_tensors
        C = sc.shape[1]
        M = sc.numel() // C
        k = grad / (2 * C * M)
        # d/ds of a_s^2 Q_s, and of -2 a_s a_t cov through a_s (0 for a constant channel);
        # d cov / ds_m = tc_m - sum(tc) / M.
        ratio = torch.where(
            std_s > 0, cov / (max(M - 1, 1) * std_s.clamp(min=1e-30)), torch.zeros_like(cov)
        )
        A = 2 * (a_s**2 - a_s**3 * std_s) + 2 * a_t * a_s**2 * ratio
        B = -2 * a_t * a_s
        D = 2 * a_t * a_s * sum_tc / M
        view = lambda x: (k * x).view(1, C, 1, 1)  # noqa: E731
        out = sc * view(A)
        out.addcmul_(tc, view(B)).add_(view(D))
        return out, None


def pkd_loss(
    student_feats: Union[torch.Tensor, Sequence[torch.Tensor]],
    teacher_feats: Union[torch.Tensor, Sequence[torch.Tensor]],
    resize_student: bool = True,
) -> torch.Tensor:
    """
    Unweighted PKD loss summed over paired levels (METHODS.md 1.2-1.3).

    Args:
        student_feats, teacher_feats (Tensor or list[Tensor]): paired maps, each (N, C, H, W).
        resize_student (bool): per level, resize the student map to the teacher's size (True)
            or the teacher's to the student's when they differ (:func:`pkd_level_loss`).

    Returns:
        Tensor: scalar ``sum_l mse(norm_s_l, norm_t_l) / 2``.
    """
    if isinstance(student_feats, torch.Tensor):
        student_feats, teacher_feats = [student_feats], [teacher_feats]
    if len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"PKD: {len(student_feats)} student levels vs {len(teacher_feats)} teacher levels"
        )
    return sum(pkd_level_loss(s, t, resize_student) for s, t in zip(student_feats, teacher_feats))


class PKDDistiller(Distiller):
    """
    Distill the FPN features of any detectron2 detector pair with :paper:`PKD`.

    Only the teacher's backbone (+FPN) runs. Levels are paired by stride (default) or by index
    (mmrazor's heterogeneous settings, e.g. teacher p2-p5 with student p3-p6); the first
    ``num_levels`` pairs are distilled. Where the student's channels differ from the teacher's,
    a trainable 1x1 conv maps the student map to the teacher's channels (an affine map only
    mixes channels under the standardisation).

    Loss: ``loss_pkd = loss_weight * sum_levels pkd_level_loss``; per-level values go to the
    event storage as ``pkd/<student level>``.
    """

    def __init__(
        self,
        *,
        loss_weight: float = 6.0,
        num_levels: Optional[int] = 4,
        pair_by: str = "stride",
        student_levels: Optional[List[str]] = None,
        teacher_levels: Optional[List[str]] = None,
        resize_student: bool = True,
    ):
        """
        Args:
            loss_weight (float): alpha; 6 for a two-stage teacher, 10 for a one-stage teacher.
                A finite number >= 0 (0 turns the loss off).
            num_levels (int or None): distill the first ``num_levels`` level pairs (finest
                first); None for all pairs. A positive int.
            pair_by (str): "stride" or "index", see :func:`pair_fpn_levels`.
            student_levels, teacher_levels (list[str] or None): restrict to these features: a
                list of distinct names (``[p3, p4]`` in an override, not ``p3``), each of
                which must be distilled: a listed level left without a partner on the other
                side, or cut off by ``num_levels``, is an error at :meth:`bind` (set
                ``num_levels=None`` with explicit lists).
            resize_student (bool): when sizes differ, resize the student map (True) or the
                teacher's (False), bilinearly.

        Bad values are errors here, naming the argument (and its config key).
        """
        super().__init__()
        owner = type(self).__name__
        self.loss_weight = check_weight(owner, "loss_weight", loss_weight)
        self.num_levels = check_num_levels(num_levels, owner)
        self.pair_by = check_pair_by(pair_by, owner)
        self.student_levels = check_level_names("student_levels", student_levels, owner)
        self.teacher_levels = check_level_names("teacher_levels", teacher_levels, owner)
        self.resize_student = check_flag(owner, "resize_student", resize_student)
        self.pairs = []
        self.adapters = nn.ModuleDict()

    def bind(self, student, teacher):
        s_shapes, t_shapes = student.backbone.output_shape(), teacher.backbone.output_shape()
        self.pairs = pair_fpn_levels(
            s_shapes,
            t_shapes,
            num_levels=self.num_levels,
            pair_by=self.pair_by,
            student_levels=self.student_levels,
            teacher_levels=self.teacher_levels,
            strict=True,  # every level the config lists is distilled
        )
        for s, t in self.pairs:
            cs, ct = s_shapes[s].channels, t_shapes[t].channels
            if cs != ct:
                self.adapters[s] = nn.Conv2d(cs, ct, kernel_size=1)

    def forward(self, student_taps, teacher_taps, ctx) -> Dict[str, torch.Tensor]:
        feats_s, feats_t = student_taps["backbone"], teacher_taps["backbone"]
        total = 0.0
        for s, t in self.pairs:
            feat_s = feats_s[s]
            if s in self.adapters:
                feat_s = self.adapters[s](feat_s)
            level = pkd_level_loss(feat_s, feats_t[t], self.resize_student)
            put_scalar(f"pkd/{s}", level)
            total = total + level
        return {"loss_pkd": self.loss_weight * total}
