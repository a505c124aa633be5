"""
The demo student distilled by GID from the demo teacher: 10 general instances per image,
ROIAlign features (1x1 adapter 64 -> 128 channels), relation and response. GI boxes with a side
of at most 6 px are dropped (the paper's 10 px is for ~800 px COCO images; demo images are
96-160 px).
Run after teacher_retinanet.py (`make demo METHOD=gid`).
"""

from detectron2.config import LazyCall as L

from detkd.losses import GIDDistiller

from .pkd_retinanet import dataloader, lr_multiplier, model, optimizer, train

model.distillers = {"gid": L(GIDDistiller)(min_size=6.0, pre_nms_topk=1000)}
train.output_dir = "output/demo/gid_retinanet"
