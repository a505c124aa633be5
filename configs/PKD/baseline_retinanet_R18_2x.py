"""Baseline twin: the same RetinaNet R18 student, schedule and data, trained alone."""

from .retinanet_R18_from_mask_rcnn_R101_2x import dataloader, lr_multiplier, model, optimizer, train

model = model.student
train.teacher_checkpoint = ""
train.output_dir = "output/PKD/baseline_retinanet_R18_2x"
