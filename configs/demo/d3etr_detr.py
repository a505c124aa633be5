"""
The tiny DETR student distilled by D3ETR from the DETR demo teacher (hidden 64 vs 96: the
teacher's queries reach the auxiliary group through a trainable projection).
`make demo METHOD=d3etr` (uses detr_teacher.py / detr_student.py).
"""
from detectron2.config import LazyCall as L

from detkd import DistillationDetector
from detkd.losses import D3ETRDistiller

from .detr_student import dataloader, lr_multiplier, optimizer, train
from .detr_student import model as student
from .detr_teacher import model as teacher

model = L(DistillationDetector)(
    student=student,
    teacher=teacher,
    distillers={"d3etr": L(D3ETRDistiller)()},
)
train.output_dir = "output/demo/d3etr_detr"
