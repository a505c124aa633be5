"""
The demo student distilled by PKD from the demo teacher (FPN 128 -> 64 channels: PKD adds 1x1
adapters). Run after teacher_retinanet.py (`make demo` does both).
"""
from detectron2.config import LazyCall as L

from detkd import DistillationDetector
from detkd.losses import PKDDistiller

from .student_retinanet import dataloader, lr_multiplier, optimizer, train
from .student_retinanet import model as student
from .teacher_retinanet import model as teacher

model = L(DistillationDetector)(
    student=student,
    teacher=teacher,
    # One-stage teacher: alpha = 10 (METHODS.md 1.5).
    distillers={"pkd": L(PKDDistiller)(loss_weight=10.0, num_levels=4)},
)
train.teacher_checkpoint = "output/demo/teacher_retinanet/model_final.pth"
train.output_dir = "output/demo/pkd_retinanet"
