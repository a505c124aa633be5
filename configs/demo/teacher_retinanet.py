"""The demo teacher: a wider RetinaNet (R18 layout, width 32, FPN 128, 3-conv head)."""

import copy

from detectron2.layers import ShapeSpec

from .student_retinanet import dataloader, lr_multiplier, model, optimizer, train

# Copies: under a plain Python import (``from configs.demo.<this> import model``, which
# train_net.py's path allows) the student config's objects are shared, and the edits below
# would make the student a copy of the teacher (LazyConfig.load loads each file afresh).
model, train = copy.deepcopy(model), copy.deepcopy(train)

model.backbone.bottom_up.stem.out_channels = 32
model.backbone.out_channels = 128
model.head.input_shape = [ShapeSpec(channels=128)] * 5
model.head.conv_dims = [128, 128, 128]

train.output_dir = "output/demo/teacher_retinanet"
# Teachers train twice as long as students (as the model zoo's 3x teachers): the wider model
# converges more slowly from scratch, and at the students' 1000 iterations it was not yet better.
train.max_iter = 2 * train.max_iter
