"""
ReviewKD: Faster R-CNN R18-FPN student, Faster R-CNN R101-FPN 3x teacher.
Paper (COCO val): student 33.26 -> 36.75. Loss weight 1.2.

The model zoo has no ResNet-18: convert torchvision's ImageNet weights with detectron2's
``tools/convert-torchvision-to-d2.py`` and point ``train.init_checkpoint`` at the result. Such a
student takes RGB input with torchvision's mean/std while the MSRA-style teacher takes BGR with
std 1: DistillationDetector flips the channels and normalises for the teacher by itself.
"""

from .faster_rcnn_R50_from_faster_rcnn_R101 import (
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

bottom_up = model.student.backbone.bottom_up
bottom_up.stages.depth = 18
del bottom_up.stages.stride_in_1x1  # BasicBlock has no 1x1 conv
model.student.input_format = "RGB"
model.student.pixel_mean = [123.675, 116.28, 103.53]
model.student.pixel_std = [58.395, 57.12, 57.375]
dataloader.train.mapper.image_format = "RGB"
model.distillers.reviewkd.loss_weight = 1.2
train.init_checkpoint = "R-18.pkl"  # converted from torchvision, see above
train.output_dir = "output/ReviewKD/faster_rcnn_R18_from_faster_rcnn_R101"
