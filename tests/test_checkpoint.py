"""Teacher/student loading in the model zoo's formats, strict teacher errors, student export."""

import os
import pickle
import re

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyCall as L
from detectron2.config import instantiate

from detkd import PKDDistiller, export_student, load_student, load_teacher
from detkd.checkpoint import TeacherCheckpointError, export_backbone, save_student

import pytest
from conftest import (
    REPO,
    load_config,
    make_inputs,
    tiny_faster_rcnn_cfg,
    tiny_kd,
    tiny_retinanet_cfg,
)


def _kd():
    return tiny_kd("pkd", L(PKDDistiller)())


def _write_zoo_pkl(model, path):
    """A checkpoint in the detectron2 model zoo's .pkl format: numpy arrays under "model"."""
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_teacher_from_zoo_pkl_pth_and_detectron2_url(tmp_path, monkeypatch):
    source = instantiate(tiny_retinanet_cfg(width=32, fpn=128))
    for p in source.parameters():
        p.data.normal_()
    kd = _kd()
    assert not _same_weights(kd.teacher, source)
    _write_zoo_pkl(source, tmp_path / "teacher.pkl")
    load_teacher(kd.teacher, str(tmp_path / "teacher.pkl"))
    assert _same_weights(kd.teacher, source)

    kd = _kd()
    torch.save({"model": source.state_dict()}, tmp_path / "teacher.pth")
    load_teacher(kd.teacher, str(tmp_path / "teacher.pth"))
    assert _same_weights(kd.teacher, source)

    # The real detectron2:// path, served from iopath's download cache (no network here).
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    rel = "COCO-Detection/tiny_retinanet/000/model_final_abc.pkl"
    os.makedirs(tmp_path / "cache/detectron2" / os.path.dirname(rel))
    _write_zoo_pkl(source, tmp_path / "cache/detectron2" / rel)
    kd = _kd()
    load_teacher(kd.teacher, "detectron2://" + rel)
    assert _same_weights(kd.teacher, source)
    # Loading into the teacher leaves the student untouched (no suffix matching across twins).
    fresh = _kd()
    assert _same_weights(kd.student, fresh.student)


def test_teacher_from_a_pickled_state_dict_without_author(tmp_path):
    # detectron2 takes a .pkl without "__author__" for Caffe2 blobs and renames its keys
    # (fpn_lateral3 -> fpn.lateral3): a plain pickled state dict left "128 teacher parameters
    # unloaded" (named as the file has them), and {"model": ...} stopped on "Unsupported type
    # found in checkpoint! model: <class 'dict'>"
    source = instantiate(tiny_retinanet_cfg(width=32, fpn=128))
    for p in source.parameters():
        p.data.normal_()
    state = {k: v.detach().numpy() for k, v in source.state_dict().items()}
    # a key without a dot (an older checkpoint's top-level pixel_mean) does not make it Caffe2's
    dotless = dict(state, pixel_mean=np.zeros((3, 1, 1), dtype=np.float32))
    files = (("plain.pkl", state), ("model.pkl", {"model": state}), ("dotless.pkl", dotless))
    for name, data in files:
        with open(tmp_path / name, "wb") as f:
            pickle.dump(data, f)
        kd = _kd()
        load_teacher(kd.teacher, str(tmp_path / name))
        assert _same_weights(kd.teacher, source), name


def test_teacher_class_count_hint_names_only_yacs_keys_that_exist(tmp_path):
    # a DETR teacher's class-count mismatch named "MODEL.CONDITIONALDETR.NUM_CLASSES in its .yaml"
    # (a key no yacs config has: ConditionalDETR and FCOS are not detectron2 meta-architectures
    # that build_yacs_detector builds); an R-CNN's count is model.teacher.roi_heads.num_classes
    detr_cfg = load_config("configs/common/models/tiny_detr.py").model
    detr_cfg.num_classes = 80
    torch.save({"model": instantiate(detr_cfg).state_dict()}, tmp_path / "detr80.pth")
    detr_cfg.num_classes = 3
    with pytest.raises(TeacherCheckpointError, match="class_embed") as e:
        load_teacher(instantiate(detr_cfg), str(tmp_path / "detr80.pth"))
    assert "model.teacher.num_classes must match" in str(e.value)
    assert "MODEL." not in str(e.value) and "build_yacs_detector" not in str(e.value)
    rcnn = tiny_faster_rcnn_cfg(num_classes=80)
    torch.save({"model": instantiate(rcnn).state_dict()}, tmp_path / "rcnn80.pth")
    with pytest.raises(
        TeacherCheckpointError,
        match=r"model\.teacher\.roi_heads\.num_classes must match the checkpoint's \(for a "
        r"build_yacs_detector teacher: MODEL\.ROI_HEADS\.NUM_CLASSES",
    ):
        load_teacher(instantiate(tiny_faster_rcnn_cfg()), str(tmp_path / "rcnn80.pth"))


