"""Instant test: PKD and GID in one run, RetinaNet R50 student from the model zoo's RetinaNet
R101 (one teacher forward for both), 40 iterations on coco_2017_val_100
(``dev/run_instant_tests.sh``)."""

from detectron2.config import LazyCall as L

from detkd.losses import PKDDistiller

from ..common.instant_test import instant_test
from ..GID.retinanet_R50_from_retinanet_R101_2x import dataloader, model, optimizer, train

model.distillers.pkd = L(PKDDistiller)(loss_weight=10.0, num_levels=4)  # the PKD setting's
lr_multiplier = instant_test(
    dataloader, optimizer, train, "pkd_gid_retinanet_R50_from_R101_instant_test"
)
