"""
Conditional DETR R50-C5 trained alone (the D3ETR baseline), paper settings: AdamW lr 1e-4
(backbone 1e-5), weight decay 1e-4, gradient clipping 0.1 (max norm), batch 16, and DETR's
training augmentation (flip; short edge 480..800, or a resize to 400/500/600 and a random crop
of 384..600 px sides first, each half of the time).
12 epochs of COCO's 117k annotated train images at batch 16 = 87.9k iterations; lr drop at
epoch 11 (80.6k).
Conditional DETR paper: R50 50 epochs 40.9 AP, R101 50 epochs 42.8 AP.
"""

import torch

from detectron2.config import LazyCall as L
from detectron2.data import transforms as T
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detkd.modeling import detr_param_groups

from ..common.coco_kd import dataloader
from ..common.kd_train import train
from ..common.models.conditional_detr import model

dataloader.train.mapper.image_format = "RGB"
# DETR's make_coco_transforms (datasets/coco.py of DETR and Conditional DETR): its RandomSelect
# of "resize" and "resize, crop, resize" is the crop branch's first two steps applied to half of
# the images, then the common resize. Test: ResizeShortestEdge(800, 1333), detectron2's default.
DETR_SCALES = tuple(range(480, 801, 32))
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.RandomApply)(
        tfm_or_aug=L(T.AugmentationList)(
            augs=[
                L(T.ResizeShortestEdge)(short_edge_length=(400, 500, 600), sample_style="choice"),
                L(T.RandomCrop)(crop_type="absolute_range", crop_size=(384, 600)),
            ]
        ),
        prob=0.5,
    ),
    L(T.ResizeShortestEdge)(short_edge_length=DETR_SCALES, max_size=1333, sample_style="choice"),
]
optimizer = L(torch.optim.AdamW)(
    params=L(detr_param_groups)(lr="${..lr}", backbone_lr_factor=0.1, weight_decay=1e-4),
    lr=1e-4,
    weight_decay=1e-4,
)
ITERS_PER_EPOCH = 117266 // 16  # 7329: the train2017 images with annotations (filter_empty=True)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1], milestones=[11 * ITERS_PER_EPOCH], num_updates=12 * ITERS_PER_EPOCH
    ),
    warmup_length=0.0,
    warmup_factor=1.0,
)
train.max_iter = 12 * ITERS_PER_EPOCH
train.clip_grad = dict(enabled=True, max_norm=0.1)  # KDTrainer: clip the global grad norm
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
train.output_dir = "output/D3ETR/conditional_detr_r50_12ep"
