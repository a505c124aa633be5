"""The embedded demo driver end to end (2 iterations per run): table, reuse, DETR family."""
import os
import subprocess
import sys

from conftest import REPO


def test_demo_runs_pkd_and_d3etr_and_reuses_finished_runs(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "detkd.demo", "--methods", "pkd", "d3etr", "--iters", "2", "--output", str(out),
           "--", "dataloader.train.dataset.names.num_images=16", "dataloader.test.dataset.names.num_images=8",
           "dataloader.train.num_workers=0", "dataloader.test.num_workers=0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = (out / "results.txt").read_text()
    for row in ("teacher (retinanet)", "student alone (retinanet)", "student + pkd",
                "teacher (detr)", "student alone (detr)", "student + d3etr"):
        assert row in table, table
    assert (out / "pkd_fpn.png").is_file()
    assert (out / "d3etr_detr" / "model_final_student.pth").is_file()
    # The GID and D3ETR pictures from these runs' checkpoints.
    from detkd.viz import main as viz

    viz(["gid", "--config", os.path.join(REPO, "configs/demo/gid_retinanet.py"),
         "--teacher", str(out / "teacher_retinanet/model_final.pth"),
         "--student", str(out / "student_retinanet/model_final.pth"), "--out", str(tmp_path / "gid.png")])
    viz(["d3etr", "--config", os.path.join(REPO, "configs/demo/d3etr_detr.py"),
         "--teacher", str(out / "teacher_detr/model_final.pth"),
         "--student", str(out / "d3etr_detr/model_final_student.pth"), "--out", str(tmp_path / "d3.png")])
    assert (tmp_path / "gid.png").stat().st_size > 1000 and (tmp_path / "d3.png").stat().st_size > 1000
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert again.stdout.count("[demo] reusing") == 6


def test_repro_finds_baseline_twins():
    from detkd.repro import baseline_of

    assert baseline_of("configs/PKD/retinanet_R50_from_retinanet_R101_2x.py") == "configs/PKD/baseline_retinanet_R50_2x.py"
    assert baseline_of("configs/PKD/fcos_R50_from_retinanet_R101_1x.py") == "configs/PKD/baseline_fcos_R50_1x.py"
    assert baseline_of("configs/ReviewKD/faster_rcnn_R18_from_faster_rcnn_R101.py") == "configs/ReviewKD/baseline_faster_rcnn_R18.py"
    assert baseline_of("configs/GID/faster_rcnn_R50_from_faster_rcnn_R101_2x.py") == "configs/GID/baseline_faster_rcnn_R50_2x.py"
    assert baseline_of("configs/demo/gid_retinanet.py") == "configs/demo/student_retinanet.py"
    assert baseline_of("configs/demo/d3etr_detr.py") == "configs/demo/student_detr.py"
    assert baseline_of("configs/D3ETR/r50_from_r101_12ep.py") == "configs/D3ETR/baseline_r50_12ep.py"
