"""
D3ETR: Conditional DETR R50-C5 student distilled from a Conditional DETR R101-C5 teacher with
MixMatcher (adaptive + fixed matching), prediction and attention-map distillation.
Paper: +7.8 AP at 12 epochs (+8.3 in the IJCAI'24 version), +2.4 at 50 epochs.
Set train.teacher_checkpoint to the R101 run's model_final.pth (conditional_detr_r101_*.py).
The paper does not say how long its teacher was trained; this config uses the 12-epoch R101 run.
For the fully trained teacher (42.8 AP in the Conditional DETR paper), pass
train.teacher_checkpoint=output/D3ETR/conditional_detr_r101_50ep/model_final.pth.
"""
from detectron2.config import LazyCall as L

from detkd import DistillationDetector
from detkd.losses import D3ETRDistiller

from .conditional_detr_r101_12ep import model as teacher
from .conditional_detr_r50_12ep import dataloader, lr_multiplier, optimizer, train
from .conditional_detr_r50_12ep import model as student

model = L(DistillationDetector)(
    student=student,
    teacher=teacher,
    distillers={"d3etr": L(D3ETRDistiller)()},
)
train.teacher_checkpoint = "output/D3ETR/conditional_detr_r101_12ep/model_final.pth"
train.output_dir = "output/D3ETR/r50_from_r101_12ep"
