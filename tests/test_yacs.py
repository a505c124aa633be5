"""Teachers and students from detectron2 yacs .yaml configs (detkd.modeling.build_yacs_detector):
the model zoo's .yaml builds the same detector as DetKD's LazyConfig twin, a yacs pair trains
with PKD, and its exported student runs in stock detectron2's DefaultPredictor."""

import os

import numpy as np
import torch
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import DefaultPredictor

from detkd.modeling import build_yacs_detector, load_yacs_config

import pytest
from conftest import load_config
from omegaconf import OmegaConf
from test_train_net import _run, _small_cfg

ZOO_TEACHER = "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml"


def _add_demo_keys(cfg):
    """An add_config function: a project's own key, as add_pointrend_config adds its own."""
    cfg.MODEL.DEMO_KEY = 1


def _tiny_retinanet_yaml(path, fpn, rgb=False):
    """A RetinaNet R-18 for the shapes data (3 classes, 128 px images kept at their size); RGB
    with torchvision's pixel statistics (a converted torchvision R-18), or the zoo's BGR."""
    rgb_keys = (
        "  PIXEL_MEAN: [123.675, 116.28, 103.53]\n  PIXEL_STD: [58.395, 57.12, 57.375]\n"
        if rgb
        else ""
    )
    path.write_text(
        f'_BASE_: "{model_zoo.get_config_file("Base-RetinaNet.yaml")}"\n'
        "MODEL:\n" + rgb_keys + "  RESNETS: {DEPTH: 18, RES2_OUT_CHANNELS: 64}\n"
        f"  FPN: {{OUT_CHANNELS: {fpn}}}\n"
        "  RETINANET: {NUM_CLASSES: 3, NUM_CONVS: 1, SCORE_THRESH_TEST: 0.0}\n"
        f"INPUT: {{MIN_SIZE_TEST: 96, MAX_SIZE_TEST: 128, FORMAT: {'RGB' if rgb else 'BGR'}}}\n"
    )
    return str(path)


