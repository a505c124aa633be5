"""Baseline twin: the same Faster R-CNN R50 student, schedule and data, trained alone."""

from .faster_rcnn_R50_from_faster_rcnn_R101_2x import (
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model = model.student
train.teacher_checkpoint = ""
train.output_dir = "output/GID/baseline_faster_rcnn_R50_2x"
