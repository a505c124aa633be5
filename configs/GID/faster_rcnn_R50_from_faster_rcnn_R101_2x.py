"""
GID: Faster R-CNN R50-FPN student, Faster R-CNN R101-FPN 3x teacher (model zoo, 42.0 AP).
Paper (COCO): student 38.3 -> 40.2 (R101 teacher 39.6). [INFER] GIs from RPN objectness and
proposals, response on RPN objectness/deltas with the RPN's anchor matcher (0.3 / 0.7),
features and relation on p2-p5; the R-CNN head is not distilled.
"""

from .retinanet_R50_from_retinanet_R101_2x import (
    L,
    GIDDistiller,
    TEACHERS,
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)
from ..common.twins import faster_rcnn as student
from ..common.twins import faster_rcnn as teacher

teacher.backbone.bottom_up.stages.depth = 101
model.student = student
model.teacher = teacher
model.distillers = {"gid": L(GIDDistiller)(num_levels=4)}
optimizer.lr = 0.02
train.teacher_checkpoint = TEACHERS["faster_rcnn_R_101_FPN_3x"]
train.output_dir = "output/GID/faster_rcnn_R50_from_faster_rcnn_R101_2x"