def test_teacher_errors_are_clear(tmp_path):
    kd = _kd()
    with pytest.raises(
        TeacherCheckpointError, match="teacher_checkpoint is empty.*teacher_random_init"
    ):
        load_teacher(kd.teacher, "")
    load_teacher(kd.teacher, "", allow_random=True)  # explicitly intended
    with pytest.raises(
        TeacherCheckpointError, match="Cannot load the teacher checkpoint.*nope.pkl.*exists"
    ):
        load_teacher(kd.teacher, str(tmp_path / "nope.pkl"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherCheckpointError, match="Cannot load"):
        load_teacher(kd.teacher, str(tmp_path / "bad.pth"))
    # Class-count mismatch: an 80-class teacher checkpoint for a 3-class teacher.
    other = instantiate(tiny_retinanet_cfg(width=32, fpn=128, num_classes=80))
    torch.save({"model": other.state_dict()}, tmp_path / "coco.pth")
    with pytest.raises(
        TeacherCheckpointError,
        match="shape mismatch.*cls_score.*class-count.*"
        r"build_yacs_detector teacher: MODEL\.RETINANET\.NUM_CLASSES in its \.yaml or "
        r"model\.teacher\.opts",
    ):
        load_teacher(kd.teacher, str(tmp_path / "coco.pth"))
    # A checkpoint that leaves teacher parameters unloaded: missing keys are listed.
    state = {k: v for k, v in kd.teacher.state_dict().items() if not k.startswith("head.")}
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(
        TeacherCheckpointError,
        match=r"leaves 12 teacher parameters unloaded: \['head\.cls_subnet\.0\.weight'",
    ):
        load_teacher(kd.teacher, str(tmp_path / "partial.pth"))


def test_init_checkpoint_loads_student_only(tmp_path):
    kd = _kd()
    src = instantiate(tiny_retinanet_cfg())
    for p in src.parameters():
        p.data.uniform_()
    _write_zoo_pkl(src, tmp_path / "student.pkl")
    teacher_before = {k: v.clone() for k, v in kd.teacher.state_dict().items()}
    load_student(kd.student, str(tmp_path / "student.pkl"))
    assert _same_weights(kd.student, src)
    assert all(torch.equal(v, kd.teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_a_second_export_replaces_the_first(tmp_path):
    # e.g. a resumed run with a larger max_iter, or a retrain into the same folder
    kd, out = _kd(), str(tmp_path / "model_final_student.pth")
    save_student(kd.student, out)
    first = torch.load(out, weights_only=False)["model"]
    with torch.no_grad():
        for p in kd.student.parameters():
            p.add_(1.0)
    save_student(kd.student, out)
    second = torch.load(out, weights_only=False)["model"]
    state = kd.student.state_dict()
    assert all(torch.equal(second[k], state[k]) for k in state)
    assert not all(torch.equal(first[k], second[k]) for k in first)
    assert os.listdir(tmp_path) == ["model_final_student.pth"]  # no .tmp left behind


def test_export_never_replaces_a_run_checkpoint(tmp_path):
    # export_student(ckpt, ckpt) wrote the student alone over the run's model_final.pth: its
    # adapters, optimizer and iteration were gone and --resume refused the folder
    kd = _kd()
    opt = torch.optim.SGD(kd.parameters(), lr=0.1)
    DetectionCheckpointer(kd, str(tmp_path), optimizer=opt).save("model_final", iteration=9)
    run = str(tmp_path / "model_final.pth")
    before = (tmp_path / "model_final.pth").read_bytes()
    with pytest.raises(
        ValueError, match="model_final.pth' is a training run's checkpoint.*another file name"
    ):
        export_student(run, run)
    # a run's model alone (DetectionCheckpointer without the optimizer) is one too
    DetectionCheckpointer(kd, str(tmp_path)).save("model_only")
    with pytest.raises(ValueError, match="training run's checkpoint"):
        export_student(run, str(tmp_path / "model_only.pth"))
    # a plain detector's run checkpoint (a baseline's) is one too
    DetectionCheckpointer(kd.student, str(tmp_path), optimizer=opt).save("baseline", iteration=9)
    with pytest.raises(ValueError, match="training run's checkpoint"):
        export_student(run, str(tmp_path / "baseline.pth"))

    # a plain detector trained by DefaultTrainer / KDTrainer (a teacher's, a baseline's): its
    # optimizer is under "trainer", beside "iteration"; save_student refuses it too
    class _Trainer:
        def state_dict(self):
            return {"optimizer": opt.state_dict(), "iteration": 9}

        def load_state_dict(self, state):
            pass

    DetectionCheckpointer(kd.student, str(tmp_path), trainer=_Trainer()).save(
        "teacher_run", iteration=9
    )
    teacher_run = (tmp_path / "teacher_run.pth").read_bytes()
    assert set(torch.load(tmp_path / "teacher_run.pth", weights_only=False)) == {
        "model",
        "trainer",
        "iteration",
    }
    with pytest.raises(
        ValueError,
        match=r"teacher_run\.pth' is a training run's checkpoint or other weights "
        r"\(keys \['iteration', 'trainer'\]\).*another file name",
    ):
        export_student(run, str(tmp_path / "teacher_run.pth"))
    with pytest.raises(
        ValueError, match=r"save_student: .*teacher_run\.pth' is a training run's checkpoint"
    ):
        kd.export_student(str(tmp_path / "teacher_run.pth"))
    # a raw state dict (torch.save(model.state_dict())) is weights of another model: kept too
    torch.save(kd.student.state_dict(), tmp_path / "raw.pth")
    with pytest.raises(ValueError, match=r"other weights \(keys \['backbone\."):
        export_student(run, str(tmp_path / "raw.pth"))
    assert (tmp_path / "teacher_run.pth").read_bytes() == teacher_run
    assert (tmp_path / "model_final.pth").read_bytes() == before
    # a folder: a clear error, and no hidden temporary file left in it
    (tmp_path / "exports").mkdir()
    for folder in (str(tmp_path / "exports"), str(tmp_path / "exports") + "/"):
        with pytest.raises(
            ValueError,
            match=r"is a folder; give the file name in it \(e\.g\. "
            r"'.*exports/model_final_student\.pth'\)",
        ):
            export_student(run, folder)
    assert not list((tmp_path / "exports").iterdir())
    # an older export is replaced
    out = str(tmp_path / "student.pth")
    torch.save({"model": {"old": torch.zeros(1)}, "__author__": "DetKD"}, out)
    state = export_student(run, out)
    assert (
        torch.load(out, weights_only=False)["model"].keys()
        == state.keys()
        == kd.student.state_dict().keys()
    )
    # weights DetKD did not write (only "model" and "__author__", as a student export): the
    # teacher's model-zoo .pkl, a stock DetectionCheckpointer.save file; and a backbone export
    _write_zoo_pkl(kd.teacher, tmp_path / "model_final_zoo.pkl")
    DetectionCheckpointer(kd.student, str(tmp_path)).save("stock")
    export_backbone(run, str(tmp_path / "backbone.pkl"))
    for name, author in (
        ("model_final_zoo.pkl", "Detectron2 Model Zoo"),
        ("stock.pth", None),
        ("backbone.pkl", "DetKD export_backbone"),
    ):
        kept = (tmp_path / name).read_bytes()
        with pytest.raises(
            ValueError,
            match=rf"{name}' is a training run's checkpoint or other weights "
            rf"\(weights export_student did not write: __author__ "
            rf"{author!r}\).*another file name",
        ):
            export_student(run, str(tmp_path / name))
        with pytest.raises(ValueError, match=rf"save_student: .*{name}' is .*other weights"):
            kd.export_student(str(tmp_path / name))
        assert (tmp_path / name).read_bytes() == kept
    # export_backbone: the same, but its own older file is what it replaces
    export_backbone(run, str(tmp_path / "backbone.pkl"))
    export_student(run, str(tmp_path / "student.pkl"))
    for name in ("model_final_zoo.pkl", "student.pkl"):
        kept = (tmp_path / name).read_bytes()
        with pytest.raises(
            ValueError, match=rf"export_backbone: .*{name}' is .*other weights.*backbone\.pkl"
        ):
            export_backbone(run, str(tmp_path / name))
        assert (tmp_path / name).read_bytes() == kept

    # a file that is no checkpoint at all: nothing of a run to lose, replaced
    with open(out, "w") as f:
        f.write("not a checkpoint")
    assert export_student(run, out).keys() == state.keys()
    assert torch.load(out, weights_only=False)["model"].keys() == state.keys()
    # files whose "model" entry is not a state dict: refused as input; as output, a list is
    # replaced (nothing of a run), DetKD's own file replaced, another's kept
    for other in ({"model": torch.zeros(3)}, {"model": [1, 2]}, [torch.zeros(1)]):
        torch.save(other, out)
        if isinstance(other, dict):
            with pytest.raises(ValueError, match="other weights"):
                export_student(run, out)
            torch.save({**other, "__author__": "DetKD"}, out)
        assert export_student(run, out).keys() == state.keys()
        with pytest.raises(ValueError, match="no 'student.\\*' keys; it is not a DetKD run"):
            export_student(other, str(tmp_path / "x.pth"))


def test_run_checkpoint_has_no_teacher_and_export_loads_in_stock_detectron2(tmp_path):
    kd = _kd()
    for p in kd.distillers.parameters():
        p.data.fill_(0.5)
    DetectionCheckpointer(kd, str(tmp_path)).save("model_0000009")
    ckpt = torch.load(tmp_path / "model_0000009.pth", weights_only=False)
    keys = ckpt["model"].keys()
    assert not any(k.startswith("teacher") for k in keys)
    assert any(k.startswith("distillers.pkd.adapters") for k in keys)

    out = str(tmp_path / "student.pth")
    state = export_student(str(tmp_path / "model_0000009.pth"), out)
    assert state.keys() == kd.student.state_dict().keys()

    # Stock detectron2: the student's own config + DetectionCheckpointer, no DetKD involved.
    stock = instantiate(tiny_retinanet_cfg())
    loaded = torch.load(out, weights_only=False)["model"]
    incompatible = stock.load_state_dict(loaded, strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    stock2 = instantiate(tiny_retinanet_cfg())
    DetectionCheckpointer(stock2).load(out)
    kd.eval(), stock2.eval()
    inputs = make_inputs(n=2)
    with torch.no_grad():
        a, b = kd(inputs), stock2(inputs)
    for x, y in zip(a, b):
        assert len(x["instances"]) > 0
        assert torch.equal(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)
        assert torch.equal(x["instances"].scores, y["instances"].scores)

    # A .pkl output is the model zoo's format (numpy arrays in a pickle), which stock detectron2
    # reads by its suffix; a torch.save file under that name it could not read.
    export_student(str(tmp_path / "model_0000009.pth"), str(tmp_path / "student.pkl"))
    with open(tmp_path / "student.pkl", "rb") as f:
        assert isinstance(pickle.load(f)["model"]["head.cls_score.weight"], np.ndarray)
    stock3 = instantiate(tiny_retinanet_cfg())
    DetectionCheckpointer(stock3).load(str(tmp_path / "student.pkl"))
    assert all(torch.equal(v, stock2.state_dict()[k]) for k, v in stock3.state_dict().items())

    # The wrapper's own export writes the same file contents.
    kd.export_student(str(tmp_path / "direct.pth"))
    direct = torch.load(tmp_path / "direct.pth", weights_only=False)["model"]
    assert all(torch.equal(direct[k], loaded[k]) for k in loaded)
    # ... also as a .pkl (it wrote a torch file under that name, which nothing could load);
    # written again over the earlier .pkl export (read as a pickle: an export, not a run's)
    for _ in range(2):
        kd.export_student(str(tmp_path / "direct.pkl"))
        stock4 = instantiate(tiny_retinanet_cfg())
        DetectionCheckpointer(stock4).load(str(tmp_path / "direct.pkl"))
        assert all(torch.equal(v, stock2.state_dict()[k]) for k, v in stock4.state_dict().items())
    with pytest.raises(ValueError, match="no 'student.\\*' keys"):
        export_student(out, str(tmp_path / "again.pth"))


def test_student_init_from_a_run_checkpoint(tmp_path):
    kd = _kd()
    DetectionCheckpointer(kd, str(tmp_path)).save("run")
    other = _kd()
    for p in other.student.parameters():
        p.data.zero_()
    load_student(other.student, str(tmp_path / "run.pth"))
    assert _same_weights(other.student, kd.student)


def test_save_student_is_atomic(tmp_path):
    student = instantiate(tiny_retinanet_cfg())
    path = str(tmp_path / "sub" / "s.pth")
    save_student(student, path)
    assert os.listdir(tmp_path / "sub") == ["s.pth"]
    data = torch.load(path, weights_only=False)
    assert isinstance(data["model"]["head.cls_score.weight"], torch.Tensor)
    assert np.isfinite(data["model"]["head.cls_score.weight"].numpy()).all()


def test_teacher_checkpoint_of_a_larger_architecture_is_an_error(tmp_path):
    # An R101 checkpoint in an R50 teacher config: every teacher key is in the file, the extra
    # blocks are not; detectron2 loads it without a word and the teacher is a truncated R101.
    deeper = tiny_retinanet_cfg(width=32, fpn=128)
    deeper.backbone.bottom_up.stages.depth = 34
    torch.save({"model": instantiate(deeper).state_dict()}, tmp_path / "deep.pth")
    with pytest.raises(
        TeacherCheckpointError,
        match=r"has 80 weights that model.teacher has no place "
        r"for: \['backbone\.bottom_up\.res2\.2\.conv1\.weight'.*stages\.depth=101",
    ):
        load_teacher(_kd().teacher, str(tmp_path / "deep.pth"))
    # the same file in the model zoo's .pkl format
    _write_zoo_pkl(instantiate(deeper), tmp_path / "deep.pkl")
    with pytest.raises(TeacherCheckpointError, match="has 80 weights.*no place for"):
        load_teacher(_kd().teacher, str(tmp_path / "deep.pkl"))
    # a head with one conv more
    wider_head = tiny_retinanet_cfg(width=32, fpn=128)
    wider_head.head.conv_dims = [128, 128, 128]
    torch.save({"model": instantiate(wider_head).state_dict()}, tmp_path / "head.pth")
    with pytest.raises(
        TeacherCheckpointError, match=r"has 4 weights.*'head\.cls_subnet\.4\.weight'"
    ):
        load_teacher(_kd().teacher, str(tmp_path / "head.pth"))
    # Parts the teacher does not have at all (e.g. the mask head of a Mask R-CNN checkpoint for a
    # Faster R-CNN teacher) and old top-level buffers are ignored: the teacher loads exactly.
    source = instantiate(tiny_retinanet_cfg(width=32, fpn=128))
    for p in source.parameters():
        p.data.normal_()
    state = dict(source.state_dict())
    state["roi_heads.mask_head.mask_fcn1.weight"] = torch.zeros(4, 4, 3, 3)
    state["pixel_mean"] = torch.zeros(3, 1, 1)
    torch.save({"model": state}, tmp_path / "extra_parts.pth")
    kd = _kd()
    load_teacher(kd.teacher, str(tmp_path / "extra_parts.pth"))
    assert _same_weights(kd.teacher, source)


def test_strict_student_load_for_evaluation(tmp_path):
    from detkd.checkpoint import CheckpointMismatchError

    kd = _kd()
    for p in kd.student.parameters():
        p.data.normal_()
    DetectionCheckpointer(kd, str(tmp_path)).save("model_final")
    with pytest.raises(CheckpointMismatchError, match="train.init_checkpoint is empty"):
        load_student(_kd().student, "", strict=True)
    # a run checkpoint or the exported student: loaded exactly
    export_student(str(tmp_path / "model_final.pth"), str(tmp_path / "student.pth"))
    for name in ("model_final.pth", "student.pth"):
        other = _kd()
        load_student(other.student, str(tmp_path / name), strict=True)
        assert _same_weights(other.student, kd.student)
    # the teacher's weights (another width) or another class count: an error, not an
    # evaluation of a half-random student
    torch.save({"model": kd.teacher.state_dict()}, tmp_path / "teacher.pth")
    with pytest.raises(
        CheckpointMismatchError,
        match=r"teacher\.pth' does not fit the model of this config "
        r"\(shape mismatch: backbone\.fpn_lateral3\.weight: file \(128, 64, 1, 1\) "
        r"vs model \(64, 32, 1, 1\)",
    ):
        load_student(_kd().student, str(tmp_path / "teacher.pth"), strict=True)
    five = instantiate(tiny_retinanet_cfg(num_classes=5))
    with pytest.raises(CheckpointMismatchError, match="head.cls_score.weight.*num_classes") as e:
        load_student(five, str(tmp_path / "student.pth"), strict=True)
    assert "not in the file" not in str(e.value)  # a key of another shape is not also missing
    # backbone only: parameters are named as missing
    state = {k: v for k, v in kd.student.state_dict().items() if k.startswith("backbone.")}
    torch.save({"model": state}, tmp_path / "backbone.pth")
    with pytest.raises(
        CheckpointMismatchError, match=r"12 model parameters are not in the file: \['head\."
    ):
        load_student(_kd().student, str(tmp_path / "backbone.pth"), strict=True)
    load_student(_kd().student, str(tmp_path / "backbone.pth"))  # train.init_checkpoint: allowed


def test_a_distillation_run_checkpoint_as_teacher(tmp_path):
    # a run's checkpoint holds its student and adapters, not its teacher: it loads as the
    # teacher when its student is that architecture (a distilled student as the next teacher)
    kd = _kd()
    for p in kd.student.parameters():
        p.data.normal_()
    DetectionCheckpointer(kd, str(tmp_path)).save("model_final")
    run = str(tmp_path / "model_final.pth")
    narrow = instantiate(tiny_retinanet_cfg())
    load_teacher(narrow, run)
    assert _same_weights(narrow, kd.student)
    # the file meant as "that run's teacher": the error says that the student was loaded and
    # that the run's teacher is not in it (it only spoke of num_classes / the architecture)
    with pytest.raises(
        TeacherCheckpointError,
        match=r"shape mismatch: .*The file is a distillation run's "
        r"checkpoint: its student \('student\.\*' weights\) was loaded as the teacher\. A DetKD "
        r"run's checkpoints do not hold its teacher: set train\.teacher_checkpoint to the "
        r"teacher's own weights",
    ):
        load_teacher(_kd().teacher, run)
    # another framework's checkpoint with student.* and teacher.* weights: its teacher.* part was
    # silently ignored, and its student loaded into a teacher of that architecture
    state = dict(torch.load(run, weights_only=False)["model"])
    state.update({"teacher." + k: v for k, v in kd.teacher.state_dict().items()})
    torch.save({"model": state}, tmp_path / "both.pth")
    with pytest.raises(
        TeacherCheckpointError,
        match=r"shape mismatch: .*Its 'teacher\.\*' weights \(not a DetKD "
        r"checkpoint: DetKD never saves the teacher\) are not read: write them to a checkpoint",
    ):
        load_teacher(_kd().teacher, str(tmp_path / "both.pth"))
    with pytest.raises(
        TeacherCheckpointError,
        match=r"has both 'student\.\*' and 'teacher\.\*' weights .* "
        r"which of the two is meant is ambiguous",
    ):
        load_teacher(instantiate(tiny_retinanet_cfg()), str(tmp_path / "both.pth"))


def _random_teacher_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # as detectron2's default_setup: train.seed + rank
        teacher = instantiate(tiny_retinanet_cfg())
        load_teacher(teacher, "", allow_random=True)
        torch.save(teacher.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_random_teacher_is_the_same_in_every_process(tmp_path):
    """``train.teacher_random_init`` in a multi-process run (e.g. the D3ETR instant test on
    several GPUs): the teacher is outside DDP, which synchronises only the student, and every
    process draws other random weights; all must distil from rank 0's teacher."""
    import torch.multiprocessing as mp

    mp.spawn(_random_teacher_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    torch.manual_seed(0)
    expected = instantiate(tiny_retinanet_cfg()).state_dict()
    assert a.keys() == b.keys() == expected.keys()
    assert all(torch.equal(a[k], expected[k]) and torch.equal(b[k], expected[k]) for k in a)


def _store_handler(store, prefix):
    """A PathManager handler class serving ``prefix`` paths from the local folder ``store``
    (open, exists, rm): a remote file system for the tests that add its other operations."""
    from iopath.common.file_io import PathHandler

    class StoreHandler(PathHandler):
        PREFIX = prefix

        def _get_supported_prefixes(self):
            return [self.PREFIX]

        def _local(self, path):
            return os.path.join(store, path[len(self.PREFIX) :])

        def _open(self, path, mode="r", buffering=-1, **kwargs):
            return open(self._local(path), mode)

        def _exists(self, path, **kwargs):
            return os.path.exists(self._local(path))

        def _rm(self, path, **kwargs):
            os.remove(self._local(path))

    return StoreHandler


def test_checkpoints_of_a_path_manager_handler_without_rename(tmp_path, monkeypatch):
    """An output folder of another PathManager handler (e.g. iopath's S3PathHandler, which has
    no rename): run checkpoints (written directly by detectron2 before they went through a
    temporary file) and the student export are written, replaced, and make no local folder
    out of the URL (os.path.abspath('kdtest://run/x.pth') is a local path)."""
    import shutil

    from detectron2.utils.file_io import PathManager

    from detkd.engine import _RunCheckpointer

    store = tmp_path / "store"
    (store / "run").mkdir(parents=True)

    class NoRename(_store_handler(store, "detkd-test-norename://")):
        def _isfile(self, path, **kwargs):
            return os.path.isfile(self._local(path))

        def _copy(self, src_path, dst_path, overwrite=False, **kwargs):
            shutil.copyfile(self._local(src_path), self._local(dst_path))
            return True

        def _get_local_path(self, path, **kwargs):
            return self._local(path)

    PathManager.register_handler(NoRename(), allow_override=True)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    model = torch.nn.Linear(2, 3)
    ckpt = _RunCheckpointer(model, NoRename.PREFIX + "run")
    for i in range(2):  # a second save replaces the file
        with torch.no_grad():
            model.weight.fill_(i)
        ckpt.save("model_final", iteration=i)
        saved = torch.load(store / "run" / "model_final.pth", weights_only=False)
        assert saved["iteration"] == i and torch.equal(
            saved["model"]["weight"], torch.full((3, 2), float(i))
        )
    assert (store / "run" / "last_checkpoint").read_text() == "model_final.pth"
    save_student(model, NoRename.PREFIX + "run/model_final_student.pth")
    exported = torch.load(store / "run" / "model_final_student.pth", weights_only=False)["model"]
    assert torch.equal(exported["weight"], torch.ones(3, 2))
    assert sorted(os.listdir(store / "run")) == [
        "last_checkpoint",
        "model_final.pth",
        "model_final_student.pth",
    ]
    assert os.listdir(cwd) == []


def test_a_remote_checkpoint_is_replaced_without_removing_it_first(tmp_path):
    """Another PathManager handler's existing file was removed before the new one was renamed
    onto it: a rename that failed (here: every rename after the first) left no file under the
    name. It is now overwritten by one copy; a new file is still renamed."""
    import shutil

    from detectron2.utils.file_io import PathManager

    store = tmp_path / "store"
    store.mkdir()
    renames = []

    class BadRename(_store_handler(store, "detkd-test-badrename://")):
        def _isdir(self, path, **kwargs):
            return os.path.isdir(self._local(path))

        def _isfile(self, path, **kwargs):
            return os.path.isfile(self._local(path))

        def _copy(self, src_path, dst_path, overwrite=False, **kwargs):
            if os.path.exists(self._local(dst_path)) and not overwrite:
                return False
            shutil.copyfile(self._local(src_path), self._local(dst_path))
            return True

        def _mv(self, src_path, dst_path, **kwargs):
            renames.append(dst_path)
            if len(renames) > 1:
                raise OSError("rename failed (the store's connection dropped)")
            os.replace(self._local(src_path), self._local(dst_path))
            return True

    PathManager.register_handler(BadRename(), allow_override=True)
    url = BadRename.PREFIX + "student.pth"
    model = torch.nn.Linear(2, 3)
    for i in range(2):
        with torch.no_grad():
            model.weight.fill_(i)
        save_student(model, url)
        saved = torch.load(store / "student.pth", weights_only=False)["model"]
        assert torch.equal(saved["weight"], torch.full((3, 2), float(i)))
        assert sorted(os.listdir(store)) == ["student.pth"]  # no .tmp left
    assert renames == [url]  # the first export renamed, the second copied over the file


@pytest.mark.parametrize(
    "config",
    [
        "configs/PKD/retinanet_R18_from_mask_rcnn_R101_2x.py",
        "configs/ReviewKD/faster_rcnn_R18_from_faster_rcnn_R101.py",
    ],
)
def test_r18_students_load_torchvision_weights_converted_by_detectron2s_tool(config, tmp_path):
    """The R18 configs' init: torchvision's ResNet-18 ImageNet weights converted by detectron2's
    tools/convert-torchvision-to-d2.py (random weights here, as nothing is downloaded). The
    student's ResNet then computes torchvision's ResNet-18: res5 equals layer4 on one input, so
    every weight, the strides (BasicBlock: in the first 3x3) and the BatchNorms landed."""
    import subprocess
    import sys

    import detectron2
    import torchvision

    from conftest import load_config

    tool = os.path.join(
        os.path.dirname(os.path.dirname(detectron2.__file__)),
        "tools",
        "convert-torchvision-to-d2.py",
    )
    # shipped by the wheel `make test` installs; not by a pip source install
    if not os.path.isfile(tool):
        pytest.skip(f"this detectron2 installation has no {tool}")
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None).eval()
    for m in tv.modules():  # BatchNorm statistics other than 0/1, so that they are checked too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.5, 0.5)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    subprocess.run(
        [sys.executable, tool, str(tmp_path / "r18.pth"), str(tmp_path / "R-18.pkl")],
        check=True,
        capture_output=True,
    )

    cfg = load_config(config)
    assert os.path.basename(cfg.train.init_checkpoint) == "R-18.pkl"
    student = instantiate(cfg.model.student).eval()
    load_student(student, str(tmp_path / "R-18.pkl"))
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected = tv.layer4(
            tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))))
        )
        got = student.backbone.bottom_up(x)["res5"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_teacher_checkpoint_of_a_smaller_or_maskless_detector_names_the_fix(tmp_path):
    # an R50 file for the R101 teacher, a Faster R-CNN file for the Mask R-CNN teacher of
    # configs/PKD/retinanet_R18_from_mask_rcnn_R101_2x.py: the error listed the unloaded keys and
    # asked "Is it the checkpoint of the architecture in model.teacher?"; it now says which
    # and what to set (as for a larger architecture's file)
    from detectron2 import model_zoo
    from detectron2.layers import ShapeSpec

    from conftest import tiny_faster_rcnn_cfg

    deep = tiny_retinanet_cfg()  # ResNet-18 layout: 2 blocks a stage
    shallow = tiny_retinanet_cfg()
    shallow.backbone.bottom_up.stages.depth = 10  # 1 block a stage
    _write_zoo_pkl(instantiate(shallow), tmp_path / "shallow.pkl")
    with pytest.raises(TeacherCheckpointError) as e:
        load_teacher(instantiate(deep), str(tmp_path / "shallow.pkl"))
    msg = str(e.value)
    assert "leaves 40 teacher parameters unloaded" in msg, msg
    assert (
        "fills only part of these containers (backbone.bottom_up.res2: 1 of its 2, "
        "backbone.bottom_up.res3: 1 of its 2, backbone.bottom_up.res4: 1 of its 2, "
        "backbone.bottom_up.res5: 1 of its 2)"
    ) in msg, msg
    assert "smaller architecture" in msg and "stages.depth=50 for an R50 checkpoint" in msg
    assert "has nothing of" not in msg

    mask = tiny_faster_rcnn_cfg()
    zoo = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model.roi_heads
    mask.roi_heads.update(
        mask_in_features=zoo.mask_in_features, mask_pooler=zoo.mask_pooler, mask_head=zoo.mask_head
    )
    mask.roi_heads.mask_head.input_shape = ShapeSpec(channels=64, width=14, height=14)
    mask.roi_heads.mask_head.conv_dims = [16, 16]
    _write_zoo_pkl(instantiate(tiny_faster_rcnn_cfg()), tmp_path / "faster.pkl")
    with pytest.raises(TeacherCheckpointError) as e:
        load_teacher(instantiate(mask), str(tmp_path / "faster.pkl"))
    msg = str(e.value)
    assert "The file has nothing of ['roi_heads.mask_head']" in msg, msg
    assert "Faster R-CNN file for a Mask R-CNN teacher" in msg and "twins.py's faster_rcnn" in msg
    assert "fills only part" not in msg


def test_an_init_checkpoint_of_which_nothing_fits_the_student_is_an_error(tmp_path):
    """An unconverted torchvision ResNet-18 .pth as train.init_checkpoint: detectron2 logs every
    key as unused and trains from scratch; DetKD stops and names the converter. A file that
    fits part of the student (its backbone) still loads, with the rest logged."""
    import torchvision

    from detkd.checkpoint import CheckpointMismatchError

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    student = instantiate(tiny_retinanet_cfg())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(
        CheckpointMismatchError, match=r"none of the student's weights.*convert-torchvision-to-d2"
    ):
        load_student(student, str(tmp_path / "r18.pth"))
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    # the same for a student with FrozenBN (detectron2's ImageNet-initialised R-50s), whose
    # running statistics a load fills itself and never reports as missing
    cfg = tiny_retinanet_cfg()
    cfg.backbone.bottom_up.stem.norm = "FrozenBN"
    cfg.backbone.bottom_up.stages.norm = "FrozenBN"
    with pytest.raises(CheckpointMismatchError, match=r"none of the student's weights"):
        load_student(instantiate(cfg), str(tmp_path / "r18.pth"))

    donor = instantiate(tiny_retinanet_cfg())
    part = {k: v for k, v in donor.state_dict().items() if k.startswith("backbone.bottom_up.")}
    torch.save({"model": part}, tmp_path / "backbone.pth")
    load_student(student, str(tmp_path / "backbone.pth"))
    got = student.state_dict()
    assert all(torch.equal(got[k], v) for k, v in part.items())


def test_a_wider_teachers_checkpoint_as_init_checkpoint_is_an_error(tmp_path):
    """The teacher's model_final.pth as the student's train.init_checkpoint: only the head's
    class and box biases (1-D, as many as the classes/anchors) have the student's shapes, so
    the load passed the nothing-fits check and the student trained from its random
    initialisation, with a "Skip loading" line per tensor. It is an error naming what fit; a
    file with one conv weight of the student's still loads (detectron2's partial init)."""
    from detkd.checkpoint import CheckpointMismatchError

    teacher = instantiate(tiny_retinanet_cfg(width=32, fpn=128))
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    student = instantiate(tiny_retinanet_cfg())
    own = student.state_dict()
    fitting = sorted(
        k
        for k, v in teacher.state_dict().items()
        if k in own and v.shape == own[k].shape and not k.endswith("num_batches_tracked")
    )
    assert fitting == ["head.bbox_pred.bias", "head.cls_score.bias"]  # the case tested
    before = {k: v.clone() for k, v in own.items()}
    with pytest.raises(
        CheckpointMismatchError,
        match=(
            r"train\.init_checkpoint '.*teacher\.pth' holds none of the student's weights: "
            r"only 2 of its "
            r"tensors fit the student's, biases or norms "
            r"\(head\.bbox_pred\.bias, head\.cls_score\.bias\), "
            r"none of its convolution or linear weights "
            r"\(e\.g\. backbone\.fpn_lateral3\.weight: file \(128, 64, 1, 1\) "
            r"vs student \(64, 32, 1, 1\);.*a teacher's checkpoint \(another width or depth\) "
            r"does not initialise"
        ),
    ):
        load_student(student, str(tmp_path / "teacher.pth"))
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # checked first
    # named by what the file is, where it is not train.init_checkpoint
    with pytest.raises(
        CheckpointMismatchError, match=r"^the last checkpoint of 'x' '.*teacher\.pth' holds none"
    ):
        load_student(student, str(tmp_path / "teacher.pth"), key="the last checkpoint of 'x'")
    target = own["head.cls_score.weight"].clone() + 1
    one_conv = dict(teacher.state_dict(), **{"head.cls_score.weight": target})
    torch.save({"model": one_conv}, tmp_path / "one_conv.pth")
    load_student(student, str(tmp_path / "one_conv.pth"))
    assert torch.equal(student.state_dict()["head.cls_score.weight"], target)


def test_an_unloadable_init_checkpoint_names_the_key_and_the_fix(tmp_path):
    """A paper config's init_checkpoint is a detectron2:// URL (ImageNet R-50), or a converted
    R-18.pkl the user has to make: offline or without the file, load_student stopped on fvcore's
    bare "AssertionError: Checkpoint R-18.pkl not found!" or urllib's URLError, naming neither
    train.init_checkpoint nor what to do (the teacher's loader says both)."""
    from detkd.checkpoint import CheckpointMismatchError

    student = instantiate(tiny_retinanet_cfg())
    with pytest.raises(
        CheckpointMismatchError,
        match=r"Cannot load train\.init_checkpoint '.*R-18\.pkl' "
        r"\(AssertionError: .*not found.*\); check that the file exists",
    ):
        load_student(student, str(tmp_path / "R-18.pkl"))
    # a URL that cannot be fetched (a closed local port: no network needed)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"could not be downloaded \(no network\?\).*set "
        r"train\.init_checkpoint to the local file",
    ):
        load_student(student, "http://127.0.0.1:9/R-50.pkl")
    with pytest.raises(
        TeacherCheckpointError, match=r"could not be downloaded .*set train\.teacher_checkpoint"
    ):
        load_teacher(instantiate(tiny_retinanet_cfg()), "http://127.0.0.1:9/R-101.pkl")


