"""
PKD: FCOS R50-FPN student, RetinaNet R101-FPN 3x teacher (the model zoo has no FCOS weights).
Paper (mmdet, FCOS X101 -> RetinaNet R50, 1x): 36.5 -> 40.3; (Mask R-CNN Swin -> FCOS R50):
39.1 -> 43.9. One-stage teacher: alpha = 10. 1x = 90k iterations at batch 16, lr 0.01.
For a Mask R-CNN teacher: `model.teacher` from mask_rcnn_R101 as in
retinanet_R50_from_mask_rcnn_R101_2x.py and alpha = 6.
"""

from detectron2.config import LazyCall as L

from detkd import DistillationDetector
from detkd.losses import PKDDistiller

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
    distillers={"pkd": L(PKDDistiller)(loss_weight=10.0, num_levels=4)},
)

optimizer.lr = 0.01
train.max_iter = 90000
train.init_checkpoint = IMAGENET_R50
train.teacher_checkpoint = TEACHERS["retinanet_R_101_FPN_3x"]
train.output_dir = "output/PKD/fcos_R50_from_retinanet_R101_1x"
