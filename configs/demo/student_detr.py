"""
The DETR demo student trained alone: the tiny Conditional DETR on the shapes data.

Its backbone starts from the demo RetinaNet student alone's (seed 0; the same width-16 R18
layout), as DETRs start from ImageNet backbones; so does the distilled student
(``d3etr_detr.py``). ``python -m detkd.demo --methods d3etr`` trains that RetinaNet and writes
its backbone with :func:`detkd.checkpoint.export_backbone` (by hand:
``export_backbone("output/demo/student_retinanet/model_final.pth", train.init_checkpoint)``).
"""

from ..common.demo_schedule import lr_multiplier, optimizer
from ..common.kd_train import train
from ..common.models.tiny_detr import model
from ..common.shapes_data import dataloader

optimizer.lr = 2e-4
train.max_iter = 1000
train.eval_period = 0
train.checkpointer.period = 500
train.log_period = 50
train.device = "cpu"
train.output_dir = "output/demo/student_detr"
train.init_checkpoint = "output/demo/backbones/student_retinanet.pkl"
