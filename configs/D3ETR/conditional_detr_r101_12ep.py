"""Conditional DETR R101-C5 (the teacher twin), 12 epochs. Train it first (the model zoo has no
DETR weights) and use its model_final.pth as the D3ETR teacher.

The model zoo's torchvision-converted ImageNet weights stop at ResNet-50 (``ImageNetPretrained/
torchvision/R-50.pkl``); its R-101 is MSRA's (BGR, std 1, stride in the 1x1 conv), not this
torchvision-style backbone. Convert torchvision's weights once with detectron2's
``tools/convert-torchvision-to-d2.py`` and point ``train.init_checkpoint`` at the result::

    wget https://download.pytorch.org/models/resnet101-63fe2227.pth
    python tools/convert-torchvision-to-d2.py resnet101-63fe2227.pth R-101.pkl
"""

from .conditional_detr_r50_12ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.stages.depth = 101
train.init_checkpoint = "R-101.pkl"  # converted from torchvision, see above
train.output_dir = "output/D3ETR/conditional_detr_r101_12ep"