def test_model_zoo_yaml_builds_the_same_teacher_as_the_lazyconfig_twin():
    """The .yaml of the model zoo's Mask R-CNN R101 3x and the teacher of
    configs/PKD/retinanet_R50_from_mask_rcnn_R101_2x.py: same parameters and buffers, input
    format and pixel statistics; with one state dict, the same FPN maps and detections."""
    torch.manual_seed(0)
    yacs = build_yacs_detector(ZOO_TEACHER, opts=["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    lazy_cfg = load_config("configs/PKD/retinanet_R50_from_mask_rcnn_R101_2x.py").model.teacher
    lazy_cfg.roi_heads.box_predictor.test_score_thresh = 0.0
    lazy = instantiate(lazy_cfg)
    a, b = yacs.state_dict(), lazy.state_dict()
    assert sorted(a) == sorted(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert yacs.input_format == lazy.input_format == "BGR"
    assert torch.equal(yacs.pixel_mean, lazy.pixel_mean) and torch.equal(
        yacs.pixel_std, lazy.pixel_std
    )
    lazy.load_state_dict(a)
    yacs.eval(), lazy.eval()
    x = [{"image": torch.rand(3, 96, 128) * 255}]
    with torch.no_grad():
        images = yacs.preprocess_image(x)
        fa = yacs.backbone(images.tensor)
        fb = lazy.backbone(lazy.preprocess_image(x).tensor)
        assert list(fa) == list(fb) == ["p2", "p3", "p4", "p5", "p6"]
        for k in fa:
            assert torch.equal(fa[k], fb[k]), k
        # the heads on unit-scale maps (a random R101 with identity FrozenBN gives ~1e6)
        f = {k: v / v.std() for k, v in fa.items()}
        (pa,), _ = yacs.proposal_generator(images, f)
        (pb,), _ = lazy.proposal_generator(images, f)
        assert len(pa) == len(pb) > 0 and torch.equal(
            pa.proposal_boxes.tensor, pb.proposal_boxes.tensor
        )
        (da,), _ = yacs.roi_heads(images, f, [pa])
        (db,), _ = lazy.roi_heads(images, f, [pb])
    assert len(da) == len(db) > 0
    assert torch.equal(da.pred_boxes.tensor, db.pred_boxes.tensor)
    assert torch.equal(da.scores, db.scores) and torch.equal(da.pred_masks, db.pred_masks)


def test_yacs_pair_trains_with_pkd_and_its_student_runs_in_default_predictor(tmp_path):
    """A yacs teacher (loaded from its checkpoint file) and a yacs student in a PKD run; the
    config node is saved and loaded as train_net.py's config.yaml; the exported student loads
    into DefaultPredictor with its own .yaml and predicts what the trained student predicts."""
    t_yaml = _tiny_retinanet_yaml(tmp_path / "teacher.yaml", fpn=64)
    s_yaml = _tiny_retinanet_yaml(tmp_path / "student.yaml", fpn=32, rgb=True)
    torch.manual_seed(1)
    teacher = build_yacs_detector(t_yaml)
    assert teacher.backbone.output_shape()["p3"].channels == 64 and teacher.num_classes == 3
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")

    cfg = _small_cfg(tmp_path / "run", max_iter=2)
    cfg.model.student = L(build_yacs_detector)(config_file=s_yaml)
    cfg.model.teacher = L(build_yacs_detector)(
        config_file=t_yaml, opts=["MODEL.RETINANET.NUM_CONVS", 1]
    )
    cfg.train.update(teacher_checkpoint=str(tmp_path / "teacher.pth"), teacher_random_init=False)
    for loader in (cfg.dataloader.train, cfg.dataloader.test):  # the student's order
        loader.mapper.image_format = "RGB"
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    saved = LazyConfig.load(str(tmp_path / "config.yaml"))
    assert saved.model.teacher.config_file == t_yaml and list(saved.model.teacher.opts) == [
        "MODEL.RETINANET.NUM_CONVS",
        1,
    ]
    assert type(instantiate(saved.model.student)).__name__ == "RetinaNet"

    trainer = _run(cfg)
    kd = trainer.model
    loaded = kd.teacher.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in teacher.state_dict().items())
    pkd = [v for v, _ in trainer.storage.history("loss_pkd").values()]
    assert len(pkd) == 2 and all(v > 0 for v in pkd)
    exported = tmp_path / "run" / "model_final_student.pth"
    assert exported.is_file()

    ycfg = load_yacs_config(s_yaml)
    ycfg.MODEL.WEIGHTS, ycfg.MODEL.DEVICE = str(exported), "cpu"
    predictor = DefaultPredictor(ycfg)
    assert kd.student.input_format == "RGB" and kd.teacher.input_format == "BGR"
    image = np.random.RandomState(0).randint(0, 256, (96, 128, 3)).astype(np.uint8)  # BGR
    got = predictor(image)["instances"]  # DefaultPredictor turns it to the student's RGB
    student = kd.student.eval()
    with torch.no_grad():
        x = torch.as_tensor(image[:, :, ::-1].transpose(2, 0, 1).astype("float32"))
        want = student([{"image": x, "height": 96, "width": 128}])[0]["instances"]
    assert len(got) == len(want) > 0
    assert torch.allclose(got.pred_boxes.tensor, want.pred_boxes.tensor, atol=1e-4)
    assert torch.allclose(got.scores, want.scores, atol=1e-6)


def test_bad_yacs_inputs_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="neither a file nor a config of detectron2's model zoo"
    ):
        build_yacs_detector(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="is a LazyConfig: use its model node"):
        build_yacs_detector("common/models/retinanet.py")
    LazyConfig.save(
        load_config("configs/demo/teacher_retinanet.py"), str(tmp_path / "run_config.yaml")
    )
    with pytest.raises(
        ValueError,
        match=r"is a LazyConfig \(e.g. the config.yaml of a DetKD .*LazyConfig.load\(path\).model",
    ):
        build_yacs_detector(str(tmp_path / "run_config.yaml"))
    # an R-CNN run's config.yaml (box_head.input_shape is a ShapeSpec): yacs's value-type
    # assertion fired before the key check, a bare AssertionError about a ShapeSpec
    LazyConfig.save(
        load_config("configs/PKD/faster_rcnn_R50_from_faster_rcnn_R101_2x.py"),
        str(tmp_path / "rcnn_run_config.yaml"),
    )
    with pytest.raises(
        ValueError,
        match=r"is a LazyConfig \(e.g. the config.yaml of a DetKD .*LazyConfig.load\(path\).model",
    ):
        build_yacs_detector(str(tmp_path / "rcnn_run_config.yaml"))
    yaml = _tiny_retinanet_yaml(tmp_path / "s.yaml", fpn=32)
    with pytest.raises(KeyError, match="MODEL.NO_SUCH_KEY.*add_config"):
        build_yacs_detector(yaml, opts=["MODEL.NO_SUCH_KEY", 1])
    with pytest.raises(ValueError, match="KEY, value pairs"):
        build_yacs_detector(yaml, opts=["MODEL.RETINANET.NUM_CONVS"])
    with pytest.raises(ImportError, match="no_such_module.add_cfg"):
        build_yacs_detector(yaml, add_config=["no_such_module.add_cfg"])
    # a project's key: refused by the defaults, read once its add_config function ran
    (tmp_path / "p.yaml").write_text(f'_BASE_: "{yaml}"\nMODEL: {{DEMO_KEY: 5}}\n')
    with pytest.raises(KeyError, match="DEMO_KEY"):
        load_yacs_config(str(tmp_path / "p.yaml"))
    assert (
        load_yacs_config(
            str(tmp_path / "p.yaml"), add_config=["test_yacs._add_demo_keys"]
        ).MODEL.DEMO_KEY
        == 5
    )
    assert (
        load_yacs_config(
            str(tmp_path / "p.yaml"), add_config="test_yacs._add_demo_keys"
        ).MODEL.DEMO_KEY
        == 5
    )
    # a meta-architecture detectron2 has no yacs builder for (FCOS: a LazyConfig only) said
    # "No object named 'FCOS' found in 'META_ARCH' registry!"
    (tmp_path / "fcos.yaml").write_text(f'_BASE_: "{yaml}"\nMODEL: {{META_ARCHITECTURE: FCOS}}\n')
    with pytest.raises(
        KeyError,
        match=r"META_ARCHITECTURE 'FCOS' is not a registered meta-architecture "
        r"\(GeneralizedRCNN, .*RetinaNet.*\).*add_config.*common/models/fcos\.py",
    ):
        build_yacs_detector(str(tmp_path / "fcos.yaml"))


def test_frozen_bn_detectors_get_the_checkpoint_checks_of_the_others(tmp_path):
    """detectron2's FrozenBatchNorm2d (the norm of the yacs defaults and of the model zoo's
    detectors) fills running_mean / running_var itself when a file lacks them, so a load never
    reports them missing: an unconverted torchvision .pth loaded into a FrozenBN student passed
    silently (training from scratch), and an R-18 file for an R-34 teacher got no "smaller
    architecture" hint."""
    import torchvision

    from detkd.checkpoint import (
        CheckpointMismatchError,
        TeacherCheckpointError,
        load_student,
        load_teacher,
    )

    yaml = _tiny_retinanet_yaml(tmp_path / "r18.yaml", fpn=16)
    student = build_yacs_detector(yaml)
    assert type(student.backbone.bottom_up.stem.conv1.norm).__name__ == "FrozenBatchNorm2d"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "tv.pth")
    with pytest.raises(
        CheckpointMismatchError, match=r"none of the student's weights.*convert-torchvision-to-d2"
    ):
        load_student(student, str(tmp_path / "tv.pth"))

    torch.save({"model": student.state_dict()}, tmp_path / "r18.pth")
    teacher = build_yacs_detector(yaml, opts=["MODEL.RESNETS.DEPTH", 34])  # 3, 4, 6, 3 blocks
    with pytest.raises(TeacherCheckpointError) as e:
        load_teacher(teacher, str(tmp_path / "r18.pth"))
    msg = str(e.value)
    assert (
        "fills only part of these containers (backbone.bottom_up.res2: 2 of its 3, "
        "backbone.bottom_up.res3: 2 of its 4, backbone.bottom_up.res4: 2 of its 6, "
        "backbone.bottom_up.res5: 2 of its 3)"
    ) in msg, msg
    assert "smaller architecture" in msg


