"""Instant test: GID, FCOS R50 student from the model zoo's RetinaNet R101 (location selection),
40 iterations on coco_2017_val_100 (``dev/run_instant_tests.sh``)."""

from ..common.instant_test import instant_test
from ..GID.fcos_R50_from_retinanet_R101_1x import dataloader, model, optimizer, train

lr_multiplier = instant_test(
    dataloader, optimizer, train, "gid_fcos_R50_from_retinanet_R101_instant_test"
)
