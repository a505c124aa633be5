"""Distillers and losses, one file per method."""

from .base import DistillContext, Distiller, pair_fpn_levels, put_scalar, zero_loss
from .pkd import PKDDistiller, pkd_level_loss, pkd_loss
from .reviewkd import ABF, ReviewKDDistiller, hcl_loss, hcl_level_loss
from .gid import GIDDistiller, relation_loss, select_general_instances
from .d3etr import D3ETRDistiller
