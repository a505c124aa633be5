"""detkd.viz: the values its pictures show, against independent computations on tiny random
models."""

import numpy as np
import torch

import detkd.viz as viz

import pytest
from conftest import REPO, make_inputs


def test_pkd_view_teacher_maps_in_the_teachers_channel_order(tmp_path, monkeypatch):
    """Student RGB, teacher BGR: the teacher's maps are of the image in BGR order (what the
    distiller's teacher_images gives it), and r is numpy's corrcoef of the drawn maps."""
    from detectron2.config import LazyConfig, instantiate

    cfg_path = tmp_path / "pkd_rgb_student.py"
    cfg_path.write_text(
        "from detectron2.config import LazyConfig\n"
        f"cfg = LazyConfig.load('{REPO}/configs/demo/pkd_retinanet.py')\n"
        "model = cfg.model\n"
        "model.student.input_format = 'RGB'\n"
        "dataloader = cfg.dataloader\n"
        "dataloader.test.mapper.image_format = 'RGB'  # else refused, as in training\n"
    )
    cfg = LazyConfig.load(str(cfg_path))
    torch.manual_seed(0)
    nets = {
        "t": instantiate(cfg.model.teacher),
        "s0": instantiate(cfg.model.student),
        "s1": instantiate(cfg.model.student),
    }
    for n, m in nets.items():
        torch.save({"model": m.state_dict()}, tmp_path / f"{n}.pth")
    inputs = make_inputs(1, size=(96, 128), seed=3)  # images in the student's (RGB) order
    monkeypatch.setattr(viz, "_load_image", lambda cfg, index: inputs)
    got = {}
    orig = viz.draw_fpn_activations

    def spy(image, rows, levels, path, reference="teacher"):
        got.update(rows=rows, levels=levels, corr=orig(image, rows, levels, path, reference))
        return got["corr"]

    monkeypatch.setattr(viz, "draw_fpn_activations", spy)
    viz.main(
        [
            "pkd",
            "--config",
            str(cfg_path),
            "--teacher",
            str(tmp_path / "t.pth"),
            "--before",
            str(tmp_path / "s0.pth"),
            "--after",
            str(tmp_path / "s1.pth"),
            "--out",
            str(tmp_path / "pkd.png"),
        ]
    )
    t = nets["t"].eval()
    x = (
        inputs[0]["image"].flip(0).float() - t.pixel_mean
    ) / t.pixel_std  # RGB -> the teacher's BGR
    with torch.no_grad():
        feats = t.backbone(x[None])
    for lvl in got["levels"]:
        assert torch.allclose(got["rows"]["teacher"][lvl], feats[lvl][0], atol=1e-5), lvl
        for name in ("student alone", "student + KD"):
            a = got["rows"][name][lvl].amax(0).numpy().ravel()
            b = got["rows"]["teacher"][lvl].amax(0).numpy().ravel()
            assert abs(got["corr"][name][lvl] - np.corrcoef(a, b)[0, 1]) < 1e-5


def test_pkd_view_channel_orders_of_models_without_input_format(tmp_path, monkeypatch):
    """As DistillationDetector: an FCOS student's data order is model.student_input_format
    (the view ignored it: RGB data reached the BGR teacher unflipped and was shown as BGR), and
    an FCOS teacher takes the student's order (the view flipped the data for it); the picture
    shows the data in the loader's order (the test mapper's image_format), also for an FCOS
    student of unknown order beside an RGB teacher (it was drawn as BGR)."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.structures import ImageList

    inputs = make_inputs(1, size=(64, 96), seed=4)
    monkeypatch.setattr(viz, "_load_image", lambda cfg, index: inputs)
    fcos = (
        "m._target_ = FCOS\n"
        "del m.anchor_generator, m.box2box_transform, m.anchor_matcher, m.input_format\n"
        "m.head._target_ = FCOSHead\n"
        "del m.head.num_anchors\n"
    )
    cases = {  # the teacher is BGR, or the student is
        "fcos_student_rgb": "m = model.student\n" + fcos + "model.student_input_format = 'RGB'\n"
        "cfg.dataloader.test.mapper.image_format = 'RGB'\n",  # else refused, as in training
        "fcos_teacher": "m = model.teacher\n" + fcos,
        # an FCOS student of unknown order beside an RGB teacher: the data is taken as the
        # teacher's (RGB, as the loader's), and was drawn as BGR
        "fcos_student_rgb_teacher": "m = model.student\n"
        + fcos
        + "model.teacher.input_format = 'RGB'\n"
        "cfg.dataloader.test.mapper.image_format = 'RGB'\n",
    }
    for case, change in cases.items():
        flipped = case == "fcos_student_rgb"  # for the teacher
        rgb_data = case != "fcos_teacher"
        cfg_path = tmp_path / f"{case}.py"
        cfg_path.write_text(
            "from detectron2.config import LazyConfig\n"
            "from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead\n"
            f"cfg = LazyConfig.load('{REPO}/configs/demo/pkd_retinanet.py')\n"
            "model = cfg.model\n" + change + "dataloader = cfg.dataloader\n"
        )
        cfg = LazyConfig.load(str(cfg_path))
        torch.manual_seed(2)
        nets = {"t": instantiate(cfg.model.teacher), "s": instantiate(cfg.model.student)}
        for n, m in nets.items():
            torch.save({"model": m.state_dict()}, tmp_path / f"{case}_{n}.pth")
        got = {}
        monkeypatch.setattr(
            viz,
            "draw_fpn_activations",
            lambda image, rows, *a, **kw: got.update(image=image, rows=rows) or {},
        )
        t_path, s_path = str(tmp_path / f"{case}_t.pth"), str(tmp_path / f"{case}_s.pth")
        viz.main(
            [
                "pkd",
                "--config",
                str(cfg_path),
                "--teacher",
                t_path,
                "--before",
                s_path,
                "--after",
                s_path,
                "--out",
                str(tmp_path / "pkd.png"),
            ]
        )
        t = nets["t"].eval()
        image = inputs[0]["image"].float()
        x = ((image.flip(0) if flipped else image) - t.pixel_mean) / t.pixel_std
        with torch.no_grad():
            feats = t.backbone(ImageList.from_tensors([x], 32).tensor)
        for lvl, v in got["rows"]["teacher"].items():
            expected = feats[lvl][0, :, : v.shape[1], : v.shape[2]]
            assert torch.allclose(v, expected, atol=1e-5), (case, lvl)
        # the picture: RGB data as it is, BGR data flipped
        rgb = inputs[0]["image"].permute(1, 2, 0).numpy()
        assert np.array_equal(got["image"], rgb if rgb_data else rgb[:, :, ::-1]), case


def _capture_draw_boxes(monkeypatch):
    """A dict that each call of viz.draw_boxes fills (image, boxes, colors and its keyword
    arguments) in place of drawing."""
    drawn = {}
    monkeypatch.setattr(
        viz,
        "draw_boxes",
        lambda image, boxes, colors, path, **kw: drawn.update(
            image=image, boxes=boxes, colors=colors, **kw
        ),
    )
    return drawn


def _capture_fpn_rows(monkeypatch):
    """A dict that each call of viz.draw_fpn_activations fills (its rows and levels) in place
    of drawing."""
    got = {}
    monkeypatch.setattr(
        viz,
        "draw_fpn_activations",
        lambda image, rows, levels, *a, **kw: got.update(rows=rows, levels=levels) or {},
    )
    return got


def _frozen_norm_train(model):
    """Training mode with BatchNorm on its running statistics: the student's outputs are those
    of eval mode, so a training step selects from what the views see."""
    model.train()
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout)):
            m.eval()
    return model


def test_gid_view_draws_the_instances_training_selects_for_an_fcos_student_of_a_retinanet(
    tmp_path, monkeypatch
):
    """configs/GID/fcos_R50_from_retinanet_R101_1x.py's pairing (selection="location"): the
    drawn boxes and scores are those the distiller's own selection gives for the same image
    (the view used to feed the per-anchor outputs of both heads, 9 vs 1 per location, to the
    per-anchor selection and failed)."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.utils.events import EventStorage

    cfg_path = tmp_path / "gid_fcos.py"
    cfg_path.write_text(
        "from detectron2.config import LazyCall as L, LazyConfig\n"
        "from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead\n"
        "from detkd.losses import GIDDistiller\n"
        f"cfg = LazyConfig.load('{REPO}/configs/demo/gid_retinanet.py')\n"
        "model = cfg.model\n"
        "s = model.student\n"
        "s._target_ = FCOS\n"
        "del s.anchor_generator, s.box2box_transform, s.anchor_matcher, s.input_format\n"
        "s.head._target_ = FCOSHead\n"
        "del s.head.num_anchors\n"
        "model.distillers = {'gid': L(GIDDistiller)(selection='location', response=False, "
        "min_size=2.0)}\n"
        "dataloader = cfg.dataloader\n"
    )
    cfg = LazyConfig.load(str(cfg_path))
    torch.manual_seed(0)
    teacher, student = instantiate(cfg.model.teacher), instantiate(cfg.model.student)
    with torch.no_grad():  # confident, varied scores and boxes of a few pixels at least
        student.head.cls_score.weight.mul_(100)
        student.head.bbox_pred.bias.fill_(1.5)
        teacher.head.cls_score.weight.mul_(100)
    torch.save({"model": teacher.state_dict()}, tmp_path / "t.pth")
    torch.save({"model": student.state_dict()}, tmp_path / "s.pth")
    inputs = make_inputs(1, size=(96, 128), seed=3)
    monkeypatch.setattr(viz, "_load_image", lambda cfg, index: inputs)
    drawn = _capture_draw_boxes(monkeypatch)
    viz.main(
        [
            "gid",
            "--config",
            str(cfg_path),
            "--teacher",
            str(tmp_path / "t.pth"),
            "--student",
            str(tmp_path / "s.pth"),
            "--out",
            str(tmp_path / "gid.png"),
        ]
    )

    # What a training step of the same model selects (BatchNorm on its running statistics).
    kd = instantiate(cfg.model)
    kd.teacher.load_state_dict(teacher.state_dict())
    kd.student.load_state_dict(student.state_dict())
    gid = kd.distillers["gid"]
    assert gid.location_strides is not None
    selected = []
    select = gid._select
    gid._select = lambda *a: selected.append(select(*a)) or selected[-1]
    with EventStorage():
        _frozen_norm_train(kd)(inputs)
    ((boxes, scores),) = selected[0]
    assert len(boxes) > 0
    assert np.allclose(drawn["boxes"], boxes.tensor.numpy(), atol=1e-4)
    assert drawn["labels"] == [f"{x:.2f}" for x in scores.tolist()]