def test_opts_with_list_values_from_a_lazyconfig_node(tmp_path):
    """opts such as ["MODEL.PIXEL_MEAN", [...]] (an RGB student's torchvision statistics) in a
    config's node, or in a `model.student.opts=[...]` override: instantiate hands them over as
    omegaconf ListConfigs, which yacs refused (a type mismatch with its list)."""
    yaml = _tiny_retinanet_yaml(tmp_path / "s.yaml", fpn=16)
    mean, sizes = [123.675, 116.28, 103.53], [[16], [32], [64], [128], [256]]
    node = L(build_yacs_detector)(
        config_file=yaml, opts=["MODEL.PIXEL_MEAN", mean, "MODEL.ANCHOR_GENERATOR.SIZES", sizes]
    )
    LazyConfig.save(
        OmegaConf.create({"model": node}, flags={"allow_objects": True}),
        str(tmp_path / "config.yaml"),
    )
    for n in (node, LazyConfig.load(str(tmp_path / "config.yaml")).model):
        model = instantiate(n)
        assert torch.equal(model.pixel_mean.flatten(), torch.tensor(mean))
        anchors = list(model.anchor_generator.cell_anchors)
        assert [a.shape[0] for a in anchors] == [3] * 5  # 1 size x 3 ratios
        assert anchors[0][1].tolist() == [-8.0, -8.0, 8.0, 8.0]


