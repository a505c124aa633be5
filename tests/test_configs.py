"""Every config under configs/ loads, has the five names, and its model instantiates on CPU."""

import glob
import os

import torch
from detectron2 import model_zoo
from detectron2.config import LazyConfig, instantiate

import pytest
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
        assert (
            cfg.train.teacher_checkpoint
            or cfg.train.get("teacher_random_init", False)
            or ("demo" in path)
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
        assert (
            url.replace("detectron2://", "https://dl.fbaipublicfiles.com/detectron2/") == expected
        )


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


DEMO_KD = [
    p
    for p in CONFIGS
    if os.sep + "demo" + os.sep in p
    and not os.path.basename(p).startswith(("teacher_", "student_"))
]


@pytest.mark.parametrize("path", DEMO_KD)
def test_demo_distillation_configs_read_their_teachers_final_checkpoint(path):
    """`train_net.py --config-file configs/demo/<method>_<det>.py` right after training
    teacher_<det>.py finds the teacher without an override (as the docstrings say)."""
    det = os.path.basename(path)[:-3].split("_", 1)[1]
    teacher = LazyConfig.load(os.path.join(REPO, "configs", "demo", f"teacher_{det}.py"))
    cfg = LazyConfig.load(os.path.join(REPO, path))
    assert cfg.train.teacher_checkpoint == os.path.join(teacher.train.output_dir, "model_final.pth")


PAPER = [p for p in CONFIGS if os.sep + "demo" + os.sep not in p]
MSRA_BGR = ([103.53, 116.28, 123.675], [1.0, 1.0, 1.0], "BGR")
TORCHVISION_RGB = ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375], "RGB")


def _zoo_yaml(url):
    """detectron2://COCO-Detection/retinanet_R_101_FPN_3x/190397697/model_final_971ab9.pkl ->
    COCO-Detection/retinanet_R_101_FPN_3x.yaml (the config its weights were trained with)."""
    assert url.startswith("detectron2://"), url
    folder, name = url[len("detectron2://") :].split("/")[:2]
    return f"{folder}/{name}.yaml"


def _anchor_generators(model):
    return {n: m for n, m in model.named_modules() if n.endswith("anchor_generator")}


def test_teachers_have_the_architecture_of_their_model_zoo_weights():
    """Each paper config's teacher is the detector its model-zoo checkpoint was trained as:
    the same parameters and shapes as detectron2's yaml config of that zoo id (a Faster R-CNN
    teacher pointed at Mask R-CNN weights, an R50 teacher at R101 weights, a different class
    count would differ), the same input format and pixel mean/std (the weights expect them),
    and for the parts GID decodes the same anchors and box2box weights."""
    import torch
    from detectron2.config import get_cfg
    from detectron2.modeling import build_anchor_generator, build_model

    checked = 0
    for path in PAPER:
        cfg = LazyConfig.load(os.path.join(REPO, path))
        url = cfg.train.get("teacher_checkpoint", "")
        if not url.startswith("detectron2://"):
            continue
        zoo = get_cfg()
        zoo.merge_from_file(model_zoo.get_config_file(_zoo_yaml(url)))
        zoo.MODEL.DEVICE = "meta"  # shapes only: nothing is allocated
        with torch.device("meta"):
            ref, teacher = build_model(zoo), instantiate(cfg.model.teacher)
        shapes = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
        ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert sorted(shapes) == sorted(ref_shapes), (path, set(shapes) ^ set(ref_shapes))
        assert shapes == ref_shapes, path
        t = cfg.model.teacher
        assert [list(t.pixel_mean), list(t.pixel_std), t.input_format] == [
            list(zoo.MODEL.PIXEL_MEAN),
            list(zoo.MODEL.PIXEL_STD),
            zoo.INPUT.FORMAT,
        ], path
        assert t.backbone.bottom_up.stages.stride_in_1x1 == zoo.MODEL.RESNETS.STRIDE_IN_1X1, path
        # what the teacher is fed: the loader's images, flipped by DistillationDetector only when
        # the student's format (model.student_input_format for FCOS, which declares none) is
        # other than the teacher's
        loaded = cfg.dataloader.train.mapper.image_format
        s_fmt = cfg.model.get("student_input_format") or cfg.model.student.get("input_format")
        assert s_fmt == loaded, path  # else a student format unknown to the wrapper
        fed = loaded if s_fmt in (None, t.input_format) else {"RGB": "BGR", "BGR": "RGB"}[loaded]
        assert fed == zoo.INPUT.FORMAT, path
        for name, gen in _anchor_generators(ref).items():
            lazy = cfg.model.teacher
            for part in name.split("."):
                lazy = lazy[part]
            mine = instantiate(lazy)
            head = zoo.MODEL.RPN if "proposal" in name else zoo.MODEL.RETINANET
            feats = head.IN_FEATURES
            shapes_in = [ref.backbone.output_shape()[f] for f in feats]
            theirs = build_anchor_generator(zoo, shapes_in)
            assert mine.strides == theirs.strides and mine.offset == theirs.offset, (path, name)
            pairs = zip(mine.cell_anchors, theirs.cell_anchors)
            assert all(torch.equal(a, b) for a, b in pairs), (path, name)
        for name, m in ref.named_modules():
            if hasattr(m, "box2box_transform"):
                mine = teacher.get_submodule(name) if name else teacher
                weights = tuple(mine.box2box_transform.weights)
                assert weights == tuple(m.box2box_transform.weights), (path, name)
        checked += 1
    assert checked >= 8