def test_a_missing_checkpoint_that_a_repo_config_writes_names_the_run_to_train(
    tmp_path, monkeypatch
):
    """The demo's distilled configs name output/demo/teacher_*/model_final.pth, its DETRs
    output/demo/backbones/*.pkl, the D3ETR distillation configs the R101 teacher's run: before
    those runs, the error said only "check that the file exists", not which run writes it."""
    from detkd.checkpoint import CheckpointMismatchError

    monkeypatch.chdir(REPO)  # configs/ as the user runs train_net.py, paths relative to it
    teacher = instantiate(tiny_retinanet_cfg())
    missing = {
        "output/demo/teacher_retinanet/model_final.pth": r"training "
        r"configs/demo/teacher_retinanet\.py first: `python train_net\.py --config-file "
        r"configs/demo/teacher_retinanet\.py` \(`python -m detkd\.demo` trains",
        "output/D3ETR/conditional_detr_r101_50ep/model_final.pth": r"training "
        r"configs/D3ETR/conditional_detr_r101_50ep\.py first: .*conditional_detr_r101_50ep\.py`\.$",
    }
    for path, hint in missing.items():
        with pytest.raises(
            TeacherCheckpointError, match=r"not found.*exists.*checkpoint; it is written by " + hint
        ):
            load_teacher(teacher, path)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"; it is the backbone of configs/demo/student_retinanet\.py's final weights: "
        r"`python -m detkd\.demo --methods d3etr` .* \(by hand: detkd\.checkpoint\."
        r"export_backbone\('output/demo/student_retinanet/model_final\.pth', "
        r"'output/demo/backbones/student_retinanet\.pkl'\)\)",
    ):
        load_student(
            instantiate(tiny_retinanet_cfg()), "output/demo/backbones/student_retinanet.pkl"
        )
    # an unfinished run of that config (its last_checkpoint, no model_final): resume it there
    run = tmp_path / "output" / "demo" / "teacher_retinanet"
    run.mkdir(parents=True)
    (run / "last_checkpoint").write_text("model_0000099.pth")
    with pytest.raises(
        TeacherCheckpointError,
        match=rf"; {re.escape(str(run))} holds an unfinished run of configs/demo/teacher_retinanet"
        rf"\.py: .*--resume train\.output_dir={re.escape(str(run))}`, which writes model_final",
    ):
        load_teacher(teacher, str(run / "model_final.pth"))
    # no config of that name, or not the repo's output layout: no such hint
    for path in ("output/demo/nothing_here/model_final.pth", str(tmp_path / "model_final.pth")):
        with pytest.raises(TeacherCheckpointError, match=r"\.pkl/\.pth checkpoint\.$"):
            load_teacher(teacher, path)