class _FolderURLs:
    """An iopath handler of ``yacstest://NAME`` URLs served from a folder, which, like the http
    handler, cannot say whether a URL is a file (no ``_isfile``)."""

    def __new__(cls, folder):
        from iopath.common.file_io import PathHandler

        class Handler(PathHandler):
            PREFIX = "yacstest://"

            def _get_supported_prefixes(self):
                return [self.PREFIX]

            def _local(self, path):
                return os.path.join(folder, path[len(self.PREFIX) :])

            def _get_local_path(self, path, **kwargs):
                return self._local(path)

            def _open(self, path, mode="r", **kwargs):
                return open(self._local(path), mode)

        return Handler()


def test_a_yaml_url_is_read_through_path_manager(tmp_path):
    """config_file may be "anything detectron2's PathManager opens": an http URL's handler
    cannot tell whether it is a file, and its NotImplementedError (with no message) stopped the
    build (detectron2's merge_from_file asks it too). The URL's local copy is read, its relative
    _BASE_ beside it."""
    from detectron2.utils.file_io import PathManager

    folder = tmp_path / "served"
    folder.mkdir()
    _tiny_retinanet_yaml(folder / "base.yaml", fpn=16)
    (folder / "child.yaml").write_text(
        '_BASE_: "base.yaml"\nMODEL: {RETINANET: {NUM_CLASSES: 5}}\n'
    )
    PathManager.register_handler(_FolderURLs(str(folder)), allow_override=True)
    cfg = load_yacs_config("yacstest://child.yaml")
    assert cfg.MODEL.RETINANET.NUM_CLASSES == 5 and cfg.MODEL.FPN.OUT_CHANNELS == 16


