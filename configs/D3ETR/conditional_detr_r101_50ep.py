"""Conditional DETR R101-C5, 50 epochs (lr drop at 40): 50 * 7329 = 366.5k iterations."""

from .conditional_detr_r50_12ep import ITERS_PER_EPOCH
from .conditional_detr_r101_12ep import dataloader, lr_multiplier, model, optimizer, train

lr_multiplier.scheduler.milestones = [40 * ITERS_PER_EPOCH]
lr_multiplier.scheduler.num_updates = 50 * ITERS_PER_EPOCH
train.max_iter = 50 * ITERS_PER_EPOCH
train.output_dir = "output/D3ETR/conditional_detr_r101_50ep"