def test_an_unloadable_checkpoint_to_evaluate_does_not_suggest_an_empty_one(tmp_path):
    """--eval-only (load_student strict): the error for a file that cannot be loaded suggested
    'an empty train.init_checkpoint starts the student from random weights', which --eval-only
    refuses ('there are no weights to evaluate'). Training (not strict) keeps the suggestion."""
    from detkd.checkpoint import CheckpointMismatchError

    student = instantiate(tiny_retinanet_cfg())
    missing = str(tmp_path / "model_final.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        load_student(student, missing, strict=True)
    assert "Cannot load train.init_checkpoint" in str(e.value) and "random weights" not in str(
        e.value
    )
    assert str(e.value).endswith(".pkl/.pth checkpoint.")
    with pytest.raises(
        CheckpointMismatchError,
        match=r"an empty train\.init_checkpoint starts the student from random",
    ):
        load_student(student, missing)
    with pytest.raises(CheckpointMismatchError, match="there are no weights to evaluate"):
        load_student(student, "", strict=True)  # what the suggestion led to


def _caffe2_name(key):
    """The Caffe2 / Detectron1 model-zoo name of a tiny Faster R-CNN's ``key`` (BasicBlocks,
    FPN, RPN, box head), the inverse of detectron2's ``convert_c2_detectron_names``."""
    import re

    suffix = {"weight": "w", "bias": "b", "running_mean": "rm", "running_var": "riv"}
    m = re.fullmatch(r"backbone\.bottom_up\.(.*)\.(weight|bias|running_mean|running_var)", key)
    if m:
        path, p = m.groups()
        if path.startswith("stem.conv1"):
            return (
                "res_conv1_bn_" + {"w": "s"}.get(suffix[p], suffix[p])
                if "norm" in path
                else "conv1_w"
            )
        stage, block, conv = re.fullmatch(r"(res\d)\.(\d+)\.(\w+?)(?:\.norm)?", path).groups()
        branch = {"conv1": "branch2a", "conv2": "branch2b", "shortcut": "branch1"}[conv]
        if path.endswith(".norm"):
            return f"{stage}_{block}_{branch}_bn_" + {"w": "s"}.get(suffix[p], suffix[p])
        return f"{stage}_{block}_{branch}_{suffix[p]}"
    m = re.fullmatch(r"backbone\.fpn_(lateral|output)(\d)\.(weight|bias)", key)
    if m:
        kind, s, p = m.groups()
        return (
            f"fpn_inner_res{s}_0_sum_lateral_" if kind == "lateral" else f"fpn_res{s}_0_sum_"
        ) + suffix[p]
    m = re.fullmatch(r"proposal_generator\.rpn_head\.(\w+)\.(weight|bias)", key)
    if m:
        name = {
            "conv": "conv_rpn_fpn2",
            "objectness_logits": "rpn_cls_logits_fpn2",
            "anchor_deltas": "rpn_bbox_pred_fpn2",
        }[m.group(1)]
        return f"{name}_{suffix[m.group(2)]}"
    m = re.fullmatch(r"roi_heads\.box_head\.fc(\d)\.(weight|bias)", key)
    if m:
        return f"fc{int(m.group(1)) + 5}_{suffix[m.group(2)]}"
    m = re.fullmatch(r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)", key)
    return f"{m.group(1)}_{suffix[m.group(2)]}"


def _write_caffe2_pkl(model, path):
    """``model`` in a Detectron1 model-zoo .pkl ("blobs" of Caffe2 names, background class first),
    which detectron2 loads with its name-matching heuristics."""
    blobs = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        name, v = _caffe2_name(k), v.detach().numpy()
        if name.startswith("cls_score"):  # background: the last class in detectron2, the first here
            v = np.concatenate([v[-1:], v[:-1]])
        elif name.startswith("bbox_pred"):  # class-specific boxes, with background's 4 first
            v = np.concatenate([np.zeros_like(v[:4]), v])
        blobs[name] = v
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f)