def test_a_file_url_is_a_local_yaml(tmp_path):
    """A file:// config_file is the local file, as DetKD's checkpoint paths and detkd.repro's
    config check take it (PathManager.isfile says False for it: it was looked up in the model
    zoo, "neither a file nor a config")."""
    _tiny_retinanet_yaml(tmp_path / "r18.yaml", fpn=16)
    cfg = load_yacs_config(
        f"file://{tmp_path / 'r18.yaml'}", opts=["MODEL.RETINANET.NUM_CLASSES", 5]
    )
    assert cfg.MODEL.RETINANET.NUM_CLASSES == 5 and cfg.MODEL.FPN.OUT_CHANNELS == 16
    model = build_yacs_detector(f"file://{tmp_path / 'r18.yaml'}")
    assert model.backbone.output_shape()["p3"].channels == 16


def test_config_errors_name_the_yaml_keys_of_a_yacs_student(tmp_path):
    """A yacs node has no input_format / num_classes arguments (train_net.py refuses a
    model.student.input_format override): the errors of a loader in another channel order and
    of another class count named those keys; they name the .yaml's, and where to set them."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    from detkd.config_checks import check_input_format, check_override_keys
    from detkd.engine import KDTrainer

    from test_train_net import _coco_json

    s_yaml = _tiny_retinanet_yaml(tmp_path / "student.yaml", fpn=16, rgb=True)
    cfg = _small_cfg(tmp_path / "run", max_iter=2)
    cfg.model.student = L(build_yacs_detector)(config_file=s_yaml)
    cfg.model.teacher = L(build_yacs_detector)(
        config_file=_tiny_retinanet_yaml(tmp_path / "t.yaml", fpn=32)
    )
    with pytest.raises(KeyError, match="'model.student' has no key 'input_format'"):
        check_override_keys(cfg, ["model.student.input_format=BGR"])
    with pytest.raises(
        ValueError,
        match=r"image_format is 'BGR' but the student takes 'RGB' images \(INPUT\.FORMAT "
        r"of model\.student's \.yaml or model\.student\.opts\)",
    ):
        KDTrainer(cfg)
    plain = build_yacs_detector(s_yaml)
    with pytest.raises(
        ValueError,
        match=r"the model takes 'RGB' images \(INPUT\.FORMAT of model's \.yaml or model\.opts\)",
    ):
        check_input_format(
            OmegaConf.create({"model": cfg.model.student, "dataloader": cfg.dataloader}), plain
        )

    for loader in (cfg.dataloader.train, cfg.dataloader.test):
        loader.mapper.image_format = "RGB"
    if "detkd_yacs_two" not in DatasetCatalog.list():
        register_coco_instances(
            "detkd_yacs_two", {}, _coco_json(tmp_path / "two.json", ["cat", "dog"]), str(tmp_path)
        )
    cfg.dataloader.train.dataset.names = cfg.dataloader.test.dataset.names = "detkd_yacs_two"
    with pytest.raises(
        ValueError,
        match=r"The student predicts 3 classes but the training dataset 'detkd_yacs_two' "
        r"has 2 \(cat, dog\)\. Set MODEL\.RETINANET\.NUM_CLASSES: 2 in "
        r"model\.student's \.yaml or model\.student\.opts \(the teacher's",
    ):
        KDTrainer(cfg)
    cfg.model.student.opts = ["MODEL.RETINANET.NUM_CLASSES", 2]  # the fix it names
    KDTrainer(cfg)


def test_a_run_in_its_teachers_folder_is_refused_before_it_overwrites_the_teacher(tmp_path):
    """train.output_dir = the folder DefaultTrainer trained the teacher in (its config.yaml and
    model_final.pth): default_setup replaced the teacher's config.yaml with the run's before the
    yacs teacher was built from it (then a misleading 'is a LazyConfig' error, the .yaml lost),
    and a run that got past it saved its own model_final.pth over the teacher's weights."""
    import importlib.util

    from detkd.engine import KDTrainer

    from conftest import REPO

    folder = tmp_path / "my_teacher"  # as DefaultTrainer leaves it
    folder.mkdir()
    _tiny_retinanet_yaml(folder / "config.yaml", fpn=32)
    teacher = build_yacs_detector(str(folder / "config.yaml"))
    torch.save({"model": teacher.state_dict(), "iteration": 9}, folder / "model_final.pth")
    (folder / "last_checkpoint").write_text("model_final.pth")
    saved = {f: (folder / f).read_bytes() for f in ("config.yaml", "model_final.pth")}

    config = tmp_path / "my_kd.py"
    config.write_text(
        "from detectron2.config import LazyCall as L, LazyConfig\n"
        "from detkd.modeling import build_yacs_detector\n"
        f"_c = LazyConfig.load({os.path.join(REPO, 'configs/demo/pkd_retinanet.py')!r})\n"
        "model, dataloader, optimizer, lr_multiplier, train = "
        "_c.model, _c.dataloader, _c.optimizer, _c.lr_multiplier, _c.train\n"
        f"model.teacher = L(build_yacs_detector)(config_file={str(folder / 'config.yaml')!r})\n"
        f"train.teacher_checkpoint = {str(folder / 'model_final.pth')!r}\n"
        f"train.output_dir = {str(folder)!r}\n"
    )
    spec = importlib.util.spec_from_file_location(
        "detkd_train_net", os.path.join(REPO, "train_net.py")
    )
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    args = train_net.default_argument_parser().parse_args(["--config-file", str(config)])
    with pytest.raises(
        ValueError,
        match=r"model\.teacher\.config_file '.*my_teacher/config\.yaml' is the "
        r"config\.yaml of this run's train\.output_dir",
    ):
        train_net.main(args)
    assert {f: (folder / f).read_bytes() for f in saved} == saved

    # KDTrainer (and train_net.py with the teacher's .yaml elsewhere): its checkpoint
    cfg = _small_cfg(folder, max_iter=2)
    elsewhere = _tiny_retinanet_yaml(tmp_path / "elsewhere.yaml", fpn=32)
    cfg.model.teacher = L(build_yacs_detector)(config_file=elsewhere)
    cfg.train.update(teacher_checkpoint=str(folder / "model_final.pth"), teacher_random_init=False)
    with pytest.raises(
        ValueError,
        match=r"train\.teacher_checkpoint '.*my_teacher/model_final\.pth' is in this "
        r"run's train\.output_dir .* the teacher's weights would be replaced",
    ):
        KDTrainer(cfg)
    cfg.train.teacher_checkpoint = str(folder / "teacher_weights.pth")  # another name: kept
    KDTrainer(cfg)
    assert {f: (folder / f).read_bytes() for f in saved} == saved