def _resnet(model_cfg):
    return model_cfg.backbone.bottom_up if "bottom_up" in model_cfg.backbone else model_cfg.backbone


@pytest.mark.parametrize("path", PAPER)
def test_students_take_the_input_of_their_imagenet_weights(path):
    """MSRA's ImageNet weights (detectron2://ImageNetPretrained/MSRA/) expect BGR with std 1 and
    the stride in the 1x1 conv; torchvision's (the model zoo's torchvision/R-50.pkl, or a
    converted R-18.pkl / R-101.pkl) expect RGB, ImageNet mean/std and the stride in the 3x3."""
    cfg = LazyConfig.load(os.path.join(REPO, path))
    student = cfg.model.student if "student" in cfg.model else cfg.model
    init = cfg.train.init_checkpoint
    mean, std, fmt = MSRA_BGR if "ImageNetPretrained/MSRA/" in init else TORCHVISION_RGB
    assert [list(student.pixel_mean), list(student.pixel_std)] == [mean, std], path
    assert cfg.dataloader.train.mapper.image_format == fmt, path
    assert student.get("input_format", fmt) == fmt, path  # FCOS has none: the mapper decides
    resnet = _resnet(student)
    depth = int(os.path.basename(init).split("R-")[1].split(".")[0])
    assert resnet.stages.depth == depth, path
    if depth >= 50:  # bottleneck blocks
        assert resnet.stages.stride_in_1x1 == (fmt == "BGR"), path


KD = [
    p
    for p in CONFIGS
    if "from" in os.path.basename(p)
    or (
        os.sep + "demo" + os.sep in p
        and not os.path.basename(p).startswith(("teacher_", "student_"))
    )
]


@pytest.mark.parametrize("path", KD)
def test_baseline_twin_is_the_distillation_config_without_teacher(path):
    """A distilled run and its baseline twin (the one detkd.repro runs) differ only in the
    teacher and distillers: the same student, data, optimizer, schedule, seed and init."""
    from detkd.repro import baseline_of

    cfg = LazyConfig.load(os.path.join(REPO, path))
    base = LazyConfig.load(os.path.join(REPO, baseline_of(path)))
    assert "teacher" not in base.model
    assert LazyConfig.to_py(cfg.model.student) == LazyConfig.to_py(base.model)
    for key in ("dataloader", "optimizer", "lr_multiplier"):
        assert LazyConfig.to_py(cfg[key]) == LazyConfig.to_py(base[key]), key
    for c in (cfg, base):
        del c.train["output_dir"], c.train["teacher_checkpoint"]
    assert LazyConfig.to_py(cfg.train) == LazyConfig.to_py(base.train)


@pytest.mark.parametrize("path", [p for p in KD if "D3ETR" in p or os.sep + "demo" + os.sep in p])
def test_trained_teachers_come_from_a_config_with_the_same_model(path):
    """Teachers that are trained first (DETR, demo) are loaded from the model_final.pth that
    the teacher's own config writes (output/<dir>/<name> -> configs/<dir>/<name>.py); that
    config builds exactly the distillation config's teacher, so the strict load fits."""
    cfg = LazyConfig.load(os.path.join(REPO, path))
    folder, name = os.path.split(cfg.train.teacher_checkpoint)
    assert name == "model_final.pth" and folder.startswith("output/"), cfg.train.teacher_checkpoint
    source = LazyConfig.load(os.path.join(REPO, "configs", folder[len("output/") :] + ".py"))
    assert source.train.output_dir == folder
    assert LazyConfig.to_py(source.model) == LazyConfig.to_py(cfg.model.teacher)