def test_d3etr_view_runs_the_teacher_on_its_own_channel_order(tmp_path, monkeypatch):
    """Student BGR, teacher RGB: the teacher's boxes drawn are its predictions for the image in
    RGB order (as in training, DistillationDetector.teacher_images), the student's those
    matched to them by the distiller's adaptive matching; boxes scaled to the input image."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.structures import ImageList
    from torchvision.ops import box_convert

    cfg_path = tmp_path / "d3etr_rgb_teacher.py"
    cfg_path.write_text(
        "from detectron2.config import LazyConfig\n"
        f"cfg = LazyConfig.load('{REPO}/configs/demo/d3etr_detr.py')\n"
        "model = cfg.model\n"
        "model.teacher.input_format = 'RGB'\n"
        "model.teacher.pixel_mean = [123.675, 116.280, 103.530]\n"
        "model.teacher.pixel_std = [58.395, 57.120, 57.375]\n"
        "dataloader = cfg.dataloader\n"
    )
    cfg = LazyConfig.load(str(cfg_path))
    torch.manual_seed(0)
    teacher, student = instantiate(cfg.model.teacher).eval(), instantiate(cfg.model.student).eval()
    torch.save({"model": teacher.state_dict()}, tmp_path / "t.pth")
    torch.save({"model": student.state_dict()}, tmp_path / "s.pth")
    inputs = make_inputs(1, size=(90, 120), seed=4)  # images in the student's (BGR) order
    monkeypatch.setattr(viz, "_load_image", lambda cfg, index: inputs)
    drawn = _capture_draw_boxes(monkeypatch)
    viz.main(
        [
            "d3etr",
            "--config",
            str(cfg_path),
            "--teacher",
            str(tmp_path / "t.pth"),
            "--student",
            str(tmp_path / "s.pth"),
            "--top",
            "5",
            "--out",
            str(tmp_path / "d3.png"),
        ]
    )

    img = inputs[0]["image"].float()
    x_t = (img.flip(0) - teacher.pixel_mean) / teacher.pixel_std  # BGR -> the teacher's RGB
    x_s = (img - student.pixel_mean) / student.pixel_std
    with torch.no_grad():
        t = teacher.forward_predictions(ImageList.from_tensors([x_t], 32))
        s = student.forward_predictions(ImageList.from_tensors([x_s], 32))
    d3 = instantiate(cfg.model).distillers["d3etr"]
    ti, si, _ = d3._match(
        t["pred_logits"][-1:], t["pred_boxes"][-1:], s["pred_logits"][-1:], s["pred_boxes"][-1:]
    )
    conf = t["pred_logits"][-1, 0].sigmoid().amax(-1)
    best = [int(q) for q in ti[0, 0][conf[ti[0, 0]].argsort(descending=True)[:5]]]
    partner = dict(zip(ti[0, 0].tolist(), si[0, 0].tolist()))
    scale = torch.tensor([120.0, 90.0, 120.0, 90.0])
    t_boxes = box_convert(t["pred_boxes"][-1, 0, best], "cxcywh", "xyxy") * scale
    s_boxes = (
        box_convert(s["pred_boxes"][-1, 0, [partner[q] for q in best]], "cxcywh", "xyxy") * scale
    )
    assert np.allclose(drawn["boxes"], torch.cat([t_boxes, s_boxes]).numpy(), atol=1e-3)
    assert drawn["pairs"] == [(i, i + 5) for i in range(5)]


def test_pkd_view_maps_cover_the_image_not_its_padding(tmp_path, monkeypatch):
    """A 70 x 100 image is padded to 96 x 128 (size divisibility 32): each level's map is drawn,
    and correlated, on the ceil(70 / s) x ceil(100 / s) cells of the image shown next to it."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.structures import ImageList

    cfg_path = f"{REPO}/configs/demo/pkd_retinanet.py"
    cfg = LazyConfig.load(cfg_path)
    torch.manual_seed(1)
    nets = {
        "t": instantiate(cfg.model.teacher),
        "s0": instantiate(cfg.model.student),
        "s1": instantiate(cfg.model.student),
    }
    for n, m in nets.items():
        torch.save({"model": m.state_dict()}, tmp_path / f"{n}.pth")
    inputs = make_inputs(1, size=(70, 100), seed=5)
    monkeypatch.setattr(viz, "_load_image", lambda cfg, index: inputs)
    got = {}
    orig = viz.draw_fpn_activations

    def spy(image, rows, levels, path, reference="teacher"):
        got.update(
            image=image, rows=rows, levels=levels, corr=orig(image, rows, levels, path, reference)
        )
        return got["corr"]

    monkeypatch.setattr(viz, "draw_fpn_activations", spy)
    viz.main(
        [
            "pkd",
            "--config",
            cfg_path,
            "--teacher",
            str(tmp_path / "t.pth"),
            "--before",
            str(tmp_path / "s0.pth"),
            "--after",
            str(tmp_path / "s1.pth"),
            "--out",
            str(tmp_path / "pkd.png"),
        ]
    )
    assert got["image"].shape == (70, 100, 3) and got["levels"] == ["p3", "p4", "p5", "p6"]
    t = nets["t"].eval()
    x = (inputs[0]["image"].float() - t.pixel_mean) / t.pixel_std
    with torch.no_grad():
        feats = t.backbone(ImageList.from_tensors([x], 32).tensor)  # (96, 128) padded
    for lvl, s in zip(got["levels"], (8, 16, 32, 64)):
        hs, ws = -(-70 // s), -(-100 // s)  # p3 9 x 13 of 12 x 16, p6 2 x 2 of 2 x 2
        for name in ("teacher", "student alone", "student + KD"):
            assert tuple(got["rows"][name][lvl].shape[-2:]) == (hs, ws), (name, lvl)
        assert torch.allclose(got["rows"]["teacher"][lvl], feats[lvl][0, :, :hs, :ws], atol=1e-5)
        a = got["rows"]["student alone"][lvl].amax(0).numpy().ravel()
        b = feats[lvl][0, :, :hs, :ws].amax(0).numpy().ravel()
        assert abs(got["corr"]["student alone"][lvl] - np.corrcoef(a, b)[0, 1]) < 1e-5


def test_view_errors_name_the_problem(tmp_path):
    """A missing config, a config without a teacher, one without the view's distiller, and a
    student checkpoint of another model (it used to be loaded half, silently) are clear errors."""
    from detectron2.config import LazyConfig, instantiate

    from detkd.checkpoint import CheckpointMismatchError

    import pytest

    demo = f"{REPO}/configs/demo"
    cfg = LazyConfig.load(f"{demo}/pkd_retinanet.py")
    torch.manual_seed(0)
    teacher, student = instantiate(cfg.model.teacher), instantiate(cfg.model.student)
    torch.save({"model": teacher.state_dict()}, tmp_path / "t.pth")
    torch.save({"model": student.state_dict()}, tmp_path / "s.pth")
    t, s = str(tmp_path / "t.pth"), str(tmp_path / "s.pth")
    with pytest.raises(SystemExit, match=r"\[viz gid\] config not found: .*nope\.py"):
        viz.main(["gid", "--config", f"{demo}/nope.py", "--teacher", t, "--student", s])
    with pytest.raises(SystemExit, match=r"student_retinanet\.py is not a distillation config"):
        viz.main(
            ["gid", "--config", f"{demo}/student_retinanet.py", "--teacher", t, "--student", s]
        )
    with pytest.raises(
        SystemExit,
        match=r"pkd_retinanet\.py has no GIDDistiller "
        r"\(its distillers: \{'pkd': 'PKDDistiller'\}\)",
    ):
        viz.main(["gid", "--config", f"{demo}/pkd_retinanet.py", "--teacher", t, "--student", s])
    with pytest.raises(SystemExit, match="has no D3ETRDistiller"):
        viz.main(["d3etr", "--config", f"{demo}/pkd_retinanet.py", "--teacher", t, "--student", s])
    # the DETR runs' checkpoints with a RetinaNet config: the config is named, not the teacher
    # checkpoint that does not fit its teacher (it used to stop on TeacherCheckpointError)
    detr = LazyConfig.load(f"{demo}/d3etr_detr.py")
    torch.save({"model": instantiate(detr.model.teacher).state_dict()}, tmp_path / "detr_t.pth")
    torch.save({"model": instantiate(detr.model.student).state_dict()}, tmp_path / "detr_s.pth")
    dt, ds = str(tmp_path / "detr_t.pth"), str(tmp_path / "detr_s.pth")
    for view, name in (("d3etr", "D3ETRDistiller"), ("gid", "GIDDistiller")):
        with pytest.raises(SystemExit, match=rf"pkd_retinanet\.py has no {name}"):
            viz.main(
                [view, "--config", f"{demo}/pkd_retinanet.py", "--teacher", dt, "--student", ds]
            )
    # the teacher's weights as --before
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        viz.main(
            [
                "pkd",
                "--config",
                f"{demo}/pkd_retinanet.py",
                "--teacher",
                t,
                "--before",
                t,
                "--after",
                s,
                "--out",
                str(tmp_path / "pkd.png"),
            ]
        )


def test_view_option_errors_name_the_option(tmp_path):
    """Wrong options are SystemExits naming the option, not tracebacks from fvcore, PIL or a
    dict: a missing student checkpoint (an AssertionError), an output folder that does not
    exist (a FileNotFoundError after the models ran), an image index past the test set (a bare
    IndexError), levels the models do not have (KeyError), and a decoder layer past the last
    (--layer 10 of 3 layers silently drew layer 1); --top 0 or -3 drew none or all but 3."""
    from detectron2.config import LazyConfig, instantiate

    import pytest

    demo = f"{REPO}/configs/demo"
    ck = {}
    for name in ("pkd_retinanet", "d3etr_detr"):
        cfg = LazyConfig.load(f"{demo}/{name}.py")
        torch.manual_seed(0)
        for role in ("teacher", "student"):
            ck[name, role] = str(tmp_path / f"{name}_{role}.pth")
            torch.save({"model": instantiate(cfg.model[role]).state_dict()}, ck[name, role])
    t, s = ck["pkd_retinanet", "teacher"], ck["pkd_retinanet", "student"]
    pkd = [
        "pkd",
        "--config",
        f"{demo}/pkd_retinanet.py",
        "--teacher",
        t,
        "--before",
        s,
        "--after",
        s,
    ]
    out = ["--out", str(tmp_path / "v.png")]
    with pytest.raises(SystemExit, match=r"\[viz pkd\] --after: no checkpoint file .*nope\.pth"):
        viz.main(pkd[:-2] + ["--after", str(tmp_path / "nope.pth")] + out)
    with pytest.raises(
        SystemExit, match=r"\[viz pkd\] --out .*: the folder .*nodir does not exist"
    ):
        viz.main(pkd + ["--out", str(tmp_path / "nodir" / "v.png")])
    with pytest.raises(SystemExit, match=r"--index -1: an image index is 0 or more"):
        viz.main(pkd + out + ["--index", "-1"])
    small = tmp_path / "pkd_4_images.py"  # the demo's test set, 4 images of it
    small.write_text(
        "from detectron2.config import LazyConfig\n"
        f"cfg = LazyConfig.load('{demo}/pkd_retinanet.py')\n"
        "model, dataloader = cfg.model, cfg.dataloader\n"
        "dataloader.test.dataset.names.num_images = 4\n"
    )
    with pytest.raises(
        SystemExit, match=r"--index 4: the config's test set has 4 images \(0 to 3\)"
    ):
        viz.main(["pkd", "--config", str(small)] + pkd[3:] + out + ["--index", "4"])
    levels = r"the levels both models have are \['p3', 'p4', 'p5', 'p6', 'p7'\]"
    with pytest.raises(SystemExit, match=rf"--levels p3 p9: {levels}"):
        viz.main(pkd + out + ["--levels", "p3", "p9"])
    assert not (tmp_path / "v.png").exists()
    d3 = [
        "d3etr",
        "--config",
        f"{demo}/d3etr_detr.py",
        "--teacher",
        ck["d3etr_detr", "teacher"],
        "--student",
        ck["d3etr_detr", "student"],
    ] + out
    layers = len(
        instantiate(
            LazyConfig.load(f"{demo}/d3etr_detr.py").model.teacher
        ).transformer.decoder.layers
    )
    with pytest.raises(
        SystemExit, match=rf"--layer {layers}: the teacher's decoder has {layers} layers"
    ):
        viz.main(d3 + ["--layer", str(layers)])
    with pytest.raises(SystemExit, match=rf"--layer -{layers + 1}: "):
        viz.main(d3 + ["--layer", str(-layers - 1)])
    for top in ("0", "-3"):
        with pytest.raises(SystemExit, match=rf"--top {top}: draw at least 1 pair"):
            viz.main(d3 + ["--top", top])
    viz.main(d3 + ["--layer", str(-layers)])  # the first layer, counted from the last
    assert (tmp_path / "v.png").stat().st_size > 1000


def _run_pkd_view(tmp_path, monkeypatch, model_lines):
    """Run the PKD view on a config of the demo's data and ``model_lines`` (the code that sets
    ``model``), random weights, one 70 x 100 image; what it would draw and the views' args."""
    from detectron2.config import LazyConfig, instantiate

    cfg_path = tmp_path / "pkd_view.py"
    cfg_path.write_text(
        "from detectron2.config import LazyCall as L\n"
        "from detectron2.config import LazyConfig\n"
        "from detkd import DistillationDetector, PKDDistiller\n"
        f"dataloader = LazyConfig.load('{REPO}/configs/demo/pkd_retinanet.py').dataloader\n"
        + model_lines
    )
    cfg = LazyConfig.load(str(cfg_path))
    torch.manual_seed(0)
    nets = {"t": instantiate(cfg.model.teacher), "s": instantiate(cfg.model.student)}
    for n, m in nets.items():
        torch.save({"model": m.state_dict()}, tmp_path / f"{n}.pth")
    inputs = make_inputs(1, size=(70, 100), seed=5)
    monkeypatch.setattr(viz, "_load_image", lambda cfg, index: inputs)
    got = _capture_fpn_rows(monkeypatch)
    args = [
        "pkd",
        "--config",
        str(cfg_path),
        "--teacher",
        str(tmp_path / "t.pth"),
        "--before",
        str(tmp_path / "s.pth"),
        "--after",
        str(tmp_path / "s.pth"),
        "--out",
        str(tmp_path / "p.png"),
    ]
    viz.main(args)
    return nets, inputs, got, args


def test_pkd_view_pairs_levels_by_stride_for_a_student_with_level_names_of_its_own(
    tmp_path, monkeypatch
):
    """README, Other backbones: a custom student backbone (levels s8, s16, s32) with an FPN
    teacher (p2-p6), paired by stride as PKD pairs them. The view paired levels by name: no
    common level, and it failed with an IndexError from matplotlib's axes."""
    from detectron2.structures import ImageList

    nets, inputs, got, args = _run_pkd_view(
        tmp_path,
        monkeypatch,
        (
            "from conftest import tiny_faster_rcnn_cfg\n"
            "from test_custom_models import custom_retinanet\n"
            "model = L(DistillationDetector)(student=custom_retinanet(), "
            "teacher=tiny_faster_rcnn_cfg(),\n"
            "    distillers={'pkd': L(PKDDistiller)(num_levels=None)})\n"
        ),
    )
    assert got["levels"] == ["s8", "s16", "s32"]  # finest first, the student's names
    t = nets["t"].eval()
    x = (inputs[0]["image"].float() - t.pixel_mean) / t.pixel_std
    with torch.no_grad():
        feats = t.backbone(ImageList.from_tensors([x], 32).tensor)
    for lvl, t_lvl, s in (("s8", "p3", 8), ("s16", "p4", 16), ("s32", "p5", 32)):
        hs, ws = -(-70 // s), -(-100 // s)
        assert torch.allclose(got["rows"]["teacher"][lvl], feats[t_lvl][0, :, :hs, :ws], atol=1e-5)
        assert tuple(got["rows"]["student + KD"][lvl].shape[-2:]) == (hs, ws)
    viz.main(args + ["--levels", "s16"])
    assert got["levels"] == ["s16"]


def _demo_checkpoints(tmp_path, cfg, seed=0):
    """Random teacher and student weights of ``cfg.model`` saved as t.pth and s.pth."""
    from detectron2.config import instantiate

    torch.manual_seed(seed)
    paths = []
    for role, name in (("teacher", "t.pth"), ("student", "s.pth")):
        torch.save({"model": instantiate(cfg.model[role]).state_dict()}, tmp_path / name)
        paths.append(str(tmp_path / name))
    return paths


def test_views_show_the_image_the_test_mapper_makes(tmp_path, monkeypatch):
    """The models see the test image as dataloader.test.mapper makes it (here resized by its
    ResizeShortestEdge): the views dropped the mapper's augmentations and ran the models on
    the file's own size. Picture, ground truth and boxes are in the resized image's
    coordinates; checked against detectron2's transform applied to the file independently."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.data import DatasetCatalog
    from detectron2.data import detection_utils as utils
    from detectron2.data import transforms as T
    from detectron2.structures import BoxMode

    cfg_path = tmp_path / "gid_resized.py"
    cfg_path.write_text(
        "import detectron2.data.transforms as T\n"
        "from detectron2.config import LazyCall as L, LazyConfig\n"
        f"cfg = LazyConfig.load('{REPO}/configs/demo/gid_retinanet.py')\n"
        "model, dataloader = cfg.model, cfg.dataloader\n"
        "dataloader.test.dataset.names.num_images = 4\n"
        "dataloader.test.mapper.augmentations = [\n"
        "    L(T.ResizeShortestEdge)(short_edge_length=200, max_size=300)]\n"
    )
    cfg = LazyConfig.load(str(cfg_path))
    t, s = _demo_checkpoints(tmp_path, cfg)
    records = DatasetCatalog.get(instantiate(cfg.dataloader.test.dataset.names))
    index = next(i for i, r in enumerate(records) if r["annotations"])
    record = records[index]
    image = utils.read_image(record["file_name"], format="BGR")
    tf = T.ResizeShortestEdge(200, 300).get_transform(image)
    resized = tf.apply_image(image)
    assert resized.shape[:2] != image.shape[:2]
    gt = np.array(
        [
            BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
            for a in record["annotations"]
        ]
    )
    gt = tf.apply_box(gt)

    from detkd.losses import GIDDistiller

    seen = {}
    select = GIDDistiller._select

    def spy_select(self, s_out, t_out, image_sizes):
        seen["image_sizes"] = list(image_sizes)
        return select(self, s_out, t_out, image_sizes)

    monkeypatch.setattr(GIDDistiller, "_select", spy_select)
    drawn = _capture_draw_boxes(monkeypatch)
    viz.main(
        [
            "gid",
            "--config",
            str(cfg_path),
            "--teacher",
            t,
            "--student",
            s,
            "--index",
            str(index),
            "--out",
            str(tmp_path / "gid.png"),
        ]
    )
    assert np.array_equal(drawn["image"], resized[:, :, ::-1])  # the resized image, as RGB
    assert seen["image_sizes"] == [resized.shape[:2]]  # what the models ran on
    assert np.allclose(drawn["gt_boxes"], gt, atol=1e-3)
    # The boxes: those a training step selects on the resized image (the file resized above).
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    kd = instantiate(cfg.model)
    kd.teacher.load_state_dict(torch.load(t)["model"])
    kd.student.load_state_dict(torch.load(s)["model"])
    h, w = resized.shape[:2]
    inst = Instances(
        (h, w),
        gt_boxes=Boxes(torch.as_tensor(gt, dtype=torch.float32)),
        gt_classes=torch.tensor([a["category_id"] - 1 for a in record["annotations"]]),
    )
    inputs = [{"image": torch.as_tensor(resized.transpose(2, 0, 1).copy()), "instances": inst}]
    selected = []
    monkeypatch.setattr(
        GIDDistiller, "_select", lambda *a: selected.append(select(*a)) or selected[-1]
    )
    with EventStorage():
        _frozen_norm_train(kd)(inputs)
    ((boxes, _),) = selected[0]
    assert len(boxes) > 0 and np.allclose(drawn["boxes"], boxes.tensor.numpy(), atol=1e-3)


def test_views_check_the_test_loaders_channel_order_as_training_does(tmp_path):
    """A test loader in RGB for a BGR student: evaluation (train_net.py) refuses it, the views
    ran on the swapped channels and drew maps and boxes of an image the models never see."""
    from detectron2.config import LazyConfig

    import pytest

    for view, name in (("pkd", "pkd_retinanet"), ("gid", "gid_retinanet"), ("d3etr", "d3etr_detr")):
        cfg_path = tmp_path / f"{name}_rgb_loader.py"
        cfg_path.write_text(
            "from detectron2.config import LazyConfig\n"
            f"cfg = LazyConfig.load('{REPO}/configs/demo/{name}.py')\n"
            "model, dataloader = cfg.model, cfg.dataloader\n"
            "dataloader.test.dataset.names.num_images = 4\n"
            "dataloader.test.mapper.image_format = 'RGB'\n"
        )
        t, s = _demo_checkpoints(tmp_path, LazyConfig.load(str(cfg_path)))
        weights = ["--before", s, "--after", s] if view == "pkd" else ["--student", s]
        with pytest.raises(
            ValueError,
            match=r"dataloader\.test\.mapper\.image_format is 'RGB' but "
            r"the student takes 'BGR' images \(model\.student\.input_format\)",
        ):
            viz.main(
                [
                    view,
                    "--config",
                    str(cfg_path),
                    "--teacher",
                    t,
                    *weights,
                    "--out",
                    str(tmp_path / f"{view}.png"),
                ]
            )
        assert not (tmp_path / f"{view}.png").exists()


def test_pkd_view_pads_each_model_as_training_does(tmp_path, monkeypatch):
    """A square-padding (ViTDet-style) backbone on one side: training pads the teacher's input
    as the student pads its own (DistillationDetector.teacher_images), the student's as it
    pads it itself. The view padded the teacher to its own square (192 x 192 for a 70 x 100
    image the student pads to 96 x 128), and a square student's teacher not at all."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.structures import ImageList

    inputs = make_inputs(1, size=(70, 100), seed=5)
    monkeypatch.setattr(viz, "_load_image", lambda cfg, index: inputs)
    for side in ("teacher", "student"):
        cfg_path = tmp_path / f"pkd_square_{side}.py"
        cfg_path.write_text(
            "from detectron2.config import LazyConfig\n"
            f"cfg = LazyConfig.load('{REPO}/configs/demo/pkd_retinanet.py')\n"
            "model, dataloader = cfg.model, cfg.dataloader\n"
            f"model.{side}.backbone.square_pad = 192\n"
        )
        cfg = LazyConfig.load(str(cfg_path))
        t_path, s_path = _demo_checkpoints(tmp_path, cfg, seed=1)
        got = _capture_fpn_rows(monkeypatch)
        viz.main(
            [
                "pkd",
                "--config",
                str(cfg_path),
                "--teacher",
                t_path,
                "--before",
                s_path,
                "--after",
                s_path,
                "--out",
                str(tmp_path / "pkd.png"),
            ]
        )
        t, s = instantiate(cfg.model.teacher).eval(), instantiate(cfg.model.student).eval()
        t.load_state_dict(torch.load(t_path)["model"])
        s.load_state_dict(torch.load(s_path)["model"])
        size = 192 if side == "student" else 0  # the student's square, for both models
        image = inputs[0]["image"].float()
        with torch.no_grad():
            padded = ImageList.from_tensors(
                [(image - t.pixel_mean) / t.pixel_std],
                32,
                padding_constraints={"square_size": size},
            ).tensor
            assert padded.shape[-2:] == ((192, 192) if size else (96, 128))
            t_feats = t.backbone(padded)
            s_feats = s.backbone(s.preprocess_image(inputs).tensor)
        for lvl, st in zip(got["levels"], (8, 16, 32, 64)):
            hs, ws = -(-70 // st), -(-100 // st)
            rows = got["rows"]
            t_map, s_map = t_feats[lvl][0, :, :hs, :ws], s_feats[lvl][0, :, :hs, :ws]
            assert torch.allclose(rows["teacher"][lvl], t_map, atol=1e-4), (side, lvl)
            for name in ("student alone", "student + KD"):
                assert torch.allclose(rows[name][lvl], s_map, atol=1e-4), (side, lvl)


def test_index_counts_images_when_the_test_loader_batches_several(tmp_path):
    """A test loader of batch size 2 (faster evaluation): --index is still an image of the test
    set, one image. It was a batch: --index 1 gave images 2 and 3, and the GID view failed to
    unpack two images' selections."""
    from detectron2.config import LazyConfig, instantiate

    cfg_path = tmp_path / "gid_batch2.py"
    cfg_path.write_text(
        "from detectron2.config import LazyConfig\n"
        f"cfg = LazyConfig.load('{REPO}/configs/demo/gid_retinanet.py')\n"
        "model, dataloader = cfg.model, cfg.dataloader\n"
        "dataloader.test.dataset.names.num_images = 4\n"
        "dataloader.test.batch_size = 2\n"
    )
    cfg = LazyConfig.load(str(cfg_path))
    inputs = viz._load_image(cfg, 1)
    cfg = LazyConfig.load(str(cfg_path))
    cfg.dataloader.test.batch_size = 1
    cfg.dataloader.test.num_workers = 0
    expected = next(x for k, x in enumerate(instantiate(cfg.dataloader.test)) if k == 1)
    assert len(inputs) == 1 and inputs[0]["file_name"] == expected[0]["file_name"]
    assert torch.equal(inputs[0]["image"], expected[0]["image"])
    t, s = _demo_checkpoints(tmp_path, cfg)
    viz.main(
        [
            "gid",
            "--config",
            str(cfg_path),
            "--teacher",
            t,
            "--student",
            s,
            "--index",
            "1",
            "--out",
            str(tmp_path / "gid.png"),
        ]
    )
    assert (tmp_path / "gid.png").stat().st_size > 1000


def test_pkd_view_draws_the_pairs_the_configs_pkd_distiller_distils(tmp_path, monkeypatch):
    """A PKD config pairing by index (the comment in configs/PKD/retinanet_R50_from_mask_rcnn_
    R101_2x.py: teacher p2-p5 with student p3-p6): the view drew each student level beside the
    teacher's level of its stride, pairs the distiller never distils. It now draws the
    distiller's pairs, the teacher's map on the student's cells (bilinear, whole padded maps as
    in training), and --levels still takes any level of a stride both models have."""
    import torch.nn.functional as F
    from detectron2.structures import ImageList

    nets, inputs, got, args = _run_pkd_view(
        tmp_path,
        monkeypatch,
        (
            "from conftest import tiny_faster_rcnn_cfg, tiny_retinanet_cfg\n"
            "model = L(DistillationDetector)(student=tiny_retinanet_cfg(), "
            "teacher=tiny_faster_rcnn_cfg(),\n"
            "    distillers={'pkd': L(PKDDistiller)(num_levels=3, pair_by='index')})\n"
        ),
    )
    assert got["levels"] == ["p3", "p4", "p5"]  # the distiller's three pairs
    t = nets["t"].eval()
    x = (inputs[0]["image"].float() - t.pixel_mean) / t.pixel_std
    with torch.no_grad():
        feats = t.backbone(ImageList.from_tensors([x], 32).tensor)
    for lvl, t_lvl, s in (("p3", "p2", 8), ("p4", "p3", 16), ("p5", "p4", 32)):
        hs, ws = -(-70 // s), -(-100 // s)
        # the whole padded (96 x 128) map resized onto the student's, as PKD pairs them, then
        # cropped to the image's cells (cropping first stretched another stretch of the image:
        # at p5 the teacher's cells were centred at y = 13, 40, 67 px against 16, 48, 80)
        full = F.interpolate(
            feats[t_lvl], size=(96 // s, 128 // s), mode="bilinear", align_corners=False
        )
        want = full[0, :, :hs, :ws]
        assert torch.allclose(got["rows"]["teacher"][lvl], want, atol=1e-5), lvl
        # bilinear resizing keeps a linear ramp linear: a teacher map of its cells' centre rows
        # (in pixels) becomes the student cells' centre rows (inside the border cells)
        ramp = (
            ((torch.arange(96 // (s // 2)) + 0.5) * (s // 2))
            .view(1, 1, -1, 1)
            .expand(1, 1, -1, 128 // (s // 2))
        )
        centres = F.interpolate(
            ramp, size=(96 // s, 128 // s), mode="bilinear", align_corners=False
        )[0, 0, 1:-1, 0]
        assert torch.allclose(centres, (torch.arange(1, 96 // s - 1) + 0.5) * s)
        assert tuple(got["rows"]["student + KD"][lvl].shape[-2:]) == (hs, ws)
    viz.main(args + ["--levels", "p6"])  # not distilled: beside the teacher's p6, by stride
    hs, ws = -(-70 // 64), -(-100 // 64)
    assert torch.allclose(got["rows"]["teacher"]["p6"], feats["p6"][0, :, :hs, :ws], atol=1e-5)


def test_max_activation_is_the_channel_max_scaled_to_0_1():
    """What the PKD picture shows with vmin 0, vmax 1: per cell the max over channels, its
    minimum at 0 and maximum at 1 (the correlations alone do not see the scaling); a constant
    map is 0, not NaN."""
    # (2, 2, 3): max [[2, -2, 3], [0.5, 5, 7]]
    feat = torch.tensor([[[1.0, -2.0, 3.0], [0.0, 5.0, 2.0]], [[2.0, -4.0, 1.0], [0.5, 1.0, 7.0]]])
    expected = (np.array([[2.0, -2.0, 3.0], [0.5, 5.0, 7.0]]) + 2.0) / 9.0
    assert np.allclose(viz.max_activation(feat), expected, atol=1e-6)
    assert np.array_equal(viz.max_activation(torch.full((3, 2, 2), 4.0)), np.zeros((2, 2)))


def test_pkd_view_correlation_is_pearsons_and_undefined_for_a_constant_map(tmp_path, monkeypatch):
    """r beside each level is numpy's Pearson r of the two max-activation maps; a level of one
    cell (or any constant map) has none: it read r=0.00, also for the teacher with itself."""
    g = torch.Generator().manual_seed(0)
    teacher = {"p3": torch.randn(4, 5, 6, generator=g), "p7": torch.randn(4, 1, 1, generator=g)}
    student = {
        "p3": teacher["p3"] + 0.5 * torch.randn(4, 5, 6, generator=g),
        "p7": torch.randn(4, 1, 1, generator=g),
    }
    image = np.zeros((40, 48, 3), dtype=np.uint8)
    fig = _drawn_figure(
        monkeypatch,
        viz.draw_fpn_activations,
        image,
        {"teacher": teacher, "student": student},
        ["p3", "p7"],
        str(tmp_path / "p.png"),
    )
    ref = np.corrcoef(
        viz.max_activation(student["p3"]).ravel(), viz.max_activation(teacher["p3"]).ravel()
    )[0, 1]
    titles = [ax.get_title() for ax in fig.axes]
    assert f"p3  r={ref:.2f}" in titles and "p7  r=n/a (constant map)" in titles
    corr = viz.draw_fpn_activations(
        image, {"teacher": teacher, "student": student}, ["p3", "p7"], str(tmp_path / "q.png")
    )
    assert corr["student"]["p3"] == pytest.approx(ref, rel=1e-6) and corr["teacher"][
        "p3"
    ] == pytest.approx(1.0)
    assert np.isnan(corr["student"]["p7"]) and np.isnan(corr["teacher"]["p7"])


def _drawn_figure(monkeypatch, draw, *args, **kwargs):
    """The matplotlib figure that ``draw(*args, **kwargs)`` saves (kept from being closed)."""
    import matplotlib.figure

    saved = {}
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **kw: saved.update(fig=fig)
    )
    draw(*args, **kwargs)
    return saved["fig"]


def test_draw_boxes_draws_each_box_its_colour_and_lines_between_pair_centres(tmp_path, monkeypatch):
    """The D3ETR picture's elements: each box a rectangle of its XYXY corners and colour, GT boxes
    dashed white, label text at the box's corner, and a line between the centres of each pair."""
    from matplotlib.colors import to_rgba

    image = np.zeros((40, 60, 3), np.uint8)
    boxes = np.array([[2.0, 4.0, 12.0, 10.0], [20.0, 6.0, 30.0, 26.0], [40.0, 1.0, 58.0, 9.0]])
    fig = _drawn_figure(
        monkeypatch,
        viz.draw_boxes,
        image,
        boxes,
        ["red", "lime", "blue"],
        str(tmp_path / "b.png"),
        labels=["a", "b", "c"],
        pairs=[(0, 1), (2, 0)],
        gt_boxes=np.array([[5.0, 5.0, 15.0, 25.0]]),
    )
    ax = fig.axes[0]
    rects = [
        (p.get_xy(), p.get_width(), p.get_height(), p.get_edgecolor(), p.get_linestyle())
        for p in ax.patches
    ]
    assert rects[0][:3] == ((5.0, 5.0), 10.0, 20.0) and rects[0][3] == to_rgba("white")
    assert rects[0][4] in ("--", "dashed")
    for (xy, w, h, col, ls), box, c in zip(rects[1:], boxes, ["red", "lime", "blue"]):
        assert (tuple(xy), w, h) == (
            (box[0], box[1]),
            box[2] - box[0],
            box[3] - box[1],
        ) and col == to_rgba(c)
        assert ls in ("-", "solid")
    assert len(rects) == 4
    assert [(t.get_text(), t.get_position()) for t in ax.texts] == [
        ("a", (2.0, 4.0)),
        ("b", (20.0, 6.0)),
        ("c", (40.0, 1.0)),
    ]
    lines = [(list(l.get_xdata()), list(l.get_ydata())) for l in ax.lines]
    assert lines == [([7.0, 25.0], [7.0, 16.0]), ([49.0, 7.0], [5.0, 7.0])]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_gid_view_colours_each_instance_by_its_best_iou_with_the_ground_truth(
    tmp_path, monkeypatch
):
    """The GID picture's colour classes: IoU >= 0.5 with some GT box positive (lime), >= 0.1
    semi-positive (orange), else negative (red), the best IoU over the GT boxes per instance
    (boxes given to the view as the distiller's selection: IoUs 1, 0.5 and 0.1 exactly, 1/3,
    0.05, 0 against a 2-box ground truth), the scores as labels."""
    from detectron2.config import LazyConfig
    from detectron2.structures import Boxes

    from detkd.losses import GIDDistiller

    cfg_path = f"{REPO}/configs/demo/gid_retinanet.py"
    t, s = _demo_checkpoints(tmp_path, LazyConfig.load(cfg_path))
    inputs = make_inputs(1, size=(64, 96), seed=2)
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 30.0, 70.0, 50.0]])
    inputs[0]["instances"].gt_boxes = Boxes(gt)
    inputs[0]["instances"].gt_classes = torch.tensor([0, 1])
    monkeypatch.setattr(viz, "_load_image", lambda cfg, index: inputs)
    chosen = torch.tensor(
        [
            [50.0, 30.0, 70.0, 50.0],  # IoU 1 with the second GT box
            [0.0, 0.0, 10.0, 20.0],  # 0.5 with the first
            [50.0, 30.0, 70.0, 130.0],  # 0.1 with the second (400 / 4000)
            [0.0, 0.0, 10.0, 30.0],  # 1/3 with the first
            [0.0, 0.0, 20.0, 50.0],  # 0.1 with the first: semi-positive too
            [80.0, 0.0, 90.0, 10.0],  # 0
            [0.0, 0.0, 200.0, 5.0],  # 50 / 2000 = 0.025 with the first
        ]
    )
    scores = torch.linspace(0.9, 0.3, len(chosen))
    monkeypatch.setattr(GIDDistiller, "_select", lambda self, *a: [(Boxes(chosen), scores)])
    drawn = _capture_draw_boxes(monkeypatch)
    viz.main(
        [
            "gid",
            "--config",
            cfg_path,
            "--teacher",
            t,
            "--student",
            s,
            "--out",
            str(tmp_path / "g.png"),
        ]
    )
    assert np.array_equal(drawn["boxes"], chosen.numpy())
    assert drawn["colors"] == ["lime", "lime", "orange", "orange", "orange", "red", "red"]
    assert drawn["labels"] == [f"{x:.2f}" for x in scores.tolist()]
    assert np.array_equal(drawn["gt_boxes"], gt.numpy())
    assert drawn["legend"] == {
        "positive (IoU>=0.5)": "lime",
        "semi-positive": "orange",
        "negative (IoU<0.1)": "red",
    }


def test_d3etr_view_counts_negative_layers_from_the_last(tmp_path, monkeypatch):
    """--layer -L of an L-layer decoder is layer 0 (as Python indexes): the same boxes and title
    as --layer 0, other boxes than --layer -1 (the last)."""
    from detectron2.config import LazyConfig, instantiate

    cfg_path = f"{REPO}/configs/demo/d3etr_detr.py"
    cfg = LazyConfig.load(cfg_path)
    t, s = _demo_checkpoints(tmp_path, cfg)
    layers = len(instantiate(cfg.model.teacher).transformer.decoder.layers)
    assert layers > 1
    monkeypatch.setattr(
        viz, "_load_image", lambda cfg, index: make_inputs(1, size=(64, 96), seed=1)
    )
    drawn = _capture_draw_boxes(monkeypatch)
    got = {}
    for layer in (0, -layers, -1):
        viz.main(
            [
                "d3etr",
                "--config",
                cfg_path,
                "--teacher",
                t,
                "--student",
                s,
                "--top",
                "3",
                "--layer",
                str(layer),
                "--out",
                str(tmp_path / "d.png"),
            ]
        )
        got[layer] = dict(drawn)
    assert got[-layers]["title"].startswith("D3ETR layer 0:")
    assert got[-1]["title"].startswith(f"D3ETR layer {layers - 1}:")
    assert np.array_equal(got[-layers]["boxes"], got[0]["boxes"])
    assert not np.allclose(got[-1]["boxes"], got[0]["boxes"])
    assert got[0]["colors"] == ["deepskyblue"] * 3 + ["red"] * 3 and got[0]["pairs"] == [
        (0, 3),
        (1, 4),
        (2, 5),
    ]


def test_d3etr_view_matches_and_draws_the_chosen_layer(tmp_path, monkeypatch):
    """Synthetic heads (L=2 layers, B=1 image, N=3 queries) whose layers match differently: the
    view matches on the chosen layer and draws that layer's student boxes (with random demo
    weights every layer gives the same match and boxes, which cannot tell the layers apart).

    Teacher boxes t0, t1, t2 (cxcywh, centres x 0.2 / 0.5 / 0.8, no two overlapping) at both
    layers; the student's layer 1 has them in the same order (s_j = t_j), its layer 0 permuted:
    s0 = t1, s1 = t2, s2 = t0. Each student query carries the logits of the teacher query whose
    box it has, so a teacher query's cost is lowest (L1 0, GIoU 1, soft-BCE at its minimum) with
    the student query of its box:
      layer 0: t0 <-> s2, t1 <-> s0, t2 <-> s1 (student indices [2, 0, 1] by teacher index);
      layer 1: t_i <-> s_i.
    Teacher confidences (class 0; the others near 0): layer 0 t0 > t1 > t2, layer 1 t2 > t1 > t0.
    --layer 0 draws the teachers [0, 1, 2] and their students s[[2, 0, 1]] of layer 0 (= t0, t1,
    t2); --layer -1 (layer 1) the teachers [2, 1, 0] and their students s[[2, 1, 0]] of layer 1.
    Matched on the last layer instead, --layer 0 would draw layer 0's s[[0, 1, 2]]; layer 1's
    boxes at layer 0's match would be s[[2, 0, 1]] of layer 1 (= t2, t0, t1)."""
    from detectron2.config import LazyConfig
    from torchvision.ops import box_convert

    cfg_path = f"{REPO}/configs/demo/d3etr_detr.py"
    t_ckpt, s_ckpt = _demo_checkpoints(tmp_path, LazyConfig.load(cfg_path))
    h, w = 64, 96
    monkeypatch.setattr(viz, "_load_image", lambda cfg, index: make_inputs(1, size=(h, w), seed=1))
    t = torch.tensor([[0.2, 0.3, 0.2, 0.15], [0.5, 0.6, 0.2, 0.15], [0.8, 0.4, 0.2, 0.15]])
    t_boxes = torch.stack([t, t])[:, None]  # (L, B, N, 4)
    s_boxes = torch.stack([t[[1, 2, 0]], t])[:, None]
    t_conf = torch.tensor([[2.0, 0.5, -1.0], [-1.0, 0.5, 2.0]])  # (L, N) class-0 logits
    s_conf = torch.stack([t_conf[0, [1, 2, 0]], t_conf[1]])

    def logits(conf, k):
        out = torch.full((2, 1, 3, k), -6.0)
        out[:, 0, :, 0] = conf
        return out

    kd_model = viz._kd_model

    def synthetic_heads(*args):
        model, d3 = kd_model(*args)
        for head, conf, boxes in (
            (model.teacher.head, t_conf, t_boxes),
            (model.student.head, s_conf, s_boxes),
        ):
            k = head.class_embed.out_features
            head.forward = lambda states, reference, conf=conf, boxes=boxes, k=k: {
                "pred_logits": logits(conf, k),
                "pred_boxes": boxes.clone(),
            }
        return model, d3

    monkeypatch.setattr(viz, "_kd_model", synthetic_heads)
    drawn = _capture_draw_boxes(monkeypatch)
    scale = torch.tensor([w, h, w, h])

    def xyxy(b):
        return box_convert(b, "cxcywh", "xyxy") * scale

    for layer, teachers, students in ((0, [0, 1, 2], [2, 0, 1]), (-1, [2, 1, 0], [2, 1, 0])):
        viz.main(
            [
                "d3etr",
                "--config",
                cfg_path,
                "--teacher",
                t_ckpt,
                "--student",
                s_ckpt,
                "--top",
                "3",
                "--layer",
                str(layer),
                "--out",
                str(tmp_path / "d.png"),
            ]
        )
        want = torch.cat([xyxy(t_boxes[layer, 0, teachers]), xyxy(s_boxes[layer, 0, students])])
        assert np.allclose(drawn["boxes"], want.numpy(), atol=1e-4), layer
        assert drawn["title"].startswith(f"D3ETR layer {layer % 2}:")
        assert drawn["pairs"] == [(0, 3), (1, 4), (2, 5)]
        # each teacher box drawn with the student box that copies it
        assert np.allclose(drawn["boxes"][:3], drawn["boxes"][3:], atol=1e-4), layer


def test_a_view_takes_the_runs_overrides_and_a_config_path_from_the_repository(
    tmp_path, monkeypatch
):
    """The picture of a run trained with overrides (the demo's: levels, widths, test data) was
    drawn from the config as written: other levels, other images, or weights that did not fit.
    The view takes them as key=value after its options; a typo in them is named."""
    from types import SimpleNamespace

    from detkd.viz import _kd_config

    monkeypatch.chdir(tmp_path)  # configs/... from outside the repository: found under it
    args = SimpleNamespace(
        view="pkd",
        config="configs/demo/pkd_retinanet.py",
        opts=["model.distillers.pkd.num_levels=2", "dataloader.test.dataset.names.num_images=8"],
    )
    cfg = _kd_config(args)
    assert (
        cfg.model.distillers.pkd.num_levels == 2
        and cfg.dataloader.test.dataset.names.num_images == 8
    )
    args.opts = ["model.distillers.pkd.num_levls=2"]
    with pytest.raises(
        SystemExit,
        match=r"\[viz pkd\] Override 'model\.distillers\.pkd\.num_levls': .* "
        r"Did you mean 'model\.distillers\.pkd\.num_levels'",
    ):
        _kd_config(args)


def test_max_activation_scales_a_small_range_to_0_1():
    """Feature maps of a range below 1 (the usual case after normalisation layers) are stretched
    to [0, 1] too: the floor on the divisor only keeps a constant map from dividing by 0."""
    # (2, 1, 3): max [0.1, 0.3, 0.2]
    feat = torch.tensor([[[0.1, 0.3, 0.15]], [[0.05, 0.25, 0.2]]])
    assert np.allclose(viz.max_activation(feat), [[0.0, 1.0, 0.5]], atol=1e-6)


def test_draw_fpn_activations_draws_each_rows_own_map_beside_the_image(tmp_path, monkeypatch):
    """The PKD picture's grid: per row the input image in column 0, then per level that row's
    own max-activation map on the jet scale from 0 to 1 (also a constant map, drawn at 0, not on
    a scale of its own); r is against the ``reference`` row, whose own titles carry none."""
    g = torch.Generator().manual_seed(1)
    rows = {
        name: {"p3": torch.randn(3, 4, 5, generator=g), "p4": torch.randn(3, 2, 3, generator=g)}
        for name in ("teacher", "student", "other")
    }
    rows["other"]["p4"] = torch.full((3, 2, 3), 0.7)
    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    fig = _drawn_figure(
        monkeypatch,
        viz.draw_fpn_activations,
        image,
        rows,
        ["p3", "p4"],
        str(tmp_path / "p.png"),
        reference="student",
    )
    assert len(fig.axes) == 3 * 3
    for r, name in enumerate(rows):
        first = fig.axes[3 * r]
        assert np.array_equal(np.asarray(first.images[0].get_array()), image), name
        assert first.get_ylabel() == name
        for c, lvl in enumerate(["p3", "p4"]):
            ax = fig.axes[3 * r + c + 1]
            (im,) = ax.images
            m = viz.max_activation(rows[name][lvl])
            assert np.allclose(np.asarray(im.get_array()), m), (name, lvl)
            assert im.get_clim() == (0, 1) and im.get_cmap().name == "jet", (name, lvl)
            ref = viz.max_activation(rows["student"][lvl])
            if name == "other" and lvl == "p4":  # constant: no r
                assert np.array_equal(m, np.zeros((2, 3)))
                r_text = "n/a (constant map)"
            else:
                r_text = f"{np.corrcoef(m.ravel(), ref.ravel())[0, 1]:.2f}"
            want = lvl if name == "student" else f"{lvl}  r={r_text}"
            assert ax.get_title() == want, (name, lvl)
    import matplotlib.pyplot as plt

    plt.close(fig)
    corr = viz.draw_fpn_activations(
        image, rows, ["p3", "p4"], str(tmp_path / "q.png"), reference="student"
    )
    m_t, m_s = (viz.max_activation(rows[n]["p4"]).ravel() for n in ("teacher", "student"))
    assert corr["teacher"]["p4"] == pytest.approx(np.corrcoef(m_t, m_s)[0, 1], rel=1e-6)
    assert corr["student"]["p4"] == pytest.approx(1.0)


def test_draw_fpn_activations_bad_levels_and_rows_are_named(tmp_path):
    """levels=[] stopped on an IndexError of matplotlib's axes (a 1-D grid), a level one row
    lacks on a KeyError naming only the level; one row of one level is a 1 x 2 grid."""
    g = torch.Generator().manual_seed(0)
    rows = {"teacher": {"p3": torch.randn(2, 3, 3, generator=g)}}
    rows["student"] = {"p3": torch.randn(2, 3, 3, generator=g), "p4": torch.randn(2, 2, 2)}
    image = np.zeros((6, 6, 3), np.uint8)
    png = tmp_path / "p.png"
    out = str(png)
    with pytest.raises(ValueError, match=r"nothing to draw \(2 rows, levels \[\]\).*levels="):
        viz.draw_fpn_activations(image, rows, [], out)
    with pytest.raises(ValueError, match=r"levels \{'teacher': \['p4'\]\} .* has \['p3'\]"):
        viz.draw_fpn_activations(image, rows, ["p3", "p4"], out)
    with pytest.raises(ValueError, match=r"reference row 'ref' is not in \['teacher', 'student'"):
        viz.draw_fpn_activations(image, rows, ["p3"], out, reference="ref")
    corr = viz.draw_fpn_activations(image, {"teacher": rows["teacher"]}, ["p3"], out)
    assert corr == {"teacher": {"p3": pytest.approx(1.0)}} and png.stat().st_size > 0


def test_draw_boxes_legend_title_label_and_line_colours(tmp_path, monkeypatch):
    """The rest of draw_boxes' picture: a legend entry per name in its colour, the title, each
    label in its box's colour, yellow lines between pairs, and a figure 5 inches wide with the
    image's aspect ratio."""
    from matplotlib.colors import to_rgba

    image = np.zeros((30, 60, 3), np.uint8)
    fig = _drawn_figure(
        monkeypatch,
        viz.draw_boxes,
        image,
        np.array([[2.0, 4.0, 12.0, 10.0], [20.0, 6.0, 30.0, 26.0]]),
        ["deepskyblue", "red"],
        str(tmp_path / "b.png"),
        labels=["t", "s"],
        pairs=[(0, 1)],
        title="D3ETR layer 1",
        legend={"teacher": "deepskyblue", "student (matched)": "red"},
    )
    ax = fig.axes[0]
    assert ax.get_title() == "D3ETR layer 1"
    leg = ax.get_legend()
    assert [t.get_text() for t in leg.get_texts()] == ["teacher", "student (matched)"]
    blue_red = [to_rgba("deepskyblue"), to_rgba("red")]
    assert [h.get_facecolor() for h in leg.legend_handles] == blue_red
    assert [to_rgba(t.get_color()) for t in ax.texts] == blue_red
    assert [to_rgba(line.get_color()) for line in ax.lines] == [to_rgba("yellow")]
    assert tuple(fig.get_size_inches()) == pytest.approx((5.0, 2.5))
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_check_args_names_each_missing_checkpoint_and_lets_urls_through(tmp_path):
    """Each checkpoint option of the views is checked as a file and named when missing; a URL
    (detectron2://, https://: loaded by the checkpointer) is not a file to check."""
    from types import SimpleNamespace

    have = tmp_path / "w.pth"
    have.write_bytes(b"")
    opts = {"pkd": ("teacher", "before", "after"), "gid": ("teacher", "student")}
    for view, names in opts.items():
        for missing in names:
            args = SimpleNamespace(view=view, index=0, out=str(tmp_path / "v.png"))
            for n in names:
                setattr(args, n, str(tmp_path / "nope.pth") if n == missing else str(have))
            with pytest.raises(
                SystemExit, match=rf"\[viz {view}\] --{missing}: no checkpoint file .*nope\.pth"
            ):
                viz._check_args(args)
    args = SimpleNamespace(
        view="d3etr",
        index=0,
        top=1,
        out=str(tmp_path / "v.png"),
        teacher="detectron2://ImageNetPretrained/MSRA/R-50.pkl",
        student="https://example.com/student.pth",
    )
    viz._check_args(args)  # no SystemExit


def test_cli_defaults_and_overrides_reach_the_views(tmp_path, monkeypatch):
    """The command line's defaults (output file per view, image 0, the last decoder layer, the 8
    most confident queries, the PKDDistiller's levels) and the key=value overrides after --."""
    t = tmp_path / "t.pth"
    t.write_bytes(b"")
    got = {}
    for view in ("pkd", "gid", "d3etr"):
        monkeypatch.setattr(viz, f"_{view}_view", lambda args, view=view: got.update({view: args}))
    cfg = f"{REPO}/configs/demo/pkd_retinanet.py"
    viz.main(["pkd", "--config", cfg, "--teacher", str(t), "--before", str(t), "--after", str(t)])
    viz.main(["gid", "--config", cfg, "--teacher", str(t), "--student", str(t), "--", "a.b=1"])
    viz.main(["d3etr", "--config", cfg, "--teacher", str(t), "--student", str(t)])
    assert (got["pkd"].out, got["gid"].out, got["d3etr"].out) == (
        "pkd_fpn.png",
        "gid_instances.png",
        "d3etr_matches.png",
    )
    assert got["pkd"].levels is None and got["pkd"].index == got["gid"].index == 0
    assert (got["d3etr"].layer, got["d3etr"].top) == (-1, 8)
    assert got["gid"].opts == ["a.b=1"] and got["pkd"].opts == []
    viz.main(["d3etr", "--config", cfg, "--teacher", str(t), "--student", str(t), "--index", "2"])
    assert got["d3etr"].index == 2
    viz.main(
        ["pkd", "--config", cfg, "--teacher", str(t), "--before", str(t), "--after", str(t)]
        + ["--levels", "p4", "p5"]
    )
    assert got["pkd"].levels == ["p4", "p5"]


def test_kd_config_refuses_a_model_without_a_student(tmp_path):
    """A model with a teacher but no student is no distillation config either (both are
    needed)."""
    from types import SimpleNamespace

    cfg_path = tmp_path / "no_student.py"
    cfg_path.write_text(
        "from detectron2.config import LazyConfig\n"
        f"cfg = LazyConfig.load('{REPO}/configs/demo/pkd_retinanet.py')\n"
        "model, dataloader = cfg.model, cfg.dataloader\n"
        "del model.student\n"
    )
    args = SimpleNamespace(view="pkd", config=str(cfg_path), opts=[])
    with pytest.raises(SystemExit, match=r"no_student\.py is not a distillation config"):
        viz._kd_config(args)


def test_pkd_view_rows_are_the_before_and_after_students(tmp_path, monkeypatch):
    """--before is the "student alone" row, --after the "student + KD" row (two different
    checkpoints): each row's maps are that checkpoint's backbone on the image."""
    from detectron2.config import LazyConfig, instantiate

    cfg_path = f"{REPO}/configs/demo/pkd_retinanet.py"
    cfg = LazyConfig.load(cfg_path)
    paths = {}
    students = {}
    for name, seed in (("teacher", 0), ("before", 1), ("after", 2)):
        torch.manual_seed(seed)
        m = instantiate(cfg.model["teacher" if name == "teacher" else "student"]).eval()
        paths[name] = str(tmp_path / f"{name}.pth")
        torch.save({"model": m.state_dict()}, paths[name])
        students[name] = m
    inputs = make_inputs(1, size=(64, 96), seed=5)
    monkeypatch.setattr(viz, "_load_image", lambda cfg, index: inputs)
    got = _capture_fpn_rows(monkeypatch)
    viz.main(
        ["pkd", "--config", cfg_path, "--out", str(tmp_path / "p.png")]
        + [x for n in ("teacher", "before", "after") for x in (f"--{n}", paths[n])]
    )
    for name, row in (("before", "student alone"), ("after", "student + KD")):
        s = students[name]
        with torch.no_grad():
            feats = s.backbone(s.preprocess_image(inputs).tensor)
        for lvl in got["levels"]:
            v = got["rows"][row][lvl]
            assert torch.allclose(v, feats[lvl][0, :, : v.shape[1], : v.shape[2]], atol=1e-5), (
                row,
                lvl,
            )


def test_pkd_view_without_a_pkd_distiller_draws_the_four_finest_common_levels(
    tmp_path, monkeypatch
):
    """A distillation config without a PKDDistiller (GID's demo): the view draws the 4 finest
    levels of a stride both models have (p3-p6 of p3-p7), and --levels takes all 5."""
    from detectron2.config import LazyConfig

    cfg_path = f"{REPO}/configs/demo/gid_retinanet.py"
    t, s = _demo_checkpoints(tmp_path, LazyConfig.load(cfg_path))
    monkeypatch.setattr(viz, "_load_image", lambda cfg, index: make_inputs(1, size=(64, 96)))
    got = _capture_fpn_rows(monkeypatch)
    args = ["pkd", "--config", cfg_path, "--teacher", t, "--before", s, "--after", s]
    viz.main(args + ["--out", str(tmp_path / "p.png")])
    assert got["levels"] == ["p3", "p4", "p5", "p6"]
    all_levels = ["p3", "p4", "p5", "p6", "p7"]
    viz.main(args + ["--out", str(tmp_path / "p.png"), "--levels"] + all_levels)
    assert got["levels"] == all_levels and list(got["rows"]["teacher"]) == all_levels


def test_pkd_view_prints_each_levels_r_as_the_picture_shows_it(tmp_path, monkeypatch, capsys):
    """The console line gives each row's r per level to 2 decimals, and "n/a (constant map)" for
    a level without one (a 1x1 map), as the picture's titles do (it printed the dict's nan)."""
    from detectron2.config import LazyConfig

    cfg_path = f"{REPO}/configs/demo/pkd_retinanet.py"
    t, s = _demo_checkpoints(tmp_path, LazyConfig.load(cfg_path))
    monkeypatch.setattr(viz, "_load_image", lambda cfg, index: make_inputs(1, size=(64, 96)))
    corr = {"teacher": {"p3": 1.0, "p7": float("nan")}, "after": {"p3": 0.4567, "p7": float("nan")}}
    monkeypatch.setattr(viz, "draw_fpn_activations", lambda *a, **kw: corr)
    out = str(tmp_path / "p.png")
    viz.main(
        ["pkd", "--config", cfg_path, "--teacher", t, "--before", s, "--after", s, "--out", out]
    )
    printed = capsys.readouterr().out.strip()
    assert printed.endswith(
        f"wrote {out}; Pearson r with the teacher's maps: {{'teacher': 'p3 1.00, p7 n/a "
        "(constant map)', 'after': 'p3 0.46, p7 n/a (constant map)'}"
    )


def test_gid_view_colours_all_instances_negative_without_ground_truth(tmp_path, monkeypatch):
    """An image without ground truth (none annotated, or no annotations at all): no instance
    overlaps an object, all are negative (red); the GT drawn is empty, or none."""
    from detectron2.config import LazyConfig
    from detectron2.structures import Boxes

    from detkd.losses import GIDDistiller

    cfg_path = f"{REPO}/configs/demo/gid_retinanet.py"
    t, s = _demo_checkpoints(tmp_path, LazyConfig.load(cfg_path))
    chosen = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 40.0, 30.0]])
    monkeypatch.setattr(
        GIDDistiller, "_select", lambda self, *a: [(Boxes(chosen), torch.tensor([0.9, 0.8]))]
    )
    drawn = _capture_draw_boxes(monkeypatch)
    for annotated in (True, False):
        inputs = make_inputs(1, size=(64, 96), seed=2, empty=(0,))
        if not annotated:
            del inputs[0]["instances"]
        monkeypatch.setattr(viz, "_load_image", lambda cfg, index: inputs)
        viz.main(
            ["gid", "--config", cfg_path, "--teacher", t, "--student", s]
            + ["--out", str(tmp_path / "g.png")]
        )
        assert drawn["colors"] == ["red", "red"], annotated
        if annotated:
            assert drawn["gt_boxes"].shape == (0, 4)
        else:
            assert drawn["gt_boxes"] is None


def test_pkd_view_resizes_an_index_paired_teacher_map_onto_the_students_ceil_cells(
    tmp_path, monkeypatch
):
    """PKD pairing by index up to the student's p6 (stride 64) with the teacher's p5 (stride
    32): the padded 96 x 128 input gives the student's p6 ceil(96 / 64) x ceil(128 / 64) = 2 x 2
    cells, and the teacher's p5 map (3 x 4) is resized onto those 2 x 2 cells, not 1 x 2."""
    import torch.nn.functional as F
    from detectron2.structures import ImageList

    nets, inputs, got, args = _run_pkd_view(
        tmp_path,
        monkeypatch,
        (
            "from conftest import tiny_faster_rcnn_cfg, tiny_retinanet_cfg\n"
            "model = L(DistillationDetector)(student=tiny_retinanet_cfg(), "
            "teacher=tiny_faster_rcnn_cfg(),\n"
            "    distillers={'pkd': L(PKDDistiller)(num_levels=4, pair_by='index')})\n"
        ),
    )
    assert got["levels"] == ["p3", "p4", "p5", "p6"]
    t = nets["t"].eval()
    x = (inputs[0]["image"].float() - t.pixel_mean) / t.pixel_std
    with torch.no_grad():
        feats = t.backbone(ImageList.from_tensors([x], 32).tensor)
    assert tuple(feats["p5"].shape[-2:]) == (3, 4)
    want = F.interpolate(feats["p5"], size=(2, 2), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(got["rows"]["teacher"]["p6"], want, atol=1e-5)
    assert tuple(got["rows"]["student alone"]["p6"].shape[-2:]) == (2, 2)


def test_gid_view_colour_thresholds_between_the_exact_bounds(tmp_path, monkeypatch):
    """IoUs off the bounds on either side of each: 0.625 positive (lime), 0.4 and 0.125
    semi-positive (orange), 0.08 negative (red), against one 10 x 10 GT box."""
    from detectron2.config import LazyConfig
    from detectron2.structures import Boxes

    from detkd.losses import GIDDistiller

    cfg_path = f"{REPO}/configs/demo/gid_retinanet.py"
    t, s = _demo_checkpoints(tmp_path, LazyConfig.load(cfg_path))
    inputs = make_inputs(1, size=(64, 96), boxes_per_image=1, seed=2)
    inputs[0]["instances"].gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    inputs[0]["instances"].gt_classes = torch.tensor([0])
    monkeypatch.setattr(viz, "_load_image", lambda cfg, index: inputs)
    # 100 / (10 * height): 0.625, 0.4, 0.125, 0.08
    chosen = torch.tensor([[0.0, 0.0, 10.0, y1] for y1 in (16.0, 25.0, 80.0, 125.0)])
    monkeypatch.setattr(
        GIDDistiller, "_select", lambda self, *a: [(Boxes(chosen), torch.full((4,), 0.5))]
    )
    drawn = _capture_draw_boxes(monkeypatch)
    viz.main(
        ["gid", "--config", cfg_path, "--teacher", t, "--student", s]
        + ["--out", str(tmp_path / "g.png")]
    )
    assert drawn["colors"] == ["lime", "orange", "orange", "red"]


def test_pkd_view_picture_in_the_students_order_when_the_loader_names_none(tmp_path, monkeypatch):
    """A test mapper without an image_format: the data is in the order the DistillationDetector
    takes for the student's (RGB here, beside a BGR teacher), so the picture is not flipped."""
    cfg_path = tmp_path / "pkd_no_loader_format.py"
    cfg_path.write_text(
        "from detectron2.config import LazyConfig\n"
        f"cfg = LazyConfig.load('{REPO}/configs/demo/pkd_retinanet.py')\n"
        "model, dataloader = cfg.model, cfg.dataloader\n"
        "model.student.input_format = 'RGB'\n"
        "dataloader.test.mapper.image_format = None\n"
    )
    from detectron2.config import LazyConfig

    t, s = _demo_checkpoints(tmp_path, LazyConfig.load(str(cfg_path)))
    inputs = make_inputs(1, size=(64, 96), seed=4)
    monkeypatch.setattr(viz, "_load_image", lambda cfg, index: inputs)
    got = {}
    monkeypatch.setattr(
        viz, "draw_fpn_activations", lambda image, *a, **kw: got.update(image=image) or {}
    )
    viz.main(
        ["pkd", "--config", str(cfg_path), "--teacher", t, "--before", s, "--after", s]
        + ["--out", str(tmp_path / "p.png")]
    )
    assert np.array_equal(got["image"], inputs[0]["image"].permute(1, 2, 0).numpy())


def test_d3etr_view_draws_the_ground_truth_of_the_image(tmp_path, monkeypatch):
    """The D3ETR picture has the image's GT boxes (dashed) beside the matched queries, and none
    for an image without annotations."""
    from detectron2.config import LazyConfig

    cfg_path = f"{REPO}/configs/demo/d3etr_detr.py"
    t, s = _demo_checkpoints(tmp_path, LazyConfig.load(cfg_path))
    drawn = _capture_draw_boxes(monkeypatch)
    for annotated in (True, False):
        inputs = make_inputs(1, size=(64, 96), seed=6)
        gt = inputs[0]["instances"].gt_boxes.tensor.numpy()
        if not annotated:
            del inputs[0]["instances"]
        monkeypatch.setattr(viz, "_load_image", lambda cfg, index: inputs)
        viz.main(
            ["d3etr", "--config", cfg_path, "--teacher", t, "--student", s, "--top", "2"]
            + ["--out", str(tmp_path / "d.png")]
        )
        if annotated:
            assert gt.shape == (2, 4) and np.array_equal(drawn["gt_boxes"], gt)
        else:
            assert drawn["gt_boxes"] is None