def _tiny_rcnn(depth=10, num_classes=3):
    from detkd.modeling.resnet import basic_resnet_stages

    from conftest import tiny_faster_rcnn_cfg

    cfg = tiny_faster_rcnn_cfg(num_classes=num_classes)
    cfg.backbone.bottom_up.stages = L(basic_resnet_stages)(depth=depth, width=16, norm="BN")
    model = instantiate(cfg)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5) if "running" in name else t.normal_()
    return model.requires_grad_(False).eval()


def test_teacher_from_a_caffe2_pkl_is_exact_and_a_deeper_backbones_is_an_error(tmp_path):
    # The heuristics' unmatched keys keep the file's names (res2.1.* for backbone.bottom_up.res2):
    # a deeper backbone's file loaded into the first blocks with a warning only.
    source = _tiny_rcnn()
    _write_caffe2_pkl(source, tmp_path / "r10.pkl")
    teacher = _tiny_rcnn()
    load_teacher(teacher, str(tmp_path / "r10.pkl"))
    assert _same_weights(teacher, source)

    _write_caffe2_pkl(_tiny_rcnn(depth=18), tmp_path / "r18.pkl")
    with pytest.raises(
        TeacherCheckpointError,
        match=r"has 40 weights that model.teacher has no place "
        r"for: \['res2\.1\.conv1\.norm\.bias'.*larger architecture",
    ):
        load_teacher(_tiny_rcnn(), str(tmp_path / "r18.pkl"))


def test_a_caffe2_teacher_pkl_of_another_class_count_is_a_shape_mismatch(tmp_path):
    # detectron2's heuristics skip a tensor of another shape with a warning: the 80-class file's
    # predictor was reported as a part the file lacks ("The file has nothing of
    # ['roi_heads.box_predictor']: ... a Faster R-CNN file for a Mask R-CNN teacher").
    _write_caffe2_pkl(_tiny_rcnn(num_classes=80), tmp_path / "coco.pkl")
    with pytest.raises(TeacherCheckpointError) as e:
        load_teacher(_tiny_rcnn(), str(tmp_path / "coco.pkl"))
    msg = str(e.value)
    assert (
        "shape mismatch: roi_heads.box_predictor.cls_score.weight: file (81, 64) vs model (4, 64)"
        in msg
    ), msg
    assert "class-count mismatch" in msg and "MODEL.ROI_HEADS.NUM_CLASSES" in msg
    assert "has nothing of" not in msg and "unloaded" not in msg


def test_init_checkpoint_from_a_pickled_backbone_state_dict_without_author(tmp_path):
    # a .pkl of the backbone's own state dict (stem.conv1.weight, res2.0.conv1.norm.running_mean)
    # is matched by name suffix, as detectron2 matches every .pkl: the pickled-state-dict
    # handling loaded it by its full names only, which refused it ("holds none of the
    # student's weights"); before that, Caffe2's renaming (running_mean -> running.mean) left
    # every BN's running statistics at their initial values
    source = instantiate(tiny_retinanet_cfg())
    bottom_up = source.backbone.bottom_up
    for t in bottom_up.state_dict().values():
        if t.is_floating_point():
            t.uniform_(0.5, 1.5)
    state = {k: v.numpy() for k, v in bottom_up.state_dict().items()}
    # also as {"model": ...} without "matching_heuristics": matched by suffix too
    for data in (state, {"model": state}):
        with open(tmp_path / "backbone.pkl", "wb") as f:
            pickle.dump(data, f)
        kd = _kd()
        load_student(kd.student, str(tmp_path / "backbone.pkl"))
        got = kd.student.backbone.bottom_up.state_dict()
        assert any(k.endswith("running_mean") for k in got)
        for k, v in bottom_up.state_dict().items():
            assert torch.equal(got[k], v), k


def test_strict_student_load_refuses_the_checkpoint_of_a_larger_architecture(tmp_path):
    # --eval-only with the weights of a student with one head conv more: every model key is in
    # the file, but the file's extra convs have no place in the model (evaluating it would
    # measure another detector); as train.init_checkpoint it is allowed
    from detkd.checkpoint import CheckpointMismatchError

    cfg = tiny_retinanet_cfg()
    cfg.head.conv_dims = [64, 64, 64]
    larger = instantiate(cfg)
    torch.save({"model": larger.state_dict()}, tmp_path / "larger.pth")
    match = (
        r"does not fit the model of this config \(4 keys of the file are not in the model: "
        r"\['head\.cls_subnet\.4\.weight'"
    )
    with pytest.raises(CheckpointMismatchError, match=match):
        load_student(instantiate(tiny_retinanet_cfg()), str(tmp_path / "larger.pth"), strict=True)
    student = instantiate(tiny_retinanet_cfg())
    load_student(student, str(tmp_path / "larger.pth"))
    assert torch.equal(student.head.cls_subnet[2].weight, larger.head.cls_subnet[2].weight)


def test_a_save_that_fails_keeps_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    # save_student writes <path>.tmp and renames it: a write that fails half-way (a full disk)
    # leaves the previous file as it was and no .tmp behind
    student = instantiate(tiny_retinanet_cfg())
    path = str(tmp_path / "s.pth")
    save_student(student, path)
    before = (tmp_path / "s.pth").read_bytes()

    def half_written(obj, f, *args, **kwargs):
        f.write(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="No space left on device"):
        save_student(student, path)
    assert os.listdir(tmp_path) == ["s.pth"]
    assert (tmp_path / "s.pth").read_bytes() == before


def test_teacher_checkpoint_with_deformable_convs_is_an_error_and_bn_counters_are_ignored(tmp_path):
    """A file with deformable convs' offsets inside the ResNet blocks (the model zoo's
    *_dconv_c3-c5 detectors: conv2_offset beside conv2, whose weights were trained for the
    deformable conv) for a teacher without them is another architecture: an error naming the
    fix, not a warning. A BN/SyncBN-trained file's num_batches_tracked in a FrozenBN teacher
    (the same eval maths; stock detectron2 loads it) loads, without a warning about them."""
    import logging

    source = instantiate(tiny_retinanet_cfg(width=32, fpn=128))
    for p in source.parameters():
        p.data.normal_()
    state = dict(source.state_dict())
    offsets = {}
    for stage in ("res3", "res4", "res5"):
        for block in (0, 1):
            if f"backbone.bottom_up.{stage}.{block}.conv2.weight" in state:
                offsets[f"backbone.bottom_up.{stage}.{block}.conv2_offset.weight"] = torch.zeros(
                    18, 4, 3, 3
                )
    assert offsets
    torch.save({"model": {**state, **offsets}}, tmp_path / "dcn.pth")
    with pytest.raises(
        TeacherCheckpointError,
        match=rf"has {len(offsets)} weights that model.teacher has no "
        r"place for: \['backbone\.bottom_up\.res3\.0\.conv2_offset\.weight'.*"
        r"deformable convolutions.*deform_on_per_stage",
    ):
        load_teacher(_kd().teacher, str(tmp_path / "dcn.pth"))

    # the tiny models use BN: the file is BN-trained, the teacher FrozenBN
    assert sum(k.endswith("num_batches_tracked") for k in state) > 10
    torch.save({"model": state}, tmp_path / "bn.pth")
    frozen = tiny_retinanet_cfg(width=32, fpn=128)
    frozen.backbone.bottom_up.stem.norm = frozen.backbone.bottom_up.stages.norm = "FrozenBN"
    kd = tiny_kd("pkd", L(PKDDistiller)(), teacher=frozen)
    assert not any(k.endswith("num_batches_tracked") for k in kd.teacher.state_dict())
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("detkd.checkpoint").addHandler(handler)
    try:
        load_teacher(kd.teacher, str(tmp_path / "bn.pth"))
    finally:
        logging.getLogger("detkd.checkpoint").removeHandler(handler)
    theirs = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert kd.teacher.state_dict().keys() == theirs.keys()
    assert all(torch.equal(kd.teacher.state_dict()[k], v) for k, v in theirs.items())
    assert not [r for r in records if "does not have" in r.getMessage()]


