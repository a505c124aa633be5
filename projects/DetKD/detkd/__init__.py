"""DetKD: knowledge distillation for Detectron2 detectors (PKD, ReviewKD, GID, D3ETR)."""

from .capture import FeatureCapture
from .checkpoint import export_backbone, export_student, load_student, load_teacher
from .distiller import DistillationDetector
from .engine import KDTrainer
from .losses import (
    D3ETRDistiller,
    Distiller,
    GIDDistiller,
    PKDDistiller,
    ReviewKDDistiller,
    pkd_loss,
)

__version__ = "0.1.0"
