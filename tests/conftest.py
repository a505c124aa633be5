"""Shared fixtures: tiny detectors built from the project's LazyConfigs, on the CPU."""

import os

import torch
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances

from detkd import DistillationDetector
from detkd.modeling.resnet import basic_resnet_stages

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 2 threads in all: each of pytest-xdist's worker processes (`make test`) gets its share
torch.set_num_threads(max(1, 2 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(scope="session", autouse=True)
def shapes_root(tmp_path_factory):
    """The synthetic datasets are written to a per-session folder."""
    root = str(tmp_path_factory.mktemp("datasets"))
    os.environ["DETKD_DATASETS"] = root
    return root


def load_config(rel_path):
    return LazyConfig.load(os.path.join(REPO, rel_path))


def tiny_retinanet_cfg(width=16, fpn=64, num_classes=3):
    """The demo RetinaNet config, optionally wider."""
    model = load_config("configs/common/models/tiny_retinanet.py").model
    model.backbone.bottom_up.stem.out_channels = width
    model.backbone.out_channels = fpn
    model.head.input_shape = [ShapeSpec(channels=fpn)] * 5
    model.head.conv_dims = [fpn, fpn]
    model.num_classes = num_classes
    return model


def tiny_faster_rcnn_cfg(width=16, fpn=64, num_classes=3):
    """detectron2's Mask R-CNN FPN config without masks, with a narrow backbone."""
    model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    bottom_up = model.backbone.bottom_up
    bottom_up.stem.out_channels = width
    bottom_up.stem.norm = "BN"
    bottom_up.stages = L(basic_resnet_stages)(depth=10, width=width, norm="BN")
    bottom_up.freeze_at = 0
    model.backbone.out_channels = fpn
    model.proposal_generator.head.in_channels = fpn
    model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
    model.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
    model.roi_heads.box_head.input_shape = ShapeSpec(channels=fpn, height=7, width=7)
    model.roi_heads.box_head.fc_dims = [64, 64]
    model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=64)
    model.roi_heads.batch_size_per_image = 64
    model.roi_heads.num_classes = num_classes
    return model


def make_inputs(n=2, size=(128, 160), boxes_per_image=2, seed=0, empty=()):
    """Random uint8 images with random boxes; images whose index is in ``empty`` get none."""
    g = torch.Generator().manual_seed(seed)
    out = []
    h, w = size
    for i in range(n):
        img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        inst = Instances((h, w))
        k = 0 if i in empty else boxes_per_image
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 12 + torch.rand(k, 2, generator=g) * 40
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, 3, (k,), generator=g)
        out.append({"image": img, "height": h, "width": w, "instances": inst})
    return out


def build(cfg):
    model = instantiate(cfg)
    model.train()
    return model


def tiny_kd(name, distiller, student=None, teacher=None):
    """A DistillationDetector (train mode, seeded) with the one distiller ``name``, between two
    tiny RetinaNets by default (the teacher wider)."""
    torch.manual_seed(0)
    return build(
        L(DistillationDetector)(
            student=student or tiny_retinanet_cfg(),
            teacher=teacher or tiny_retinanet_cfg(width=32, fpn=128),
            distillers={name: distiller},
        )
    )


def short_train(config, output_dir, iters=3):
    """Train ``config`` for ``iters`` iterations through KDTrainer on small shapes splits, with a
    random teacher; returns the trainer (its ``storage`` holds every logged value) and the
    final COCOEvaluator results."""
    from detkd.engine import KDTrainer

    cfg = load_config(config)
    cfg.train.update(
        output_dir=str(output_dir),
        max_iter=iters,
        teacher_checkpoint="",
        init_checkpoint="",
        teacher_random_init=True,
        log_period=1,
        device="cpu",
    )
    cfg.dataloader.train.dataset.names.num_images = 16
    cfg.dataloader.test.dataset.names.num_images = 8
    cfg.dataloader.train.update(num_workers=0, total_batch_size=4)
    cfg.dataloader.test.num_workers = 0
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    return trainer, results


def history(trainer, key):
    return [v for v, _ in trainer.storage.history(key).values()]


class _ShapesBackbone(torch.nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self._shapes = shapes

    def output_shape(self):
        return self._shapes


class BackboneOnlyDetector(torch.nn.Module):
    """A stand-in with only ``backbone.output_shape()``: what feature distillers' ``bind`` reads
    (level pairing, adapter channels), without building a detector."""

    def __init__(self, shapes):
        super().__init__()
        self.backbone = _ShapesBackbone(shapes)
