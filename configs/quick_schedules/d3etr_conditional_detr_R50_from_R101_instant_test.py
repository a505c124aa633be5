"""Instant test: D3ETR, Conditional DETR R50 student from a Conditional DETR R101 teacher, 40
iterations on coco_2017_val_100 (``dev/run_instant_tests.sh``). The model zoo has no DETR
teacher, so the teacher starts from random weights here: the test checks that MixMatcher and
the attention-map terms run on full-size models, not what they learn."""

from ..common.instant_test import instant_test
from ..D3ETR.r50_from_r101_12ep import dataloader, model, optimizer, train

lr_multiplier = instant_test(
    dataloader, optimizer, train, "d3etr_conditional_detr_R50_from_R101_instant_test", lr=1e-4
)
train.teacher_checkpoint = ""
train.teacher_random_init = True
