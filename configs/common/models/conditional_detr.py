"""
Conditional DETR R50-C5 (paper settings): 6 encoder / 6 decoder layers, 300 queries, d = 256,
8 heads, FFN 2048, dropout 0.1; focal loss 2, L1 5, GIoU 2 (matcher costs 2/5/2). The backbone
as DETR's: frozen BN, stem and res2 frozen (torchvision's layer1; DETR trains layer2..layer4).
"""

from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet

from detkd.modeling import (
    ConditionalDETR,
    ConditionalDETRTransformer,
    HungarianMatcher,
    PositionEmbeddingSine,
)

model = L(ConditionalDETR)(
    backbone=L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=False, norm="FrozenBN"),
        out_features=["res5"],
        freeze_at=2,  # stem + res2, as DETR's backbone
    ),
    in_feature="res5",
    position_embedding=L(PositionEmbeddingSine)(num_pos_feats=128),
    transformer=L(ConditionalDETRTransformer)(
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=2048,
        dropout=0.1,
    ),
    matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
    num_classes=80,
    num_queries=300,
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
)