def _paper_table_rows():
    import re

    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text.split("### Paper settings (COCO)", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in section.splitlines() if line.startswith("| [")]
    link = re.compile(r"\]\((configs/[^)]+\.py)\)")
    return [(link.search(r).group(1), [c.strip() for c in r.strip("|").split("|")]) for r in rows]


def test_readme_paper_table_rows_name_their_configs_teacher_detector_and_schedule():
    """Each row of the README's COCO table links a config that exists, whose model-zoo teacher
    (id and zoo box AP), student detector and schedule are the ones the row names."""
    zoo_ap = {
        "retinanet_R_101_FPN_3x": "40.4",
        "faster_rcnn_R_101_FPN_3x": "42.0",
        "mask_rcnn_R_101_FPN_3x": "42.9",
    }
    detector = {
        "RetinaNet": "RetinaNet",
        "FCOS": "FCOS",
        "GeneralizedRCNN": "Faster R-CNN",
        "ConditionalDETR": "Conditional DETR",
    }
    rows = _paper_table_rows()
    assert len(rows) >= 10
    for path, cols in rows:
        assert os.path.isfile(os.path.join(REPO, path)), path
        cfg = LazyConfig.load(os.path.join(REPO, path))
        assert detector[cfg.model.student._target_.__name__] == cols[1], path
        url = cfg.train.teacher_checkpoint
        if url.startswith("detectron2://"):
            zoo_id = url.split("/")[3]
            assert cols[2] == f"{zoo_id} ({zoo_ap[zoo_id]})", path
        sched = {90000: "1x", 180000: "2x"}.get(cfg.train.max_iter)
        if sched and cfg.dataloader.train.total_batch_size == 16:
            assert cols[-1] == sched, path


def _effective(node):
    """A LazyCall node's keyword arguments with the class's defaults filled in."""
    import inspect

    params = inspect.signature(node._target_).parameters
    args = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    args.update({k: v for k, v in node.items() if k != "_target_"})
    return args


def test_paper_configs_carry_the_methods_hyperparameters():
    """The distillers of the COCO configs, with their classes' defaults, have METHODS.md's values:
    PKD alpha 6 for a two-stage (R-CNN) teacher and 10 for a one-stage one, on 4 levels (1.4-1.5);
    ReviewKD lambda 1.0 (R50) / 1.2 (R18) on all levels (2.5); GID's port weights, K, NMS, size
    filter, pre-NMS top-k and ROIAlign size (3.1-3.5); D3ETR's 1/5/2 losses and costs, attention
    weights 1, MixMatcher on (4.2-4.3), with the Conditional DETR recipe (4.1, 4.3)."""
    from detkd.losses import D3ETRDistiller, GIDDistiller, PKDDistiller, ReviewKDDistiller

    gid = dict(
        feat_weight=5e-4,
        relation_weight=40.0,
        response_cls_weight=0.1,
        response_reg_weight=1.0,
        topk=10,
        nms_thresh=0.3,
        min_size=10.0,
        pre_nms_topk=3000,
        pooler_resolution=10,
    )
    d3etr = dict(
        cls_weight=1.0,
        l1_weight=5.0,
        giou_weight=2.0,
        sa_weight=1.0,
        ca_weight=1.0,
        match_cost_class=1.0,
        match_cost_bbox=5.0,
        match_cost_giou=2.0,
        fixed_matching=True,
        aux_gt_loss=True,
    )
    detr = dict(
        num_queries=300,
        loss_class_weight=2.0,
        loss_bbox_weight=5.0,
        loss_giou_weight=2.0,
        focal_alpha=0.25,
        focal_gamma=2.0,
        aux_loss=True,
    )
    transformer = dict(d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6)
    seen = set()
    for path in PAPER:
        cfg = LazyConfig.load(os.path.join(REPO, path))
        for node in cfg.model.get("distillers", {}).values():
            args, cls = _effective(node), node._target_
            seen.add(cls)
            levels_and_weight = (args.get("num_levels"), args.get("loss_weight"))
            if cls is PKDDistiller:
                two_stage = cfg.model.teacher._target_.__name__ == "GeneralizedRCNN"
                assert levels_and_weight == (4, 6.0 if two_stage else 10.0), path
            elif cls is ReviewKDDistiller:
                depth = _resnet(cfg.model.student).stages.depth
                assert levels_and_weight == (None, {50: 1.0, 18: 1.2}[depth]), path
            elif cls is GIDDistiller:
                assert {k: args[k] for k in gid} == gid, path
            elif cls is D3ETRDistiller:
                assert {k: args[k] for k in d3etr} == d3etr, path
                for m in (cfg.model.student, cfg.model.teacher):
                    t, det = _effective(m.transformer), _effective(m)
                    assert {k: t[k] for k in transformer} == transformer, path
                    assert {k: det[k] for k in detr} == detr, path
                    match = _effective(m.matcher)
                    costs = (match["cost_class"], match["cost_bbox"], match["cost_giou"])
                    assert costs == (2.0, 5.0, 2.0), path
                groups = _effective(cfg.optimizer.params)
                opt = (cfg.optimizer.lr, cfg.optimizer.weight_decay, groups["backbone_lr_factor"])
                assert opt == (1e-4, 1e-4, 0.1), path
                assert cfg.train.clip_grad == {"enabled": True, "max_norm": 0.1}, path
                assert cfg.dataloader.train.total_batch_size == 16, path
    assert seen == {PKDDistiller, ReviewKDDistiller, GIDDistiller, D3ETRDistiller}


