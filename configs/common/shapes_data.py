"""
Data loaders of the synthetic shapes dataset (``detkd.data.shapes``): written once under
``$DETKD_DATASETS`` (default ./datasets), read by detectron2's COCO loader, evaluated by
COCOEvaluator. Images are 96-160 px with 3 classes, so no resizing is needed.
"""

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from detkd.data.shapes import register_shapes

dataloader = model_zoo.get_config("common/data/coco.py").dataloader

dataloader.train.dataset.names = L(register_shapes)(split="train", num_images=512)
dataloader.train.mapper.augmentations = [L(T.RandomFlip)(horizontal=True)]
dataloader.train.mapper.use_instance_mask = False
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 1

dataloader.test.dataset.names = L(register_shapes)(split="val", num_images=128)
dataloader.test.mapper.augmentations = []
dataloader.test.num_workers = 1
