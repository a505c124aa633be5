"""Detectors DetKD adds to detectron2."""

from .detr import (
    Attention,
    ConditionalDETR,
    ConditionalDETRTransformer,
    Dropout,
    HungarianMatcher,
    PositionEmbeddingSine,
    detr_param_groups,
)
from .resnet import basic_resnet_stages
from .from_yacs import build_yacs_detector, load_yacs_config
