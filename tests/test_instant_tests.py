"""The GPU smoke tier (configs/quick_schedules, dev/run_instant_tests.sh): each instant test is
its paper setting's model with detectron2's instant-test schedule, and the script trains and
evaluates one on detectron2's builtin ``coco_2017_val_100`` (here a two-image stand-in written by
the test, read by detectron2's COCO loader)."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
from detectron2.config import LazyConfig
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from conftest import REPO, load_config
from PIL import Image

# instant test -> the paper setting whose model it runs
PAPER = {
    "pkd_retinanet_R50_from_mask_rcnn_R101": "configs/PKD/retinanet_R50_from_mask_rcnn_R101_2x.py",
    "reviewkd_faster_rcnn_R50_from_R101": (
        "configs/ReviewKD/faster_rcnn_R50_from_faster_rcnn_R101.py"
    ),
    "gid_fcos_R50_from_retinanet_R101": "configs/GID/fcos_R50_from_retinanet_R101_1x.py",
    "pkd_gid_retinanet_R50_from_R101": "configs/GID/retinanet_R50_from_retinanet_R101_2x.py",
    "d3etr_conditional_detr_R50_from_R101": "configs/D3ETR/r50_from_r101_12ep.py",
}
INSTANT = sorted(glob.glob(os.path.join(REPO, "configs", "quick_schedules", "*_instant_test.py")))


def test_each_instant_test_is_its_paper_model_on_the_instant_schedule():
    assert sorted(os.path.basename(p)[: -len("_instant_test.py")] for p in INSTANT) == sorted(PAPER)
    for path in INSTANT:
        name = os.path.basename(path)[: -len(".py")]
        cfg, paper = LazyConfig.load(path), load_config(PAPER[name[: -len("_instant_test")]])
        model, paper_model = LazyConfig.to_py(cfg.model), LazyConfig.to_py(paper.model)
        if name.startswith("pkd_gid"):  # the GID setting plus the PKD distiller
            assert sorted(cfg.model.distillers) == ["gid", "pkd"]
            assert cfg.model.distillers.pkd.loss_weight == 10.0
            del cfg.model.distillers["pkd"]
            model = LazyConfig.to_py(cfg.model)
        assert model == paper_model, name
        assert (
            cfg.dataloader.train.dataset.names
            == cfg.dataloader.test.dataset.names
            == "coco_2017_val_100"
        )
        assert (
            cfg.train.max_iter,
            cfg.train.eval_period,
            cfg.dataloader.train.total_batch_size,
        ) == (40, 40, 4)
        assert cfg.optimizer.lr == (1e-4 if name.startswith("d3etr") else 0.005)
        sched = cfg.lr_multiplier.scheduler
        assert (list(sched["values"]), list(sched.milestones), sched.num_updates) == (
            [1.0, 0.1],
            [30],
            40,
        )
        assert cfg.train.output_dir == f"output/quick_schedules/{name}"
        # the real teacher weights where the model zoo has them
        assert cfg.train.teacher_checkpoint == paper.train.teacher_checkpoint or name.startswith(
            "d3etr"
        )
        assert cfg.train.init_checkpoint == paper.train.init_checkpoint


def _coco_val_100(root, n=2):
    """``root/coco``: n random JPEGs and instances_val2017_100.json with COCO's 80 thing
    categories (their ids and names, which the builtin dataset's metadata must match)."""
    os.makedirs(os.path.join(root, "coco", "val2017"))
    os.makedirs(os.path.join(root, "coco", "annotations"))
    cats = [
        dict(id=c["id"], name=c["name"], supercategory="") for c in COCO_CATEGORIES if c["isthing"]
    ]
    rng = np.random.RandomState(0)
    images, anns = [], []
    for i in range(n):
        name = f"{i + 1:012d}.jpg"
        Image.fromarray(rng.randint(0, 255, (120, 160, 3), dtype=np.uint8)).save(
            os.path.join(root, "coco", "val2017", name)
        )
        images.append(dict(id=i + 1, file_name=name, height=120, width=160))
        anns.append(
            dict(
                id=i + 1,
                image_id=i + 1,
                category_id=cats[i]["id"],
                bbox=[10.0, 20.0, 50.0, 40.0],
                area=2000.0,
                iscrowd=0,
            )
        )
    with open(os.path.join(root, "coco", "annotations", "instances_val2017_100.json"), "w") as f:
        json.dump(dict(images=images, annotations=anns, categories=cats), f)


def _run_script(tmp_path, *args, cwd=REPO):
    env = dict(
        os.environ,
        DETECTRON2_DATASETS=str(tmp_path / "d2"),
        NUM_GPUS="1",
        OMP_NUM_THREADS="2",
        PYTHON=sys.executable,
        OUTPUT=str(tmp_path / "out"),
    )
    return subprocess.run(
        ["bash", os.path.join(REPO, "dev", "run_instant_tests.sh"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_run_instant_tests_trains_and_evaluates_on_coco_val_100(tmp_path):
    """One instant test through the script, shrunk for the CPU: one iteration at 96 px with a
    random teacher (the full-size models, COCO and model-zoo files are the GPU tier's)."""
    _coco_val_100(str(tmp_path / "d2"))
    small = [
        "train.max_iter=1",
        "train.log_period=1",
        "train.teacher_checkpoint=",
        "train.teacher_random_init=True",
        "train.init_checkpoint=",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[96]",
        "dataloader.train.mapper.augmentations.0.max_size=128",
        "dataloader.test.mapper.augmentations.0.short_edge_length=96",
        "dataloader.test.mapper.augmentations.0.max_size=128",
    ]
    proc = _run_script(
        tmp_path, "configs/quick_schedules/pkd_gid_retinanet_R50_from_R101_instant_test.py", *small
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert (
        "Running configs/quick_schedules/pkd_gid_retinanet_R50_from_R101_instant_test.py "
        "on 1 CPU process(es)" in log
    )
    # train and test: coco_2017_val_100
    assert log.count("Loaded 2 images in COCO format from") == 2
    assert "instances_val2017_100.json" in log
    assert "batch_size=2" in log  # 2 images per GPU
    line = [x for x in log.splitlines() if "iter: 0 " in x][0]
    assert "loss_pkd" in line and "loss_gid_feat" in line and "loss_cls" in line
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log  # COCOEvaluator ran
    assert not (tmp_path / "out").exists()  # the script cleans up after each run


def test_run_instant_tests_stops_at_a_failing_run(tmp_path):
    proc = _run_script(
        tmp_path,
        "configs/quick_schedules/pkd_gid_retinanet_R50_from_R101_instant_test.py",
        "configs/quick_schedules/gid_fcos_R50_from_retinanet_R101_instant_test.py",
        "train.max_ite=1",
    )
    assert proc.returncode != 0
    assert "Did you mean 'train.max_iter'?" in proc.stderr
    assert "gid_fcos" not in proc.stdout  # the second config never started


def test_run_instant_tests_reads_a_config_path_from_the_callers_directory(tmp_path):
    # run from configs/: the path is found (the typo in the override is the error), not missing
    proc = _run_script(
        tmp_path,
        "quick_schedules/pkd_gid_retinanet_R50_from_R101_instant_test.py",
        "train.max_ite=1",
        cwd=os.path.join(REPO, "configs"),
    )
    assert proc.returncode != 0
    assert "Did you mean 'train.max_iter'?" in proc.stderr, proc.stderr[-2000:]
