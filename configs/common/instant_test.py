"""
The instant-test schedule of the GPU smoke tier (``dev/run_instant_tests.sh``), as detectron2's
``configs/quick_schedules/*_instant_test.yaml``: 40 iterations on ``coco_2017_val_100`` (the
first 100 COCO val images; ``$DETECTRON2_DATASETS/coco/annotations/instances_val2017_100.json``)
at lr 0.005 (dropped 10x at iteration 30), then COCOEvaluator on the same 100 images. The model
is the paper setting's, unchanged: the tier checks that a paper config trains, distills and
evaluates on real COCO images and full-size models, not its accuracy.
"""

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

INSTANT_ITERS = 40


def instant_test(dataloader, optimizer, train, name, lr=0.005):
    """
    Turn a paper setting's ``dataloader``, ``optimizer`` and ``train`` into the instant test
    ``name`` (in place) and return its ``lr_multiplier``.

    Args:
        lr (float): detectron2's instant-test lr for SGD at batch 4; the DETR settings pass their
            own AdamW lr.
    """
    dataloader.train.dataset.names = "coco_2017_val_100"
    dataloader.test.dataset.names = "coco_2017_val_100"
    dataloader.train.total_batch_size = 4  # run_instant_tests.sh: 2 images per GPU
    dataloader.train.num_workers = 2
    dataloader.test.num_workers = 2
    optimizer.lr = lr
    train.max_iter = INSTANT_ITERS
    train.eval_period = INSTANT_ITERS
    train.checkpointer.period = INSTANT_ITERS
    train.log_period = 10
    train.output_dir = f"output/quick_schedules/{name}"
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[1.0, 0.1], milestones=[30], num_updates=INSTANT_ITERS
        ),
        warmup_length=0.0,
        warmup_factor=1.0,
    )
