"""Instant test: ReviewKD, Faster R-CNN R50 student from the model zoo's Faster R-CNN R101,
40 iterations on coco_2017_val_100 (``dev/run_instant_tests.sh``)."""

from ..common.instant_test import instant_test
from ..ReviewKD.faster_rcnn_R50_from_faster_rcnn_R101 import dataloader, model, optimizer, train

lr_multiplier = instant_test(
    dataloader, optimizer, train, "reviewkd_faster_rcnn_R50_from_R101_instant_test"
)
