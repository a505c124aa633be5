"""
The tiny DETR student distilled by D3ETR from the DETR demo teacher (hidden 64 vs 96: the
teacher's queries reach the auxiliary group through a trainable projection).
Run after teacher_detr.py; like student_detr.py, its backbone starts from the demo RetinaNet
student's (`make demo METHOD=d3etr` trains and writes all of them).
"""

from detectron2.config import LazyCall as L

from detkd import DistillationDetector
from detkd.losses import D3ETRDistiller

from .student_detr import dataloader, lr_multiplier, optimizer, train
from .student_detr import model as student
from .teacher_detr import model as teacher

model = L(DistillationDetector)(
    student=student,
    teacher=teacher,
    distillers={"d3etr": L(D3ETRDistiller)()},
)
train.teacher_checkpoint = "output/demo/teacher_detr/model_final.pth"
train.output_dir = "output/demo/d3etr_detr"
