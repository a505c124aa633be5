"""
COCO data, SGD and schedules shared by the paper-setting configs (batch 16, detectron2's
schedules: 1x = 90k iterations ~ 12 epochs of 118k images; 2x = 180k, steps at 120k/160k).

These are detectron2's recipes, not the reference code's (METHODS.md 1.5, 3.5); the baseline
twins use the same, so the distilled-vs-baseline comparison is paired:

* training scale: detectron2's multi-scale short side 640-800 (max 1333), as ReviewKD's
  reference; PKD's mmdet configs train at a single scale (1333, 800) and GID's port mostly at a
  single short side 800. For those, override
  ``dataloader.train.mapper.augmentations.0.short_edge_length=800``;
* steps at 2/3 and 8/9 of training, 1x and 2x (mmdet: epochs 16 and 22 of 24; 8 and 11 of
  12); warm-up 1000 iterations from 0.001x (mmdet: 500).
"""

from detectron2 import model_zoo

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.use_instance_mask = False

optimizer = model_zoo.get_config("common/optim.py").SGD
optimizer.lr = 0.02

_schedules = model_zoo.get_config("common/coco_schedule.py")
lr_multiplier_1x = _schedules.lr_multiplier_1x
lr_multiplier_2x = _schedules.lr_multiplier_2x

# detectron2 model-zoo teachers (COCO 2017 val box AP of the model zoo in the comment).
TEACHERS = dict(
    retinanet_R_101_FPN_3x="detectron2://COCO-Detection/retinanet_R_101_FPN_3x/190397697/model_final_971ab9.pkl",  # noqa: E501  40.4
    faster_rcnn_R_101_FPN_3x="detectron2://COCO-Detection/faster_rcnn_R_101_FPN_3x/137851257/model_final_f6e8b1.pkl",  # noqa: E501  42.0
    mask_rcnn_R_101_FPN_3x="detectron2://COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x/138205316/model_final_a3ec72.pkl",  # noqa: E501  42.9
)
IMAGENET_R50 = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
