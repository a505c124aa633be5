"""
A narrow RetinaNet for the CPU demo and tests: detectron2's ``common/models/retinanet.py``
with a ResNet-18 layout of width 16, a 64-channel FPN (P6 from P5 as FCOS does), a 2-conv
head, anchors sized for 96-160 px images, 3 classes, and BatchNorm (trained from scratch).
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from detkd.modeling.resnet import basic_resnet_stages

model = model_zoo.get_config("common/models/retinanet.py").model

bottom_up = model.backbone.bottom_up
bottom_up.stem.out_channels = 16
bottom_up.stem.norm = "BN"
bottom_up.stages = L(basic_resnet_stages)(depth=18, width="${..stem.out_channels}", norm="BN")
bottom_up.freeze_at = 0
model.backbone.out_channels = 64
model.backbone.top_block.in_feature = "p5"
model.backbone.top_block.in_channels = "${..out_channels}"
model.head.input_shape = [ShapeSpec(channels=64)] * 5
model.head.conv_dims = [64, 64]
model.anchor_generator.sizes = [
    [x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [16, 32, 64, 128, 256]
]
model.num_classes = 3