def _readme_own_data_config(repo, data):
    """The README's "Your own data and models" example config, with its two paths filled in."""
    import re

    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    found = re.search(r"```python\n(# my_kd\.py.*?)```", text, re.S)
    assert found, "README: no '# my_kd.py' example config under 'Your own data and models'"
    return found.group(1).replace("/path/to/DetKD", repo).replace("/path/to/my_data", data)


def _readme_own_teacher_config():
    """The README's "Your own data and models" example teacher config (``my_teacher.py``)."""
    import re

    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    found = re.search(r"```python\n(# my_teacher\.py.*?)```", text, re.S)
    assert found, "README: no '# my_teacher.py' example config under 'Your own data and models'"
    return found.group(1)


def _tiny_coco(root, split, n, empty=0):
    """A COCO-format split of n 64x80 images with 2 categories (first ``empty`` images
    without annotations)."""
    import json

    import numpy as np

    from PIL import Image

    os.makedirs(os.path.join(root, split))
    rng = np.random.RandomState(len(split))
    images, anns = [], []
    for i in range(n):
        img = np.full((64, 80, 3), 30, np.uint8)
        for _ in range(0 if i < empty else 2):
            x, y = rng.randint(0, 50), rng.randint(0, 34)
            s, c = rng.randint(12, 28), rng.randint(1, 3)
            img[y : y + s, x : x + s] = (255, 60, 60) if c == 1 else (60, 255, 60)
            anns.append(
                dict(
                    id=len(anns) + 1,
                    image_id=i + 1,
                    category_id=c,
                    bbox=[x, y, s, s],
                    area=float(s * s),
                    iscrowd=0,
                )
            )
        Image.fromarray(img).save(os.path.join(root, split, f"{i}.png"))
        images.append(dict(id=i + 1, file_name=f"{i}.png", width=80, height=64))
    cats = [dict(id=1, name="square"), dict(id=2, name="patch")]
    with open(os.path.join(root, f"{split}.json"), "w") as f:
        json.dump(dict(images=images, annotations=anns, categories=cats), f)


