"""Detectors DetKD adds to detectron2."""
from .detr import (
    ConditionalDETR,
    ConditionalDETRTransformer,
    HungarianMatcher,
    PositionEmbeddingSine,
    detr_param_groups,
)
from .resnet import basic_resnet_stages
