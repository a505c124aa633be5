"""Instant test: PKD, RetinaNet R50 student from the model zoo's Mask R-CNN R101 (a
heterogeneous pair), 40 iterations on coco_2017_val_100 (``dev/run_instant_tests.sh``)."""

from ..common.instant_test import instant_test
from ..PKD.retinanet_R50_from_mask_rcnn_R101_2x import dataloader, model, optimizer, train

lr_multiplier = instant_test(
    dataloader, optimizer, train, "pkd_retinanet_R50_from_mask_rcnn_R101_instant_test"
)
