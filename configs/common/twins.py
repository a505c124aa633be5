"""
Model-zoo detectors as LazyConfig nodes for teacher/student twins: each call site does
``get_config`` twice and applies its delta (e.g. ``teacher.backbone.bottom_up.stages.depth = 101``).
"""

from detectron2 import model_zoo

retinanet = model_zoo.get_config("common/models/retinanet.py").model
retinanet.backbone.bottom_up.freeze_at = 2

fcos = model_zoo.get_config("common/models/fcos.py").model
fcos.backbone.bottom_up.freeze_at = 2

mask_rcnn = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
mask_rcnn.backbone.bottom_up.freeze_at = 2

faster_rcnn = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
faster_rcnn.backbone.bottom_up.freeze_at = 2
faster_rcnn.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
