"""Conditional DETR R101-C5 (the teacher twin), 12 epochs. Train it first (the model zoo has no
DETR weights) and use its model_final.pth as the D3ETR teacher."""
from .conditional_detr_r50_12ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.stages.depth = 101
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-101.pkl"
train.output_dir = "output/D3ETR/conditional_detr_r101_12ep"
