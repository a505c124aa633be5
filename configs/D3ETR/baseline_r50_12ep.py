"""Baseline twin of r50_from_r101_12ep.py: Conditional DETR R50-C5 alone, same schedule."""

from .conditional_detr_r50_12ep import dataloader, lr_multiplier, model, optimizer, train