def test_teacher_checkpoint_with_a_parameter_a_module_lacks_is_an_error(tmp_path):
    # a file whose stem conv has a bias (another architecture's) for a teacher whose stem conv
    # has none: the bias has no place in model.teacher, which is not the file's architecture
    kd = _kd()
    key = "backbone.bottom_up.stem.conv1.bias"
    assert kd.teacher.backbone.bottom_up.stem.conv1.bias is None
    torch.save({"model": {**kd.teacher.state_dict(), key: torch.zeros(32)}}, tmp_path / "b.pth")
    with pytest.raises(TeacherCheckpointError) as e:
        load_teacher(kd.teacher, str(tmp_path / "b.pth"))
    assert f"has 1 weights that model.teacher has no place for: ['{key}']" in str(e.value)


def test_run_checkpointer_refuses_a_nan_buffer_and_strictly_a_file_with_extra_keys(tmp_path):
    # A BatchNorm whose running mean turned NaN (a diverged step's forward) gives NaN outputs at
    # inference like a NaN weight: the checkpoint is refused. Under --resume (strict), a file
    # with a key the model lacks (another run's extra module) is refused like a missing one.
    from detkd.checkpoint import CheckpointMismatchError
    from detkd.engine import _RunCheckpointer

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ckpt = _RunCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000000", iteration=0)
    with torch.no_grad():
        model[1].running_mean[1] = float("nan")
    with pytest.raises(
        FloatingPointError,
        match=r"Checkpoint 'model_0000001' not written: .* 1 weights are NaN "
        r"or inf \(\['1\.running_mean'\]\)",
    ):
        ckpt.save("model_0000001", iteration=1)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    extra = torch.load(tmp_path / "model_0000000.pth", weights_only=False)
    extra["model"]["2.weight"] = torch.ones(2)
    torch.save(extra, tmp_path / "model_0000000.pth")
    ckpt.strict = True
    with pytest.raises(CheckpointMismatchError, match=r"2\.weight"):
        ckpt.resume_or_load("", resume=True)
    # not strict: logged only
    _RunCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)


def test_resume_accepts_a_run_checkpoint_without_the_wrappers_extra_state(tmp_path):
    """A run checkpoint of an older version has no '_extra_state' (the student's EMA loss
    normaliser): --resume (a strict load) restores it, with nothing reported missing; a
    parameter missing from it is still an error."""
    from detkd.checkpoint import CheckpointMismatchError
    from detkd.engine import _RunCheckpointer

    kd = _kd()
    for p in kd.student.parameters():
        p.data.normal_()
    state = {k: v for k, v in kd.state_dict().items() if k != "_extra_state"}
    torch.save({"model": state}, tmp_path / "old.pth")
    other = _kd()
    ckpt = _RunCheckpointer(other, str(tmp_path))
    ckpt.strict = True
    ckpt.load(str(tmp_path / "old.pth"), checkpointables=[])
    assert _same_weights(other.student, kd.student)
    del state["student.head.cls_score.bias"]
    torch.save({"model": state}, tmp_path / "older.pth")
    match = r"1 model parameters are not in the file: \['student.head.cls_score.bias'\]"
    with pytest.raises(CheckpointMismatchError, match=match):
        ckpt.load(str(tmp_path / "older.pth"), checkpointables=[])


def test_export_backbone_initialises_a_detr_from_a_retinanets_backbone(tmp_path):
    """export_backbone writes a RetinaNet's backbone.bottom_up.* as a model-zoo style .pkl:
    DetKD's loader and stock detectron2's both put every tensor into a Conditional DETR's
    backbone.* (res5, which the DETR on res4 lacks, is left out); a run checkpoint gives its
    student's backbone; a wrong prefix or a non-.pkl output is a clear error."""
    from detkd import export_backbone

    from conftest import load_config

    source = instantiate(tiny_retinanet_cfg())
    with torch.no_grad():
        for t in source.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
    expected = source.backbone.bottom_up.state_dict()
    torch.save({"model": source.state_dict()}, tmp_path / "retinanet.pth")
    written = export_backbone(str(tmp_path / "retinanet.pth"), str(tmp_path / "backbone.pkl"))
    assert set(written) == set(expected) and all(
        np.array_equal(written[k], expected[k].numpy()) for k in expected
    )

    detr_cfg = load_config("configs/common/models/tiny_detr.py").model  # width 16, on res4
    loaders = (
        lambda m: load_student(m, str(tmp_path / "backbone.pkl")),
        lambda m: DetectionCheckpointer(m).load(str(tmp_path / "backbone.pkl")),  # stock detectron2
    )
    for load in loaders:
        torch.manual_seed(0)
        detr = instantiate(detr_cfg)
        others = {
            k: v.clone() for k, v in detr.state_dict().items() if not k.startswith("backbone.")
        }
        load(detr)
        got = detr.backbone.state_dict()
        assert got.keys() <= expected.keys() and {k.split(".")[0] for k in got} == {
            "stem",
            "res2",
            "res3",
            "res4",
        }
        for k, v in got.items():
            assert torch.equal(v, expected[k]), k
        # only the backbone
        assert all(torch.equal(detr.state_dict()[k], v) for k, v in others.items())

    kd = _kd()  # a DetKD run checkpoint: its student's backbone (the teacher's is wider)
    torch.save({"model": kd.state_dict(), "iteration": 3}, tmp_path / "run.pth")
    written = export_backbone(str(tmp_path / "run.pth"), str(tmp_path / "student_backbone.pkl"))
    student = kd.student.backbone.bottom_up.state_dict()
    assert set(written) == set(student) and all(
        np.array_equal(written[k], student[k].numpy()) for k in student
    )

    torch.save({"model": detr.state_dict()}, tmp_path / "detr.pth")
    with pytest.raises(
        ValueError, match=r"no weights under 'backbone\.bottom_up\.'.*'backbone\.' for a DETR"
    ):
        export_backbone(str(tmp_path / "detr.pth"), str(tmp_path / "detr_backbone.pkl"))
    assert set(
        export_backbone(
            str(tmp_path / "detr.pth"), str(tmp_path / "detr_backbone.pkl"), prefix="backbone."
        )
    ) == set(got)
    with pytest.raises(ValueError, match=r"write a \.pkl"):
        export_backbone(str(tmp_path / "retinanet.pth"), str(tmp_path / "backbone.pth"))
    # a checkpoint stored in bfloat16 (numpy has no such dtype): its values, as float32
    half = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v
        for k, v in source.state_dict().items()
    }
    written = export_backbone({"model": half}, str(tmp_path / "bf16.pkl"))
    key = "res2.0.conv1.weight"
    assert written[key].dtype == np.float32
    assert np.array_equal(written[key], half["backbone.bottom_up." + key].float().numpy())


def test_a_pretrained_backbone_as_teacher_or_evaluated_student_is_named_as_such(tmp_path):
    """A pretrained-backbone file (export_backbone's, or an ImageNet .pkl) where a trained
    detector is needed, as train.teacher_checkpoint or as the weights of --eval-only, is named
    as a pretrained backbone with the fix; the hints for a detector file without some parts
    ("a Faster R-CNN file for a Mask R-CNN teacher") and for another config did not fit it."""
    from detkd import export_backbone
    from detkd.checkpoint import CheckpointMismatchError

    source = instantiate(tiny_retinanet_cfg())
    torch.save({"model": source.state_dict()}, tmp_path / "retinanet.pth")
    export_backbone(str(tmp_path / "retinanet.pth"), str(tmp_path / "backbone.pkl"))
    with pytest.raises(
        TeacherCheckpointError, match=r"pretrained backbone.*not a trained detector.*model_final"
    ) as e:
        load_teacher(instantiate(tiny_retinanet_cfg()), str(tmp_path / "backbone.pkl"))
    assert "Faster R-CNN file" not in str(e.value)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"pretrained backbone.*Set train.init_checkpoint to the trained",
    ) as e:
        load_student(instantiate(tiny_retinanet_cfg()), str(tmp_path / "backbone.pkl"), strict=True)
    assert "with the config it was trained with" not in str(e.value)
    # training: fine
    load_student(instantiate(tiny_retinanet_cfg()), str(tmp_path / "backbone.pkl"))


