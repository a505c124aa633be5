"""
PKD for a small, fast student from a two-stage model-zoo teacher: RetinaNet R18-FPN student,
Mask R-CNN R101-FPN 3x teacher (model zoo, 42.9 box AP). No published number for this pair:
the PKD paper's heterogeneous setting (retinanet_R50_from_mask_rcnn_R101_2x.py) with an R18
backbone. Two-stage teacher: alpha = 6. Baseline twin: baseline_retinanet_R18_2x.py.

The model zoo has no ResNet-18: convert torchvision's ImageNet weights with detectron2's
``tools/convert-torchvision-to-d2.py`` and point ``train.init_checkpoint`` at the result. Such a
student takes RGB input with torchvision's mean/std while the MSRA-style teacher takes BGR with
std 1: DistillationDetector flips the channels and normalises for the teacher by itself.
"""

from .retinanet_R50_from_mask_rcnn_R101_2x import dataloader, lr_multiplier, model, optimizer, train

bottom_up = model.student.backbone.bottom_up
bottom_up.stages.depth = 18
del bottom_up.stages.stride_in_1x1  # BasicBlock has no 1x1 conv
model.student.backbone.top_block.in_channels = 512  # P6 from R18's res5 (512 channels, not 2048)
model.student.input_format = "RGB"
model.student.pixel_mean = [123.675, 116.28, 103.53]
model.student.pixel_std = [58.395, 57.12, 57.375]
dataloader.train.mapper.image_format = "RGB"
train.init_checkpoint = "R-18.pkl"  # converted from torchvision, see above
train.output_dir = "output/PKD/retinanet_R18_from_mask_rcnn_R101_2x"
