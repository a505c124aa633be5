"""AdamW + warm-up + step schedule of the CPU demo (from-scratch BN models, batch 8).
AdamW rather than SGD: from-scratch training of the narrow models diverged with SGD 0.02."""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 1e-3
optimizer.weight_decay = 1e-4

# Milestones are in percent of train.max_iter, so `train.max_iter=...` overrides stay valid.
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[80], num_updates=100),
    warmup_length=0.05,
    warmup_factor=0.01,
)