def _share_buffers_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    from detkd.engine import share_student_buffers

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        kd = _kd()
        bn = [m for m in kd.student.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
        # each process's own statistics, as after DDP training
        bn.running_mean.fill_(float(rank + 1))
        bn.num_batches_tracked.fill_(10 * (rank + 1))
        with torch.no_grad():
            bn.weight.fill_(float(rank + 1))  # parameters are DDP's business: not touched
        share_student_buffers(kd)
        torch.save(
            {"mean": bn.running_mean, "n": bn.num_batches_tracked, "w": bn.weight.detach()},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_evaluation_in_training_uses_rank_0s_batch_norm_statistics_in_every_process(tmp_path):
    """With DDP's broadcast_buffers=False each process keeps its own BatchNorm statistics; the
    evaluation during training ran each process's images with them, while checkpoints hold rank
    0's, so the logged AP was not the saved model's. share_student_buffers (called before that
    evaluation) gives every process rank 0's buffers and leaves the parameters alone."""
    import torch.multiprocessing as mp

    mp.spawn(_share_buffers_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.all(got["mean"] == 1.0) and int(got["n"]) == 10
        assert torch.all(got["w"] == float(r + 1))


def test_strict_student_load_names_up_to_20_missing_keys_and_10_shape_mismatches(tmp_path):
    # --eval-only's error lists the unloaded parameters (" ..." only beyond 20 of them) and each
    # tensor of another shape (up to 10), by name and both shapes
    from detkd.checkpoint import CheckpointMismatchError

    student = instantiate(tiny_retinanet_cfg())
    state = student.state_dict()
    keys = [k for k in state if not k.endswith("num_batches_tracked")]
    for n, listed in ((20, keys[:20]), (21, keys[:20])):
        torch.save({"model": {k: v for k, v in state.items() if k not in keys[:n]}}, tmp_path / "f")
        with pytest.raises(CheckpointMismatchError) as e:
            load_student(instantiate(tiny_retinanet_cfg()), str(tmp_path / "f"), strict=True)
        more = " ..." if n > 20 else ""
        assert f"({n} model parameters are not in the file: {listed}{more}). " in str(e.value)
    five = instantiate(tiny_retinanet_cfg(num_classes=5))
    torch.save({"model": five.state_dict()}, tmp_path / "five.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        load_student(instantiate(tiny_retinanet_cfg()), str(tmp_path / "five.pth"), strict=True)
    # 9 anchors a cell: 5 classes are 45 channels, 3 are 27
    assert (
        "shape mismatch: head.cls_score.weight: file (45, 64, 3, 3) vs model (27, 64, 3, 3); "
        "head.cls_score.bias: file (45,) vs model (27,) (a class-count mismatch"
    ) in str(e.value)


def test_strict_load_of_an_unconverted_torchvision_file_into_a_frozen_bn_student(tmp_path):
    # --eval-only with a FrozenBN student (whose running statistics a load fills itself, never
    # reported as missing) and a file of which nothing fits: named as such, as without FrozenBN
    import torchvision

    from detkd.checkpoint import CheckpointMismatchError

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    cfg = tiny_retinanet_cfg()
    cfg.backbone.bottom_up.stem.norm = cfg.backbone.bottom_up.stages.norm = "FrozenBN"
    with pytest.raises(
        CheckpointMismatchError,
        match=r"r18\.pth' holds none of the student's weights: none of its keys \(e\.g\. conv1\.",
    ):
        load_student(instantiate(cfg), str(tmp_path / "r18.pth"), strict=True)


def test_teacher_checkpoint_without_some_parts_names_the_shallowest_parts_it_lacks(tmp_path):
    # the hint names each part the file has nothing of at its shallowest (all of 'roi_heads',
    # not its box head and predictor), every such part (up to 10), and, for a file of which
    # nothing fits, the whole model (not "a pretrained backbone": none of its backbone loaded
    # either); a file that only lacks one tensor of a part asks whether it is the teacher's
    # architecture
    import torchvision

    from conftest import tiny_faster_rcnn_cfg

    rcnn = instantiate(tiny_faster_rcnn_cfg()).state_dict()
    torch.save({"model": {k: v for k, v in rcnn.items() if "roi_heads." not in k}}, tmp_path / "f")
    with pytest.raises(TeacherCheckpointError) as e:
        load_teacher(instantiate(tiny_faster_rcnn_cfg()), str(tmp_path / "f"))
    assert "The file has nothing of ['roi_heads']: " in str(e.value), str(e.value)
    state = instantiate(tiny_retinanet_cfg()).state_dict()
    cases = (
        (
            "no_subnets",
            ("head.cls_subnet.", "head.bbox_subnet."),
            "The file has nothing of ['head.bbox_subnet', 'head.cls_subnet']: ",
        ),
        ("no_bias", ("head.cls_score.bias",), "Is it the checkpoint of the architecture in "),
    )
    for name, dropped, hint in cases:
        kept = {k: v for k, v in state.items() if not k.startswith(dropped)}
        torch.save({"model": kept}, tmp_path / f"{name}.pth")
        with pytest.raises(TeacherCheckpointError) as e:
            load_teacher(instantiate(tiny_retinanet_cfg()), str(tmp_path / f"{name}.pth"))
        assert hint in str(e.value), str(e.value)
    r18 = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(r18, tmp_path / "r18.pth")
    with pytest.raises(TeacherCheckpointError) as e:
        load_teacher(instantiate(tiny_retinanet_cfg()), str(tmp_path / "r18.pth"))
    assert "pretrained backbone" not in str(e.value)
    # nothing fits and the file has weights of other names: another architecture's file (a
    # classifier's, or a RetinaNet's for a DETR teacher), not a detector lacking some parts
    assert "has nothing of" not in str(e.value)
    assert (
        f"None of model.teacher's weights is in the file, whose {len(r18)} weights are all of "
        "parts "
        "model.teacher does not have (['bn1', 'conv1', 'fc', 'layer1.0', 'layer1.1', 'layer2.0', "
        "'layer2.1', 'layer3.0'] ...): it is the checkpoint of another architecture. Set "
        "model.teacher to the architecture the file was trained as"
    ) in str(e.value), str(e.value)
    state = {f"retina.{k}": v for k, v in state.items()}
    torch.save({"model": state}, tmp_path / "renamed.pth")
    with pytest.raises(TeacherCheckpointError) as e:
        load_teacher(instantiate(tiny_retinanet_cfg()), str(tmp_path / "renamed.pth"))
    assert f"whose {len(state)} weights are all of parts model.teacher does not have " in str(
        e.value
    )
    assert "(['retina.backbone', 'retina.head']): " in str(e.value), str(e.value)


def test_a_caffe2_teacher_pkl_with_a_bias_the_teachers_conv_lacks_is_an_error(tmp_path):
    # the heuristics' unmatched key keeps the file's name (stem.conv1.bias, from conv1_b): it is
    # placed by the module its leading names end with (backbone.bottom_up.stem.conv1, a conv
    # without bias), as the full-named key is
    source = _tiny_rcnn()
    _write_caffe2_pkl(source, tmp_path / "r10.pkl")
    with open(tmp_path / "r10.pkl", "rb") as f:
        data = pickle.load(f)
    assert source.backbone.bottom_up.stem.conv1.bias is None
    data["blobs"]["conv1_b"] = np.zeros(16, dtype=np.float32)
    with open(tmp_path / "bias.pkl", "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(TeacherCheckpointError) as e:
        load_teacher(_tiny_rcnn(), str(tmp_path / "bias.pkl"))
    assert "has 1 weights that model.teacher has no place for: ['stem.conv1.bias']" in str(e.value)


def test_an_unloadable_local_checkpoint_hint_for_file_urls_and_folders(tmp_path):
    # a file:// path is a local file (not "could not be downloaded"); a folder's hint gives the
    # last of its checkpoints (.pth or .pkl, sorted) as the example and lists them
    from detkd.checkpoint import CheckpointMismatchError

    student = instantiate(tiny_retinanet_cfg())
    with pytest.raises(CheckpointMismatchError) as e:
        load_student(student, f"file://{tmp_path / 'R-18.pkl'}")
    assert "check that the file exists" in str(e.value) and "downloaded" not in str(e.value)
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model_0000009.pth", "model_final.pkl", "log.txt"):
        (run / name).write_bytes(b"")
    with pytest.raises(TeacherCheckpointError) as e:
        load_teacher(instantiate(tiny_retinanet_cfg()), str(run))
    assert (
        f"set train.teacher_checkpoint to the file in it (e.g. {run / 'model_final.pkl'}; "
        "the folder holds model_0000009.pth, model_final.pkl)"
    ) in str(e.value)


def test_an_init_checkpoint_that_fits_only_a_linear_layer_still_loads(tmp_path):
    # detectron2's partial init: a file of which one linear weight fits (the box head's fc1 of a
    # Faster R-CNN) initialises it; only a file of which no convolution or linear weight fits is
    # refused
    from conftest import tiny_faster_rcnn_cfg

    student = instantiate(tiny_faster_rcnn_cfg())
    fc1 = student.state_dict()["roi_heads.box_head.fc1.weight"].clone()
    assert fc1.dim() == 2
    torch.save({"model": {"roi_heads.box_head.fc1.weight": fc1 + 1}}, tmp_path / "fc1.pth")
    load_student(student, str(tmp_path / "fc1.pth"))
    assert torch.equal(student.roi_heads.box_head.fc1.weight, fc1 + 1)


def test_strict_student_load_accepts_parts_and_top_level_buffers_the_student_lacks(tmp_path):
    # --eval-only with a file that has a part the student has not (the mask head of a Mask
    # R-CNN file) or an old top-level pixel_mean: the student's weights are all there and
    # nothing in the file belongs inside them; loaded (stock detectron2 does too)
    kd = _kd()
    for p in kd.student.parameters():
        p.data.normal_()
    state = dict(kd.student.state_dict())
    state["roi_heads.mask_head.mask_fcn1.weight"] = torch.zeros(4, 4, 3, 3)
    state["pixel_mean"] = torch.zeros(3, 1, 1)
    torch.save({"model": state}, tmp_path / "extra.pth")
    student = instantiate(tiny_retinanet_cfg())
    load_student(student, str(tmp_path / "extra.pth"), strict=True)
    assert _same_weights(student, kd.student)


def test_teacher_errors_add_the_run_note_and_only_the_hints_that_apply(tmp_path):
    # a deeper architecture's file without deformable convs: no deformable-conv advice; a run
    # checkpoint whose student is deeper or shallower than model.teacher: the error says that
    # the run's student was loaded; a part the teacher lacks is ignored with a warning naming it
    import logging

    deeper = tiny_retinanet_cfg(width=32, fpn=128)
    deeper.backbone.bottom_up.stages.depth = 34
    torch.save({"model": instantiate(deeper).state_dict()}, tmp_path / "deep.pth")
    with pytest.raises(TeacherCheckpointError) as e:
        load_teacher(_kd().teacher, str(tmp_path / "deep.pth"))
    assert "larger architecture" in str(e.value) and "deformable" not in str(e.value)
    note = "The file is a distillation run's checkpoint: its student ('student.*' weights) was "
    shallow = tiny_retinanet_cfg()
    shallow.backbone.bottom_up.stages.depth = 10
    for cfg, error in ((tiny_retinanet_cfg(), "no place for"), (shallow, "unloaded")):
        state = {"student." + k: v for k, v in instantiate(cfg).state_dict().items()}
        torch.save({"model": state, "iteration": 9}, tmp_path / "run.pth")
        other = tiny_retinanet_cfg() if cfg is shallow else shallow  # R18 for R10, R10 for R18
        with pytest.raises(TeacherCheckpointError) as e:
            load_teacher(instantiate(other), str(tmp_path / "run.pth"))
        assert error in str(e.value) and note in str(e.value), str(e.value)

    source = instantiate(tiny_retinanet_cfg())
    state = dict(source.state_dict(), **{"roi_heads.mask_head.mask_fcn1.weight": torch.zeros(1)})
    torch.save({"model": state}, tmp_path / "mask.pth")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("detkd.checkpoint").addHandler(handler)
    try:
        load_teacher(instantiate(tiny_retinanet_cfg()), str(tmp_path / "mask.pth"))
    finally:
        logging.getLogger("detkd.checkpoint").removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].endswith(
        "has weights of parts model.teacher does not have (ignored): "
        "['roi_heads.mask_head.mask_fcn1.weight']"
    ), warnings


def test_a_teacher_file_with_teacher_keys_but_no_student_is_not_ambiguous(tmp_path):
    # only a file with both 'student.*' and 'teacher.*' weights is ambiguous; a detector's own
    # file with extra 'teacher.*' tensors loads (those are parts model.teacher does not have)
    source = instantiate(tiny_retinanet_cfg())
    extra = {"teacher.head.cls_score.bias": torch.zeros(27)}
    torch.save({"model": {**source.state_dict(), **extra}}, tmp_path / "t.pth")
    teacher = instantiate(tiny_retinanet_cfg())
    load_teacher(teacher, str(tmp_path / "t.pth"))
    assert _same_weights(teacher, source)


def test_export_refusals_name_what_the_file_is(tmp_path):
    # a folder that does not exist yet, given with a trailing slash, is a folder too; a run's
    # model alone is named as such, also under DetKD's own "__author__"; at most 6 other keys
    kd = _kd()
    DetectionCheckpointer(kd, str(tmp_path)).save("run")
    run = str(tmp_path / "run.pth")
    with pytest.raises(ValueError, match=r"'.*new/' is a folder; give the file name in it"):
        export_student(run, str(tmp_path / "new") + "/")
    assert not (tmp_path / "new").exists()
    DetectionCheckpointer(kd, str(tmp_path)).save("model_only")
    with pytest.raises(ValueError, match=r"other weights \(a DetKD run's model\)"):
        export_student(run, str(tmp_path / "model_only.pth"))
    data = torch.load(run, weights_only=False)
    torch.save({**data, "__author__": "DetKD"}, tmp_path / "claimed.pth")
    with pytest.raises(ValueError, match=r"other weights \(a DetKD run's model\)"):
        export_student(run, str(tmp_path / "claimed.pth"))
    torch.save({**data, **{f"k{i}": i for i in range(7)}}, tmp_path / "many.pth")
    with pytest.raises(ValueError, match=r"\(keys \['k0', 'k1', 'k2', 'k3', 'k4', 'k5'\] \.\.\.\)"):
        export_student(run, str(tmp_path / "many.pth"))


def test_export_student_of_a_loaded_state_dict_without_model_key(tmp_path):
    # export_student takes the run checkpoint's loaded dict or its state dict itself
    kd = _kd()
    state = export_student(kd.state_dict(), str(tmp_path / "s.pth"))
    assert state.keys() == kd.student.state_dict().keys()
    saved = torch.load(tmp_path / "s.pth", weights_only=False)["model"]
    assert all(torch.equal(saved[k], v) for k, v in kd.student.state_dict().items())


def test_export_backbone_without_the_prefix_names_the_prefixes_the_file_has(tmp_path):
    source = instantiate(tiny_retinanet_cfg())
    with pytest.raises(ValueError) as e:
        export_backbone({"model": source.state_dict()}, str(tmp_path / "b.pkl"), prefix="body.")
    assert (
        "no weights under 'body.' in the checkpoint (it has ['backbone.bottom_up.', "
        "'backbone.fpn_lateral3.', 'backbone.fpn_lateral4.', 'backbone.fpn_lateral5.', "
        "'backbone.fpn_output3.', 'backbone.fpn_output4.', 'backbone.fpn_output5.', "
        "'backbone.top_block.'])"
    ) in str(e.value)
    assert not (tmp_path / "b.pkl").exists()


def test_a_pickled_state_dict_that_turns_name_matching_off_is_loaded_by_its_names(tmp_path):
    # {"model": ..., "matching_heuristics": False} in a .pkl without "__author__": exact names,
    # as the file asks; a backbone's own names then fit nothing of the detector
    from detkd.checkpoint import CheckpointMismatchError

    source = instantiate(tiny_retinanet_cfg())
    bottom_up = {k: v.numpy() for k, v in source.backbone.bottom_up.state_dict().items()}
    full = {k: v.numpy() for k, v in source.state_dict().items()}
    for data, fits in ((bottom_up, False), (full, True)):
        with open(tmp_path / "f.pkl", "wb") as f:
            pickle.dump({"model": data, "matching_heuristics": False}, f)
        student = instantiate(tiny_retinanet_cfg())
        if fits:
            load_student(student, str(tmp_path / "f.pkl"), strict=True)
            assert _same_weights(student, source)
        else:
            with pytest.raises(CheckpointMismatchError, match="holds none of the student's"):
                load_student(student, str(tmp_path / "f.pkl"))


def test_an_export_to_a_handler_whose_rename_refuses_to_overwrite(tmp_path):
    """A PathManager handler whose mv refuses an existing destination (returns False, as
    iopath's local handler does): an older export is removed first, so it is replaced; a mv
    that fails anyway is an error, not a silently missing file."""
    from detectron2.utils.file_io import PathManager

    store = tmp_path / "store"
    store.mkdir()

    class NoOverwrite(_store_handler(store, "detkd-test-nooverwrite://")):
        broken = False

        def _isdir(self, path, **kwargs):
            return os.path.isdir(self._local(path))

        def _mv(self, src_path, dst_path, **kwargs):
            if self.broken or os.path.exists(self._local(dst_path)):
                return False
            os.rename(self._local(src_path), self._local(dst_path))
            return True

    handler = NoOverwrite()
    PathManager.register_handler(handler, allow_override=True)
    model = torch.nn.Linear(2, 3)
    out = NoOverwrite.PREFIX + "s.pth"
    for value in (1.0, 2.0):
        with torch.no_grad():
            model.weight.fill_(value)
        save_student(model, out)
        saved = torch.load(store / "s.pth", weights_only=False)["model"]
        assert torch.equal(saved["weight"], torch.full((3, 2), value))
    handler.broken = True
    with pytest.raises(OSError, match=r"could not move the written checkpoint .*s\.pth\.tmp"):
        save_student(model, out)


def test_a_run_checkpoint_that_cannot_replace_a_folder_leaves_no_temporary_file(tmp_path):
    # a folder under the checkpoint's name: the rename fails, and the full-size temporary file
    # written beside it is removed
    from detkd.engine import _RunCheckpointer

    (tmp_path / "model_final.pth").mkdir()
    ckpt = _RunCheckpointer(torch.nn.Linear(2, 3), str(tmp_path))
    with pytest.raises(OSError):
        ckpt.save("model_final", iteration=0)
    assert os.listdir(tmp_path) == ["model_final.pth"]


def test_a_wider_teachers_init_checkpoint_error_gives_weights_as_its_shape_examples(tmp_path):
    # the examples of "none of its convolution or linear weights" are weights (not the biases of
    # the same layers, which the message does not speak of): the first two
    from detkd.checkpoint import CheckpointMismatchError

    teacher = instantiate(tiny_retinanet_cfg(width=32, fpn=128))
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        load_student(instantiate(tiny_retinanet_cfg()), str(tmp_path / "teacher.pth"))
    assert (
        "(e.g. backbone.fpn_lateral3.weight: file (128, 64, 1, 1) vs student (64, 32, 1, 1); "
        "backbone.fpn_output3.weight: file (128, 128, 3, 3) vs student (64, 64, 3, 3))."
    ) in str(e.value), str(e.value)


def test_run_checkpointer_turns_an_unreadable_file_into_its_error_only_while_strict(tmp_path):
    # only --resume (strict) gets the run's own error (which names the file and the fix); a
    # plain load of a damaged file raises torch's error itself
    from detkd.engine import _RunCheckpointer, _UnreadableCheckpoint

    damaged = tmp_path / "model_0000000.pth"
    damaged.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception) as raw:
        _RunCheckpointer(torch.nn.Linear(2, 2), str(tmp_path)).load(str(damaged))
    assert not isinstance(raw.value, _UnreadableCheckpoint)
    ckpt = _RunCheckpointer(torch.nn.Linear(2, 2), str(tmp_path))  # a failed load leaves state
    ckpt.strict = True
    with pytest.raises(_UnreadableCheckpoint) as e:
        ckpt.load(str(damaged))
    assert str(e.value) == f"{type(raw.value).__name__}: {raw.value}"
    assert e.value.__cause__ is not None and type(e.value.__cause__) is type(raw.value)


def test_a_diverged_first_checkpoint_names_ten_weights_and_the_advice_without_a_last_one(
    tmp_path,
):
    # no checkpoint yet: the advice is a new run; the message names the first 10 bad weights,
    # with "..." only past 10
    from detkd.engine import _RunCheckpointer

    model = torch.nn.Sequential(*[torch.nn.Linear(1, 1, bias=False) for _ in range(11)])
    with torch.no_grad():
        for m in model[:10]:
            m.weight.fill_(float("nan"))
    names = [f"{i}.weight" for i in range(11)]
    ckpt = _RunCheckpointer(model, str(tmp_path))
    with pytest.raises(FloatingPointError) as e:
        ckpt.save("model_0000000")
    assert str(e.value) == (
        f"Checkpoint 'model_0000000' not written: the training diverged, 10 weights are NaN or "
        f"inf ({names[:10]}). No earlier checkpoint was written: start the run again, with a "
        "lower optimizer.lr or train.clip_grad.enabled=True."
    )
    with torch.no_grad():
        model[10].weight.fill_(float("inf"))
    ckpt.clip_max_norm = 0.5
    with pytest.raises(FloatingPointError) as e:
        ckpt.save("model_0000000")
    assert str(e.value).endswith(
        f"11 weights are NaN or inf ({names[:10]} ...). No earlier checkpoint was written: "
        "start the run again, with a lower optimizer.lr or a lower train.clip_grad.max_norm "
        "(now 0.5)."
    )
    assert list(tmp_path.iterdir()) == []