def test_readme_own_data_config_trains_outside_the_repository(tmp_path):
    # The README's example of a user's config outside the repository: its dataset registration
    # (guarded: loading twice in one process works), DetKD's configs taken by path as separate
    # copies (the teacher keeps its FPN 128 while the student has 64), the user's classes on
    # both; train_net.py run from the user's folder trains, distils, evaluates and exports.
    import subprocess
    import sys

    from detectron2.data import DatasetCatalog

    data, user = str(tmp_path / "data"), tmp_path / "user"
    _tiny_coco(data, "train", 4, empty=1)
    _tiny_coco(data, "val", 2)
    user.mkdir()
    (user / "my_kd.py").write_text(_readme_own_data_config(REPO, data))
    try:
        cfg = LazyConfig.load(str(user / "my_kd.py"))
        LazyConfig.load(str(user / "my_kd.py"))  # registered once, not an error
        assert cfg.model.student.num_classes == cfg.model.teacher.num_classes == 2
        assert cfg.model.student.backbone.out_channels == 64
        assert cfg.model.teacher.backbone.out_channels == 128
        assert len(DatasetCatalog.get("my_train")) == 4 and len(DatasetCatalog.get("my_val")) == 2
    finally:
        for name in ("my_train", "my_val"):
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)

    # the README's teacher config trains my_kd.py's teacher alone into my_kd.py's
    # train.teacher_checkpoint, which the distillation run then loads
    (user / "my_teacher.py").write_text(_readme_own_teacher_config())
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "projects", "DetKD"))
    opts = [
        "train.max_iter=2",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
    ]
    for config in ("my_teacher.py", "my_kd.py"):
        cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config]
        proc = subprocess.run(
            cmd + opts, cwd=user, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    teacher = torch.load(user / "output" / "my_teacher" / "model_final.pth", weights_only=False)
    assert teacher["model"]["backbone.fpn_output3.weight"].shape[0] == 128
    assert teacher["model"]["head.cls_score.weight"].shape[0] == 9 * 2
    assert "Teacher weights loaded from output/my_teacher/model_final.pth" in proc.stdout + (
        proc.stderr
    )
    out = user / "output" / "my_kd"
    student = torch.load(out / "model_final_student.pth", weights_only=False)["model"]
    assert student["head.cls_score.weight"].shape[0] == 9 * 2  # 9 anchors x the user's 2 classes
    assert student["backbone.fpn_output3.weight"].shape[0] == 64
    with open(out / "metrics.json") as f:
        lines = f.read()
    assert "loss_pkd" in lines and "loss_gid_feat" in lines and "bbox/AP" in lines


def _seed_values(cell):
    """The per-seed values in parentheses of a README table cell, "(a / b / c[ AP])", or None."""
    import re

    seeds = re.search(r"\(([^)]*)\)", cell)
    if not seeds:
        return None
    return [float(v.replace(" AP", "").replace("−", "-")) for v in seeds.group(1).split("/")]


def _demo_tables():
    """The README's two demo result tables (validation, held-out): {row name: (AP, per-seed
    values, ΔAP sd)}; a row's per-seed values are its APs (student alone) or ΔAPs."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text.split("### Demo (synthetic shapes, CPU)", 1)[1].split("### Paper settings", 1)[0]
    tables, rows = [], None
    for line in section.splitlines():
        if line.startswith("| model"):
            rows = {}
            tables.append(rows)
        elif rows is not None and line.startswith("|") and "---" not in line:
            cols = [c.strip() for c in line.strip("|").split("|")]
            values = _seed_values(cols[5])
            sd = float(cols[6]) if cols[6] else None
            rows[cols[0].replace("*", "")] = (float(cols[1]), values, sd)
        elif not line.startswith("|"):
            rows = None  # a table ends at its first other line (other tables have other columns)
    return tables, text


def test_readme_clipped_demo_table_is_consistent_and_its_bf16_claim_holds():
    """The first two demo tables (gradient clipping, seeds 0-2; validation and held-out splits):
    every distilled row's ΔAP is the mean of its per-seed ΔAPs and its AP its student's (RetinaNet
    or DETR, over the same seeds) plus that; sds are the sample sds; the text's per-seed bf16 -
    fp32 ReviewKD differences follow from the rows."""
    import re
    import statistics

    tables, text = _demo_tables()
    sds = [
        float(v) for v in re.findall(r"\| (?:DETR )?student alone \| [\d.]+ \| ([\d.]+) \|", text)
    ]
    for clipped, student_sds in zip(tables[:2], (sds[:2], sds[2:4])):  # validation, held-out
        rows = [n for n in clipped if "teacher" not in n and "student alone" not in n]
        assert len(rows) == 6 - (clipped is tables[1])  # the held-out table has no bf16 row
        for base, sd in zip(("student alone", "DETR student alone"), student_sds):
            student = clipped[base]  # per-seed APs rounded to 0.01: mean and sd within ~0.01
            assert student[0] == pytest.approx(statistics.mean(student[1]), abs=0.006)
            assert sd == pytest.approx(statistics.stdev(student[1]), abs=0.011)
            for name in [n for n in rows if n.startswith("DETR") == base.startswith("DETR")]:
                ap, deltas, dsd = clipped[name]  # a row of fewer seeds pairs with the first ones
                base_ap = statistics.mean(student[1][: len(deltas)])
                assert ap == pytest.approx(base_ap + statistics.mean(deltas), abs=0.011), name
                assert dsd == pytest.approx(statistics.stdev(deltas), abs=0.011), name
    clipped = tables[0]
    bf16 = clipped['student + ReviewKD, `abf_precision="bf16"`'][1]
    fp32 = clipped["student + ReviewKD (p3-p5, λ=0.1)"][1]
    stated = re.search(r"differ from the fp32 ones by (\S+) and (\S+) AP", text).groups()
    assert [float(v.replace("−", "-")) for v in stated] == pytest.approx(
        [b - f for b, f in zip(bf16, fp32)], abs=0.006
    )


def test_readme_demo_claims_match_its_tables():
    """The demo section's statements computed from its own tables: the spread of paired ΔAP sds
    of this version's RetinaNet rows (the Notes), the largest move of a PKD (α=1) run by the flip
    fix, and the held-out split's ranking of the RetinaNet rows against the validation split's."""
    import re

    tables, text = _demo_tables()
    val, held = tables[-2:]  # the clipped version's table (2026-12-02) comes first
    retina = [
        n for n in val if "DETR" not in n and "teacher" not in n and "before the flip" not in n
    ]
    sds = [t[n][2] for t in (val, held) for n in retina if n in t and t[n][2] is not None]
    stated = re.search(r"paired ΔAP sd (\d+\.\d)–(\d+\.\d) AP", text).groups()
    assert stated == (f"{min(sds):.1f}", f"{max(sds):.1f}"), (stated, sorted(sds))

    student = val["student alone"][1]
    after = val["student + PKD (α=1)"][1]
    before = val["before the flip fix: student + PKD (α=1)"][1]
    moves = [abs(a - b) for a, b in zip(after, before)]
    seed = max(range(len(moves)), key=moves.__getitem__)
    claim = re.search(
        r"moved single runs by up to (\d+) AP \(seed (\d): (\d+\.\d+) → (\d+\.\d+)", text
    ).groups()
    expected = (
        str(round(moves[seed])),
        str(seed),
        f"{student[seed] + before[seed]:.2f}",
        f"{student[seed] + after[seed]:.2f}",
    )
    assert claim == expected, (claim, expected)

    both = [n for n in retina if n in held]
    swapped = {
        (a, b) for a in both for b in both if val[a][0] > val[b][0] and held[a][0] < held[b][0]
    }
    a10 = "papers' weights: student + PKD (α=10)"
    a10_gid = a10 + " + GID"
    assert swapped == {(a10_gid, a10), ("student alone", a10), ("student alone", a10_gid)}
    lower = [n for n in both if n != "student alone" and held[n][0] < val[n][0]]
    assert lower == ["student + GID"], lower  # "the distilled students higher, except GID's"


def _two_split_table(header):
    """(README text, {run: cells}) of the README table whose header starts with ``header``, with
    the columns run | AP | ΔAP (per seed) | sd | held-out AP | held-out ΔAP (per seed) | sd | ..."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    rows = {}
    for line in text[text.index(header) :].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cols = [c.strip() for c in line.strip("|").split("|")]
        rows[cols[0]] = cols
    return text, rows


def _check_two_split_rows(student, distilled):
    """On both splits of a :func:`_two_split_table`: the student's AP and sd follow from its
    per-seed APs; each distilled row's bold ΔAP is the mean of its per-seed ΔAPs, its sd their
    sample sd and its AP the student's plus the ΔAP."""
    import re
    import statistics

    for ap_col, seed_col, sd_col in ((1, 2, 3), (4, 5, 6)):  # validation, held-out
        base = _seed_values(student[seed_col])
        assert float(student[ap_col]) == pytest.approx(statistics.mean(base), abs=0.006)
        assert float(student[sd_col]) == pytest.approx(statistics.stdev(base), abs=0.011)
        for row in distilled:
            deltas = _seed_values(row[seed_col])
            mean = float(re.search(r"\*\*([+\-][\d.]+)\*\*", row[seed_col]).group(1))
            assert mean == pytest.approx(statistics.mean(deltas), abs=0.006), row[0]
            assert float(row[ap_col]) == pytest.approx(
                statistics.mean(base) + mean, abs=0.011
            ), row[0]
            assert float(row[sd_col]) == pytest.approx(statistics.stdev(deltas), abs=0.011), row[0]


def test_readme_other_cpu_family_table_is_consistent():
    """The demo section's AMD (no AMX) ReviewKD table: each distilled row's ΔAP is the mean of its
    per-seed ΔAPs (sd: their sample sd) and its AP the student's plus that, on both splits; the
    student's AP and sd follow from its per-seed APs; the text's per-seed bf16 - fp32 differences
    and the step-time saving follow from the rows."""
    import re

    text, rows = _two_split_table("| run, AMD EPYC (no AMX)")
    student = rows["student alone"]
    fp32, bf16 = (
        rows["student + ReviewKD (p3-p5, λ=0.1)"],
        rows['student + ReviewKD, `abf_precision="bf16"`'],
    )
    _check_two_split_rows(student, [fp32, bf16])
    stated = re.search(r"pairs \(([^;]*) validation; ([^)]*) held-out\)", text).groups()
    diffs = [float(v.replace("−", "-")) for part in stated for v in part.split(",")]
    expected = [
        b - f for col in (2, 5) for b, f in zip(_seed_values(bf16[col]), _seed_values(fp32[col]))
    ]
    assert diffs == pytest.approx(expected, abs=0.011)
    saving = re.search(r"step is (\d+) % shorter", text).group(1)
    assert int(saving) == round(100 * (1 - float(bf16[7]) / float(fp32[7])))


def test_readme_pretrained_backbone_detr_table_is_consistent():
    """The demo section's DETR table (pretrained backbones, seeds 0-2, both splits): the student's
    AP and sd follow from its per-seed APs, D3ETR's ΔAP, sd and AP from its per-seed ΔAPs; the
    text's shares of the teacher's AP follow from the rows."""
    import re

    text, rows = _two_split_table("| run, DETRs from pretrained backbones")
    teacher, student, d3etr = (
        rows[k]
        for k in (
            "teacher (Conditional DETR, d=96, 2000 it)",
            "DETR student alone",
            "DETR student + D3ETR",
        )
    )
    _check_two_split_rows(student, [d3etr])
    shares = re.search(
        r"reaches (\d+) % of the teacher's AP, the student\s+alone (\d+) %", text
    ).groups()
    assert [int(v) for v in shares] == [
        round(100 * float(r[1]) / float(teacher[1])) for r in (d3etr, student)
    ]


def test_demo_configs_imported_as_python_modules_keep_the_student_apart():
    """``from configs.demo.pkdgid_retinanet import model`` (a config of one's own importing a
    demo config as a module): the teacher configs edited the student config's shared objects,
    so the student became a copy of the teacher (FPN 128, d = 96) without a word."""
    import subprocess
    import sys

    code = (
        "from configs.demo.pkdgid_retinanet import model as r\n"
        "from configs.demo.d3etr_detr import model as d, train\n"
        "print(r.student.backbone.out_channels, r.teacher.backbone.out_channels, "
        "d.student.transformer.d_model, d.teacher.transformer.d_model, train.output_dir)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["64", "128", "64", "96", "output/demo/d3etr_detr"]


# Values of the paper-setting configs that METHODS.md states and the tests above left unchecked
# (found by mutating the configs: each test below fails on a changed value that passed before).


def _load_paper(path):
    return LazyConfig.load(os.path.join(REPO, path))


def _students_and_teachers(cfg):
    return [cfg.model.student, cfg.model.teacher] if "student" in cfg.model else [cfg.model]


def _drops(cfg):
    """The lr drop iterations of a (warm-up wrapped) multi-step schedule, for train.max_iter."""
    s = cfg.lr_multiplier.scheduler
    n = s.get("num_updates") or s.milestones[-1]  # detectron2: scale-invariant, last milestone
    return [round(m / n * cfg.train.max_iter) for m in s.milestones if m < n]


def _paper_distillers(name):
    """(path, config, the distiller's effective arguments) of each paper config with a ``name``
    distiller."""
    for path in PAPER:
        cfg = _load_paper(path)
        for node in cfg.model.get("distillers", {}).values():
            if node._target_.__name__ == name:
                yield path, cfg, _effective(node)


def test_paper_configs_train_on_coco_train_with_80_classes():
    for path in PAPER:
        cfg = _load_paper(path)
        assert cfg.dataloader.train.dataset.names == "coco_2017_train", path
        assert cfg.dataloader.test.dataset.names == "coco_2017_val", path
        for m in _students_and_teachers(cfg):
            node = m.roi_heads if "roi_heads" in m else m  # R-CNN: the ROI heads' count
            assert _effective(node)["num_classes"] == 80, path


def test_pkd_pairs_by_index_resizes_the_student_and_uses_mmdets_lrs():
    """METHODS.md 1.4: pairing by index, the student map resized; 1.5: SGD batch 16, lr 0.02 for
    Faster R-CNN, 0.01 for one-stage students."""
    checked = 0
    for path, cfg, args in _paper_distillers("PKDDistiller"):
        names = (cfg.model.teacher._target_.__name__, cfg.model.student._target_.__name__)
        if names[0] != names[1] and "GeneralizedRCNN" in names:  # p2.. against p3..
            assert args["pair_by"] == "index", path
        assert args["resize_student"] is True, path
        two_stage = names[1] == "GeneralizedRCNN"
        assert cfg.optimizer.lr == (0.02 if two_stage else 0.01), path
        assert cfg.dataloader.train.total_batch_size == 16, path
        checked += 1
    assert checked >= 5


def test_reviewkd_abfs_and_reference_schedule():
    """METHODS.md 2.2: mid = 256 (the teacher's channels), ordinary BN; 2.5: batch 8, lr 0.01,
    180k iterations with drops at 120k / 160k, multi-scale short side 640-800 (max 1333)."""
    checked = 0
    for path, cfg, args in _paper_distillers("ReviewKDDistiller"):
        assert args["mid_channels"] in (None, 256) and args["norm"] == "BN", path
        assert (cfg.dataloader.train.total_batch_size, cfg.optimizer.lr) == (8, 0.01), path
        assert cfg.train.max_iter == 180000 and _drops(cfg) == [120000, 160000], path
        resize = cfg.dataloader.train.mapper.augmentations[0]
        assert (min(resize.short_edge_length), max(resize.short_edge_length)) == (640, 800), path
        assert resize.max_size == 1333, path
        checked += 1
    assert checked == 2


def test_gid_port_schedule_and_faster_rcnn_levels():
    """METHODS.md 3.5: RetinaNet 2x, batch 16, lr 0.01, 180k, drops at 120k / 160k; 3.4: the
    Faster R-CNN features and relation on p2-p5 (4 levels)."""
    checked = 0
    for path, cfg, args in _paper_distillers("GIDDistiller"):
        det = cfg.model.student._target_.__name__
        if det == "GeneralizedRCNN":
            assert args["num_levels"] == 4, path
        else:
            assert args["num_levels"] is None, path  # p3-p7, the [3, 7] clamp
        if det == "RetinaNet":
            assert (cfg.dataloader.train.total_batch_size, cfg.optimizer.lr) == (16, 0.01), path
            assert cfg.train.max_iter == 180000 and _drops(cfg) == [120000, 160000], path
        checked += 1
    assert checked == 3


def test_d3etr_r101_teacher_r50_student_and_lr_drops():
    """METHODS.md 4.1: Conditional DETR R101-C5 teacher -> R50-C5 student; 4.3: lr drop at 11 of
    12 epochs or 40 of 50, training for the whole schedule."""
    ipe = 117266 // 16
    checked = 0
    for path in PAPER:
        if os.sep + "D3ETR" + os.sep not in path:
            continue
        cfg = _load_paper(path)
        epochs = round(cfg.train.max_iter / ipe)
        assert epochs in (12, 50), path
        s = cfg.lr_multiplier.scheduler
        assert s.num_updates == cfg.train.max_iter, path
        assert list(s.milestones) == [(11 if epochs == 12 else 40) * ipe], path
        if "teacher" in cfg.model:
            assert _resnet(cfg.model.teacher).stages.depth == 101, path
            assert _resnet(cfg.model.student).stages.depth == 50, path
        checked += 1
    assert checked == 8
