"""
GID: FCOS R50-FPN student, RetinaNet R101-FPN 3x teacher (the model zoo has no FCOS weights).
Paper (FCOS R101 -> R50): 38.5 -> 42.0. Feature and relation terms only: the heads differ (1 vs 9
predictions per location), so there is no response term, and [INFER] GIs are selected per
location (the best anchor of each location of equal stride, class scores of both sides).
1x: 90k iterations at batch 16, lr 0.01.
"""

from detectron2.config import LazyCall as L

from detkd import DistillationDetector
from detkd.losses import GIDDistiller

from ..common.coco_kd import IMAGENET_R50, TEACHERS, dataloader, optimizer
from ..common.coco_kd import lr_multiplier_1x as lr_multiplier
from ..common.kd_train import train
from ..common.twins import fcos as student
from ..common.twins import retinanet as teacher

teacher.backbone.bottom_up.stages.depth = 101

model = L(DistillationDetector)(
    student=student,
    teacher=teacher,
    # detectron2's FCOS declares no input_format: the loader's order, checked against the teacher's
    student_input_format=dataloader.train.mapper.image_format,
    distillers={"gid": L(GIDDistiller)(selection="location", response=False)},
)

optimizer.lr = 0.01
train.max_iter = 90000
train.init_checkpoint = IMAGENET_R50
train.teacher_checkpoint = TEACHERS["retinanet_R_101_FPN_3x"]
train.output_dir = "output/GID/fcos_R50_from_retinanet_R101_1x"