def test_a_yacs_file_with_a_stray_lowercase_model_key_is_a_key_error_not_a_lazyconfig(tmp_path):
    """A yacs .yaml (it has MODEL) with a mistyped key `model:` is a yacs config with a key
    detectron2 does not have, named as such, not reported as a LazyConfig's config.yaml."""
    yaml = _tiny_retinanet_yaml(tmp_path / "s.yaml", fpn=16)
    (tmp_path / "typo.yaml").write_text(
        f'_BASE_: "{yaml}"\nmodel: {{RETINANET: {{NUM_CLASSES: 2}}}}\n'
    )
    with pytest.raises(KeyError, match=r"typo\.yaml: Non-existent config key: model.*add_config"):
        load_yacs_config(str(tmp_path / "typo.yaml"))


def test_a_yacs_assertion_that_is_not_about_keys_is_not_reported_as_a_missing_key(tmp_path):
    """yacs asserts for more than a missing key (a newer config VERSION): that error is raised
    as it is, not as a KeyError with the add_config hint."""
    (tmp_path / "v3.yaml").write_text("VERSION: 3\nMODEL: {RETINANET: {NUM_CLASSES: 2}}\n")
    with pytest.raises(AssertionError, match="Cannot merge a v3 config into a v2 config"):
        load_yacs_config(str(tmp_path / "v3.yaml"))
