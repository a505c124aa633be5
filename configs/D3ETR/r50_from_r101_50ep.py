"""D3ETR R50 <- R101, 50 epochs (lr drop at 40). Paper: +2.4 AP over the 50-epoch baseline."""

from .conditional_detr_r50_50ep import lr_multiplier, train
from .r50_from_r101_12ep import dataloader, model, optimizer

train.teacher_checkpoint = "output/D3ETR/conditional_detr_r101_50ep/model_final.pth"
train.output_dir = "output/D3ETR/r50_from_r101_50ep"
