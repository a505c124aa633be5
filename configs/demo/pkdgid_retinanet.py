"""PKD and GID composed in one run: one teacher pass (backbone + head) feeds both distillers."""

from detectron2.config import LazyCall as L

from detkd.losses import GIDDistiller, PKDDistiller

from .pkd_retinanet import dataloader, lr_multiplier, model, optimizer, train

model.distillers = {
    "pkd": L(PKDDistiller)(loss_weight=1.0, num_levels=4),  # alpha: see pkd_retinanet.py
    "gid": L(GIDDistiller)(min_size=6.0, pre_nms_topk=1000),
}
train.output_dir = "output/demo/pkdgid_retinanet"
