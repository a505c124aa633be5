"""Baseline twin: the same RetinaNet R50 student, schedule and data, trained alone."""

from .retinanet_R50_from_retinanet_R101_2x import dataloader, lr_multiplier, model, optimizer, train

model = model.student
train.teacher_checkpoint = ""
train.output_dir = "output/PKD/baseline_retinanet_R50_2x"
