"""Every config under configs/ loads, has the five names, and its model instantiates on CPU."""
import glob
import os

import pytest

from detectron2 import model_zoo
from detectron2.config import LazyConfig, instantiate

from conftest import REPO

CONFIGS = sorted(
    os.path.relpath(p, REPO)
    for p in glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True)
    if not p.endswith("__init__.py") and os.sep + "common" + os.sep not in p
    # the instant tests run their paper setting's model (test_instant_tests.py checks that)
    and os.sep + "quick_schedules" + os.sep not in p
)


def test_configs_found():
    assert len(CONFIGS) >= 8


@pytest.mark.parametrize("path", CONFIGS)
def test_config_instantiates(path):
    cfg = LazyConfig.load(os.path.join(REPO, path))
    for name in ("model", "dataloader", "optimizer", "lr_multiplier", "train"):
        assert name in cfg, f"{path} lacks `{name}`"
    model = instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0
    if hasattr(model, "teacher"):
        assert all(not p.requires_grad for p in model.teacher.parameters())
        assert cfg.train.teacher_checkpoint or cfg.train.get("teacher_random_init", False) or (
            "demo" in path
        ), f"{path}: a distillation config without train.teacher_checkpoint"


def test_teacher_urls_are_the_model_zoo_checkpoints():
    from configs.common import coco_kd  # noqa: F401  (plain import works: no relative imports)

    zoo = {
        "retinanet_R_101_FPN_3x": "COCO-Detection/retinanet_R_101_FPN_3x.yaml",
        "faster_rcnn_R_101_FPN_3x": "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml",
        "mask_rcnn_R_101_FPN_3x": "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml",
    }
    for key, url in coco_kd.TEACHERS.items():
        expected = model_zoo.get_checkpoint_url(zoo[key])
        assert url.replace("detectron2://", "https://dl.fbaipublicfiles.com/detectron2/") == expected


@pytest.mark.parametrize("path", CONFIGS)
def test_every_trainable_parameter_gets_a_gradient(path):
    """One training step of each config's model: every parameter that requires a gradient gets
    one. Multi-GPU training (DDP with detectron2's default find_unused_parameters=False) stops
    at the second iteration otherwise (e.g. a projection that only the first decoder layer
    uses, built in every layer)."""
    import torch
    from detectron2.utils.events import EventStorage

    from conftest import make_inputs

    cfg = LazyConfig.load(os.path.join(REPO, path))
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    with EventStorage():
        losses = model(make_inputs(n=2, size=(96, 128)))
    sum(losses.values()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"{path}: parameters without a gradient: {unused}"


DEMO_KD = [p for p in CONFIGS if os.sep + "demo" + os.sep in p
           and not os.path.basename(p).startswith(("teacher_", "student_"))]


@pytest.mark.parametrize("path", DEMO_KD)
def test_demo_distillation_configs_read_their_teachers_final_checkpoint(path):
    """`train_net.py --config-file configs/demo/<method>_<det>.py` right after training
    teacher_<det>.py finds the teacher without an override (as the docstrings say)."""
    det = os.path.basename(path)[:-3].split("_", 1)[1]
    teacher = LazyConfig.load(os.path.join(REPO, "configs", "demo", f"teacher_{det}.py"))
    cfg = LazyConfig.load(os.path.join(REPO, path))
    assert cfg.train.teacher_checkpoint == os.path.join(teacher.train.output_dir, "model_final.pth")
