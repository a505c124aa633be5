"""
A Conditional DETR small enough for the CPU demo and tests: narrow ResNet-18 layout (width 16,
BN, trained from scratch), encoder on res4 (stride 16), d = 64, 4 heads, 2 + 3 layers, 30
queries, 3 classes.
"""

from detectron2.config import LazyCall as L

from detkd.modeling.resnet import basic_resnet_stages

from .conditional_detr import model

model.backbone.stem.update(out_channels=16, norm="BN")
model.backbone.stages = L(basic_resnet_stages)(depth=18, width=16, norm="BN")
model.backbone.out_features = ["res4"]
model.backbone.freeze_at = 0
model.in_feature = "res4"
model.position_embedding.num_pos_feats = 32
model.transformer.update(
    d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=128
)
model.num_queries = 30
model.num_classes = 3
model.pixel_mean = [103.530, 116.280, 123.675]
model.pixel_std = [57.375, 57.120, 58.395]
model.input_format = "BGR"
