"""
The demo student distilled by PKD from the demo teacher (FPN 64 channels vs the teacher's 128:
PKD adds 1x1 adapters 64 -> 128). Run after teacher_retinanet.py (`make demo` does both).
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
    # alpha = 1, not the paper's 10 for a one-stage teacher (METHODS.md 1.5; configs/PKD keep it):
    # on this 1000-iteration demo alpha = 10 starts the PKD loss at ~13x the detection loss (40
    # vs 3) and the students lost AP (-1.34 +- 3.26 over five seeds); alpha = 1 starts both at the
    # same scale (alpha * L_pkd(0) ~ L_det(0)), a rule fixed before the runs, one setting, no
    # search. Five seeds: +4.39 +- 6.26 AP, held-out +7.17 +- 4.70 (README, Results: Demo).
    distillers={"pkd": L(PKDDistiller)(loss_weight=1.0, num_levels=4)},
)
train.teacher_checkpoint = "output/demo/teacher_retinanet/model_final.pth"
train.output_dir = "output/demo/pkd_retinanet"
