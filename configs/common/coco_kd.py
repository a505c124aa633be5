"""
COCO data, SGD and schedules shared by the paper-setting configs (batch 16, detectron2's
schedules: 1x = 90k iterations ~ 12 epochs of 118k images; 2x = 180k, steps at 120k/160k).
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
