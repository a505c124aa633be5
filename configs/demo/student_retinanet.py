"""The demo student trained alone: the narrow RetinaNet (R18 layout, width 16, FPN 64)."""
from ..common.demo_schedule import lr_multiplier, optimizer
from ..common.kd_train import train
from ..common.models.tiny_retinanet import model
from ..common.shapes_data import dataloader

train.max_iter = 1000
train.eval_period = 0  # evaluated once at the end
train.checkpointer.period = 500
train.log_period = 50
train.device = "cpu"
train.output_dir = "output/demo/student_retinanet"
