"""The embedded demo driver end to end (2 iterations per run): table, reuse, DETR family."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, load_config


def _demo_in_process(cmd, capsys):
    """``python -m detkd.demo ...`` (``cmd``) called in this process (the runs it trains are still
    train_net.py processes): what it prints. Saves the interpreter start and imports of a process.
    """
    from detkd.demo import main

    assert cmd[1:3] == ["-m", "detkd.demo"]
    capsys.readouterr()
    main(cmd[3:])
    return capsys.readouterr().out


def test_demo_runs_pkd_and_d3etr_and_reuses_finished_runs(tmp_path, capsys):
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "detkd.demo",
        "--methods",
        "pkd",
        "d3etr",
        "--iters",
        "2",
        "--output",
        str(out),
        "--",
        "dataloader.train.dataset.names.num_images=16",
        "dataloader.test.dataset.names.num_images=8",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = (out / "results.txt").read_text()
    for row in (
        "teacher (retinanet)",
        "student alone (retinanet)",
        "student + pkd",
        "teacher (detr)",
        "student alone (detr)",
        "student + d3etr",
    ):
        assert row in table, table
    assert (out / "pkd_fpn.png").is_file()
    assert (out / "d3etr_detr" / "model_final_student.pth").is_file()
    # The GID and D3ETR pictures from these runs' checkpoints.
    from detkd.viz import main as viz

    viz(
        [
            "gid",
            "--config",
            os.path.join(REPO, "configs/demo/gid_retinanet.py"),
            "--teacher",
            str(out / "teacher_retinanet/model_final.pth"),
            "--student",
            str(out / "student_retinanet/model_final.pth"),
            "--out",
            str(tmp_path / "gid.png"),
        ]
    )
    viz(
        [
            "d3etr",
            "--config",
            os.path.join(REPO, "configs/demo/d3etr_detr.py"),
            "--teacher",
            str(out / "teacher_detr/model_final.pth"),
            "--student",
            str(out / "d3etr_detr/model_final_student.pth"),
            "--out",
            str(tmp_path / "d3.png"),
        ]
    )
    assert (tmp_path / "gid.png").stat().st_size > 1000 and (
        tmp_path / "d3.png"
    ).stat().st_size > 1000
    # the first call above is the command line itself; the others call its main() in this process
    assert _demo_in_process(cmd, capsys).count("[demo] reusing") == 6
    # A second seed: the seed-0 runs and the teacher are reused, the student runs repeat.
    assert cmd[4:7] == ["pkd", "d3etr", "--iters"]
    # and every run evaluated on a held-out split too (a second table)
    seeds = cmd[:4] + ["pkd", "--seeds", "0", "1", "--heldout", "6"] + cmd[6:]
    assert _demo_in_process(seeds, capsys).count("[demo] reusing") == 3
    with open(out / "student_retinanet_seed1" / "config.yaml") as f:
        assert "seed: 1" in f.read()
    assert (out / "pkd_retinanet_seed1" / "model_final_student.pth").is_file()
    table, held = (out / "results.txt").read_text().split("held-out split (6 images, seed 7):")
    assert "0,1" in table.split("student + pkd")[1].splitlines()[0]
    assert "0,1" in held.split("student + pkd")[1].splitlines()[0]
    with open(out / "pkd_retinanet_seed1" / "config.yaml") as f:
        assert "seed: 1" in f.read()
    runs = [
        "teacher_retinanet",
        "student_retinanet",
        "student_retinanet_seed1",
        "pkd_retinanet",
        "pkd_retinanet_seed1",
    ]
    ap = {}
    for run in runs:
        with open(
            out / run / "heldout_6" / "config.yaml"
        ) as f:  # the held-out split, not the val split
            assert "split: heldout" in f.read()
        with open(out / run / "heldout_6" / "eval_results.json") as f:
            ap[run] = json.load(f)["bbox"]["AP"]
    # the held-out rows are those results (2-iteration models may detect nothing: AP nan)
    student = held.split("student alone (retinanet)")[1].split()
    assert student[0] == f"{(ap['student_retinanet'] + ap['student_retinanet_seed1']) / 2:.2f}"
    pkd = held.split("student + pkd")[1].split()
    assert pkd[0] == f"{(ap['pkd_retinanet'] + ap['pkd_retinanet_seed1']) / 2:.2f}"
    with open(out / "pkd_retinanet_seed1" / "heldout_6" / "config.yaml") as f:
        text = f.read()
    assert "num_images: 6" in text and "seed: 7" in text
    assert "held-out evaluation" not in _demo_in_process(seeds, capsys)  # cached
    # seeds without 0: the PKD picture comes from the first seed's runs (all reused here)
    os.remove(out / "pkd_fpn.png")
    only1 = cmd[:4] + ["pkd", "--seeds", "1"] + cmd[6:]
    assert (
        _demo_in_process(only1, capsys).count("[demo] reusing") == 3
        and (out / "pkd_fpn.png").is_file()
    )


def test_demo_reuses_a_finished_run_only_if_trained_with_the_same_arguments(tmp_path, monkeypatch):
    # `make demo ITERS=20` then `make demo`: the 20-iteration runs must not fill the table
    from detkd import demo

    config = os.path.join(REPO, "configs/demo/student_retinanet.py")
    out = tmp_path / "student_retinanet"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"")
    (out / "metrics.json").write_text(json.dumps({"bbox/AP": 1.0, "iteration": 20}) + "\n")
    (out / "model_0000019.pth").write_bytes(b"")
    (out / "last_checkpoint").write_text("model_final.pth")
    (out / "model_teacher.pth").write_bytes(b"a file of one's own")
    trained, seen = [], []

    def fake_train_net(cmd, **kwargs):  # a finished run of these arguments
        trained.append(cmd[1:])
        seen.append(sorted(p.name for p in out.iterdir()))
        (out / "metrics.json").write_text(json.dumps({"bbox/AP": 2.0, "iteration": 40}) + "\n")
        (out / "model_final.pth").write_bytes(b"")

    monkeypatch.setattr(demo.subprocess, "run", fake_train_net)
    logs = []
    res, _ = demo._train(config, str(out), ["train.max_iter=40"], False, logs.append)
    assert len(trained) == 1 and "train.max_iter=40" in trained[0] and res["AP"] == 2.0
    # the retrained run starts without the earlier run's files (train_net.py refuses to start
    # over another model's checkpoints, e.g. after model.distillers.pkd.num_levels=2); a file of
    # one's own stays
    assert seen[0] == ["model_teacher.pth"]
    assert any("retraining" in line for line in logs)
    res, _ = demo._train(config, str(out), ["train.max_iter=40"], False, logs.append)
    assert len(trained) == 1 and res["AP"] == 2.0 and "[demo] reusing" in logs[-1]
    demo._train(config, str(out), [], False, logs.append)  # the full schedule: trained again
    assert len(trained) == 2 and "train.max_iter=40" not in trained[1]


def test_demo_retrains_a_distilled_run_whose_teacher_was_trained_again(tmp_path, monkeypatch):
    from detkd import demo

    config = os.path.join(REPO, "configs/demo/pkd_retinanet.py")
    teacher, out = tmp_path / "teacher.pth", tmp_path / "pkd_retinanet"
    teacher.write_bytes(b"")
    out.mkdir()
    trained = []

    def fake_train_net(cmd, **kwargs):  # a finished run, written after its teacher
        trained.append(cmd[1:])
        (out / "model_final.pth").write_bytes(b"")
        (out / "metrics.json").write_text(json.dumps({"bbox/AP": 1.0, "iteration": 40}) + "\n")
        os.utime(teacher, (1e9, 1e9))

    monkeypatch.setattr(demo.subprocess, "run", fake_train_net)
    opts, logs = [f"train.teacher_checkpoint={teacher}"], []
    demo._train(config, str(out), opts, False, logs.append)
    demo._train(config, str(out), opts, False, logs.append)
    assert len(trained) == 1 and "[demo] reusing" in logs[-1]
    os.utime(teacher, (2e9, 2e9))  # the teacher trained again: newer than the student's weights
    demo._train(config, str(out), opts, False, logs.append)
    assert len(trained) == 2 and any(
        "its teacher or pretrained backbone was trained again" in line for line in logs
    )
    # so does a pretrained backbone (train.init_checkpoint) written again since (the DETR runs')
    backbone = tmp_path / "student_retinanet.pkl"
    backbone.write_bytes(b"")
    opts.append(f"train.init_checkpoint={backbone}")
    os.utime(teacher, (1e9, 1e9))
    demo._train(config, str(out), opts, False, logs.append)  # other arguments: trained
    os.utime(backbone, (1e9, 1e9))
    demo._train(config, str(out), opts, False, logs.append)
    assert len(trained) == 3 and "[demo] reusing" in logs[-1]
    os.utime(backbone, (2e9, 2e9))
    demo._train(config, str(out), opts, False, logs.append)
    assert len(trained) == 4 and "pretrained backbone was trained again" in logs[-2]


def test_demo_never_reuses_the_weights_of_a_retraining_that_failed(tmp_path, monkeypatch):
    # a 40-iteration run, then one of 20 that writes its model_final.pth and fails in its final
    # evaluation: a third call with the first run's arguments must retrain, not reuse the
    # 20-iteration weights under the 40-iteration run's command and metrics
    from detkd import demo

    config = os.path.join(REPO, "configs/demo/student_retinanet.py")
    out = tmp_path / "student_retinanet"
    out.mkdir()
    calls = []

    def fake_train_net(cmd, **kwargs):
        calls.append(cmd[1:])
        (out / "model_final.pth").write_bytes(cmd[-1].encode())
        if "train.max_iter=20" in cmd:  # fails in its final evaluation: no metrics
            raise subprocess.CalledProcessError(1, cmd)
        with open(out / "metrics.json", "a") as f:  # detectron2's JSONWriter appends
            f.write(json.dumps({"time": 0.1 * len(calls), "iteration": 19}) + "\n")
            f.write(json.dumps({"bbox/AP": 40.0 + len(calls), "iteration": 39}) + "\n")

    monkeypatch.setattr(demo.subprocess, "run", fake_train_net)
    logs = []
    demo._train(config, str(out), ["train.max_iter=40"], False, logs.append)
    with pytest.raises(SystemExit, match="the run failed"):
        demo._train(config, str(out), ["train.max_iter=20"], False, logs.append)
    assert (out / "model_final.pth").read_bytes() == b"train.max_iter=20"
    res, _ = demo._train(config, str(out), ["train.max_iter=40"], False, logs.append)
    assert len(calls) == 3 and "train.max_iter=40" in calls[2] and "[demo] reusing" not in logs[-1]
    assert (out / "model_final.pth").read_bytes() == b"train.max_iter=40" and res["AP"] == 43.0
    # the replaced runs' lines are gone: the s/iter column is the third run's alone
    assert len((out / "metrics.json").read_text().splitlines()) == 2
    assert demo._seconds_per_iter(str(out)) == pytest.approx(0.3)


def test_demo_summary_over_seeds_pairs_the_deltas():
    from detkd.demo import summarize

    def res(ap):
        return {"AP": ap, "AP50": ap + 10, "AP75": ap - 10}

    runs = [
        ("teacher", 0, res(50.0), "t", None),
        ("student alone", 0, res(40.0), "s0", None),
        ("student + kd", 0, res(43.0), "k0", "student alone"),
        ("student alone", 1, res(44.0), "s1", None),
        ("student + kd", 1, res(45.0), "k1", "student alone"),
        ("student alone", 2, res(42.0), "s2", None),
        ("student + kd", 2, res(47.0), "k2", "student alone"),
    ]
    rows = {r["name"]: r for r in summarize(runs)}
    assert list(rows) == ["teacher", "student alone", "student + kd"]
    assert rows["teacher"]["sd"] == 0.0 and rows["teacher"]["delta"] is None
    s, k = rows["student alone"], rows["student + kd"]
    assert s["mean"]["AP"] == 42.0 and s["sd"] == 2.0 and s["seeds"] == [0, 1, 2]
    assert k["mean"]["AP"] == 45.0 and k["mean"]["AP50"] == 55.0 and k["sd"] == 2.0
    # paired deltas 3, 1, 5: mean 3, sample sd 2 (the unpaired spread would be larger)
    assert k["delta"] == 3.0 and k["delta_sd"] == 2.0 and k["dirs"] == ["k0", "k1", "k2"]


def test_repro_finds_baseline_twins():
    from detkd.repro import baseline_of

    assert (
        baseline_of("configs/PKD/retinanet_R50_from_retinanet_R101_2x.py")
        == "configs/PKD/baseline_retinanet_R50_2x.py"
    )
    assert (
        baseline_of("configs/PKD/fcos_R50_from_retinanet_R101_1x.py")
        == "configs/PKD/baseline_fcos_R50_1x.py"
    )
    assert (
        baseline_of("configs/ReviewKD/faster_rcnn_R18_from_faster_rcnn_R101.py")
        == "configs/ReviewKD/baseline_faster_rcnn_R18.py"
    )
    assert (
        baseline_of("configs/GID/faster_rcnn_R50_from_faster_rcnn_R101_2x.py")
        == "configs/GID/baseline_faster_rcnn_R50_2x.py"
    )
    assert baseline_of("configs/demo/gid_retinanet.py") == "configs/demo/student_retinanet.py"
    assert baseline_of("configs/demo/d3etr_detr.py") == "configs/demo/student_detr.py"
    assert (
        baseline_of("configs/D3ETR/r50_from_r101_12ep.py") == "configs/D3ETR/baseline_r50_12ep.py"
    )


@pytest.mark.parametrize("where", ["repo-relative", "cwd-relative"])
def test_repro_passes_options_after_the_config_and_absolute_configs(tmp_path, monkeypatch, where):
    # `python -m detkd.repro CONFIG --num-gpus 8 key=value` (the README's form): the option is
    # parsed wherever it stands, only key=value items reach train_net.py as overrides, and the
    # configs reach the run (started in the repository root) as absolute paths
    from detkd import repro

    monkeypatch.chdir(tmp_path)
    config = "configs/PKD/retinanet_R50_from_retinanet_R101_2x.py"
    if where == "cwd-relative":
        config = os.path.relpath(os.path.join(REPO, config), tmp_path)
    calls = []

    class Stop(Exception):
        pass

    def fake_run(cmd, check, cwd, env):
        calls.append((cmd, cwd))
        raise Stop

    monkeypatch.setattr(subprocess, "run", fake_run)
    (tmp_path / "teacher.pth").write_bytes(b"")
    with pytest.raises(Stop):
        repro.main(
            [
                config,
                "--num-gpus",
                "8",
                "train.max_iter=5",
                "--output",
                str(tmp_path / "o"),
                "train.teacher_checkpoint=teacher.pth",
            ]
        )
    ((cmd, cwd),) = calls
    args = cmd[2:]
    assert cwd == REPO
    assert args[:4] == [
        "--config-file",
        os.path.join(REPO, "configs/PKD/baseline_retinanet_R50_2x.py"),
        "--num-gpus",
        "8",
    ]
    assert args[4] == "train.output_dir=" + str(
        tmp_path / "o" / "PKD" / "retinanet_R50_from_retinanet_R101_2x" / "baseline"
    )
    # the teacher is the distilled run's: the baseline's config.yaml does not name it
    assert args[5:] == ["train.teacher_checkpoint=", "train.max_iter=5"]


def test_overrides_reach_only_the_configs_that_have_their_parent_key():
    # `python -m detkd.demo --methods pkd -- model.distillers.pkd.loss_weight=10` (the README's
    # papers'-weights rows): the teacher and student-alone runs must not get the key
    from detkd.demo import applicable_overrides, check_overrides

    demo = os.path.join(REPO, "configs", "demo")
    opts = [
        "model.distillers.pkd.loss_weight=10",
        "train.max_iter=5",
        "dataloader.train.total_batch_size=2",
    ]
    pkd, student, gid = (os.path.join(demo, f"{n}_retinanet.py") for n in ("pkd", "student", "gid"))
    assert applicable_overrides(pkd, opts) == opts
    assert applicable_overrides(student, opts) == opts[1:]
    assert applicable_overrides(gid, opts) == opts[1:]
    check_overrides([pkd, student], opts)
    with pytest.raises(SystemExit, match=r"model\.distillers\.pkd\.loss_weight=10"):
        check_overrides([gid, student], opts)  # no PKD run: a typo or a method not run
    with pytest.raises(SystemExit, match="modle"):
        check_overrides([pkd], ["modle.distillers.pkd.loss_weight=1"])


def test_repro_errors_name_the_problem(tmp_path, monkeypatch):
    """A missing config is reported as missing (not as a missing twin), a name without a twin
    convention is a clear error (it was an IndexError), and a pair that would not be compared
    with the same seed, schedule and student fails before any training."""
    from detkd import repro

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing may train"))
    out = ["--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"config not found: configs/PKD/nope_from_x_2x\.py"):
        repro.main(["configs/PKD/nope_from_x_2x.py", *out])
    (tmp_path / "mykd.py").write_text("")
    with pytest.raises(
        SystemExit, match=r"mykd\.py: no baseline twin follows from the name; pass --baseline"
    ):
        repro.baseline_of(str(tmp_path / "mykd.py"))
    with pytest.raises(SystemExit, match="teacher_retinanet.py is not a distillation config"):
        # its "twin" student_retinanet.py exists
        repro.main(["configs/demo/teacher_retinanet.py", *out])
    with pytest.raises(
        SystemExit, match="the baseline .*gid_retinanet.py is a distillation config"
    ):
        repro.main(
            ["configs/demo/pkd_retinanet.py", "--baseline", "configs/demo/gid_retinanet.py", *out]
        )
    with pytest.raises(SystemExit, match=r"train.seed is -1: each run would draw its own seed"):
        repro.main(["configs/demo/pkd_retinanet.py", "train.seed=-1", *out])
    with pytest.raises(
        SystemExit, match=r"train\.max_iter \(1000 vs 2000\), model\.student differ"
    ):
        repro.main(
            [
                "configs/demo/pkd_retinanet.py",
                "--baseline",
                "configs/demo/teacher_retinanet.py",
                *out,
            ]
        )
    with pytest.raises(SystemExit, match=r"model\.student, optimizer, train\.clip_grad differ"):
        repro.main(
            ["configs/demo/d3etr_detr.py", "--baseline", "configs/demo/student_retinanet.py", *out]
        )
    # overrides for both runs keep a pair paired; one for the baseline only would not
    repro.check_pair(
        os.path.join(REPO, "configs/demo/pkd_retinanet.py"),
        os.path.join(REPO, "configs/demo/student_retinanet.py"),
        [
            "train.max_iter=5",
            "train.seed=3",
            "train.teacher_checkpoint=",
            "train.teacher_random_init=True",
        ],
    )
    with pytest.raises(SystemExit, match=r"model\.student differ"):
        repro.check_pair(
            os.path.join(REPO, "configs/demo/pkd_retinanet.py"),
            os.path.join(REPO, "configs/demo/student_retinanet.py"),
            ["model.head.prior_prob=0.1"],
        )
    # the pair kept paired for another class count: model.num_classes reached the distilled
    # config too (its parent 'model' exists there), whose train_net.py run refused it only after
    # the baseline had trained; it is the baseline's key (the distilled config lacks it), so it
    # reaches the baseline only. A key that neither config has is refused before anything trains.
    pkd, student = (
        os.path.join(REPO, f"configs/demo/{n}_retinanet.py") for n in ("pkd", "student")
    )
    classes = ["model.student.num_classes=5", "model.num_classes=5"]
    assert repro.pair_overrides(pkd, student, classes) == classes[:1]
    assert repro.pair_overrides(student, pkd, classes) == classes[1:]
    repro.check_pair(
        pkd, student, classes + ["train.teacher_checkpoint=", "train.teacher_random_init=True"]
    )
    refused = (
        r"student_retinanet\.py: Override 'model\.num_clases': 'model' has no key "
        r".*'model\.num_classes'"
    )
    with pytest.raises(SystemExit, match=refused):
        repro.main(
            [
                "configs/demo/pkd_retinanet.py",
                "model.student.num_classes=5",
                "model.num_clases=5",
                *out,
            ]
        )


def test_demo_rejects_a_mistyped_method_before_training(tmp_path, monkeypatch):
    """`--methods pkd gdi`: the unknown method is reported before the teacher, student and PKD
    runs train (it used to be found only when its turn came, after them)."""
    from detkd import demo

    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: pytest.fail("nothing may train"))
    with pytest.raises(
        SystemExit, match=r"no config configs/demo/gdi_\*\.py; available methods: \['d3etr', 'gid'"
    ) as e:
        demo.main(["--methods", "pkd", "gdi", "--output", str(tmp_path / "demo")])
    assert "__init__" not in str(e.value) and "teacher_retinanet" not in str(e.value)


@pytest.mark.parametrize("method", ["pkd+gid", "pkd,gid", "PKDGID"])
def test_demo_names_the_config_of_a_combination_of_methods(tmp_path, monkeypatch, method):
    # the README's combined method is `pkdgid`; `pkd+gid` was answered with the list of every file
    # of configs/demo (`__init__`, teacher_*, student_*), none of them a method
    from detkd import demo

    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: pytest.fail("nothing may train"))
    with pytest.raises(SystemExit, match=r"did you mean --methods pkdgid\?") as e:
        demo.main(["--methods", method, "--output", str(tmp_path / "demo")])
    assert ("a combination of methods is a config of its own" in str(e.value)) == (
        "+" in method or "," in method
    )
    assert "--methods pkd gid" in str(e.value)


def test_demo_rejects_an_override_train_net_would_refuse_before_training(tmp_path, monkeypatch):
    """`-- model.distillers.pkd.loss_wieght=10`: its parent key exists in the PKD config, so it
    passed the demo's check, and train_net.py refused it only at the PKD run, after the teacher
    and the student alone had trained (a CalledProcessError naming a log file)."""
    from detkd import demo

    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: pytest.fail("nothing may train"))
    out = ["--methods", "pkd", "--output", str(tmp_path / "demo"), "--"]
    with pytest.raises(
        SystemExit,
        match=r"\[demo\] pkd_retinanet\.py: Override 'model\.distillers\.pkd\.loss_wieght'"
        r".*Did you mean 'model\.distillers\.pkd\.loss_weight'",
    ):
        demo.main(out + ["model.distillers.pkd.loss_wieght=10"])
    with pytest.raises(
        SystemExit, match=r"\[demo\] .*_retinanet\.py: Override 'train\.max_ite'.*'train\.max_iter'"
    ):
        demo.main(out + ["train.max_ite=5"])


def test_repro_and_demo_pass_paths_relative_to_the_working_directory(tmp_path, monkeypatch):
    # `cd experiments; python -m detkd.repro CONFIG train.teacher_checkpoint=teacher.pth`: the
    # runs start in the repository root, where 'teacher.pth' is another file or none (the
    # distilled run failed with "not found" for a file that is there, after the baseline trained)
    from detkd import demo, repro

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "teacher.pth").write_bytes(b"")
    calls = []

    class Stop(Exception):
        pass

    def fake_run(cmd, check, cwd, env):
        calls.append((cmd, cwd))
        if len(calls) == 2:
            raise Stop

    monkeypatch.setattr(subprocess, "run", fake_run)
    opts = [
        "train.teacher_checkpoint=ckpt/teacher.pth",
        "train.max_iter=5",
        "train.init_checkpoint=",
        "dataloader.train.total_batch_size=2",
    ]
    with pytest.raises(Stop):
        repro.main(
            [
                os.path.join(REPO, "configs/demo/pkd_retinanet.py"),
                *opts,
                "--output",
                str(tmp_path / "o"),
            ]
        )
    (_, cwd), (distilled, _) = calls
    assert cwd == REPO
    teacher = str(tmp_path / "ckpt" / "teacher.pth")
    assert distilled[-4:] == [f"train.teacher_checkpoint={teacher}", *opts[1:]]
    assert os.path.isfile(os.path.join(cwd, distilled[-4].split("=", 1)[1]))

    seen = []

    def fake_train(config, output_dir, opts, force, log):
        seen.append(list(opts))
        raise Stop

    monkeypatch.setattr(demo, "_train", fake_train)
    with pytest.raises(Stop):
        demo.main(
            ["--output", str(tmp_path / "demo"), "--", "train.init_checkpoint=ckpt/teacher.pth"]
        )
    assert seen == [[f"train.init_checkpoint={teacher}"]]
    # values that are literals, absolute, URLs, not files here or bare words (a folder `cuda`
    # here does not make train.device=cuda a path) are kept as they are
    (tmp_path / "5").write_text("")
    (tmp_path / "cuda").mkdir()
    keep = [
        "train.max_iter=5",
        "train.init_checkpoint=/x/y.pth",
        "train.init_checkpoint=detectron2://a.pkl",
        "train.init_checkpoint=nope.pth",
        "train.device=cuda",
        "+foo=ckpt",
        "+foo=./ckpt",
    ]
    assert demo.paths_from_here(keep) == keep[:6] + [f"+foo={tmp_path / 'ckpt'}"]
    monkeypatch.chdir(REPO)  # from the repository root, nothing changes
    assert demo.paths_from_here(["train.init_checkpoint=configs"]) == [
        "train.init_checkpoint=configs"
    ]


def test_repro_checks_the_teacher_checkpoint_before_the_baseline_trains(tmp_path, monkeypatch):
    # the distilled run trains second: a missing teacher failed it only after the baseline's
    # whole schedule (hours on the COCO configs)
    from detkd import repro

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing may train"))
    config, out = os.path.join(REPO, "configs/demo/pkd_retinanet.py"), [
        "--output",
        str(tmp_path / "o"),
    ]
    with pytest.raises(
        SystemExit,
        match=r"the teacher checkpoint .*missing\.pth of pkd_retinanet\.py does not exist",
    ):
        repro.main([config, f"train.teacher_checkpoint={tmp_path / 'missing.pth'}", *out])
    with pytest.raises(
        SystemExit, match=r"teacher checkpoint nope/t\.pth .* \(train_net\.py looks for it under "
    ):
        repro.main([config, "train.teacher_checkpoint=nope/t.pth", *out])
    with pytest.raises(
        SystemExit, match=r"train\.teacher_checkpoint of pkd_retinanet\.py is empty"
    ):
        repro.main([config, "train.teacher_checkpoint=", *out])
    # a file that exists, a URL, or an empty one with a random teacher asked for: the runs start
    calls = []

    def fake_run(cmd, check, cwd, env):
        calls.append(cmd)
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "run", fake_run)
    (tmp_path / "t.pth").write_bytes(b"")
    for opts in (
        ["train.teacher_checkpoint=t.pth"],
        ["train.teacher_checkpoint=detectron2://x/model_final.pkl"],
        ["train.teacher_checkpoint=", "train.teacher_random_init=True"],
    ):
        with pytest.raises(KeyboardInterrupt):
            repro.main([config, *opts, *out])
    assert len(calls) == 3


@pytest.mark.parametrize("method", ["student", "teacher"])
def test_demo_rejects_the_teacher_and_the_student_as_methods(tmp_path, monkeypatch, method):
    # `--methods student` trained configs/demo/student_retinanet.py twice into one folder (the
    # student-alone row's and the "student + student" row's), the second retraining over the
    # first with other arguments; `--methods teacher` retrained the teacher at the students'
    # iterations
    from detkd import demo

    monkeypatch.setattr(demo, "_train", lambda *a, **k: pytest.fail("nothing may train"))
    with pytest.raises(
        SystemExit,
        match=rf"--methods {method}: the teacher and the student alone are in every "
        r"table; methods are distillation configs: \['d3etr', 'gid', 'pkd'",
    ):
        demo.main(["--methods", "pkd", method, "--output", str(tmp_path / "demo")])


def test_paths_from_here_quotes_a_path_that_hydra_would_parse_as_syntax(tmp_path, monkeypatch):
    # `cd "exp (2),a"; python -m detkd.repro CONFIG train.teacher_checkpoint=t.pth`: the absolute
    # path passed on, unquoted, was a hydra parse error ('(') or a sweep (','), a traceback
    # before anything ran; quoted, it reaches the config as that path
    from detectron2.config import LazyConfig

    from detkd import demo, repro

    here = tmp_path / "exp (2),it's [a]"
    here.mkdir()
    (here / "t.pth").write_bytes(b"")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "t.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path / "plain")  # a path hydra reads as it is: unquoted, as before
    assert demo.paths_from_here(["train.teacher_checkpoint=t.pth"]) == [
        f"train.teacher_checkpoint={tmp_path / 'plain' / 't.pth'}"
    ]
    monkeypatch.chdir(here)
    opts = demo.paths_from_here(["train.teacher_checkpoint=t.pth", "train.max_iter=5"])
    assert opts[1] == "train.max_iter=5"
    cfg = LazyConfig.apply_overrides(
        LazyConfig.load(os.path.join(REPO, "configs/demo/pkd_retinanet.py")), opts
    )
    assert cfg.train.teacher_checkpoint == str(here / "t.pth") and cfg.train.max_iter == 5

    calls = []

    def fake_run(cmd, check, cwd, env):
        calls.append(cmd)
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(KeyboardInterrupt):  # the pair checks pass; the baseline starts
        repro.main(
            [
                os.path.join(REPO, "configs/demo/pkd_retinanet.py"),
                "train.teacher_checkpoint=t.pth",
                "--output",
                str(tmp_path / "o"),
            ]
        )
    assert len(calls) == 1


def test_repro_checks_a_yacs_teacher_config_before_the_baseline_trains(tmp_path, monkeypatch):
    # a teacher of detkd.modeling.build_yacs_detector is built only by the distilled run, which
    # trains second: a .yaml it cannot read (a path relative to the folder repro was started
    # in, while train_net.py runs in the repository root; a key of opts) failed it only after
    # the baseline's whole schedule
    from detectron2 import model_zoo

    from detkd import repro

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing may train"))
    (tmp_path / "t.pth").write_bytes(b"")
    (tmp_path / "teacher.yaml").write_text(
        f'_BASE_: "{model_zoo.get_config_file("Base-RetinaNet.yaml")}"\n'
        "MODEL: {RETINANET: {NUM_CLASSES: 3}}\n"
    )
    config = tmp_path / "kd.py"
    config.write_text(
        "import os\n"
        "from detectron2.config import LazyCall as L\nfrom detectron2.config import LazyConfig\n"
        "from detkd.modeling import build_yacs_detector\n"
        f"_c = LazyConfig.load({os.path.join(REPO, 'configs/demo/pkd_retinanet.py')!r})\n"
        "model, dataloader, optimizer, lr_multiplier, train = (\n"
        "    _c.model, _c.dataloader, _c.optimizer, _c.lr_multiplier, _c.train)\n"
        "model.teacher = L(build_yacs_detector)(config_file=os.environ['YACS_TEACHER'], opts=[])\n"
    )
    args = [
        str(config),
        "--baseline",
        "configs/demo/student_retinanet.py",
        "train.teacher_checkpoint=t.pth",
        "--output",
        str(tmp_path / "o"),
    ]
    monkeypatch.setenv("YACS_TEACHER", "teacher.yaml")  # here, not in the repository root
    with pytest.raises(
        SystemExit,
        match=r"model\.teacher\.config_file of kd\.py, teacher\.yaml, is neither a file "
        r"nor a config of detectron2's model zoo \(train_net\.py looks for a "
        r"relative path under ",
    ):
        repro.main(args)
    monkeypatch.setenv("YACS_TEACHER", str(tmp_path / "teacher.yaml"))
    with pytest.raises(
        SystemExit, match=r"model\.teacher of kd\.py: opts of .*teacher\.yaml: .*MODEL\.NO_SUCH_KEY"
    ):
        repro.main(args + ["model.teacher.opts=[MODEL.NO_SUCH_KEY,1]"])
    calls = []

    def fake_run(cmd, check, cwd, env):
        calls.append(cmd)
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "run", fake_run)
    for teacher in (str(tmp_path / "teacher.yaml"), "COCO-Detection/retinanet_R_50_FPN_1x.yaml"):
        monkeypatch.setenv("YACS_TEACHER", teacher)
        with pytest.raises(KeyboardInterrupt):
            repro.main(args)
    assert len(calls) == 2


def test_demo_and_repro_refuse_overrides_of_the_keys_they_set_per_run(tmp_path, monkeypatch):
    """`train.output_dir=X` came after each run's own folder: every run of the table or pair
    trained into X (the distilled run replaced the baseline's checkpoints; the demo failed after
    the teacher's run, repro read metrics where no run wrote). The demo's `train.seed` gave the
    seed-0 rows (and the teacher) another seed, its `train.teacher_checkpoint` was silently
    replaced by the demo's teacher. Each is refused before anything trains, naming the option."""
    import re

    from detkd import demo, repro

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing may train"))
    out = ["--output", str(tmp_path / "o")]
    for opt, fix in (
        ("train.output_dir=x", "pass --output DIR"),
        ("train.seed=5", "pass --seeds"),
        ("train.teacher_checkpoint=t.pth", "the teacher that the demo trains"),
    ):
        with pytest.raises(SystemExit, match=rf"\[demo\] the override {re.escape(opt)} .*{fix}"):
            demo.main(["--methods", "pkd", *out, "--", "train.max_iter=2", opt])
    for opt in ("train.output_dir=x", "++train.output_dir=x", "~train.output_dir"):
        with pytest.raises(
            SystemExit, match=rf"\[repro\] the override {re.escape(opt)} .*pass --output DIR"
        ):
            repro.main(
                ["configs/demo/pkd_retinanet.py", opt, "train.teacher_random_init=True", *out]
            )
    # the keys repro's pairs share stay settable
    with pytest.raises(pytest.fail.Exception, match="nothing may train"):
        repro.main(
            [
                "configs/demo/pkd_retinanet.py",
                "train.seed=3",
                "train.teacher_checkpoint=",
                "train.teacher_random_init=True",
                *out,
            ]
        )


def test_a_failed_run_is_reported_with_its_log_not_a_traceback(tmp_path, monkeypatch):
    """`detkd.demo -- train.device=cuda` on a machine without one: the teacher's run failed and
    the demo ended in a CalledProcessError traceback, the run's error only in a log file that it
    did not name. repro's runs print to the console: their failure names the run."""
    from detkd import demo, repro

    def failing_train_net(cmd, stdout=None, **kwargs):
        if stdout is not None:  # the demo's runs write to their log file
            stdout.write(
                "[11/30 20:00:00 detectron2]: Config ...\nRuntimeError: Found no NVIDIA driver\n"
            )
            stdout.flush()
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(subprocess, "run", failing_train_net)
    config = os.path.join(REPO, "configs/demo/student_retinanet.py")
    log = tmp_path / "student_retinanet.log"
    with pytest.raises(
        SystemExit,
        match=rf"\[demo\] the run failed \(exit status 1\); its log {log} ends "
        r"with:\n    \[11/30.*\n    RuntimeError: Found no NVIDIA driver$",
    ):
        demo._train(
            config,
            str(tmp_path / "student_retinanet"),
            ["train.device=cuda"],
            False,
            lambda s: None,
        )
    run = tmp_path / "run"
    run.mkdir()
    (run / "model_final.pth").write_bytes(b"")
    with pytest.raises(
        SystemExit,
        match=rf"its log {run / 'heldout_4' / 'log.txt'} ends with:"
        r"\n.*\n    RuntimeError: Found no NVIDIA",
    ):
        demo.heldout_metrics(config, str(run), 4, [], lambda s: None)
    with pytest.raises(
        SystemExit,
        match=r"\[repro\] the baseline run \(student_retinanet\.py\) failed \(exit "
        r"status 1\): its error is in its output above",
    ):
        repro.main(
            [
                "configs/demo/pkd_retinanet.py",
                "train.teacher_random_init=True",
                "train.teacher_checkpoint=",
                "--output",
                str(tmp_path / "o"),
            ]
        )


def test_repro_runs_of_configs_of_the_same_name_go_to_different_folders(tmp_path, monkeypatch):
    """configs/PKD and configs/GID both hold retinanet_R50_from_retinanet_R101_2x.py: both
    repro runs went to <--output>/retinanet_R50_from_retinanet_R101_2x/{baseline,distilled}, and
    the second replaced the first's checkpoints (and appended to its metrics.json)."""
    from detkd import repro

    class Stop(Exception):
        pass

    dirs = []

    def fake_run(cmd, check, cwd, env):
        dirs.append(_output_dir(cmd))
        raise Stop

    monkeypatch.setattr(subprocess, "run", fake_run)
    # checked elsewhere; slow on COCO configs
    monkeypatch.setattr(repro, "check_pair", lambda *a: None)
    for method in ("PKD", "GID"):
        with pytest.raises(Stop):
            repro.main(
                [
                    f"configs/{method}/retinanet_R50_from_retinanet_R101_2x.py",
                    "--output",
                    str(tmp_path),
                ]
            )
    assert dirs == [
        str(tmp_path / m / "retinanet_R50_from_retinanet_R101_2x" / "baseline")
        for m in ("PKD", "GID")
    ]


def _output_dir(cmd):
    """The train.output_dir=... value of a train_net.py command line."""
    return next(a for a in cmd if a.startswith("train.output_dir=")).split("=", 1)[1]


def _baseline_on_d2_train(tmp_path, drop=""):
    """A baseline config of one's own: the demo student on a `train` dict without DetKD's
    teacher keys (detectron2's own), less the keys in ``drop``."""
    base = tmp_path / "my_baseline.py"
    base.write_text(
        "from detectron2.config import LazyConfig\n"
        f"c = LazyConfig.load({os.path.join(REPO, 'configs/demo/student_retinanet.py')!r})\n"
        "model, dataloader, optimizer, lr_multiplier = c.model, c.dataloader, c.optimizer, "
        "c.lr_multiplier\n"
        "train = {k: v for k, v in c.train.items() if not k.startswith('teacher_') "
        f"and k not in {drop!r}.split()}}\n"
    )
    return base


def _repro_commands(monkeypatch, argv):
    """The train_net.py arguments of the baseline and the distilled run that repro.main(argv)
    starts (nothing trains)."""
    from detkd import repro

    cmds = []

    class Stop(Exception):
        pass

    def fake_run(cmd, check, cwd, env):
        cmds.append(cmd[2:])
        if len(cmds) == 2:
            raise Stop

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(Stop):
        repro.main(argv)
    return cmds


def test_repro_with_a_baseline_whose_train_dict_has_no_teacher_keys(tmp_path, monkeypatch):
    """A baseline of one's own on detectron2's `train` dict (no DetKD keys): repro gave its run
    `train.teacher_checkpoint=` (refused by train_net.py as a typo: 'train' has no key
    'teacher_checkpoint'), and `train.teacher_checkpoint=T` or `train.teacher_random_init=True`,
    meant for the distilled run, were refused for the baseline before anything trained. They now
    reach the distilled run only; an override of a key neither config has stays an error."""
    from detkd import repro

    base = _baseline_on_d2_train(tmp_path)
    opts = ["train.teacher_random_init=True", "train.teacher_checkpoint=", "train.max_iter=2"]
    baseline, distilled = _repro_commands(
        monkeypatch,
        [
            "configs/demo/pkd_retinanet.py",
            "--baseline",
            str(base),
            *opts,
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert baseline[-1:] == ["train.max_iter=2"] and not any(
        "teacher" in a for a in baseline
    ), baseline
    assert distilled[-4:] == ["train.teacher_eval_at_start=True", *opts], distilled
    with pytest.raises(SystemExit, match=r"my_baseline\.py: Override 'train\.max_ite'"):
        repro.main(
            ["configs/demo/pkd_retinanet.py", "--baseline", str(base), *opts[:2], "train.max_ite=2"]
        )


def test_repro_adds_a_key_on_purpose_to_the_config_of_the_pair_that_lacks_it(tmp_path, monkeypatch):
    """A baseline on detectron2's own `train` dict has no train.seed, which the distilled config
    has (0): check_pair refuses the pair ('train.seed (0 vs None) differ'), and `+train.seed=0`
    (a key added on purpose, which train_net.py accepts) is how to pair it. pair_overrides gave a
    key that only the distilled config has to the distilled run only, `+` included: the baseline
    never got its seed and the pair could not be run at all."""
    from detkd import repro

    base = _baseline_on_d2_train(tmp_path, drop="seed")
    pkd = os.path.join(REPO, "configs/demo/pkd_retinanet.py")
    assert repro.pair_overrides(str(base), pkd, ["+train.seed=0", "train.seed=0"]) == [
        "+train.seed=0"
    ]
    assert repro.pair_overrides(pkd, str(base), ["+train.seed=0"]) == ["+train.seed=0"]
    opts = ["train.teacher_random_init=True", "train.teacher_checkpoint=", "+train.seed=0"]
    out = ["--output", str(tmp_path / "o")]
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing may train"))
    with pytest.raises(SystemExit, match=r"train\.seed \(0 vs None\)"):
        repro.main(["configs/demo/pkd_retinanet.py", "--baseline", str(base), *opts[:2], *out])
    baseline, distilled = _repro_commands(
        monkeypatch, ["configs/demo/pkd_retinanet.py", "--baseline", str(base), *opts, *out]
    )
    assert baseline[-1] == "+train.seed=0" and distilled[-1] == "+train.seed=0", (
        baseline,
        distilled,
    )


def test_repro_table_reports_the_runs_last_results_and_the_delta(tmp_path, monkeypatch, capsys):
    """The pair's results (train_net.py faked: each run writes its metrics.json): the teacher row
    from the distilled run's teacher/bbox/* keys (its last values), the student and distilled
    rows from each run's last bbox/* results, the delta distilled AP - baseline AP."""
    from detkd import repro

    def fake_run(cmd, check, cwd, env):
        out = _output_dir(cmd)
        os.makedirs(out)
        if out.endswith("baseline"):
            lines = [
                {"bbox/AP": 99.0, "iteration": 4},
                {"loss": 1.0},
                {"bbox/AP": 20.0, "bbox/AP50": 30.0, "bbox/AP75": 15.0, "iteration": 9},
            ]
        else:
            lines = [
                {
                    "teacher/bbox/AP": 1.0,
                    "teacher/bbox/AP50": 2.0,
                    "teacher/bbox/AP75": 3.0,
                    "iteration": 0,
                },
                {
                    "teacher/bbox/AP": 50.0,
                    "teacher/bbox/AP50": 60.0,
                    "teacher/bbox/AP75": 40.0,
                    "iteration": 0,
                },
                {"bbox/AP": 23.5, "bbox/AP50": 31.0, "bbox/AP75": 19.25, "iteration": 9},
            ]
        with open(os.path.join(out, "metrics.json"), "w") as f:
            f.write("".join(json.dumps(m) + "\n" for m in lines))

    monkeypatch.setattr(subprocess, "run", fake_run)
    capsys.readouterr()
    res = repro.main(
        [
            "configs/demo/pkd_retinanet.py",
            "train.teacher_random_init=True",
            "train.teacher_checkpoint=",
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert res == {
        "teacher": {"AP": 50.0, "AP50": 60.0, "AP75": 40.0},
        "baseline": {"AP": 20.0, "AP50": 30.0, "AP75": 15.0},
        "distilled": {"AP": 23.5, "AP50": 31.0, "AP75": 19.25},
    }
    table = capsys.readouterr().out.split("\n\n")[-1].splitlines()
    assert [line.split() for line in table] == [
        ["AP", "AP50", "AP75"],
        ["teacher", "50.00", "60.00", "40.00"],
        ["student", "20.00", "30.00", "15.00"],
        ["distilled", "23.50", "31.00", "19.25"],
        ["delta", "+3.50"],
    ]


def test_repro_refuses_a_baseline_that_differs_in_any_paired_key(tmp_path):
    """check_pair compares seed, schedule, initialisation, student, training data, optimizer,
    LR schedule, gradient clipping and AMP: a baseline of one's own that differs from the
    distilled config in one of them only is refused, naming that key (clipping and AMP absent
    or disabled are the same: off)."""
    from detkd import repro

    pkd = os.path.join(REPO, "configs/demo/pkd_retinanet.py")
    ok = ["train.teacher_checkpoint=", "train.teacher_random_init=True"]
    changes = {
        "train.seed": "train.seed = 4",
        "train.max_iter": "train.max_iter = 7",
        "train.init_checkpoint": "train.init_checkpoint = 'other.pth'",
        "model.student": "model.head.prior_prob = 0.2",
        "dataloader.train": "dataloader.train.total_batch_size = 3",
        "optimizer": "optimizer.lr = 0.5",
        "lr_multiplier": "lr_multiplier.warmup_length = 0.2",
        "train.clip_grad": "train.clip_grad.enabled = False",
        "train.amp": "train.amp = dict(enabled=True)",
        # evaluated on other data: the delta would compare two test sets
        "dataloader.test": "dataloader.test.dataset.names.num_images = 16",
        "dataloader.evaluator": "dataloader.evaluator.max_dets_per_image = 10",
    }
    for key, line in changes.items():
        base = tmp_path / f"baseline_{key.replace('.', '_')}.py"
        base.write_text(
            "from detectron2.config import LazyConfig\n"
            f"c = LazyConfig.load({os.path.join(REPO, 'configs/demo/student_retinanet.py')!r})\n"
            "model, dataloader, optimizer, lr_multiplier, train = c.model, c.dataloader, "
            "c.optimizer, c.lr_multiplier, c.train\n" + line + "\n"
        )
        with pytest.raises(SystemExit, match=rf"the same way: {re.escape(key)}( \(.*\))? differ"):
            repro.check_pair(pkd, str(base), ok)
    base.write_text(base.read_text().replace(changes["dataloader.evaluator"], ""))
    repro.check_pair(pkd, str(base), ok)  # the unchanged twin
    # AMP absent in one config and disabled in the other: both off
    base.write_text(base.read_text() + "del train['amp']\n")
    repro.check_pair(pkd, str(base), ok)


def test_repro_does_not_evaluate_a_teacher_of_another_class_set(tmp_path, monkeypatch):
    """A teacher of another class set than the test data's (PKD accepts e.g. a model-zoo COCO
    teacher) cannot be scored there: repro forced train.teacher_eval_at_start=True, and the
    distilled run stopped on it after the baseline's whole schedule. It is now not evaluated
    (said before anything trains) and its row shows '-'; a teacher of the data's classes is."""
    from detectron2.config import LazyConfig

    from detkd import repro

    pkd = os.path.join(REPO, "configs/demo/pkd_retinanet.py")
    cfg = LazyConfig.apply_overrides(LazyConfig.load(pkd), ["model.teacher.num_classes=5"])
    assert repro.teacher_not_evaluable(cfg).startswith(
        "the teacher predicts 5 classes but the test dataset"
    )
    assert repro.teacher_not_evaluable(LazyConfig.load(pkd)) == ""
    del cfg.dataloader["evaluator"]  # nothing is evaluated: nothing to say
    assert repro.teacher_not_evaluable(cfg) == ""

    calls = []

    def fake_run(cmd, check, cwd, env):
        calls.append(cmd)
        out = _output_dir(cmd)
        os.makedirs(out, exist_ok=True)
        lines = [{"bbox/AP": 10.0 if out.endswith("baseline") else 12.0, "iteration": 1}]
        if "train.teacher_eval_at_start=True" in cmd:
            lines.insert(0, {"teacher/bbox/AP": 40.0, "iteration": 0})
        with open(os.path.join(out, "metrics.json"), "a") as f:
            f.write("".join(json.dumps(m) + "\n" for m in lines))

    monkeypatch.setattr(subprocess, "run", fake_run)
    for classes, evaluated in ((5, False), (3, True)):
        calls.clear()
        out = repro.main(
            [
                pkd,
                "--output",
                str(tmp_path / str(classes)),
                f"model.teacher.num_classes={classes}",
                "train.teacher_checkpoint=",
                "train.teacher_random_init=True",
            ]
        )
        assert len(calls) == 2 and f"train.teacher_eval_at_start={evaluated}" in calls[1]
        assert (
            out["teacher"] == ({"AP": 40.0} if evaluated else {}) and out["distilled"]["AP"] == 12.0
        )


def test_demo_orchestrates_the_runs_and_tables_of_several_seeds(tmp_path, monkeypatch):
    """detkd.demo's runs (train_net.py faked): one teacher at twice the students' iterations,
    each seed's student alone and distilled runs (train.seed, <run>_seed<s> folders) with the
    teacher's final weights, the PKD picture of the first seed's runs, the held-out evaluation
    of every run, and both tables' means, sds, paired deltas and s/iter of those results."""
    from detkd import demo, viz

    out = tmp_path / "demo"
    ap = {
        "teacher_retinanet": 50.0,
        "student_retinanet": 40.0,
        "student_retinanet_seed2": 44.0,
        "pkd_retinanet": 43.0,
        "pkd_retinanet_seed2": 45.0,
        "gid_retinanet": 38.0,
        "gid_retinanet_seed2": 46.0,
    }
    trained = []

    def fake_train(config, output_dir, opts, force, log):
        name = os.path.basename(output_dir)
        trained.append((os.path.basename(config), name, list(opts)))
        os.makedirs(output_dir)
        times = (
            (0.5,)
            if name.startswith("teacher")
            else (0.4, 0.6) if name.endswith("seed2") else (0.1, 0.6, 0.2)
        )
        with open(os.path.join(output_dir, "metrics.json"), "w") as f:
            f.write(
                "".join(json.dumps({"time": t, "iteration": i}) + "\n" for i, t in enumerate(times))
            )
        a = ap[name]
        return {"AP": a, "AP50": a + 10, "AP75": a - 10}, None

    held = []

    def fake_heldout(config, output_dir, num_images, opts, log):
        held.append(
            (os.path.basename(config), os.path.basename(output_dir), num_images, list(opts))
        )
        a = ap[os.path.basename(output_dir)] / 2
        return {"AP": a, "AP50": a + 1, "AP75": a - 1}

    pictures = []
    monkeypatch.setattr(demo, "_train", fake_train)
    monkeypatch.setattr(demo, "heldout_metrics", fake_heldout)
    monkeypatch.setattr(viz, "main", lambda argv: pictures.append(argv))
    demo.main(
        [
            "--methods",
            "pkd",
            "gid",
            "--iters",
            "5",
            "--seeds",
            "0",
            "2",
            "--heldout",
            "6",
            "--output",
            str(out),
            "--",
            "dataloader.train.num_workers=0",
        ]
    )
    nw = "dataloader.train.num_workers=0"
    tc = f"train.teacher_checkpoint={out / 'teacher_retinanet' / 'model_final.pth'}"
    assert trained == [
        ("teacher_retinanet.py", "teacher_retinanet", ["train.max_iter=10", nw]),
        ("student_retinanet.py", "student_retinanet", ["train.max_iter=5", nw]),
        ("pkd_retinanet.py", "pkd_retinanet", ["train.max_iter=5", nw, tc]),
        ("gid_retinanet.py", "gid_retinanet", ["train.max_iter=5", nw, tc]),
        (
            "student_retinanet.py",
            "student_retinanet_seed2",
            ["train.max_iter=5", nw, "train.seed=2"],
        ),
        ("pkd_retinanet.py", "pkd_retinanet_seed2", ["train.max_iter=5", nw, "train.seed=2", tc]),
        ("gid_retinanet.py", "gid_retinanet_seed2", ["train.max_iter=5", nw, "train.seed=2", tc]),
    ]
    assert held == [(c, d, 6, [nw]) for c, d, _ in trained]
    (picture,) = pictures
    assert picture[:3] == ["pkd", "--config", os.path.join(REPO, "configs/demo/pkd_retinanet.py")]
    assert picture[3:9] == [
        "--teacher",
        str(out / "teacher_retinanet" / "model_final.pth"),
        "--before",
        str(out / "student_retinanet" / "model_final.pth"),
        "--after",
        str(out / "pkd_retinanet" / "model_final_student.pth"),
    ]
    assert picture[-2:] == ["--", nw]  # the distilled run's overrides: its model and test data
    val, heldout = (out / "results.txt").read_text().split("held-out split (6 images, seed 7):")

    def rows(table):
        return {
            line[:28].strip(): line[28:].split()[:-1] for line in table.strip().splitlines()[2:]
        }

    # AP sd AP50 AP75 dAP sd s/iter seeds (sd, dAP, its sd: none for one run)
    assert rows(val) == {
        "teacher (retinanet)": ["50.00", "60.00", "40.00", "0.500", "0"],
        "student alone (retinanet)": ["42.00", "2.83", "52.00", "32.00", "0.350", "0,2"],
        "student + pkd": ["44.00", "1.41", "54.00", "34.00", "+2.00", "1.41", "0.350", "0,2"],
        "student + gid": ["42.00", "5.66", "52.00", "32.00", "+0.00", "2.83", "0.350", "0,2"],
    }
    assert rows(heldout) == {
        "teacher (retinanet)": ["25.00", "26.00", "24.00", "0.500", "0"],
        "student alone (retinanet)": ["21.00", "1.41", "22.00", "20.00", "0.350", "0,2"],
        "student + pkd": ["22.00", "0.71", "23.00", "21.00", "+1.00", "0.71", "0.350", "0,2"],
        "student + gid": ["21.00", "2.83", "22.00", "20.00", "+0.00", "1.41", "0.350", "0,2"],
    }
    # one seed: no sd columns, the delta of that seed
    out = tmp_path / "one"
    demo.main(["--methods", "gid", "--output", str(out)])
    assert rows((out / "results.txt").read_text()) == {
        "teacher (retinanet)": ["50.00", "60.00", "40.00", "0.500"],
        "student alone (retinanet)": ["40.00", "50.00", "30.00", "0.200"],
        "student + gid": ["38.00", "48.00", "28.00", "-2.00", "0.200"],
    }
    assert trained[-3:] == [
        ("teacher_retinanet.py", "teacher_retinanet", []),
        ("student_retinanet.py", "student_retinanet", []),
        ("gid_retinanet.py", "gid_retinanet", [tc.replace(str(tmp_path / "demo"), str(out))]),
    ]
    # runs too short for detectron2's timer (it skips the first iterations): no time, "-"
    # (was 0.000)
    for name in ("teacher_retinanet", "student_retinanet", "gid_retinanet"):
        with open(out / name / "metrics.json", "w") as f:
            f.write(json.dumps({"iteration": 1, "total_loss": 1.0}) + "\n")
    res = {"AP": 1.0, "AP50": 2.0, "AP75": 0.5}
    table = demo._table(
        [
            ("teacher (retinanet)", 0, res, str(out / "teacher_retinanet"), None),
            ("student alone (retinanet)", 0, res, str(out / "student_retinanet"), None),
            ("student + gid", 0, res, str(out / "gid_retinanet"), "student alone (retinanet)"),
        ],
        False,
    )
    assert [r[-1] for r in rows(table).values()] == ["-", "-", "-"]


def test_heldout_metrics_evaluates_the_runs_final_weights_on_the_heldout_split_once(
    tmp_path, monkeypatch
):
    """heldout_metrics (train_net.py --eval-only faked): the run's model_final.pth evaluated on
    the held-out split (its own seed 7, N images), the user's overrides that apply given first
    so that they cannot replace those settings; cached, redone once the weights are newer."""
    from detectron2.config import LazyConfig

    from detkd import demo

    config = os.path.join(REPO, "configs/demo/student_retinanet.py")
    run = tmp_path / "student_retinanet"
    run.mkdir()
    weights = run / "model_final.pth"
    weights.write_bytes(b"")
    os.utime(weights, (1e9, 1e9))
    calls = []

    def fake_train_net(cmd, cwd, stdout, stderr, check, env):
        calls.append(cmd)
        out = _output_dir(cmd)
        with open(os.path.join(out, "eval_results.json"), "w") as f:
            json.dump({"bbox": {"AP": 10.0 * len(calls), "AP50": 20.0}}, f)

    monkeypatch.setattr(demo.subprocess, "run", fake_train_net)
    opts = [
        "dataloader.test.num_workers=0",
        "train.init_checkpoint=",
        "dataloader.test.dataset.names.num_images=3",
        "model.distillers.pkd.loss_weight=2",
    ]  # the last: not for this config
    assert demo.heldout_metrics(config, str(run), 6, opts, lambda s: None) == {
        "AP": 10.0,
        "AP50": 20.0,
    }
    (cmd,) = calls
    assert cmd[1:5] == [os.path.join(REPO, "train_net.py"), "--config-file", config, "--eval-only"]
    cfg = LazyConfig.apply_overrides(LazyConfig.load(config), cmd[5:])
    names = cfg.dataloader.test.dataset.names
    assert (names.split, names.num_images, names.seed) == (
        "heldout",
        6,
        demo.HELDOUT_SEED,
    ) and demo.HELDOUT_SEED == 7
    assert cfg.train.init_checkpoint == str(weights) and cfg.train.output_dir == str(
        run / "heldout_6"
    )
    assert cfg.dataloader.test.num_workers == 0 and not any("distillers" in a for a in cmd)
    # cached while the results are newer than the weights; evaluated again once they are not
    assert (
        demo.heldout_metrics(config, str(run), 6, opts, lambda s: None)["AP"] == 10.0
        and len(calls) == 1
    )
    os.utime(weights, (4e9, 4e9))
    assert (
        demo.heldout_metrics(config, str(run), 6, opts, lambda s: None)["AP"] == 20.0
        and len(calls) == 2
    )


def test_repro_gives_a_deletion_override_to_the_config_of_the_pair_that_has_the_key():
    """`~model.distillers.pkd.loss_weight` (back to the distiller's default) is for the distilled
    run only, as `model.distillers.pkd.loss_weight=3` is: its key, less the `~`, is the
    distilled config's; the baseline's run would refuse it (no such key)."""
    from detkd import repro

    pkd, student = (
        os.path.join(REPO, f"configs/demo/{n}_retinanet.py") for n in ("pkd", "student")
    )
    opts = [
        "~model.distillers.pkd.loss_weight",
        "model.distillers.pkd.loss_weight=3",
        "train.max_iter=4",
    ]
    assert repro.pair_overrides(student, pkd, opts) == ["train.max_iter=4"]
    assert repro.pair_overrides(pkd, student, opts) == opts


def test_demo_starts_the_detr_runs_from_the_retinanets_backbones(tmp_path, monkeypatch):
    """The DETR teacher starts from the RetinaNet teacher's backbone, every DETR student run (alone
    and D3ETR, every seed) from the seed-0 RetinaNet student's: those runs are trained first
    (once, also when they are rows of the table), their backbones written to <output>/backbones
    by export_backbone and passed as train.init_checkpoint; written again only when their run was
    trained again; a user's train.init_checkpoint is refused (train_net.py faked, real exports)."""
    import numpy as np
    import torch
    from detectron2.config import instantiate

    from detkd import demo

    from conftest import tiny_retinanet_cfg

    out = tmp_path / "demo"
    trained, weights = [], {}

    def fake_train(config, output_dir, opts, force, log):
        name = os.path.basename(output_dir)
        trained.append((os.path.basename(config), name, list(opts)))
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "metrics.json"), "w") as f:
            f.write(json.dumps({"time": 0.1, "iteration": 0}) + "\n")
        if name in ("teacher_retinanet", "student_retinanet"):
            torch.manual_seed(len(trained))
            model = instantiate(tiny_retinanet_cfg(width=32 if name.startswith("teacher") else 16))
            weights[name] = model.backbone.bottom_up.state_dict()
            torch.save({"model": model.state_dict()}, os.path.join(output_dir, "model_final.pth"))
        return {"AP": 1.0, "AP50": 2.0, "AP75": 0.5}, None

    monkeypatch.setattr(demo, "_train", fake_train)
    demo.main(["--methods", "d3etr", "--iters", "5", "--seeds", "0", "1", "--output", str(out)])
    t_init = f"train.init_checkpoint={out / 'backbones' / 'teacher_retinanet.pkl'}"
    s_init = f"train.init_checkpoint={out / 'backbones' / 'student_retinanet.pkl'}"
    tc = f"train.teacher_checkpoint={out / 'teacher_detr' / 'model_final.pth'}"
    assert trained == [
        ("teacher_retinanet.py", "teacher_retinanet", ["train.max_iter=10"]),
        ("teacher_detr.py", "teacher_detr", ["train.max_iter=10", t_init]),
        ("student_retinanet.py", "student_retinanet", ["train.max_iter=5"]),
        ("student_detr.py", "student_detr", ["train.max_iter=5", s_init]),
        ("d3etr_detr.py", "d3etr_detr", ["train.max_iter=5", s_init, tc]),
        ("student_detr.py", "student_detr_seed1", ["train.max_iter=5", "train.seed=1", s_init]),
        ("d3etr_detr.py", "d3etr_detr_seed1", ["train.max_iter=5", "train.seed=1", s_init, tc]),
    ]
    table = (out / "results.txt").read_text()
    assert "teacher (detr)" in table and "retinanet" not in table  # backbone sources are no rows
    for role in ("teacher", "student"):
        with open(out / "backbones" / f"{role}_retinanet.pkl", "rb") as f:
            data = __import__("pickle").load(f)
        expected = weights[f"{role}_retinanet"]
        assert data["matching_heuristics"] and set(data["model"]) == set(expected)
        assert all(np.array_equal(data["model"][k], v.numpy()) for k, v in expected.items())

    # again, every run finished: the backbones are not written again (the DETR runs would retrain);
    # a RetinaNet student trained again since: its backbone is
    pkl = out / "backbones" / "student_retinanet.pkl"
    before = {p: p.stat().st_mtime_ns for p in (pkl, out / "backbones" / "teacher_retinanet.pkl")}
    monkeypatch.setattr(
        demo, "_train", lambda config, output_dir, opts, force, log: ({"AP": 1.0}, None)
    )
    demo.main(["--methods", "d3etr", "--iters", "5", "--output", str(out)])
    assert {p: p.stat().st_mtime_ns for p in before} == before
    source = out / "student_retinanet" / "model_final.pth"
    os.utime(source, ns=(before[pkl] + 10**9, before[pkl] + 10**9))
    demo.main(["--methods", "d3etr", "--iters", "5", "--output", str(out)])
    assert pkl.stat().st_mtime_ns > before[pkl]
    assert (out / "backbones" / "teacher_retinanet.pkl").stat().st_mtime_ns == before[
        out / "backbones" / "teacher_retinanet.pkl"
    ]

    # with a RetinaNet method too, its teacher and student are trained once, as rows and sources
    trained.clear()
    monkeypatch.setattr(demo, "_train", fake_train)
    from detkd import viz

    monkeypatch.setattr(viz, "main", lambda argv: None)  # the PKD picture of a "pkd" run
    demo.main(["--methods", "pkd", "d3etr", "--output", str(tmp_path / "both")])
    names = [name for _, name, _ in trained]
    assert sorted(names) == sorted(set(names)) and len(names) == 6
    assert "teacher (retinanet)" in (tmp_path / "both" / "results.txt").read_text()
    with pytest.raises(
        SystemExit, match=r"train\.init_checkpoint.*backbones of the demo's retinanet runs"
    ):
        demo.main(["--methods", "d3etr", "--output", str(out), "--", "train.init_checkpoint=x.pkl"])


def test_demo_refuses_overrides_that_reach_its_two_students_differently(tmp_path, monkeypatch):
    """An override reaches a config where its parent key exists: model.anchor_matcher.* reached
    the student alone (and the teacher), not the distilled student (model.student.*), and the
    table's delta compared two different students. Refused before training, naming the fix;
    given to both, accepted."""
    from detkd import demo

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing may train"))
    thr = "model.anchor_matcher.thresholds=[0.5,0.6]"
    with pytest.raises(
        SystemExit,
        match=r"pkd_retinanet\.py and student_retinanet\.py would train or evaluate "
        r"different students: model\.student differ.*model\.X=\.\.\. model\.student\.X=",
    ):
        demo.main(["--methods", "pkd", "--output", str(tmp_path / "o"), "--", thr])
    with pytest.raises(SystemExit, match=r"model\.student differ"):  # the other way round
        demo.main(
            [
                "--methods",
                "pkd",
                "--output",
                str(tmp_path / "o"),
                "--",
                "model.student.head.conv_dims=[8]",
            ]
        )
    kd, alone = (
        os.path.join(REPO, "configs/demo", f"{n}.py")
        for n in ("pkd_retinanet", "student_retinanet")
    )
    demo.check_same_students(
        [(kd, alone)], [thr, "model.student.anchor_matcher.thresholds=[0.5,0.6]"]
    )
    # the distiller only
    demo.check_same_students([(kd, alone)], ["model.distillers.pkd.loss_weight=3"])
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_the_runs_read_the_data_where_this_process_does(tmp_path, monkeypatch):
    """A relative $DETKD_DATASETS (or the default ./datasets) named two folders: the runs start in
    the repository root, the demo's picture is drawn here. The runs get it absolute."""
    from detkd import repro
    from detkd.demo import run_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DETKD_DATASETS", "rel_data")
    assert run_env()["DETKD_DATASETS"] == str(tmp_path / "rel_data")
    monkeypatch.delenv("DETKD_DATASETS")
    assert run_env()["DETKD_DATASETS"] == str(tmp_path / "datasets")
    seen = []

    def fake_run(cmd, check, cwd, env):
        seen.append(env["DETKD_DATASETS"])
        out = _output_dir(cmd)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.json"), "a") as f:
            f.write(
                json.dumps({"bbox/AP": 1.0, "bbox/AP50": 2.0, "bbox/AP75": 3.0, "iteration": 1})
                + "\n"
            )

    monkeypatch.setattr(subprocess, "run", fake_run)
    res = repro.main(
        [
            os.path.join(REPO, "configs/demo/pkd_retinanet.py"),
            "train.teacher_random_init=True",
            "train.teacher_checkpoint=",
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert seen == [str(tmp_path / "datasets")] * 2
    assert res["teacher"] == {}


def test_repro_run_again_in_its_folder_reports_this_runs_results_only(
    tmp_path, monkeypatch, capsys
):
    """detectron2's writer appends to metrics.json: a second repro in the same folder whose
    distilled run does not evaluate its teacher (train.teacher_eval_at_start=False) printed the
    first run's teacher AP. Each run starts without the folder's old metrics.json."""
    from detkd import repro

    def fake_run(cmd, check, cwd, env):
        out = _output_dir(cmd)
        os.makedirs(out, exist_ok=True)
        lines = [{"bbox/AP": 10.0 if out.endswith("baseline") else 12.0, "iteration": 1}]
        if "train.teacher_eval_at_start=False" not in cmd and out.endswith("distilled"):
            lines.insert(0, {"teacher/bbox/AP": 40.0, "iteration": 0})
        with open(os.path.join(out, "metrics.json"), "a") as f:  # as detectron2's writer
            f.write("".join(json.dumps(m) + "\n" for m in lines))

    monkeypatch.setattr(subprocess, "run", fake_run)
    args = [
        "configs/demo/pkd_retinanet.py",
        "train.teacher_random_init=True",
        "train.teacher_checkpoint=",
        "--output",
        str(tmp_path / "o"),
    ]
    assert repro.main(args)["teacher"] == {"AP": 40.0}
    run = tmp_path / "o" / "demo" / "pkd_retinanet" / "distilled"
    for name in (
        "model_final.pth",
        "model_0000000.pth",
        "last_checkpoint",
        "model_final_student.pth",
    ):
        (run / name).write_bytes(b"the first run's")
    (run / "model_mine.pth").write_bytes(b"kept")
    res = repro.main(args + ["train.teacher_eval_at_start=False"])
    # the earlier run's checkpoints went with its metrics.json (train_net.py refuses to start
    # over another model's run); a file of one's own stays
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json", "model_mine.pth"]
    assert res["teacher"] == {} and res["distilled"]["AP"] == 12.0
    table = capsys.readouterr().out.split("\n\n")[-1]
    assert table.splitlines()[1].split() == ["teacher", "-", "-", "-"]


class _Stop(Exception):
    pass


def test_demo_force_retrains_a_finished_run_of_the_same_arguments(tmp_path, monkeypatch):
    """--force trains again a run that would be reused (same arguments, finished)."""
    from detkd import demo

    config = os.path.join(REPO, "configs/demo/student_retinanet.py")
    out = tmp_path / "student_retinanet"
    out.mkdir()
    trained = []

    def fake_train_net(cmd, **kwargs):
        trained.append(cmd)
        (out / "model_final.pth").write_bytes(b"")
        (out / "metrics.json").write_text(json.dumps({"bbox/AP": 1.0}) + "\n")

    monkeypatch.setattr(demo.subprocess, "run", fake_train_net)
    logs = []
    for force in (False, False):
        demo._train(config, str(out), ["train.max_iter=4"], force, logs.append)
    assert len(trained) == 1 and "[demo] reusing" in logs[-1]
    logs.clear()
    demo._train(config, str(out), ["train.max_iter=4"], True, logs.append)
    assert len(trained) == 2 and not any("reusing" in line for line in logs)


def test_demo_retrains_for_an_input_newer_than_the_weights_only(tmp_path):
    """A teacher (or pretrained backbone) file newer than the run's final weights means the run
    trains again; one exactly as old does not."""
    from detkd import demo

    teacher, weights = tmp_path / "teacher.pth", tmp_path / "model_final.pth"
    teacher.write_bytes(b"")
    weights.write_bytes(b"")
    cmd = ["train_net.py", f"train.teacher_checkpoint={teacher}"]
    os.utime(teacher, (1e9, 1e9))
    os.utime(weights, (1e9, 1e9))
    assert not demo._newer_inputs(str(tmp_path), cmd)
    os.utime(teacher, (1e9 + 1, 1e9 + 1))
    assert demo._newer_inputs(str(tmp_path), cmd)
    os.utime(teacher, (1e9 - 1, 1e9 - 1))
    assert not demo._newer_inputs(str(tmp_path), cmd)


def test_paths_from_here_leaves_values_alone_in_the_repository_root(monkeypatch):
    """Run from the repository root, a relative path already names the file the runs read (they
    start there): it stays as written."""
    from detkd.demo import paths_from_here

    monkeypatch.chdir(REPO)
    opts = ["train.init_checkpoint=configs/demo/pkd_retinanet.py"]
    assert paths_from_here(opts) == opts


def test_demo_trains_the_detector_family_given_by_detector(tmp_path, monkeypatch):
    """--detector picks the family among a method's demo configs (a second family, "aaa",
    sorts first and is added here to the files demo finds)."""
    import glob

    from detkd import demo

    real = glob.glob

    def with_a_second_family(pattern):
        extra = [pattern.replace("*", "aaa")] if pattern.endswith("pkd_*.py") else []
        return real(pattern) + extra

    monkeypatch.setattr(glob, "glob", with_a_second_family)
    seen = []

    def fake_train(config, run_dir, opts, force, log):
        seen.append(os.path.basename(config))
        raise _Stop

    monkeypatch.setattr(demo, "_train", fake_train)
    with pytest.raises(_Stop):
        demo.main(["--methods", "pkd", "--detector", "retinanet", "--output", str(tmp_path)])
    assert seen == ["teacher_retinanet.py"]


def test_repro_settings_that_are_off_differ_in_nothing_else():
    """Disabled gradient clipping (or AMP) is the same setting whatever its other keys say, and
    an AMP dict that is off equals none."""
    from detectron2.config import LazyConfig

    from detkd.repro import paired_differences

    kd = LazyConfig.apply_overrides(
        load_config("configs/demo/pkd_retinanet.py"), ["train.clip_grad.enabled=False"]
    )
    base = LazyConfig.apply_overrides(
        load_config("configs/demo/student_retinanet.py"),
        ["train.clip_grad.enabled=False", "train.clip_grad.max_norm=5.0"],
    )
    assert kd.train.clip_grad.max_norm != base.train.clip_grad.max_norm
    assert paired_differences(kd, base) == []
    base.train.clip_grad.enabled = True
    assert "train.clip_grad" in str(paired_differences(kd, base))
    base.train.clip_grad.enabled = False
    base.train.amp = dict(enabled=False, precision="bfloat16")
    kd.train.pop("amp", None)
    assert paired_differences(kd, base) == []


def test_repro_reads_a_relative_teacher_checkpoint_from_the_repository_root(tmp_path, monkeypatch):
    """The runs start in the repository root: a teacher path relative to it is found from any
    working directory."""
    from detkd import repro

    monkeypatch.chdir(tmp_path)
    repro.check_pair(
        os.path.join(REPO, "configs/demo/pkd_retinanet.py"),
        os.path.join(REPO, "configs/demo/student_retinanet.py"),
        ["train.teacher_checkpoint=configs/demo/teacher_retinanet.py"],
    )


def test_repro_finds_yacs_teachers_in_lists_and_leaves_urls_to_the_run():
    from detkd.repro import _check_yacs_node, _yacs_nodes

    from omegaconf import OmegaConf

    yacs = {"_target_": "detkd.modeling.build_yacs_detector", "config_file": "t.yaml"}
    node = OmegaConf.create({"members": [{"x": 1}, yacs]})
    assert [k for k, _ in _yacs_nodes(node, "model.teacher")] == ["model.teacher.members[1]"]
    url = OmegaConf.create({"config_file": "https://example.com/teacher.yaml", "opts": []})
    assert _check_yacs_node("model.teacher", url, "kd.py") is None


def test_repro_teacher_row_is_its_box_ap_not_its_mask_ap(tmp_path):
    """The engine logs teacher/{task}/{metric}: a Mask R-CNN teacher's segm AP is not its row."""
    from detkd.repro import _teacher_metrics

    metrics = {
        "teacher/bbox/AP": 50.0,
        "teacher/bbox/AP50": 60.0,
        "teacher/segm/AP": 45.0,
        "teacher/segm/AP50": 55.0,
        "iteration": 0,
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics) + "\n")
    assert _teacher_metrics(str(tmp_path)) == {"AP": 50.0, "AP50": 60.0}
