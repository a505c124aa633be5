"""
PKD across detector families: RetinaNet R50 student, Mask R-CNN R101-FPN 3x teacher (model zoo,
42.9 box AP). Paper (Mask R-CNN Swin-S teacher): student 37.4 -> 41.5. Two-stage teacher:
alpha = 6. Levels are paired by index, as mmrazor's setting behind the paper's 41.5 (METHODS.md
1.4): teacher p2-p5 with student p3-p6, each student map resized bilinearly to its teacher
level's size. `model.distillers.pkd.pair_by=stride` pairs equal strides instead (teacher p3-p6
with student p3-p6; DetKD's default).
Baseline twin: baseline_retinanet_R50_2x.py.
"""

from .retinanet_R50_from_retinanet_R101_2x import (
    L,
    PKDDistiller,
    TEACHERS,
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)
from ..common.twins import mask_rcnn as teacher

teacher.backbone.bottom_up.stages.depth = 101
model.teacher = teacher
model.distillers = {"pkd": L(PKDDistiller)(loss_weight=6.0, num_levels=4, pair_by="index")}
train.teacher_checkpoint = TEACHERS["mask_rcnn_R_101_FPN_3x"]
train.output_dir = "output/PKD/retinanet_R50_from_mask_rcnn_R101_2x"
