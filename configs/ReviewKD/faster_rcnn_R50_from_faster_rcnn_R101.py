"""
ReviewKD: Faster R-CNN R50-FPN student, Faster R-CNN R101-FPN 3x teacher (model zoo, 42.0 AP).
Paper (COCO val): student 37.93 -> 40.36 (teacher 42.04). Loss weight 1.0 on p2-p6.
Schedule of the reference code: batch 8, lr 0.01, 180k iterations (steps 120k / 160k),
i.e. detectron2's 1x at half batch = 12 epochs; multi-scale training 640-800, max 1333.
"""

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detkd import DistillationDetector
from detkd.losses import ReviewKDDistiller

from ..common.coco_kd import IMAGENET_R50, TEACHERS, dataloader, optimizer
from ..common.kd_train import train
from ..common.twins import faster_rcnn as student
from ..common.twins import faster_rcnn as teacher

teacher.backbone.bottom_up.stages.depth = 101

model = L(DistillationDetector)(
    student=student,
    teacher=teacher,
    distillers={"reviewkd": L(ReviewKDDistiller)(loss_weight=1.0)},
)

dataloader.train.total_batch_size = 8
optimizer.lr = 0.01
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[120000, 160000], num_updates=180000
    ),
    warmup_length=1000 / 180000,
    warmup_factor=0.001,
)
train.max_iter = 180000
train.init_checkpoint = IMAGENET_R50
train.teacher_checkpoint = TEACHERS["faster_rcnn_R_101_FPN_3x"]
train.output_dir = "output/ReviewKD/faster_rcnn_R50_from_faster_rcnn_R101"
