"""detkd.viz: the values its pictures show, against independent computations on tiny random models."""
import numpy as np
import torch

import detkd.viz as viz
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
    )
    cfg = LazyConfig.load(str(cfg_path))
    torch.manual_seed(0)
    nets = {"t": instantiate(cfg.model.teacher), "s0": instantiate(cfg.model.student),
            "s1": instantiate(cfg.model.student)}
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
    viz.main(["pkd", "--config", str(cfg_path), "--teacher", str(tmp_path / "t.pth"),
              "--before", str(tmp_path / "s0.pth"), "--after", str(tmp_path / "s1.pth"),
              "--out", str(tmp_path / "pkd.png")])
    t = nets["t"].eval()
    x = (inputs[0]["image"].flip(0).float() - t.pixel_mean) / t.pixel_std  # RGB -> the teacher's BGR
    with torch.no_grad():
        feats = t.backbone(x[None])
    for lvl in got["levels"]:
        assert torch.allclose(got["rows"]["teacher"][lvl], feats[lvl][0], atol=1e-5), lvl
        for name in ("student alone", "student + KD"):
            a = got["rows"][name][lvl].amax(0).numpy().ravel()
            b = got["rows"]["teacher"][lvl].amax(0).numpy().ravel()
            assert abs(got["corr"][name][lvl] - np.corrcoef(a, b)[0, 1]) < 1e-5
