"""
The demo student distilled by ReviewKD from the demo teacher (ABFs map the student's 64 FPN
channels to the teacher's 128). Run after teacher_retinanet.py (`make demo METHOD=reviewkd`).
"""
from detectron2.config import LazyCall as L

from detkd.losses import ReviewKDDistiller

from .pkd_retinanet import dataloader, lr_multiplier, model, optimizer, train

model.distillers = {"reviewkd": L(ReviewKDDistiller)(loss_weight=1.0)}
train.output_dir = "output/demo/reviewkd_retinanet"
