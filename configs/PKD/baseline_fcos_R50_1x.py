"""Baseline twin: the same FCOS R50 student, schedule and data, trained alone."""

from .fcos_R50_from_retinanet_R101_1x import dataloader, lr_multiplier, model, optimizer, train

model = model.student
train.teacher_checkpoint = ""
train.output_dir = "output/PKD/baseline_fcos_R50_1x"
