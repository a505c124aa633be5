"""
The DETR demo teacher: wider backbone (width 32) and d = 96, 6 heads, same depth/queries.

Its backbone starts from the demo RetinaNet teacher's (the same width-32 R18 layout), as DETRs
start from ImageNet backbones: ``python -m detkd.demo --methods d3etr`` trains that RetinaNet and
writes its backbone with :func:`detkd.checkpoint.export_backbone` (by hand:
``export_backbone("output/demo/teacher_retinanet/model_final.pth", train.init_checkpoint)``).
"""

import copy

from .student_detr import dataloader, lr_multiplier, model, optimizer, train

# Copies: under a plain Python import (``from configs.demo.<this> import model``, which
# train_net.py's path allows) the student config's objects are shared, and the edits below
# would make the student a copy of the teacher (LazyConfig.load loads each file afresh).
model, train = copy.deepcopy(model), copy.deepcopy(train)

model.backbone.stem.out_channels = 32
model.backbone.stages.width = 32
model.position_embedding.num_pos_feats = 48
model.transformer.update(d_model=96, nhead=6, dim_feedforward=192)
train.output_dir = "output/demo/teacher_detr"
# Teachers train twice as long as students (as the model zoo's 3x teachers): the wider model
# converges more slowly from scratch, and at the students' 1000 iterations it was not yet better.
train.max_iter = 2 * train.max_iter
train.init_checkpoint = "output/demo/backbones/teacher_retinanet.pkl"
