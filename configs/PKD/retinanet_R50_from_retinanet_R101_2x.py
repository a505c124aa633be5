"""
PKD: RetinaNet R50-FPN student, RetinaNet R101-FPN 3x teacher (detectron2 model zoo, 40.4 AP).
Paper (mmdet, RetinaNet X101 teacher, 2x): student 37.4 -> 40.8 AP. One-stage teacher: alpha = 10.
2x = 180k iterations at batch 16 (24 epochs), lr 0.01, steps at 120k / 160k.
"""

from detectron2.config import LazyCall as L

from detkd import DistillationDetector
from detkd.losses import PKDDistiller

from ..common.coco_kd import IMAGENET_R50, TEACHERS, dataloader, optimizer
from ..common.coco_kd import lr_multiplier_2x as lr_multiplier
from ..common.kd_train import train
from ..common.twins import retinanet as student
from ..common.twins import retinanet as teacher

teacher.backbone.bottom_up.stages.depth = 101

model = L(DistillationDetector)(
    student=student,
    teacher=teacher,
    distillers={"pkd": L(PKDDistiller)(loss_weight=10.0, num_levels=4)},
)

optimizer.lr = 0.01
train.max_iter = 180000
train.init_checkpoint = IMAGENET_R50
train.teacher_checkpoint = TEACHERS["retinanet_R_101_FPN_3x"]
train.output_dir = "output/PKD/retinanet_R50_from_retinanet_R101_2x"
