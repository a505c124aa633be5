"""The DETR demo student trained alone: the tiny Conditional DETR on the shapes data."""
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
