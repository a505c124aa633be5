"""The DETR demo teacher: wider backbone (width 32) and d = 96, 6 heads, same depth/queries."""
from .student_detr import dataloader, lr_multiplier, model, optimizer, train

model.backbone.stem.out_channels = 32
model.backbone.stages.width = 32
model.position_embedding.num_pos_feats = 48
model.transformer.update(d_model=96, nhead=6, dim_feedforward=192)
train.output_dir = "output/demo/teacher_detr"
