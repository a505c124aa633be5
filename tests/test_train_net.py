"""train_net.py / KDTrainer end to end on the shapes data: COCOEvaluator result, student
export, and resume equal to an uninterrupted run."""

import json
import logging
import os
import platform
import re
import resource
import signal
import subprocess
import sys

import torch
from detectron2.config import LazyCall as L
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import hooks

from detkd.engine import KDTrainer
from detkd.utils import unwrap_model

import pytest
from conftest import REPO, load_config, tiny_retinanet_cfg


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def test_train_net_three_iterations_evaluates_and_exports(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "train_net.py",
        "--config-file",
        "configs/demo/pkd_retinanet.py",
        "train.max_iter=3",
        "train.log_period=1",
        f"train.output_dir={out}",
        "train.teacher_checkpoint=",
        "train.teacher_random_init=True",
        "dataloader.train.dataset.names.num_images=16",
        "dataloader.test.dataset.names.num_images=8",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "dataloader.train.total_batch_size=4",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "copypaste: AP,AP50,AP75" in proc.stdout + proc.stderr
    assert (out / "model_final.pth").is_file() and (out / "model_final_student.pth").is_file()
    log = (out / "log.txt").read_text()  # DetKD's own messages reach the run's log
    assert f"Student exported to {out / 'model_final_student.pth'}" in log
    assert "the teacher keeps random weights" in log
    assert (
        "train.init_checkpoint is empty: the student starts from its random initialisation" in log
    )
    assert "Distillers bound: pkd (PKDDistiller): levels p3->p3, p4->p4, p5->p5, p6->p6, " in log
    logged = _metrics(str(out))
    assert [m["iteration"] for m in logged if "loss_pkd" in m] == [0, 1, 2]
    assert all(m["loss_pkd"] > 0 for m in logged if "loss_pkd" in m)
    assert any("bbox/AP" in m for m in logged)
    student = torch.load(out / "model_final_student.pth", weights_only=False)["model"]
    assert not any(k.startswith(("student.", "teacher", "distillers")) for k in student)

    # --eval-only on the exported student evaluates with COCOEvaluator; in the training run's
    # folder, the run's config.yaml stays and the evaluation's goes beside it, and so do the
    # run's predictions (inference/: they were replaced by those of the evaluated checkpoint).
    run_config = (out / "config.yaml").read_bytes()
    run_predictions = (out / "inference" / "coco_instances_results.json").read_bytes()
    proc = subprocess.run(
        [
            sys.executable,
            "train_net.py",
            "--config-file",
            "configs/demo/pkd_retinanet.py",
            "--eval-only",
            f"train.init_checkpoint={out / 'model_final_student.pth'}",
            f"train.output_dir={out}",
            "train.teacher_checkpoint=",
            "dataloader.test.dataset.names.num_images=8",
            "dataloader.test.num_workers=0",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "copypaste: AP,AP50,AP75" in proc.stdout + proc.stderr
    assert (out / "config.yaml").read_bytes() == run_config
    assert "max_iter: 3" in run_config.decode()
    eval_config = (out / "config_eval.yaml").read_text()
    assert f"init_checkpoint: {out / 'model_final_student.pth'}" in eval_config
    assert "max_iter: 3" not in eval_config  # the evaluation's own overrides
    assert (out / "inference" / "coco_instances_results.json").read_bytes() == run_predictions
    assert (out / "inference_eval" / "coco_instances_results.json").is_file()
    with open(out / "eval_results.json") as f:
        written = json.load(f)["bbox"]
    printed = [line for line in (proc.stdout + proc.stderr).splitlines() if "copypaste: " in line]
    # the values
    printed = printed[[i for i, line in enumerate(printed) if "AP,AP50,AP75" in line][0] + 1]
    assert [float(x) for x in printed.split("copypaste: ")[1].split(",")[:3]] == [
        pytest.approx(written[k], abs=1e-4) for k in ("AP", "AP50", "AP75")
    ]


def _run_or_fail_if_hung(cmd, env, hung, timeout=150):
    """Run ``cmd`` in the repository root in a session of its own; fail with ``hung`` (its
    worker processes killed too) past ``timeout`` s, or with its output's end if it fails."""
    with subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            output = proc.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(hung)
    assert proc.returncode == 0, output[-3000:]
    return output


def test_cpu_processes_split_the_cores_they_may_run_on(monkeypatch):
    """A CPU-only run of N processes gives each 1/N of the cores in the process's CPU affinity
    (a Slurm or cgroup binding), not of the machine's os.cpu_count()."""
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("the OS reports no CPU affinity")
    monkeypatch.syspath_prepend(REPO)
    import train_net

    allowed = 2 * (os.cpu_count() or 1) + 2  # a count the machine's cores cannot give
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(allowed)))
    monkeypatch.setattr(train_net.comm, "get_local_size", lambda: 2)
    monkeypatch.setattr(train_net.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = []
    monkeypatch.setattr(train_net.torch, "set_num_threads", threads.append)
    train_net._share_cpu_threads()
    assert threads == [allowed // 2]


def test_train_net_two_processes_on_the_cpu(tmp_path):
    """``--num-gpus 2`` without CUDA: two processes over gloo (DDP with detectron2's train.ddp,
    find_unused_parameters=False), D3ETR on the DETR demo pair with the teacher evaluated at the
    start. Both processes train all iterations; the main one logs and exports the student."""
    out = tmp_path / "ddp"
    cmd = [
        # --dist-url auto: a free port (detectron2's default port is fixed per user, so another
        # two-process run on the machine at the same time would hold it)
        sys.executable,
        "train_net.py",
        "--num-gpus",
        "2",
        "--dist-url",
        "auto",
        "--config-file",
        "configs/demo/d3etr_detr.py",
        "train.max_iter=3",
        "train.log_period=1",
        f"train.output_dir={out}",
        "train.teacher_checkpoint=",
        "train.teacher_random_init=True",
        "train.teacher_eval_at_start=True",
        "train.init_checkpoint=",
        "dataloader.train.dataset.names.num_images=16",
        "dataloader.test.dataset.names.num_images=8",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "dataloader.train.total_batch_size=4",
    ]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    with open(out / "log.txt.rank1") as f:  # the second process ran the same training loop
        log = f.read()
    assert "Starting training from iteration 0" in log
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, cores // 2)  # the cores split between the two processes
    assert (
        f"CPU-only run with 2 processes: {threads} thread{'' if threads == 1 else 's'} each" in log
    )
    assert "Teacher evaluation before training" not in log  # it has no results: it said "{}"
    assert "Teacher evaluation before training: {'bbox': {'AP': " in (out / "log.txt").read_text()
    logged = _metrics(str(out))
    assert [m["iteration"] for m in logged if "loss_d3etr_cls" in m] == [0, 1, 2]
    assert any("teacher/bbox/AP" in m for m in logged) and any("bbox/AP" in m for m in logged)
    assert (out / "model_final_student.pth").is_file()

    # --eval-only on two processes with one test image: the second process has none and never
    # runs a forward; DDP's buffer broadcast before the first forward left the main one waiting
    eval_cmd = [
        sys.executable,
        "train_net.py",
        "--num-gpus",
        "2",
        "--dist-url",
        "auto",
        "--eval-only",
        "--config-file",
        "configs/demo/d3etr_detr.py",
        f"train.output_dir={tmp_path / 'eval1'}",
        "train.teacher_checkpoint=",
        f"train.init_checkpoint={out / 'model_final_student.pth'}",
        "dataloader.test.dataset.names.num_images=1",
        "dataloader.test.num_workers=0",
    ]
    output = _run_or_fail_if_hung(
        eval_cmd, env, "--eval-only on two processes with one test image hung"
    )
    assert "copypaste: AP,AP50,AP75" in output

    # --resume on both processes: they agree (through the main one) not to evaluate the
    # teacher again, whose results metrics.json holds; both go on from iteration 3. With
    # train.ddp.broadcast_buffers=True and one test image, the final evaluation ran through
    # DDP's wrapper and hung as --eval-only did.
    cmd[cmd.index("train.max_iter=3")] = "train.max_iter=4"
    cmd[cmd.index("dataloader.test.dataset.names.num_images=8")] = (
        "dataloader.test.dataset.names.num_images=1"
    )
    _run_or_fail_if_hung(
        cmd[:2] + ["--resume"] + cmd[2:] + ["train.ddp.broadcast_buffers=True"],
        env,
        "the final evaluation of a run with train.ddp.broadcast_buffers=True hung",
    )
    with open(out / "log.txt.rank1") as f:
        assert "Starting training from iteration 3" in f.read()
    logged = _metrics(str(out))
    assert [m["iteration"] for m in logged if any(k.startswith("teacher/") for k in m)] == [0]
    assert [m["iteration"] for m in logged if "loss_d3etr_cls" in m] == [0, 1, 2, 3]


def test_bad_teacher_path_fails_before_training(tmp_path):
    cfg = _small_cfg(tmp_path / "bad", max_iter=2)
    cfg.train.teacher_checkpoint = str(tmp_path / "missing_teacher.pkl")
    cfg.train.teacher_random_init = False
    trainer = KDTrainer(cfg)
    with pytest.raises(RuntimeError, match="missing_teacher.pkl"):
        trainer.resume_or_load(resume=False)
    assert not (tmp_path / "bad" / "last_checkpoint").exists()


def _small_cfg(output_dir, max_iter):
    cfg = load_config("configs/demo/pkd_retinanet.py")
    cfg.model.student = tiny_retinanet_cfg(width=8, fpn=32)
    cfg.model.teacher = tiny_retinanet_cfg(width=16, fpn=64)
    cfg.train.update(
        output_dir=str(output_dir),
        max_iter=max_iter,
        teacher_checkpoint="",
        teacher_random_init=True,
        eval_period=0,
        log_period=1,
        seed=3,
    )
    cfg.train.checkpointer.period = 2
    # SGD: Adam turns float noise in near-zero gradients into lr-sized steps.
    cfg.optimizer = load_config("configs/PKD/baseline_retinanet_R50_2x.py").optimizer
    cfg.optimizer.lr = 0.002
    ds = cfg.dataloader
    ds.train.dataset.names.num_images = 4
    ds.train.dataset.filter_empty = False  # exactly 4 images: every batch is the same 4
    ds.test.dataset.names.num_images = 4
    ds.train.update(total_batch_size=4, num_workers=0, aspect_ratio_grouping=False)
    ds.train.mapper.augmentations = []
    ds.train.sampler = L(TrainingSampler)(size=4, shuffle=False)
    ds.test.num_workers = 0
    return cfg


class _Interrupt(hooks.HookBase):
    def __init__(self, at=2):
        self.at = at

    def before_step(self):
        if self.trainer.iter == self.at:
            raise KeyboardInterrupt("simulated preemption")


def _run(cfg, resume=False, interrupt=False):
    """``interrupt``: False, True (at iteration 2) or the iteration to interrupt at."""
    torch.manual_seed(cfg.train.seed)
    trainer = KDTrainer(cfg)
    if interrupt is not False:
        trainer.register_hooks([_Interrupt(2 if interrupt is True else interrupt)])
    trainer.resume_or_load(resume=resume)
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return trainer


def test_resume_equals_uninterrupted(tmp_path):
    straight = _run(_small_cfg(tmp_path / "a", 4))
    _run(_small_cfg(tmp_path / "b", 4), interrupt=True)
    assert not (tmp_path / "b" / "model_final_student.pth").exists()  # no export when interrupted
    assert (tmp_path / "b" / "model_0000001.pth").is_file()
    resumed = _run(_small_cfg(tmp_path / "b", 4), resume=True)
    assert resumed.start_iter == 2

    a = straight.model.state_dict()
    b = resumed.model.state_dict()
    assert any(k.startswith("distillers.pkd.adapters") for k in a)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), k
    # Raw per-iteration losses (metrics.json holds windowed medians).
    for key in ("total_loss", "loss_pkd", "loss_cls", "loss_box_reg"):
        ha = dict((it, v) for v, it in straight.storage.history(key).values())
        hb = dict((it, v) for v, it in resumed.storage.history(key).values())
        assert sorted(hb) == [2, 3]
        for it in (2, 3):
            assert hb[it] == pytest.approx(ha[it], rel=1e-5), (key, it)


def test_resume_of_a_plain_detector_keeps_its_ema_loss_normalizer(tmp_path):
    # A teacher's or baseline's run: RetinaNet's loss_normalizer (an EMA of the number of
    # positive anchors, a float attribute outside the state_dict) restarted at 100 on resume;
    # on the demo's tiny model the resumed steps' loss_cls was 0.858 instead of 0.899.
    # (A DistillationDetector saves its student's as extra state.)
    def plain():
        cfg = _small_cfg(tmp_path / "alone", 4)
        cfg.model = tiny_retinanet_cfg(width=8, fpn=32)
        return cfg

    trainer = KDTrainer(plain())
    trainer.model.loss_normalizer = 42.5
    trainer.iter = 1
    trainer.checkpointer.save("model_0000001", iteration=1)
    resumed = KDTrainer(plain())
    assert not hasattr(resumed.model, "loss_normalizer")  # set at the first step
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    assert resumed.model.loss_normalizer == 42.5


def test_resume_with_another_max_iter_trains_on_the_new_schedule(tmp_path, caplog):
    """A run of 5 iterations stopped before iteration 4 (last checkpoint: iteration 3), resumed
    with train.max_iter=10: step 4 trains at the new schedule's lr (4/10 of the way: the base
    lr), not the one the old schedule gave it (4/5: past the 80 % step, a tenth). Resumed past
    train.max_iter, or at it (a finished run), it trains nothing and says so."""
    from detectron2.config import instantiate

    _run(_small_cfg(tmp_path / "r", 5), interrupt=4)
    cfg = _small_cfg(tmp_path / "r", 10)
    multiplier = instantiate(cfg.lr_multiplier)
    assert multiplier(4 / 5) == pytest.approx(0.1) and multiplier(4 / 10) == 1.0  # the case tested
    resumed = _run(cfg, resume=True)
    assert resumed.start_iter == 4
    lr = dict((it, v) for v, it in resumed.storage.history("lr").values())
    for it in range(4, 10):
        assert lr[it] == pytest.approx(cfg.optimizer.lr * multiplier(it / 10), rel=1e-6), it

    assert "base learning rates" not in caplog.text  # the same optimizer.lr: no warning
    with caplog.at_level(logging.WARNING, logger="detkd.engine"):
        past = _run(_small_cfg(tmp_path / "r", 6), resume=True)
    assert past.start_iter == 10
    assert "has trained 10 iterations, more than train.max_iter=6" in caplog.text
    caplog.clear()  # the finished run resumed as it was (a relaunched job): it says so too
    with caplog.at_level(logging.WARNING, logger="detkd.engine"):
        again = _run(_small_cfg(tmp_path / "r", 10), resume=True)
    assert again.start_iter == 10
    assert "has trained 10 iterations, all of train.max_iter=10: nothing is trained" in caplog.text
    # what is logged after training (the evaluation of the last checkpoint) is at the run's own
    # iteration count: TrainerBase.train counted one more, a step that was never trained
    assert past.iter == past.storage.iter == 10 and again.iter == again.storage.iter == 10
    assert resumed.iter == resumed.storage.iter == 10  # a run that trained: as detectron2 has it


def test_resume_with_another_optimizer_lr_keeps_the_runs_and_says_so(tmp_path, caplog):
    """optimizer.lr changed on --resume: the run's base lr is kept (README), which the log now
    says instead of ignoring the new value without a word. Then AMP switched on at resume."""
    _run(_small_cfg(tmp_path / "b", 4), interrupt=2)
    cfg = _small_cfg(tmp_path / "b", 4)
    cfg.optimizer.lr = 0.5
    with caplog.at_level(logging.WARNING, logger="detkd.engine"):
        resumed = _run(cfg, resume=True)
    assert "the run's base learning rates [0.002] are kept" in caplog.text
    assert "this config's [0.5]" in caplog.text
    lr = dict((it, v) for v, it in resumed.storage.history("lr").values())
    assert lr[2] == pytest.approx(0.002, rel=1e-6)

    # The same run resumed with train.amp.enabled switched on: its checkpoint has no
    # grad-scaler state, on which detectron2's AMPTrainer stopped with a bare KeyError. It
    # goes on from its iteration with a fresh scaler, and says so. (AMPTrainer trains only
    # on CUDA; only the resume is run here.)
    from detectron2.engine import AMPTrainer

    cfg = _small_cfg(tmp_path / "b", 6)
    cfg.train.amp.enabled = True
    amp = KDTrainer(cfg)
    assert isinstance(amp._trainer, AMPTrainer)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detkd.engine"):
        amp.resume_or_load(resume=True)
    assert amp.start_iter == 4
    assert "iteration 3 of the run was trained without AMP" in caplog.text
    assert "loss scale starts afresh" in caplog.text


def test_resume_with_other_optimizer_settings_keeps_the_runs_and_another_optimizer_is_refused(
    tmp_path, caplog
):
    """--resume restores the run's optimizer: settings changed in the config (weight decay,
    momentum) are kept from the run and the log says so (they were dropped without a word). Another
    optimizer class is refused like another model (AdamW's load stopped on a bare KeyError 'step',
    SGD's first step on 'momentum'), also for a checkpoint that does not name its optimizer's
    class; nothing is overwritten."""
    from detkd.checkpoint import CheckpointMismatchError

    out = tmp_path / "o"
    _run(_small_cfg(out, 2))
    cfg = _small_cfg(out, 4)
    cfg.optimizer.update(weight_decay=0.05, momentum=0.0)
    with caplog.at_level(logging.WARNING, logger="detkd.engine"):
        trainer = KDTrainer(cfg)
        trainer.resume_or_load(resume=True)
    assert "the run's optimizer settings are kept" in caplog.text
    assert (
        "momentum 0.9 (this config: 0.0)" in caplog.text
        and "weight_decay 0.0001 (this config: 0.05)" in caplog.text
    )
    assert {g["momentum"] for g in trainer.optimizer.param_groups} == {0.9}
    assert trainer.start_iter == 2

    adamw = load_config("configs/demo/student_retinanet.py").optimizer
    last = (out / "last_checkpoint").read_text()
    files = sorted(os.listdir(out))
    cfg = _small_cfg(out, 4)
    cfg.optimizer = adamw
    with pytest.raises(
        CheckpointMismatchError,
        match=r"the run's optimizer is torch.optim.sgd.SGD, this config's "
        r"torch.optim.adamw.AdamW.*new train.output_dir",
    ):
        KDTrainer(cfg).resume_or_load(resume=True)
    # a checkpoint that does not name its optimizer's class (other tools, earlier versions)
    path = out / last
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["trainer"]["optimizer_class"]
    torch.save(checkpoint, path)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"optimizer state does not fit this config's torch.optim.adamw.AdamW",
    ):
        KDTrainer(cfg).resume_or_load(resume=True)
    assert (out / "last_checkpoint").read_text() == last and sorted(os.listdir(out)) == files

    # an AdamW run resumed with SGD: the groups lack SGD's settings
    out2 = tmp_path / "a"
    cfg = _small_cfg(out2, 2)
    cfg.optimizer = adamw
    _run(cfg)
    path = out2 / (out2 / "last_checkpoint").read_text()
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["trainer"]["optimizer_class"]
    torch.save(checkpoint, path)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"parameter groups lack \[.*'momentum'.*\], settings of this config's "
        r"torch.optim.sgd.SGD",
    ):
        KDTrainer(_small_cfg(out2, 4)).resume_or_load(resume=True)


def test_amp_on_the_cpu_is_an_error_before_any_hook_runs(tmp_path):
    """train.amp.enabled with train.device='cpu': detectron2's AMPTrainer asserted CUDA at its
    first step, after the hooks' before_train (here the teacher's evaluation had already run and
    been logged); now a ValueError that names the keys, before any hook or step."""
    cfg = _small_cfg(tmp_path / "amp", 2)
    cfg.train.update(device="cpu", teacher_eval_at_start=True)
    cfg.train.amp.enabled = True
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    started = []
    trainer.register_hooks([hooks.CallbackHook(before_train=lambda t: started.append(t.iter))])
    with pytest.raises(
        ValueError, match=r"train.amp.enabled=True, but the model is on 'cpu'.*train.device='cpu'"
    ):
        trainer.train()
    assert started == [] and trainer.iter == 0
    assert (tmp_path / "amp" / "metrics.json").read_text() == ""  # no teacher evaluation logged


def test_train_before_resume_or_load_is_an_error_not_a_random_teacher(tmp_path):
    """KDTrainer(cfg).train() without resume_or_load (which loads train.teacher_checkpoint) would
    distil from the teacher's random initialisation without a word: a clear error, before any
    hook or step, naming the call to make."""
    cfg = _small_cfg(tmp_path / "noload", 1)
    trainer = KDTrainer(cfg)
    started = []
    trainer.register_hooks([hooks.CallbackHook(before_train=lambda t: started.append(t.iter))])
    with pytest.raises(
        RuntimeError, match=r"teacher was not loaded.*resume_or_load\(resume=False\)"
    ):
        trainer.train()
    assert started == []
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert started == [0] and trainer.iter == 1


def _run_without_schedule_state(output_dir, max_iter, interrupt):
    """A run stopped before iteration ``interrupt`` whose last checkpoint (written every 2
    iterations) then loses the LR scheduler's state, as one written by other tools."""
    _run(_small_cfg(output_dir, max_iter), interrupt=interrupt)
    with open(output_dir / "last_checkpoint") as f:
        path = output_dir / f.read().strip()
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["trainer"]["hooks"]["LRScheduler"]
    torch.save(checkpoint, path)


def test_resume_from_a_checkpoint_without_schedule_state_goes_on_from_its_iteration(
    tmp_path, caplog
):
    """A checkpoint whose trainer state lacks the LR scheduler's (other tools, a run without the
    LRScheduler hook): the resumed run trains at the schedule's lr for its iteration, not at
    the warm-up lr of step 0 (1 % of the base lr here), and says so."""
    from detectron2.config import instantiate

    _run_without_schedule_state(tmp_path / "s", max_iter=10, interrupt=4)
    cfg = _small_cfg(tmp_path / "s", 10)
    with caplog.at_level(logging.WARNING, logger="detkd.engine"):
        resumed = _run(cfg, resume=True)
    assert resumed.start_iter == 4
    assert "holds no learning-rate schedule state for iteration 4" in caplog.text
    lr = dict((it, v) for v, it in resumed.storage.history("lr").values())
    multiplier = instantiate(cfg.lr_multiplier)
    assert multiplier(0.0) == pytest.approx(0.01)  # where the schedule would have restarted
    for it in range(4, 10):
        assert lr[it] == pytest.approx(cfg.optimizer.lr * multiplier(it / 10), rel=1e-6), it


def test_teacher_eval_at_start_logs_under_teacher_keys(tmp_path):
    cfg = _small_cfg(tmp_path / "t", max_iter=1)
    cfg.train.teacher_eval_at_start = True
    trainer = _run(cfg)
    hook = [h for h in trainer._hooks if type(h).__name__ == "TeacherEvalHook"][0]
    assert "bbox" in hook.results
    keys = trainer.storage.latest()
    assert "teacher/bbox/AP" in keys or "teacher/bbox/AP50" in keys
    assert (tmp_path / "t" / "inference_teacher").is_dir()
    record = json.loads((tmp_path / "t" / "inference_teacher" / "teacher_eval.json").read_text())
    assert (
        record["teacher_checkpoint"] == ""
        and record["results"]["teacher/bbox/AP50"] == hook.results["bbox"]["AP50"]
    )
    logged = _metrics(str(tmp_path / "t"))
    assert any("teacher/bbox/AP50" in m for m in logged)
    assert any("bbox/AP50" in m for m in logged)  # the student's own, separate


def test_teacher_eval_at_start_is_not_repeated_on_resume(tmp_path):
    """A run stopped before iteration 2 and resumed: the teacher was evaluated once, at the
    start, and its results stay in metrics.json; a resumed run without them (the key turned on
    only now) evaluates it."""

    def hook(trainer):
        return [h for h in trainer._hooks if type(h).__name__ == "TeacherEvalHook"][0]

    cfg = _small_cfg(tmp_path / "t", max_iter=3)
    cfg.train.teacher_eval_at_start = True
    cfg.dataloader.test.dataset.names.num_images = 2
    first = _run(cfg, interrupt=2)
    assert "bbox" in hook(first).results
    resumed = _run(cfg, resume=True)
    assert resumed.start_iter == 2 and hook(resumed).results is None
    logged = [m for m in _metrics(str(tmp_path / "t")) if any(k.startswith("teacher/") for k in m)]
    assert [m["iteration"] for m in logged] == [0]

    plain = _small_cfg(tmp_path / "p", max_iter=3)
    _run(plain, interrupt=2)
    plain.train.teacher_eval_at_start = True
    plain.dataloader.test.dataset.names.num_images = 2
    assert "bbox" in hook(_run(plain, resume=True)).results


def test_teacher_eval_at_start_leaves_the_random_states_unchanged(tmp_path):
    # the evaluation's data loader draws from torch's RNG; the training loader's worker seeds
    # (its flips) and the student's dropout come from the same states: the run must not change
    import random

    import numpy as np
    from detectron2.utils.events import EventStorage

    cfg = _small_cfg(tmp_path / "s", max_iter=1)
    cfg.dataloader.test.dataset.names.num_images = 2
    cfg.train.teacher_eval_at_start = True
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    hook = [h for h in trainer._hooks if type(h).__name__ == "TeacherEvalHook"][0]
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with EventStorage(0) as trainer.storage:
        hook.before_train()
    assert "bbox" in hook.results
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]


def test_no_export_nor_final_evaluation_when_the_last_iteration_fails(tmp_path):
    # TrainerBase.train leaves iter = max_iter - 1 when the last iteration raises
    failed = _run(_small_cfg(tmp_path / "c", 2), interrupt=1)
    assert not (tmp_path / "c" / "model_final_student.pth").exists()
    assert not (tmp_path / "c" / "model_final.pth").exists()
    # detectron2's EvalHook evaluated the unfinished model and logged it as the final bbox/*
    assert not hasattr(failed, "_last_eval_results")
    assert not any("bbox/AP" in m for m in _metrics(str(tmp_path / "c")))
    finished = _run(_small_cfg(tmp_path / "c", 2), resume=True)  # the run then completes: exported
    assert finished.iter == 2 and (tmp_path / "c" / "model_final_student.pth").is_file()
    assert "bbox" in finished._last_eval_results  # and is evaluated
    assert len([m for m in _metrics(str(tmp_path / "c")) if "bbox/AP" in m]) == 1


def test_clip_grad_clips_the_global_norm_at_every_step(tmp_path):
    # train.clip_grad (the DETR configs' 0.1): the gradients the optimizer steps with have a
    # global norm of exactly max_norm when larger; the LR scheduler still wraps optimizer.step.
    norms = {}
    for name, clip in (("raw", None), ("clipped", 1e-3)):
        cfg = _small_cfg(tmp_path / name, max_iter=2)
        if clip:
            cfg.train.clip_grad = dict(enabled=True, max_norm=clip)
        torch.manual_seed(cfg.train.seed)
        trainer = KDTrainer(cfg)
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        seen = norms[name] = []

        def record(opt, args, kwargs, params=params, seen=seen):  # runs after the clip hook
            grads = [p.grad.detach().flatten() for p in params if p.grad is not None]
            seen.append(torch.cat(grads).norm().item())

        trainer.optimizer.register_step_pre_hook(record)
        trainer.resume_or_load(resume=False)
        trainer.train()
        assert len(seen) == 2 and trainer.scheduler.last_epoch == 2
    assert min(norms["raw"]) > 1e-2
    assert norms["clipped"] == pytest.approx([1e-3, 1e-3], rel=1e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_clip_grad_under_amp_clips_the_unscaled_gradients(fused):
    """Under AMP (AMPTrainer: GradScaler.step) the clip applies to the unscaled gradients, also
    for an optimizer that unscales them in its own step (fused=True), which the hook gets
    still scaled (by 1024 here). Gradient (3, 4), norm 5, clipped to 1: SGD with lr 1 steps by
    -(0.6, 0.8); a limit of 100 leaves it at -(3, 4). The fused step once moved by 1/1024 of it."""
    from detkd.engine import _clip_before_step

    for max_norm, expected in ((1.0, [-0.6, -0.8]), (100.0, [-3.0, -4.0])):
        w = torch.nn.Parameter(torch.zeros(2))
        optimizer = torch.optim.SGD([w], lr=1.0, fused=fused)
        _clip_before_step(optimizer, max_norm)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale((w * torch.tensor([3.0, 4.0])).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        assert w.detach().tolist() == pytest.approx(expected, rel=1e-5)


def test_teacher_eval_at_start_feeds_the_teacher_its_own_channel_order(tmp_path):
    # an RGB student with a BGR teacher (configs/ReviewKD's R18 <- MSRA R101): the test loader
    # gives RGB images; the teacher must see them flipped, as in training
    cfg = _small_cfg(tmp_path / "f", max_iter=1)
    cfg.model.student.input_format = "RGB"
    cfg.model.teacher.input_format = "BGR"
    cfg.dataloader.train.mapper.image_format = "RGB"
    cfg.dataloader.test.dataset.names.num_images = 2
    cfg.train.teacher_eval_at_start = True
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    kd = trainer.model
    assert kd.flip_teacher_channels
    seen, preprocess = [], kd.teacher.preprocess_image

    def spy(batched_inputs):
        seen.extend(x["image"].clone() for x in batched_inputs)
        return preprocess(batched_inputs)

    kd.teacher.preprocess_image = spy
    hook = [h for h in trainer._hooks if type(h).__name__ == "TeacherEvalHook"][0]
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as trainer.storage:
        hook.before_train()
    loaded = [x["image"] for batch in KDTrainer.build_test_loader(cfg) for x in batch]
    assert len(seen) == len(loaded) == 2
    for got, rgb in zip(seen, loaded):
        assert torch.equal(got, rgb.flip(0)) and not torch.equal(got, rgb)
    assert "bbox" in hook.results


def test_resume_into_another_configs_run_is_a_clear_error_and_keeps_its_checkpoints(
    tmp_path, caplog
):
    from detkd.checkpoint import CheckpointMismatchError

    out = tmp_path / "r"
    _run(_small_cfg(out, 2))
    files = {
        p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith(("model_", "last_"))
    }
    assert {"model_final.pth", "model_final_student.pth", "last_checkpoint"} <= set(files)
    # e.g. another class count: detectron2 only logged the skipped head weights, and the first
    # optimizer step failed with a raw "size of tensor a (27) must match the size of tensor b (36)"
    cfg = _small_cfg(out, 4)
    cfg.model.student.num_classes = 4
    (tmp_path / "four").mkdir()
    # 4 classes: the checks pass
    four = _own_coco(tmp_path / "four", "detkd_test_four", cat_ids=(3, 7, 42, 50))
    cfg.dataloader.train.dataset.names = cfg.dataloader.test.dataset.names = four
    cfg.dataloader.train.sampler = None
    with pytest.raises(
        CheckpointMismatchError,
        match=r"--resume: the last checkpoint of .*model_final\.pth\) does "
        r"not fit the model of this config \(shape mismatch: student\.head\.cls_score\.weight: "
        r"file \(27, 32, 3, 3\) vs model \(36, 32, 3, 3\).*new train\.output_dir",
    ):
        KDTrainer(cfg).resume_or_load(resume=True)
    # a plain detector's run (e.g. the student trained alone) resumed as a distillation run
    plain = load_config("configs/demo/student_retinanet.py")
    plain.model = tiny_retinanet_cfg(width=8, fpn=32)
    plain.train.update(output_dir=str(tmp_path / "alone"), max_iter=1, eval_period=0)
    plain.dataloader = _small_cfg(out, 4).dataloader
    KDTrainer(plain).train()
    cfg = _small_cfg(tmp_path / "alone", 4)
    with pytest.raises(
        CheckpointMismatchError, match=r"model parameters are not in the file: \['student\."
    ):
        KDTrainer(cfg).resume_or_load(resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in files} == files
    # the same run started again without --resume: a warning that names the flag
    with caplog.at_level(logging.WARNING, logger="detkd.engine"):
        KDTrainer(_small_cfg(out, 4)).resume_or_load(resume=False)
    assert any(
        "--resume was not given" in r.getMessage() and "model_final.pth" in r.getMessage()
        for r in caplog.records
    )


def test_resume_without_last_checkpoint_and_a_new_run_over_another_models_run_keep_the_checkpoints(
    tmp_path,
):
    """--resume in a folder whose checkpoints have no last_checkpoint file (deleted, copied
    there) logged "Starting training from iteration 0" and replaced model_*.pth and the
    export; a run started without --resume over another model's finished run replaced its
    model_final.pth and left a folder of two runs' files, with only a warning. Both are errors
    that name the fix, and leave every file as it was. A new run of the same model there (a
    re-run) still starts again, with the warning."""
    from detkd.checkpoint import CheckpointMismatchError

    out = tmp_path / "r"
    _run(_small_cfg(out, 2))
    (out / "last_checkpoint").unlink()
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith("model_")}
    assert {"model_0000001.pth", "model_final.pth", "model_final_student.pth"} <= set(files)
    with pytest.raises(
        CheckpointMismatchError,
        match=(
            r"--resume: '.*r' holds run checkpoints \(model_0000001\.pth, model_final\.pth\) "
            r"but no "
            r"last_checkpoint file.*`echo model_final\.pth > .*r/last_checkpoint`"
            r".*another train\.output_dir"
        ),
    ):
        KDTrainer(_small_cfg(out, 4)).resume_or_load(resume=True)
    assert {
        p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith(("model_", "last_"))
    } == files
    (out / "last_checkpoint").write_text("model_0000001.pth")  # the fix named: the run goes on
    assert _run(_small_cfg(out, 3), resume=True).start_iter == 2

    files = {
        p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith(("model_", "last_"))
    }
    wider = _small_cfg(out, 2)
    wider.model.student = tiny_retinanet_cfg(width=16, fpn=32)
    with pytest.raises(
        CheckpointMismatchError,
        match=(
            r"'.*r' holds the run of another model \(its last checkpoint .*model_final\.pth "
            r"does not fit "
            r"this config's: shape mismatch: student\.backbone\.fpn_lateral3\.weight: file "
            r"\(32, 16, 1, 1\) vs model \(32, 32, 1, 1\).*Start it in another train\.output_dir"
        ),
    ):
        KDTrainer(wider).resume_or_load(resume=False)
    plain = _small_cfg(out, 2)
    plain.model = tiny_retinanet_cfg(width=8, fpn=32)  # the student alone: no student. prefix
    with pytest.raises(CheckpointMismatchError, match=r"model keys not in the file: \['backbone\."):
        KDTrainer(plain).resume_or_load(resume=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in files} == files
    # the same model: a re-run, also over a checkpoint of an older version without the
    # student's extra state (which --resume accepts too)
    final = torch.load(out / "model_final.pth", weights_only=False)
    assert "_extra_state" in final["model"]
    del final["model"]["_extra_state"]
    torch.save(final, out / "model_final.pth")
    KDTrainer(_small_cfg(out, 2)).resume_or_load(resume=False)
    # a file of one's own named like a checkpoint is no run to continue: --resume starts one
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model_teacher.pth").write_bytes(b"kept")
    assert _run(_small_cfg(mine, 1), resume=True).start_iter == 0
    assert (mine / "model_teacher.pth").read_bytes() == b"kept"


def test_eval_only_without_or_with_wrong_weights_is_an_error(tmp_path):
    base = [
        sys.executable,
        "train_net.py",
        "--config-file",
        "configs/demo/pkd_retinanet.py",
        "--eval-only",
        f"train.output_dir={tmp_path / 'eval'}",
        "dataloader.test.dataset.names.num_images=4",
        "dataloader.test.num_workers=0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(
        base + ["train.init_checkpoint="],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert (
        "CheckpointMismatchError: train.init_checkpoint is empty: there are no weights to evaluate"
        in proc.stderr
    )
    assert not (tmp_path / "eval" / "eval_results.json").exists()


def test_override_typos_are_errors_that_name_the_key():
    from detkd.config_checks import check_override_keys

    cfg = load_config("configs/demo/pkd_retinanet.py")
    # LazyConfig adds such keys silently: the run used the config's max_iter / teacher
    with pytest.raises(
        KeyError, match=r"'train' has no key 'max_ite'\. Did you mean 'train\.max_iter'\?"
    ):
        check_override_keys(cfg, ["train.max_ite=2"])
    with pytest.raises(
        KeyError, match=r"no key 'teacher_chekpoint'\. Did you mean 'train\.teacher_checkpoint'"
    ):
        check_override_keys(cfg, ["train.max_iter=2", "train.teacher_chekpoint=/some/teacher.pth"])
    # a flag typed after the overrides (detectron2's parser takes it as one): Hydra's bare
    # LexerNoViableAltException before
    with pytest.raises(
        ValueError,
        match=r"\['--resume'\] come after the key=value overrides.*put the flags "
        r"\(--config-file, --resume, --eval-only, --num-gpus, \.\.\.\) before them.*"
        r"--config-file <config> --resume key=value",
    ):
        check_override_keys(cfg, ["train.max_iter=2", "--resume"])
    with pytest.raises(
        KeyError,
        match=r"'model\.student' has no key 'num_clases'\. "
        r"Did you mean 'model\.student\.num_classes'",
    ):
        check_override_keys(cfg, ["model.student.num_clases=4"])
    with pytest.raises(
        KeyError,
        match=r"'model\.distillers\.pkd' has no key 'loss_weigth'"
        r".*'model\.distillers\.pkd\.loss_weight'",
    ):
        check_override_keys(cfg, ["model.distillers.pkd.loss_weigth=4"])
    # existing keys, arguments a LazyCall leaves at their default, DetKD's documented keys, +key
    check_override_keys(
        cfg,
        [
            "train.max_iter=2",
            "train.teacher_checkpoint=",
            "model.distillers.pkd.pair_by=index",
            "dataloader.train.dataset.filter_empty=False",
            "dataloader.test.dataset.names.split=heldout",
            "model.teacher_precision=fp16",
            "train.clip_grad.enabled=True",
            "train.clip_grad.max_norm=1.0",
            "optimizer.betas=[0.9,0.99]",
            "+train.my_note=1",
        ],
    )
    # the RetinaNet demo's
    assert "clip_grad" in cfg.train and cfg.train.clip_grad == dict(enabled=True, max_norm=10.0)
    proc = subprocess.run(
        [
            sys.executable,
            "train_net.py",
            "--config-file",
            "configs/demo/pkd_retinanet.py",
            "train.max_ite=2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "Did you mean 'train.max_iter'?" in proc.stderr


def test_override_check_accepts_keys_detectron2_reads_force_adds_and_keys_of_earlier_overrides():
    from detkd.config_checks import check_override_keys

    cfg = load_config("configs/demo/pkd_retinanet.py")
    assert "cudnn_benchmark" not in cfg.train  # read by detectron2's default_setup with a default
    check_override_keys(cfg, ["train.cudnn_benchmark=True"])
    check_override_keys(cfg, ["++train.my_note=1", "++train.max_iter=3"])  # hydra's add-or-override
    # a key that an earlier override of the same command line creates or replaces
    check_override_keys(cfg, ["+train.extra={a:1}", "train.extra.a=2"])
    check_override_keys(
        cfg,
        [
            "model.distillers={pkd:{_target_:detkd.losses.PKDDistiller}}",
            "model.distillers.pkd.loss_weight=5",
        ],
    )
    # the caller's config is untouched; typos are still errors, also after earlier overrides
    assert "extra" not in cfg.train and "my_note" not in cfg.train and cfg.train.max_iter == 1000
    with pytest.raises(KeyError, match=r"'train\.extra' has no key 'b'"):
        check_override_keys(cfg, ["+train.extra={a:1}", "train.extra.b=2"])
    with pytest.raises(KeyError, match=r"Did you mean 'train\.max_iter'\?"):
        check_override_keys(cfg, ["train.cudnn_benchmark=True", "train.max_ite=2"])


@pytest.mark.parametrize(
    "key, value, match",
    [
        (
            "checkpointer.period",
            0,
            r"train\.checkpointer\.period must be an int >= 1.*above train\.max_iter \(2\)",
        ),
        (
            "checkpointer.max_to_keep",
            0,
            r"train\.checkpointer\.max_to_keep must be an int >= 1 .* or None",
        ),
        ("log_period", 0, r"train\.log_period must be an int >= 1"),
        ("eval_period", -1, r"train\.eval_period must be an int >= 0"),
        (
            "clip_grad.max_norm",
            -1.0,
            r"train\.clip_grad\.max_norm must be a number > 0 .*turns every gradient around",
        ),
        ("clip_grad.max_norm", 0, r"train\.clip_grad\.max_norm must be a number > 0"),
    ],
)
def test_train_periods_and_limits_that_fail_late_or_train_wrongly_are_clear_errors(
    tmp_path, key, value, match
):
    """checkpointer.period=0 / log_period=0 stopped the run after its first step with a
    ZeroDivisionError in fvcore / detectron2, max_to_keep=0 on a bare assertion; a clipping limit
    <= 0 trained without a word (-1 flips every gradient, 0 zeroes them)."""
    from omegaconf import OmegaConf

    cfg = _small_cfg(tmp_path / "run", 2)
    cfg.train.clip_grad.enabled = True
    OmegaConf.update(cfg.train, key, value)
    with pytest.raises(ValueError, match=match):
        KDTrainer(cfg)
    assert not (tmp_path / "run").exists()
    cfg.train.clip_grad.enabled = False
    if key.startswith("clip_grad"):
        KDTrainer(cfg)  # the limit is not read without clipping
    else:  # a whole number written as a float (train.checkpointer.period=1e3) is fine
        OmegaConf.update(cfg.train, key, 1000.0)
        KDTrainer(cfg)


def test_cuda_device_without_cuda_and_a_folder_as_checkpoint_are_clear_errors(tmp_path):
    from detkd.checkpoint import CheckpointMismatchError, TeacherCheckpointError

    cfg = _small_cfg(tmp_path / "run", 2)
    if not torch.cuda.is_available():  # the COCO configs' train.device on a machine without CUDA
        cfg.train.device = "cuda"
        with pytest.raises(
            RuntimeError,
            match=r"train\.device='cuda', but torch finds no CUDA GPU.*train\.device=cpu",
        ):
            KDTrainer.build_model(cfg)
        cfg.train.device = "cpu"
    # a folder given as a checkpoint: "Checkpoint ... not found!" named a path that exists
    folder = tmp_path / "teacher_run"
    folder.mkdir()
    (folder / "model_final.pth").write_bytes(b"")
    cfg.train.update(teacher_checkpoint=str(folder), teacher_random_init=False)
    trainer = KDTrainer(cfg)
    with pytest.raises(
        TeacherCheckpointError,
        match=r"it is a folder, not a checkpoint file: set "
        r"train\.teacher_checkpoint to the file in it \(e\.g\. .*teacher_run/model_final\.pth; "
        r"the folder holds model_final\.pth\)",
    ):
        trainer.resume_or_load(resume=False)
    cfg.train.update(teacher_checkpoint="", teacher_random_init=True, init_checkpoint=str(tmp_path))
    with pytest.raises(
        CheckpointMismatchError,
        match=r"it is a folder, not a checkpoint file: set train\.init_checkpoint",
    ):
        KDTrainer(cfg).resume_or_load(resume=False)
    # --resume: last_checkpoint empty, or naming a folder (both "does not exist")
    cfg.train.init_checkpoint = ""
    out = tmp_path / "run"
    (out / "inference").mkdir(parents=True)
    for content, problem in (
        ("", "is not a file: last_checkpoint is empty"),
        ("inference", "is a folder"),
    ):
        (out / "last_checkpoint").write_text(content)
        with pytest.raises(
            CheckpointMismatchError,
            match=rf"--resume: the last checkpoint of .*, {problem}\. "
            r"To continue, there is no other checkpoint there",
        ):
            KDTrainer(cfg).resume_or_load(resume=True)


def test_a_yacs_config_or_a_lazyconfig_without_a_section_is_a_clear_error(tmp_path):
    """A model-zoo .yaml as --config-file ended in omegaconf's "Missing key train"; a LazyConfig
    without `optimizer` in "Missing key optimizer" after config.yaml and log.txt were written."""
    from detectron2 import model_zoo

    from detkd.config_checks import check_config_sections

    yaml_file = model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    proc = subprocess.run(
        [
            sys.executable,
            "train_net.py",
            "--config-file",
            yaml_file,
            "train.max_iter=2",
            f"train.output_dir={tmp_path / 'yacs'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert re.search(
        r"ValueError: .*retinanet_R_50_FPN_1x\.yaml is a yacs config "
        r"\(it has \['MODEL', '_BASE_'\]\).*"
        r"build_yacs_detector",
        proc.stderr,
    ), proc.stderr[-2000:]
    assert not (tmp_path / "yacs").exists()
    cfg = load_config("configs/demo/student_retinanet.py")
    del cfg["optimizer"], cfg["lr_multiplier"]
    with pytest.raises(
        ValueError,
        match=r"x\.py defines no optimizer, lr_multiplier: a LazyConfig run reads model, "
        r"dataloader, train, optimizer, lr_multiplier at its top level \(training\)",
    ):
        check_config_sections(cfg, "x.py")
    check_config_sections(cfg, "x.py", training=False)  # --eval-only reads neither
    del cfg["dataloader"]
    with pytest.raises(ValueError, match=r"defines no dataloader: .*\(--eval-only\)"):
        check_config_sections(cfg, "x.py", training=False)
    check_config_sections(load_config("configs/demo/pkd_retinanet.py"), "pkd_retinanet.py")
    own = load_config("configs/demo/pkd_retinanet.py")
    own.DATASETS = dict(train="shapes_train")  # a .py config's own dict named like a yacs section
    check_config_sections(own, "mine.py")
    with pytest.raises(ValueError, match="is a yacs config"):
        check_config_sections(own, "mine.yaml")


def test_a_sweep_override_and_a_distillers_dict_that_would_merge_are_clear_errors():
    """``optimizer.lr=1,5`` (a Hydra sweep) failed in omegaconf without naming the override;
    ``model.distillers={gid:{...}}`` on the PKD config merged (PKD and GID ran, rc 0) and
    ``model.distillers={}`` ran PKD."""
    from detectron2.config import LazyConfig

    from detkd.config_checks import check_override_keys

    from omegaconf import OmegaConf

    cfg = load_config("configs/demo/pkd_retinanet.py")
    with pytest.raises(
        ValueError, match=r"'optimizer\.lr=1,5' is a Hydra sweep.*1\.5, not 1,5.*\[1,5\]"
    ):
        check_override_keys(cfg, ["optimizer.lr=1,5"])
    merged = LazyConfig.apply_overrides(
        load_config("configs/demo/pkd_retinanet.py"),
        ["model.distillers={gid:{_target_:detkd.losses.GIDDistiller}}"],
    )
    # what LazyConfig does
    assert sorted(OmegaConf.to_container(merged.model.distillers)) == ["gid", "pkd"]
    for value in ("{}", "{gid:{_target_:detkd.losses.GIDDistiller}}"):
        with pytest.raises(
            ValueError,
            match=r"a dict override merges into the config's model\.distillers.*"
            r"\['pkd'\] would still run.*configs/demo/",
        ):
            check_override_keys(cfg, [f"model.distillers={value}"])
    # accepted: the config's distillers named (replaced or extended), or one added by its key
    check_override_keys(
        cfg, ["model.distillers={pkd:{loss_weight:2},gid:{_target_:detkd.losses.GIDDistiller}}"]
    )
    check_override_keys(cfg, ["+model.distillers.gid={_target_:detkd.losses.GIDDistiller}"])
    check_override_keys(cfg, ["optimizer.betas=[0.9,0.99]", "train.output_dir='a,b'"])


class _NaNGradient(hooks.HookBase):
    """At iteration ``at`` the gradient of one student weight is NaN while the loss is finite
    (e.g. the backward of a sqrt at 0): the step writes NaN into the weights and detectron2's
    loss check only stops the run at the next iteration."""

    def __init__(self, at):
        self.at = at

    def before_train(self):
        weight = self.trainer.model.student.head.cls_score.weight
        weight.register_hook(lambda g: g * float("nan") if self.trainer.iter == self.at else g)


@pytest.mark.parametrize("clip", [False, True])
def test_a_diverged_step_never_replaces_the_last_good_checkpoint(tmp_path, clip):
    out = tmp_path / "nan"
    cfg = _small_cfg(out, max_iter=4)
    cfg.train.checkpointer.update(period=1, max_to_keep=1)  # a save after every step, keep one
    cfg.train.clip_grad = dict(enabled=clip, max_norm=10.0)
    torch.manual_seed(cfg.train.seed)
    trainer = KDTrainer(cfg)
    trainer.register_hooks([_NaNGradient(at=1)])
    trainer.resume_or_load(resume=False)
    # clipping scales every gradient by max_norm / (a NaN global norm): every weight is NaN, and
    # the advice is a lower limit, not clipping
    bad = (
        r"\d+ weights are NaN or inf \(\['student\.backbone"
        if clip
        else (r"1 weights are NaN or inf \(\['student\.head\.cls_score\.weight'\]\)")
    )
    advice = (
        r"a lower train\.clip_grad\.max_norm \(now 10\)"
        if clip
        else r"train\.clip_grad\.enabled=True"
    )
    with pytest.raises(
        FloatingPointError,
        match=r"Checkpoint 'model_0000001' not written: the training diverged, "
        + bad
        + r".*\. The last checkpoint "
        r"is still .*model_0000000\.pth: continue from it with --resume and "
        + advice
        + r" \(--resume keeps the run's base lr: "
        r"for a lower optimizer\.lr, start a new run from it, "
        r"train\.init_checkpoint=.*model_0000000\.pth, in another "
        r"train\.output_dir\)\.$",
    ):
        trainer.train()
    # before: model_0000001.pth with NaN weights was tagged last and model_0000000.pth deleted
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"
    assert (
        not (out / "model_0000001.pth").exists() and not (out / "model_final_student.pth").exists()
    )
    saved = torch.load(out / "model_0000000.pth", weights_only=False)
    assert saved["iteration"] == 0
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    resumed = KDTrainer(_small_cfg(out, max_iter=4))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 1


def test_a_failed_checkpoint_write_keeps_the_file_it_would_replace(tmp_path, monkeypatch):
    # a run trained further (max_iter 2 -> 4) writes model_final.pth again; a full disk while
    # writing it used to leave a truncated model_final.pth where the finished run's was
    out = tmp_path / "longer"
    _run(_small_cfg(out, max_iter=2))
    before = (out / "model_final.pth").read_bytes()
    save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if os.path.basename(getattr(f, "name", str(f))).startswith("model_final"):
            f.write(b"\0" * 1000)
            raise OSError(28, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    trainer = KDTrainer(_small_cfg(out, max_iter=4))
    trainer.resume_or_load(resume=True)
    with pytest.raises(OSError, match="No space left on device"):
        trainer.train()
    monkeypatch.undo()
    assert (out / "model_final.pth").read_bytes() == before
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 1
    # last_checkpoint names the last complete file: the periodic one of iteration 3
    assert (out / "last_checkpoint").read_text() == "model_0000003.pth"
    assert torch.load(out / "model_0000003.pth", weights_only=False)["iteration"] == 3
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []


def test_resume_from_a_damaged_or_missing_last_checkpoint_names_it_and_the_fix(tmp_path):
    from detkd.checkpoint import CheckpointMismatchError

    out = tmp_path / "damaged"
    _run(_small_cfg(out, max_iter=4), interrupt=3)  # checkpoints of iterations 1 (and none else)
    _run(_small_cfg(out, max_iter=4), resume=True)  # then 3 and final
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    data = (out / "model_final.pth").read_bytes()
    (out / "model_final.pth").write_bytes(data[: len(data) // 2])  # e.g. a partial copy
    # before: torch's "PytorchStreamReader failed reading zip archive", naming no file
    with pytest.raises(
        CheckpointMismatchError,
        match=r"--resume: the last checkpoint of .*, .*model_final\.pth, "
        r"cannot be read \(RuntimeError: .*\); it is damaged\. To continue, resume from another "
        r"checkpoint there \(model_0000001\.pth, model_0000003\.pth\) by writing its name into "
        r".*last_checkpoint",
    ):
        KDTrainer(_small_cfg(out, max_iter=4)).resume_or_load(resume=True)
    (out / "model_final.pth").unlink()
    # before: AssertionError "Checkpoint ... not found!"
    with pytest.raises(
        CheckpointMismatchError,
        match=r"model_final\.pth, does not exist\. To continue, resume "
        r"from another checkpoint there \(model_0000001\.pth, model_0000003\.pth\)",
    ):
        KDTrainer(_small_cfg(out, max_iter=4)).resume_or_load(resume=True)
    # the fix the message gives works
    (out / "last_checkpoint").write_text("model_0000003.pth")
    trainer = KDTrainer(_small_cfg(out, max_iter=4))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 4


def test_a_distilled_run_and_its_baseline_of_one_seed_see_the_same_data_and_initialisation(
    tmp_path,
):
    # The teacher's and the adapters' initialisation draw from torch's RNG after the student's:
    # the training loader's worker seeds (its random flips) came from what they left, so a
    # distilled run flipped other images than its baseline of the same seed.
    import detectron2.data.transforms as T
    from detectron2.utils.env import seed_all_rng

    def first_batches(cfg):
        cfg.dataloader.train.mapper.augmentations = [L(T.RandomFlip)(horizontal=True)]
        cfg.dataloader.train.update(num_workers=1, total_batch_size=2)
        seed_all_rng(cfg.train.seed)  # as default_setup does
        trainer = KDTrainer(cfg)
        it = iter(trainer._trainer.data_loader)
        batches = [[(x["image_id"], x["image"].clone()) for x in next(it)] for _ in range(8)]
        return trainer, batches

    distilled = _small_cfg(tmp_path / "kd", max_iter=1)
    baseline = _small_cfg(tmp_path / "base", max_iter=1)
    baseline.model = baseline.model.student
    kd_trainer, kd_batches = first_batches(distilled)
    base_trainer, base_batches = first_batches(baseline)

    kd_student = kd_trainer.model.student.state_dict()
    for k, v in base_trainer.model.state_dict().items():
        assert torch.equal(v, kd_student[k]), k
    mirrored = set()  # images seen both ways: the flips are random, and the same in both runs
    for kd_batch, base_batch in zip(kd_batches, base_batches):
        for (kd_id, kd_img), (base_id, base_img) in zip(kd_batch, base_batch):
            assert kd_id == base_id
            assert torch.equal(kd_img, base_img), kd_id
            for other_id, other in (x for b in base_batches for x in b):
                if other_id == kd_id and torch.equal(other, kd_img.flip(-1)):
                    mirrored.add(kd_id)
    assert mirrored


def test_a_refused_resume_keeps_the_runs_config_yaml(tmp_path):
    """`--resume` with another config into a run's folder is refused "before anything is
    overwritten" (README), and its message says to resume with the config of that run; but
    default_setup had already replaced the folder's config.yaml, that config's only record,
    by the refused one (here GID's for a PKD run)."""
    out = tmp_path / "run"
    common = [
        f"train.output_dir={out}",
        "train.teacher_checkpoint=",
        "train.teacher_random_init=True",
        "dataloader.train.dataset.names.num_images=8",
        "dataloader.test.dataset.names.num_images=4",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "dataloader.train.total_batch_size=4",
        "train.eval_period=0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="2")

    def train_net(config, *extra):
        return subprocess.run(
            [sys.executable, "train_net.py", "--config-file", config, *extra, *common],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    proc = train_net("configs/demo/pkd_retinanet.py", "train.max_iter=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = (out / "config.yaml").read_bytes()
    assert b"PKDDistiller" in written and b"GIDDistiller" not in written
    proc = train_net("configs/demo/gid_retinanet.py", "--resume", "train.max_iter=4")
    assert proc.returncode != 0
    assert "It was written by another model or config" in proc.stderr
    assert (out / "config.yaml").read_bytes() == written


def test_train_net_names_misplaced_flags_bad_last_checkpoints_of_eval_only_and_model_changes(
    tmp_path, monkeypatch
):
    """train_net.py: a --config-file after the overrides (or none) failed with detectron2's
    "Config file  has to be a python or yaml file"; --eval-only --resume with a last_checkpoint
    naming a missing file or an empty one blamed train.init_checkpoint, which it had not read,
    and with checkpoints but no last_checkpoint evaluated train.init_checkpoint; --resume with
    other model settings (a distiller's loss_weight) replaced the run's config.yaml without a
    word."""
    from detectron2.config import LazyConfig
    from detectron2.engine import default_argument_parser

    from detkd.checkpoint import CheckpointMismatchError

    monkeypatch.syspath_prepend(REPO)
    import train_net

    config = os.path.join(REPO, "configs/demo/pkd_retinanet.py")
    parse = default_argument_parser().parse_args
    with pytest.raises(
        ValueError,
        match=r"\['--config-file'\] come after the key=value overrides.*e\.g\. "
        r"train_net\.py --config-file <config> key=value \.\.\.$",
    ):
        train_net.main(parse(["train.max_iter=1", "--config-file", config]))
    with pytest.raises(ValueError, match=r"No config file: give one with --config-file"):
        train_net.main(parse(["train.max_iter=1"]))
    # the separator detkd.demo takes before its overrides: detectron2's parser keeps it among them
    # (a misplaced-flag error before); a leading one is dropped, so the overrides are checked
    assert parse(["--config-file", config, "--", "train.max_ite=1"]).opts[0] == "--"
    with pytest.raises(KeyError, match=r"'train' has no key 'max_ite'"):
        train_net.main(parse(["--config-file", config, "--", "train.max_ite=1"]))
    with pytest.raises(
        ValueError,
        match=r"'--' among the key=value overrides \['train\.max_iter=1', '--', "
        r"'train\.seed=2'\].*Drop it",
    ):
        train_net.main(parse(["--config-file", config, "train.max_iter=1", "--", "train.seed=2"]))

    out = tmp_path / "run"
    out.mkdir()
    (out / "model_0000001.pth").write_bytes(b"a checkpoint")
    (out / "config.yaml").write_bytes(b"the run's config")

    def eval_only_resume():
        train_net.main(
            parse(
                [
                    "--config-file",
                    config,
                    "--eval-only",
                    "--resume",
                    f"train.output_dir={out}",
                    "dataloader.test.dataset.names.num_images=4",
                    "dataloader.test.num_workers=0",
                ]
            )
        )

    with pytest.raises(
        CheckpointMismatchError,
        match=r"holds run checkpoints \(model_0000001\.pth\) but no last_checkpoint",
    ):
        eval_only_resume()
    # a training --resume is refused before default_setup writes config.yaml and the logs
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model_0000001.pth").write_bytes(b"a checkpoint")
    with pytest.raises(
        CheckpointMismatchError,
        match=r"holds run checkpoints \(model_0000001\.pth\) but no last_checkpoint",
    ):
        train_net.main(parse(["--config-file", config, "--resume", f"train.output_dir={bare}"]))
    assert [p.name for p in bare.iterdir()] == ["model_0000001.pth"]
    for tag, problem in (
        ("model_9999999.pth", "does not exist"),
        ("", "is not a file: last_checkpoint is empty"),
    ):
        (out / "last_checkpoint").write_text(tag)
        with pytest.raises(
            CheckpointMismatchError,
            match=(
                rf"^--resume: the last checkpoint of '.*run', .*run/{re.escape(tag)}, "
                rf"{problem}\. To continue, "
                r"resume from another checkpoint there \(model_0000001\.pth\) by writing its "
                r"name into"
            ),
        ):
            eval_only_resume()
    assert (
        out / "config.yaml"
    ).read_bytes() == b"the run's config"  # refused before it was replaced

    # --resume with another distiller weight: the warning names the key and both values
    cfg = LazyConfig.load(config)
    cfg.train.output_dir = str(out)
    cfg.model.distillers.pkd.loss_weight = 1.0
    LazyConfig.save(cfg, str(out / "config.yaml"))
    run_config = (out / "config.yaml").read_bytes()
    assert train_net._model_change(cfg, run_config) is None
    cfg.model.distillers.pkd.loss_weight = 100.0
    LazyConfig.save(cfg, str(out / "config.yaml"))  # what default_setup writes
    change = train_net._model_change(cfg, run_config)
    assert "model.distillers.pkd.loss_weight: 1.0 (this config: 100.0)" in change, change
    assert change.count("(this config:") == 1


@pytest.mark.parametrize("failure", ["teacher path", "amp on the cpu"])
def test_a_new_run_failing_at_startup_keeps_the_finished_runs_files(tmp_path, monkeypatch, failure):
    """A run started again (no --resume) in a finished run's folder that fails before training
    replaced the folder's config.yaml, the only record of the checkpoints' config, by its own;
    the checkpoints and the tag were kept. Failures in construction (a wrong teacher path) and,
    after it, in train()'s checks before the first step (train.amp.enabled on the CPU)."""
    from detectron2.engine import default_argument_parser

    monkeypatch.syspath_prepend(REPO)
    import train_net

    out = tmp_path / "run"
    out.mkdir()
    kept = {
        "model_final.pth": b"run",
        "model_final_student.pth": b"student",
        "last_checkpoint": b"model_final.pth",
        "config.yaml": b"the run's config",
    }
    for name, data in kept.items():
        (out / name).write_bytes(data)
    if failure == "teacher path":
        opts, error = [f"train.teacher_checkpoint={tmp_path / 'missing_teacher.pkl'}"], (
            RuntimeError,
            "missing_teacher.pkl",
        )
    else:
        opts = [
            "train.teacher_checkpoint=",
            "train.teacher_random_init=True",
            "train.amp.enabled=True",
        ]
        error = (ValueError, "train.amp.enabled=True, but the model is on 'cpu'")
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            os.path.join(REPO, "configs/demo/pkd_retinanet.py"),
            f"train.output_dir={out}",
            "dataloader.train.dataset.names.num_images=4",
            "dataloader.test.dataset.names.num_images=4",
            "dataloader.train.num_workers=0",
            "dataloader.test.num_workers=0",
            *opts,
        ]
    )
    with pytest.raises(error[0], match=error[1]):
        train_net.main(args)
    assert {name: (out / name).read_bytes() for name in kept} == kept


def test_a_new_run_failing_after_its_first_checkpoint_keeps_its_own_config_yaml(
    tmp_path, monkeypatch
):
    """The other side of the test above: a run in a finished run's folder that wrote a
    checkpoint before failing (here at its third step, checkpoints every step) replaced the
    folder's checkpoints with its own, so its config.yaml stays (not the run's before it)."""
    from detectron2.engine import default_argument_parser

    monkeypatch.syspath_prepend(REPO)
    import train_net

    out = tmp_path / "run"
    out.mkdir()
    for name, data in {
        "last_checkpoint": b"model_0000001.pth",
        "config.yaml": b"the run's config",
    }.items():
        (out / name).write_bytes(data)
    step = train_net.KDTrainer.run_step

    def failing_step(trainer):
        if trainer.iter == 2:
            raise FloatingPointError("stopped at step 2")
        step(trainer)

    monkeypatch.setattr(train_net.KDTrainer, "run_step", failing_step)
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            os.path.join(REPO, "configs/demo/pkd_retinanet.py"),
            f"train.output_dir={out}",
            "train.teacher_checkpoint=",
            "train.teacher_random_init=True",
            "train.checkpointer.period=1",
            "dataloader.train.dataset.names.num_images=4",
            "dataloader.test.dataset.names.num_images=4",
            "dataloader.train.num_workers=0",
            "dataloader.test.num_workers=0",
            "dataloader.train.total_batch_size=2",
        ]
    )
    with pytest.raises(FloatingPointError, match="stopped at step 2"):
        train_net.main(args)
    assert (
        out / "last_checkpoint"
    ).read_bytes() == b"model_0000001.pth"  # the same name, rewritten
    assert torch.load(out / "model_0000001.pth", weights_only=False)["iteration"] == 1
    assert b"PKDDistiller" in (out / "config.yaml").read_bytes()


def test_finished_run_exports_the_student_even_if_the_final_evaluation_fails(tmp_path):
    # a test set that fails to load at the final evaluation, after training (here a registered
    # one whose loader reads at the startup checks and raises afterwards, as a json removed
    # during the run): the finished run's student must still be exported (it was not: the export
    # hook ran after the evaluation hook, and TrainerBase stops at the first after_train that
    # raises)
    from detectron2.data import DatasetCatalog

    calls = []

    def broken():
        calls.append(1)
        if len(calls) == 1:  # KDTrainer's check that the test set has images
            return [{"file_name": "x.png", "image_id": 0, "height": 64, "width": 64}]
        raise RuntimeError("detkd_test_broken_dataset: unreadable annotations")

    if "detkd_test_broken_dataset" in DatasetCatalog.list():
        DatasetCatalog.remove("detkd_test_broken_dataset")
    DatasetCatalog.register("detkd_test_broken_dataset", broken)
    cfg = _small_cfg(tmp_path / "e", max_iter=2)
    cfg.dataloader.test.dataset.names = "detkd_test_broken_dataset"
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    with pytest.raises(RuntimeError, match="unreadable annotations"):
        trainer.train()
    exported = torch.load(tmp_path / "e" / "model_final_student.pth", weights_only=False)["model"]
    final = torch.load(tmp_path / "e" / "model_final.pth", weights_only=False)["model"]
    student = {k[len("student.") :]: v for k, v in final.items() if k.startswith("student.")}
    assert sorted(exported) == sorted(student)
    for k, v in student.items():
        assert torch.equal(exported[k], v), k


def test_unregistered_test_dataset_fails_before_training(tmp_path):
    # a misspelt dataloader.test name would otherwise surface only at the first evaluation
    # (by default after the whole run): KDTrainer refuses it before building anything
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    if "detkd_test_mini_val" not in DatasetCatalog.list():
        register_coco_instances(
            "detkd_test_mini_val", {}, str(tmp_path / "val.json"), str(tmp_path)
        )
    cfg = _small_cfg(tmp_path / "u", max_iter=2)
    for names in ("detkd_test_mini_vall", ["detkd_test_mini_val", "detkd_test_mini_vall"]):
        cfg.dataloader.test.dataset.names = names
        with pytest.raises(
            ValueError,
            match=r"'detkd_test_mini_vall' is not registered \(did you mean "
            r"'detkd_test_mini_val'[,?].*register_coco_instances",
        ):
            KDTrainer(cfg)
    assert not (tmp_path / "u").exists() or not any((tmp_path / "u").iterdir())
    cfg.dataloader.test.dataset.names = ["detkd_test_mini_val", "coco_2017_val"]  # registered: fine
    from detkd.config_checks import check_test_datasets, check_train_datasets

    check_test_datasets(cfg)
    # a misspelt training dataset: named with the close ones before the models are built (not
    # detectron2's KeyError listing every builtin dataset once the loader is built)
    check_train_datasets(cfg)  # the shapes LazyCall registers the name it gives: fine
    cfg.dataloader.train.dataset.names = ["coco_2017_val", "detkd_test_mini_vall"]
    with pytest.raises(ValueError) as e:
        KDTrainer(cfg)
    assert str(e.value).startswith(
        "dataloader.train.dataset.names: dataset 'detkd_test_mini_vall' is not registered (did "
        "you mean 'detkd_test_mini_val'"
    )
    assert str(e.value).endswith(
        "so there is no training data. Register it (e.g. register_coco_instances in the config) "
        "or fix the name."
    )
    assert not (tmp_path / "u").exists() or not any((tmp_path / "u").iterdir())


def _coco_json(path, classes):
    """A COCO-format file of 2 images with one box each, categories ``classes`` (ids 1..K)."""
    images = [{"id": i, "file_name": f"im{i}.png", "height": 64, "width": 64} for i in (1, 2)]
    anns = [
        {
            "id": i,
            "image_id": i,
            "category_id": 1 + (i % len(classes)),
            "bbox": [4, 4, 20, 20],
            "area": 400,
            "iscrowd": 0,
        }
        for i in (1, 2)
    ]
    cats = [{"id": i + 1, "name": c} for i, c in enumerate(classes)]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(path)


def test_student_class_count_must_match_the_training_data(tmp_path):
    # a 3-class student on a 2-class dataset trained silently (class 2 never positive, a wrong
    # evaluation mapping); the classes are compared once the training data is loaded
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    for name, classes in (
        ("detkd_test_two", ["cat", "dog"]),
        ("detkd_test_three", ["a", "b", "c"]),
    ):
        if name not in DatasetCatalog.list():
            register_coco_instances(
                name, {}, _coco_json(tmp_path / f"{name}.json", classes), str(tmp_path)
            )
    cfg = _small_cfg(tmp_path / "c", max_iter=2)
    assert cfg.model.student.num_classes == 3
    cfg.dataloader.train.dataset.names = "detkd_test_two"
    with pytest.raises(
        ValueError,
        match=r"The student predicts 3 classes but the training dataset "
        r"'detkd_test_two' has 2 \(cat, dog\)\. Set model\.student\.num_classes = 2",
    ):
        KDTrainer(cfg)
    cfg.dataloader.train.dataset.names = cfg.dataloader.test.dataset.names = "detkd_test_three"
    KDTrainer(cfg)  # 3 and 3: accepted
    # an R-CNN's classes are its ROI heads'; the message names that key, under model.student
    # in a distillation config and under model in a plain detector's (a teacher's, a baseline's:
    # they have no model.student, and train_net.py refuses that override there)
    from detectron2.config import instantiate

    from detkd.config_checks import check_student_classes

    from conftest import tiny_faster_rcnn_cfg

    rcnn = instantiate(tiny_faster_rcnn_cfg())
    assert rcnn.roi_heads.num_classes == 3
    check_student_classes(cfg, rcnn)
    cfg.dataloader.train.dataset.names = ["detkd_test_three", "detkd_test_two"]
    with pytest.raises(ValueError) as e:
        check_student_classes(cfg, rcnn)
    msg = str(e.value)
    assert msg == (
        "The model predicts 3 classes but the training dataset 'detkd_test_two' has 2 "
        "(cat, dog). Set model.roi_heads.num_classes = 2."
    ), msg


def test_loader_channel_order_must_match_the_students(tmp_path):
    # an RGB student (torchvision-converted weights, as configs/PKD/retinanet_R18_from_mask_rcnn_
    # R101_2x.py) whose loader was left at detectron2's BGR trained silently on swapped channels,
    # and its BGR teacher got the images flipped from the student's declared order: RGB. Refused
    # before training, for either key forgotten, a test loader of its own, and a plain detector.
    from detectron2.config import instantiate

    from detkd.config_checks import check_input_format

    cfg = _small_cfg(tmp_path / "f", max_iter=2)
    assert cfg.model.student.get("input_format", "BGR") == "BGR"
    cfg.model.student.input_format = "RGB"  # the loader left at BGR
    with pytest.raises(
        ValueError,
        match=r"dataloader\.train\.mapper\.image_format is 'BGR' but the "
        r"student takes 'RGB' images \(model\.student\.input_format\).*"
        r"teacher's images would be flipped.*torchvision.*'RGB'",
    ):
        KDTrainer(cfg)
    cfg.dataloader.train.mapper.image_format = "RGB"  # the test loader's follows (coco.py)
    trainer = KDTrainer(cfg)  # both RGB: accepted, and the BGR teacher gets them flipped
    assert unwrap_model(trainer.model).flip_teacher_channels
    cfg.dataloader.test.mapper.image_format = "BGR"  # a test loader of its own, left at BGR
    with pytest.raises(
        ValueError, match=r"dataloader\.test\.mapper\.image_format is 'BGR' but the student"
    ):
        check_input_format(cfg, trainer.model)
    check_input_format(cfg, trainer.model, splits=("train",))
    # a student without input_format (detectron2's FCOS): model.student_input_format is its order
    cfg.model.student_input_format = "RGB"
    kd = instantiate(cfg.model)
    kd.student.input_format = None  # as detectron2's FCOS, which has no such attribute
    with pytest.raises(
        ValueError,
        match=r"'BGR' but the student takes 'RGB' images \(model\.student_input_format\)",
    ):
        check_input_format(cfg, kd)
    # a plain detector (a baseline, a teacher): its own input_format
    cfg.model.student.input_format = "BGR"
    plain = instantiate(cfg.model.student)
    check_input_format(cfg, plain, splits=("test",))
    with pytest.raises(
        ValueError,
        match=r"dataloader\.train\.mapper\.image_format is 'RGB' but the model "
        r"takes 'BGR' images \(model\.input_format\)",
    ):
        check_input_format(cfg, plain)
    # a loader in another colour space (detectron2's "YUV-BT.601": float64 images) stopped the
    # first step in the teacher's first convolution on "expected scalar type Double but found
    # Float"; refused before training too. "L" (grey, broadcast over the 3 channels) is no mismatch.
    cfg.dataloader.train.mapper.image_format = "YUV-BT.601"
    match = (
        r"dataloader\.train\.mapper\.image_format is 'YUV-BT\.601' but the model takes 'BGR' "
        r"images \(model\.input_format\): its images would reach it in YUV-BT\.601.*'BGR'"
    )
    with pytest.raises(ValueError, match=match):
        check_input_format(cfg, plain)
    cfg.model.student_input_format = None
    with pytest.raises(ValueError, match=r"'YUV-BT\.601' but the student takes 'BGR' images"):
        KDTrainer(cfg)
    cfg.dataloader.train.mapper.image_format = "L"
    check_input_format(cfg, plain)


def test_channel_order_of_a_plain_model_names_no_teacher_and_other_formats_are_not_checked():
    # a plain detector has no teacher whose images could be flipped; a model that declares
    # neither RGB nor BGR (e.g. "L") is not compared with its loader
    from types import SimpleNamespace

    from detkd.config_checks import check_input_format

    cfg = load_config("configs/demo/pkd_retinanet.py")
    assert cfg.dataloader.train.mapper.image_format == "BGR"
    with pytest.raises(ValueError) as e:
        check_input_format(cfg, SimpleNamespace(input_format="RGB"))
    assert str(e.value).startswith(
        "dataloader.train.mapper.image_format is 'BGR' but the model takes 'RGB' images "
        "(model.input_format): its images would reach it with the channels swapped. Set both "
    )
    check_input_format(cfg, SimpleNamespace(input_format="L"))
    del cfg.dataloader.test  # no test loader: only the training loader is compared
    check_input_format(cfg, SimpleNamespace(input_format="BGR"))


def test_eval_only_refuses_a_test_loader_in_another_channel_order(tmp_path):
    # --eval-only evaluated the BGR demo student on RGB images without a word
    from detectron2.config import instantiate

    from detkd.checkpoint import save_student

    ckpt = tmp_path / "student.pth"
    save_student(instantiate(load_config("configs/demo/pkd_retinanet.py").model.student), str(ckpt))
    cmd = [
        sys.executable,
        "train_net.py",
        "--config-file",
        "configs/demo/pkd_retinanet.py",
        "--eval-only",
        f"train.output_dir={tmp_path / 'eval'}",
        "dataloader.test.dataset.names.num_images=4",
        "dataloader.test.num_workers=0",
        f"train.init_checkpoint={ckpt}",
        "dataloader.test.mapper.image_format=RGB",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert (
        "ValueError: dataloader.test.mapper.image_format is 'RGB' but the student takes 'BGR' "
        "images (model.student.input_format)"
    ) in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "eval" / "eval_results.json").exists()


def test_kd_diag_pearson_in_metrics_json_is_the_value_of_its_iteration(tmp_path):
    # kd_diag/pearson_<level> is logged every diag_period iterations only: with detectron2's
    # default smoothing, metrics.json / TensorBoard showed the median of the last 20 logged values
    # (20 * diag_period iterations) under each iteration, not that iteration's correlation.
    import numpy as np
    from detectron2.checkpoint import DetectionCheckpointer

    from detkd.utils import unwrap_model

    out = tmp_path / "d"
    cfg = _small_cfg(out, max_iter=3)
    cfg.model.diag_period = 2
    trainer = _run(cfg)
    logged = {
        m["iteration"]: m["kd_diag/pearson_p3"]
        for m in _metrics(str(out))
        if "kd_diag/pearson_p3" in m
    }
    assert sorted(logged) == [0, 2]
    # independently: the student before iteration 2's step (model_0000001.pth, saved after
    # iteration 1) and the frozen teacher on the batch (every batch is the same 4 images)
    kd = unwrap_model(trainer.model)
    model = KDTrainer.build_model(cfg)
    DetectionCheckpointer(model).load(str(out / "model_0000001.pth"))
    batch = next(iter(KDTrainer.build_train_loader(cfg)))
    with torch.no_grad():
        student = model.student.train()
        s = student.backbone(student.preprocess_image(batch).tensor)["p3"]
        t = kd.teacher.backbone(kd.teacher_images(batch).tensor)["p3"]
    expected = np.corrcoef(s.mean(1).flatten().numpy(), t.mean(1).flatten().numpy())[0, 1]
    assert logged[2] == pytest.approx(expected, abs=1e-4)
    raw = dict((it, v) for v, it in trainer.storage.history("kd_diag/pearson_p3").values())
    assert logged == pytest.approx(raw, abs=1e-6) and abs(raw[2] - raw[0]) > 1e-4


def test_a_failed_write_of_the_last_checkpoint_tag_keeps_the_previous_tag(tmp_path, monkeypatch):
    # fvcore's tag_last_checkpoint opens last_checkpoint with "w" (emptying it) and then writes
    # the name: a failure in between (a full disk, a preemption) left an empty tag, which
    # --resume cannot use, while the checkpoint it named was intact
    from detectron2.utils.file_io import PathManager

    out = tmp_path / "tag"
    _run(_small_cfg(out, max_iter=2))
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    real_open = PathManager.open

    class _FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
            return False

    def open_(path, mode="r", **kwargs):
        f = real_open(path, mode, **kwargs)
        return _FullDisk(f) if "last_checkpoint" in str(path) and "w" in mode else f

    trainer = KDTrainer(_small_cfg(out, max_iter=4))
    trainer.resume_or_load(resume=True)
    monkeypatch.setattr(PathManager, "open", open_)
    with pytest.raises(OSError, match="No space left on device"):
        trainer.train()  # the first save, model_0000003.pth, is written; its tag is not
    monkeypatch.undo()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    resumed = KDTrainer(_small_cfg(out, max_iter=4))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2


def _own_coco(root, name, cat_ids=(3, 7, 42)):
    """A registered COCO-format dataset of 2 written 64x64 images, categories of the given
    (non-contiguous) ids, one box per category."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    from PIL import Image

    images, anns = [], []
    for i in (1, 2):
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(root / f"im{i}.png")
        images.append({"id": i, "file_name": f"im{i}.png", "height": 64, "width": 64})
        for c in cat_ids:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": c,
                    "bbox": [4, 4, 30, 30],
                    "area": 900,
                    "iscrowd": 0,
                }
            )
    cats = [{"id": c, "name": f"cat{c}"} for c in cat_ids]
    data = {"images": images, "annotations": anns, "categories": cats}
    (root / f"{name}.json").write_text(json.dumps(data))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        from detectron2.data import MetadataCatalog

        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(root / f"{name}.json"), str(root))
    return name


def test_teacher_eval_at_start_of_a_teacher_of_another_class_set_is_a_clear_error(tmp_path):
    # A teacher of other classes (README: an 80-class model-zoo teacher, which PKD accepts) on
    # the user's 3-class test data (COCO ids 3, 7, 42): COCOEvaluator stopped the run on an
    # AssertionError on the first prediction of a class >= 3 (a teacher of fewer classes was
    # scored against a wrong mapping). Refused before training, naming the key; nothing saved.
    val = _own_coco(tmp_path, "detkd_test_own_val")
    (tmp_path / "t").mkdir()
    cfg = _small_cfg(tmp_path / "e", max_iter=2)
    # the same 3 classes
    cfg.dataloader.train.dataset.names = _own_coco(tmp_path / "t", "detkd_test_own_tr")
    cfg.dataloader.train.sampler = None
    cfg.dataloader.test.dataset.names = val
    cfg.train.teacher_eval_at_start = True
    cfg.model.teacher.num_classes = 80
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    match = (
        r"train\.teacher_eval_at_start: the teacher predicts 80 classes but the test dataset "
        r"'detkd_test_own_val' has 3 \(cat3, cat7, cat42\).*Set train\.teacher_eval_at_start=False"
    )
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert not (tmp_path / "e" / "last_checkpoint").exists()
    # the teacher of the data's 3 classes is evaluated on them (ids 3, 7, 42 mapped back)
    cfg.model.teacher.num_classes = 3
    cfg.train.output_dir = str(tmp_path / "ok")
    cfg.train.max_iter = 1
    trainer = _run(cfg)
    hook = [h for h in trainer._hooks if type(h).__name__ == "TeacherEvalHook"][0]
    assert {"AP-cat3", "AP-cat7", "AP-cat42"} <= set(hook.results["bbox"])


def _cfg_of_own_data_with_a_subset_val(tmp_path, prefix, output_dir, max_iter):
    """_small_cfg on datasets of one's own: <prefix>_train of category ids 3, 7, 42 and
    <prefix>_val_sub, whose json lists only the categories 7, 42."""
    train = _own_coco(tmp_path, f"{prefix}_train")
    (tmp_path / "v").mkdir()
    val = _own_coco(tmp_path / "v", f"{prefix}_val_sub", cat_ids=(7, 42))
    cfg = _small_cfg(output_dir, max_iter=max_iter)
    cfg.dataloader.train.dataset.names = train
    cfg.dataloader.train.sampler = None
    cfg.dataloader.test.dataset.names = val
    return cfg


def test_test_data_of_other_classes_than_the_training_data_is_an_error_before_training(tmp_path):
    # A val.json listing only the categories it annotates (ids 7, 42) next to a train.json of
    # ids 3, 7, 42: the student's class 0 (id 3) was evaluated as the val data's class 0 (id 7),
    # a shifted mapping without a word. Refused before training; equal lists are accepted.
    cfg = _cfg_of_own_data_with_a_subset_val(tmp_path, "detkd_test_own", tmp_path / "c", max_iter=2)
    match = (
        r"The classes of the test dataset 'detkd_test_own_val_sub' \(2: cat7, cat42\) are not "
        r"those of the training dataset 'detkd_test_own_train' \(3: cat3, cat7, cat42\); they "
        r"differ from class 0 on.*same categories"
    )
    with pytest.raises(ValueError, match=match):
        KDTrainer(cfg)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").glob("*.pth"))
    cfg.dataloader.test.dataset.names = _own_coco(tmp_path / "v", "detkd_test_own_val_all")
    KDTrainer(cfg)  # the same categories: accepted


def test_eval_only_refuses_a_student_of_another_class_count_than_the_test_data(tmp_path):
    # --eval-only of a 3-class student on 2-class data ran the whole inference, then stopped on
    # COCOEvaluator's assertion (a prediction of class 2); now refused before, naming the fix.
    from detectron2.config import instantiate

    from detkd.checkpoint import save_student

    _own_coco(tmp_path, "detkd_test_eval_only_2cls", cat_ids=(7, 42))  # writes the json
    (tmp_path / "own.py").write_text(
        "from detectron2.config import LazyConfig\n"
        "from detectron2.data import DatasetCatalog\n"
        "from detectron2.data.datasets import register_coco_instances\n"
        f"base = LazyConfig.load({os.path.join(REPO, 'configs/demo/pkd_retinanet.py')!r})\n"
        "model, dataloader, train = base.model, base.dataloader, base.train\n"
        "optimizer, lr_multiplier = base.optimizer, base.lr_multiplier\n"
        "if 'own_val' not in DatasetCatalog.list():\n"
        "    register_coco_instances('own_val', {}, "
        f"{str(tmp_path / 'detkd_test_eval_only_2cls.json')!r}, "
        f"{str(tmp_path)!r})\n"
        "dataloader.test.dataset.names = 'own_val'\n"
    )
    ckpt = tmp_path / "student.pth"
    save_student(instantiate(load_config("configs/demo/pkd_retinanet.py").model.student), str(ckpt))
    cmd = [
        sys.executable,
        "train_net.py",
        "--config-file",
        str(tmp_path / "own.py"),
        "--eval-only",
        f"train.output_dir={tmp_path / 'eval'}",
        "dataloader.test.num_workers=0",
        f"train.init_checkpoint={ckpt}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert (
        "ValueError: The student predicts 3 classes but the test dataset 'own_val' has 2 "
        "(cat7, cat42). Set model.student.num_classes = 2"
    ) in proc.stderr, proc.stderr[-2000:]
    assert "Start inference" not in proc.stdout + proc.stderr


def test_class_checks_of_the_test_data_skip_a_config_without_an_evaluator(tmp_path):
    # A config without dataloader.evaluator evaluates nothing (KDTrainer.test skips it, the
    # teacher's evaluation at the start too): test data of other classes than the training
    # data's (e.g. a base config's test set left in place) is never scored, and was refused
    # before training ("Give both json files the same categories").
    cfg = _cfg_of_own_data_with_a_subset_val(
        tmp_path, "detkd_test_noeval", tmp_path / "n", max_iter=1
    )
    with pytest.raises(
        ValueError, match="The classes of the test dataset 'detkd_test_noeval_val_sub'"
    ):
        KDTrainer(cfg)  # with an evaluator: refused, as before
    del cfg.dataloader.evaluator
    cfg.train.teacher_eval_at_start = True  # the teacher's 3 classes, the test data's 2
    trainer = _run(cfg)
    assert trainer.iter == 1 and trainer._last_eval_results == {}  # trained, not evaluated
    hook = [h for h in trainer._hooks if type(h).__name__ == "TeacherEvalHook"][0]
    assert hook.results is None


def test_resume_without_schedule_state_at_another_lr_trains_at_the_runs(tmp_path, caplog):
    """Both --resume cases at once: the warning says the run's base lr (in the checkpoint's
    optimizer state) is kept, and the schedule, which went on from the checkpoint's iteration
    with this config's base lr, trained at the new lr instead."""
    from detectron2.config import instantiate

    _run_without_schedule_state(tmp_path / "s", max_iter=6, interrupt=3)
    cfg = _small_cfg(tmp_path / "s", 6)
    cfg.optimizer.lr = 0.5
    with caplog.at_level(logging.WARNING, logger="detkd.engine"):
        resumed = _run(cfg, resume=True)
    assert resumed.start_iter == 2
    assert "the run's base learning rates [0.002] are kept" in caplog.text
    assert "holds no learning-rate schedule state for iteration 2" in caplog.text
    lr = dict((it, v) for v, it in resumed.storage.history("lr").values())
    multiplier = instantiate(cfg.lr_multiplier)
    for it in range(2, 6):
        assert lr[it] == pytest.approx(0.002 * multiplier(it / 6), rel=1e-6), it


def test_a_plain_model_config_that_keeps_a_teacher_checkpoint_in_its_own_folder_trains(tmp_path):
    """README (Your own data): train the teacher with the distillation config's `model = teacher`
    and `train.output_dir = "output/my_teacher"`. Its train.teacher_checkpoint still names
    output/my_teacher/model_final.pth, the file this very run writes; a plain model never reads
    train.teacher_checkpoint, yet the run was refused ("the teacher's weights would be replaced by
    the student's"). A DistillationDetector with that setting is still refused."""
    from detkd.config_checks import check_run_inputs_kept

    out = str(tmp_path / "my_teacher")
    kd = load_config("configs/demo/pkd_retinanet.py")
    kd.train.teacher_checkpoint = os.path.join(out, "model_final.pth")
    kd.train.output_dir = out
    with pytest.raises(ValueError, match="teacher's weights would be replaced"):
        check_run_inputs_kept(kd)
    plain = load_config("configs/demo/pkd_retinanet.py")
    plain.model = plain.model.teacher  # the README's `model = teacher`
    plain.train.teacher_checkpoint = os.path.join(out, "model_final.pth")
    plain.train.output_dir = out
    check_run_inputs_kept(plain)  # nothing to lose: no error


def test_training_data_without_a_usable_annotation_is_an_error_naming_filter_empty(tmp_path):
    # detectron2 drops images without annotations (or with only iscrowd=1 ones) from training;
    # when that left none, its assertion said only "No valid data found in <name>"
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from PIL import Image

    name = "detkd_test_no_usable_annotation"
    images = []
    for i in (1, 2):
        Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / f"im{i}.png")
        images.append({"id": i, "file_name": f"im{i}.png", "height": 64, "width": 64})
    anns = [
        {
            "id": 1,
            "image_id": 2,
            "category_id": 1,
            "bbox": [4, 4, 20, 20],
            "area": 400,
            "iscrowd": 1,
        }
    ]
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    (tmp_path / "train.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(tmp_path / "train.json"), str(tmp_path))
    cfg = _small_cfg(tmp_path / "e", max_iter=2)
    cfg.dataloader.train.dataset.names = name
    cfg.dataloader.train.dataset.filter_empty = True
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"no image of '{name}' has an annotation to train on (2 images: 1 without annotations, "
            "1 with only iscrowd=1 ones)"
        )
        + ".*set dataloader.train.dataset.filter_empty = False",
    ):
        KDTrainer(cfg)
    cfg.dataloader.train.dataset.filter_empty = False  # the fix it names: both images, no boxes
    cfg.dataloader.train.sampler.size = 2
    batch = next(iter(KDTrainer.build_train_loader(cfg)))
    assert len(batch) == 4 and all(len(d["instances"]) == 0 for d in batch)


def test_a_test_dataset_without_images_is_an_error_before_training(tmp_path):
    # detectron2's test loader stopped on it ("Dataset '...' is empty!") at the first
    # evaluation, by default after the whole run; --eval-only names it the same way
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from detkd.config_checks import check_student_classes

    name = "detkd_test_no_images"
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    (tmp_path / "val.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": cats})
    )

    def register():  # fresh metadata, as in a new process
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, str(tmp_path / "val.json"), str(tmp_path))

    register()
    cfg = _small_cfg(tmp_path / "t", max_iter=2)
    cfg.dataloader.test.dataset.names = name
    message = re.escape(f"The test dataset '{name}' (dataloader.test.dataset.names) has no images")
    with pytest.raises(ValueError, match=message):
        KDTrainer(cfg)
    assert not (tmp_path / "t" / "last_checkpoint").exists()
    from detectron2.config import instantiate

    register()
    with pytest.raises(ValueError, match=message):
        check_student_classes(cfg, instantiate(cfg.model), split="test")


def test_kd_scalars_of_a_step_whose_backward_failed_are_written_and_the_flag_reset(tmp_path):
    # the step's KD scalars wait in the model for the hook's after_backward; a step that fails
    # after its forward (here at zero_grad, right before the backward) left them unwritten (the
    # inner trainer's hooks got no after_train), and scalars_after_backward stayed set after the
    # run: a later plain SimpleTrainer of the model never wrote its last step's scalars
    from detkd.utils import unwrap_model

    cfg = _small_cfg(tmp_path / "f", max_iter=3)
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    optimizer = trainer._trainer.optimizer
    zero_grad = optimizer.zero_grad

    def failing_zero_grad(*args, **kwargs):
        if trainer.iter == 1:
            raise RuntimeError("out of memory (simulated)")
        return zero_grad(*args, **kwargs)

    optimizer.zero_grad = failing_zero_grad
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.train()
    kd = unwrap_model(trainer.model)
    assert [it for _, it in trainer.storage.history("pkd/p3").values()] == [0, 1]
    logged = [m["iteration"] for m in _metrics(str(tmp_path / "f")) if "pkd/p3" in m]
    assert logged == [0, 1]
    assert not kd.scalars_after_backward and not kd._pending_scalars


def _needs_a(a, b=None):
    """A LazyCall target without ``**kwargs`` (override-key tests)."""
    return a


def _takes_kwargs(a, **kwargs):
    """A LazyCall target with ``**kwargs`` (override-key tests)."""
    return a


def test_override_check_of_lazycall_arguments_unset_ones_and_kwargs():
    # An argument a LazyCall leaves unset is a valid key only as the override's last part: a key
    # below it (model.x.b.c, b unset) would make b a dict nobody asked for; a target with
    # **kwargs takes any name.
    from detkd.config_checks import check_override_keys

    cfg = load_config("configs/demo/pkd_retinanet.py")
    cfg.model.distillers.x = L(_needs_a)(a=1)
    cfg.model.distillers.y = L(_takes_kwargs)(a=1)
    check_override_keys(cfg, ["model.distillers.x.b=2"])  # an argument left at its default
    with pytest.raises(KeyError, match=r"'model\.distillers\.x' has no key 'b'"):
        check_override_keys(cfg, ["model.distillers.x.b.c=2"])
    with pytest.raises(KeyError, match=r"'model\.distillers\.x' has no key 'c'"):
        check_override_keys(cfg, ["model.distillers.x.c=2"])
    check_override_keys(cfg, ["model.distillers.y.anything=2"])  # **kwargs


def _override_key_error(cfg, override):
    """The message of the KeyError that check_override_keys raises for ``override``."""
    from detkd.config_checks import check_override_keys

    with pytest.raises(KeyError) as e:
        check_override_keys(cfg, [override])
    return e.value.args[0]


def test_override_typo_hints_name_sections_every_close_key_and_unset_arguments():
    # a misspelt top-level section is looked up among the config's sections; the hint lists up
    # to three close keys, each in full, and a LazyCall's unset arguments among the keys there
    cfg = load_config("configs/demo/pkd_retinanet.py")
    cfg.model.distillers.x = L(_needs_a)(a=1)
    msg = _override_key_error(cfg, "trian.max_iter=2")
    assert msg == (
        "Override 'trian.max_iter': the config has no key 'trian'. Did you mean 'train'? Keys "
        "there: ['dataloader', 'lr_multiplier', 'model', 'optimizer', 'student', 'teacher', "
        "'train']. (Write +trian.max_iter=... to add a new key on purpose.)"
    )
    msg = _override_key_error(cfg, "train.period=5")
    assert msg.startswith(
        "Override 'train.period': 'train' has no key 'period'. "
        "Did you mean 'train.log_period', 'train.eval_period'? Keys named 'period' below it: "
        "['train.checkpointer.period']. Keys there: ['amp', "
    )
    msg = _override_key_error(cfg, "model.distillers.x.bb=2")
    assert msg == (
        "Override 'model.distillers.x.bb': 'model.distillers.x' has no key 'bb'. Did you mean "
        "'model.distillers.x.b'? Keys there: ['a', 'b']. (_needs_a takes no argument 'bb': "
        "+model.distillers.x.bb=... would fail too.)"
    )
    # a key of the model's parts set on the wrapper: the hint names the parts' keys
    msg = _override_key_error(cfg, "model.num_classes=2")
    assert msg.startswith(
        "Override 'model.num_classes': 'model' has no key 'num_classes'. Keys named "
        "'num_classes' below it: ['model.student.head.num_classes', 'model.student.num_classes', "
        "'model.teacher.head.num_classes', 'model.teacher.num_classes']. Keys there: "
    )
    assert msg.endswith(
        "(DistillationDetector takes no argument 'num_classes': +model.num_classes=... would "
        "fail too.)"
    )


def test_override_check_leaves_list_indices_values_and_uninspectable_targets_to_lazyconfig():
    # below a list or a value, LazyConfig reports the override itself; a LazyCall of a target
    # without a signature (a builtin type) may take any argument
    from detkd.config_checks import check_override_keys

    cfg = load_config("configs/demo/pkd_retinanet.py")
    cfg.model.distillers.d = {"_target_": "builtins.dict", "a": 1}
    check_override_keys(cfg, ["optimizer.betas.5=1", "train.max_iter.x=1"])
    check_override_keys(cfg, ["model.distillers.d.b=2"])


def test_a_distillers_dict_below_model_and_a_flag_with_its_value_after_the_overrides_are_errors():
    # any *.distillers dict merges (a wrapper's model.kd.distillers too); a flag written with
    # its value (--config-file=x.py) is a flag as well
    from detkd.config_checks import check_config_sections, check_override_keys

    cfg = load_config("configs/demo/pkd_retinanet.py")
    cfg.model.kd = dict(distillers=dict(pkd=dict(loss_weight=1)))
    with pytest.raises(
        ValueError,
        match=r"'model\.kd\.distillers=\{gid:\{loss_weight:1\}\}': a dict override merges into "
        r"the config's model\.kd\.distillers, it does not replace it: \['pkd'\] would still run",
    ):
        check_override_keys(cfg, ["model.kd.distillers={gid:{loss_weight:1}}"])
    with pytest.raises(
        ValueError, match=r"^\['--config-file=x\.py'\] come after the key=value overrides"
    ) as err:
        check_override_keys(cfg, ["train.max_iter=1", "--config-file=x.py"])
    # the example names the config file once
    assert str(err.value).endswith("e.g. train_net.py --config-file <config> key=value ...")
    # a .yml file is a yacs config like a .yaml one, also where it has a `model` key
    cfg.DATASETS = dict(train="shapes_train")
    with pytest.raises(ValueError, match=r"^mine\.yml is a yacs config \(it has \['DATASETS'\]\)"):
        check_config_sections(cfg, "mine.yml")


def _keeps_a_kd_model(**kwargs):
    """A factory function as cfg.model (it may return a DistillationDetector)."""
    raise AssertionError("not built by check_run_inputs_kept")


def test_an_init_checkpoint_the_run_would_overwrite_is_refused(tmp_path):
    """train.init_checkpoint in the run's own folder under a name the run saves to (e.g. training
    on from a finished run's model_final.pth in the same folder): the run replaced the file it
    started from. Refused before anything is written, for a plain model too; --eval-only (which
    saves nothing) and other names are fine."""
    from detkd.config_checks import check_run_inputs_kept

    out = tmp_path / "run"
    for config in ("configs/demo/pkd_retinanet.py", "configs/demo/student_retinanet.py"):
        cfg = load_config(config)
        cfg.train.update(output_dir=str(out), teacher_checkpoint="")
        for name in ("model_0000099.pth", "model_final.pth", "model_final_student.pth"):
            cfg.train.init_checkpoint = str(out / name)
            with pytest.raises(
                ValueError,
                match=r"train\.init_checkpoint .*model_.*is in this run's train\.output_dir "
                r".*the weights the student starts from would be replaced.*copy the file out",
            ):
                check_run_inputs_kept(cfg)
            check_run_inputs_kept(cfg, checkpoints=False)
        cfg.train.init_checkpoint = str(out / "start.pth")
        check_run_inputs_kept(cfg)
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"weights")
    cfg = _small_cfg(out, 1)
    cfg.train.init_checkpoint = str(out / "model_final.pth")
    with pytest.raises(ValueError, match="would be replaced"):
        KDTrainer(cfg)
    assert (out / "model_final.pth").read_bytes() == b"weights"


def test_run_inputs_kept_refuses_each_name_the_run_writes_and_each_yacs_node(tmp_path):
    # The teacher's checkpoint under any name the run saves to (periodic model_<7 digits>.pth,
    # not a 6-digit one), only when the run saves (not --eval-only); a factory function as
    # cfg.model counts as a possible DistillationDetector; the student's .yaml is checked too.
    from detkd.config_checks import check_run_inputs_kept
    from detkd.modeling import build_yacs_detector

    out = str(tmp_path / "run")
    cfg = load_config("configs/demo/pkd_retinanet.py")
    cfg.train.output_dir = out
    for name in ("model_0004999.pth", "model_final.pth", "model_final_student.pth"):
        cfg.train.teacher_checkpoint = os.path.join(out, name)
        with pytest.raises(ValueError, match="teacher's weights would be replaced"):
            check_run_inputs_kept(cfg)
        check_run_inputs_kept(cfg, checkpoints=False)  # --eval-only saves nothing
    cfg.train.teacher_checkpoint = os.path.join(out, "model_004999.pth")  # not a run's name
    check_run_inputs_kept(cfg)
    cfg.train.teacher_checkpoint = os.path.join(out, "model_final.pth")
    factory = load_config("configs/demo/pkd_retinanet.py")
    factory.train.update(output_dir=out, teacher_checkpoint=os.path.join(out, "model_final.pth"))
    factory.model = L(_keeps_a_kd_model)(student=factory.model.student)
    with pytest.raises(ValueError, match="teacher's weights would be replaced"):
        check_run_inputs_kept(factory)
    cfg.train.teacher_checkpoint = ""
    cfg.model.student = L(build_yacs_detector)(config_file=os.path.join(out, "config.yaml"))
    with pytest.raises(
        ValueError, match=r"model\.student\.config_file .* is the config\.yaml of this run's"
    ):
        check_run_inputs_kept(cfg)
    check_run_inputs_kept(cfg, config_yaml=False)


def test_run_inputs_kept_accepts_a_run_name_in_another_folder_and_a_yacs_models_teacher_key(
    tmp_path, monkeypatch
):
    # model_final.pth of another folder is no file of this run; a yacs model (detectron2's
    # build_model: never a DistillationDetector) reads no train.teacher_checkpoint; a run
    # without train.output_dir saves no checkpoint (fvcore's Checkpointer skips an empty
    # save_dir), not even into the working directory
    from detkd.config_checks import check_run_inputs_kept
    from detkd.modeling import build_yacs_detector

    out = str(tmp_path / "run")
    cfg = load_config("configs/demo/pkd_retinanet.py")
    cfg.train.update(
        output_dir=out,
        teacher_checkpoint=str(tmp_path / "teacher" / "model_final.pth"),
        init_checkpoint=str(tmp_path / "student" / "model_final_student.pth"),
    )
    check_run_inputs_kept(cfg)
    monkeypatch.chdir(tmp_path)
    cfg.train.update(output_dir="", teacher_checkpoint="model_final.pth")
    check_run_inputs_kept(cfg)
    cfg.train.update(output_dir=out, teacher_checkpoint=os.path.join(out, "model_final.pth"))
    cfg.model = L(build_yacs_detector)(config_file=str(tmp_path / "teacher.yaml"))
    check_run_inputs_kept(cfg)
    cfg.train.init_checkpoint = os.path.join(out, "model_final.pth")  # read by the yacs model
    with pytest.raises(ValueError, match=r"^train\.init_checkpoint .* would be replaced"):
        check_run_inputs_kept(cfg)


def test_run_inputs_kept_follows_the_checkpointers_file_prefix(tmp_path):
    # train.checkpointer.file_prefix=kd: the run saves kd_final.pth, so model_final.pth is kept
    from detkd.config_checks import check_run_inputs_kept

    out = tmp_path / "run"
    cfg = load_config("configs/demo/pkd_retinanet.py")
    cfg.train.output_dir = str(out)
    cfg.train.checkpointer.file_prefix = "kd"
    cfg.train.teacher_checkpoint = str(out / "model_final.pth")
    check_run_inputs_kept(cfg)
    for name in ("kd_final.pth", "kd_0000099.pth", "model_final_student.pth"):
        cfg.train.teacher_checkpoint = str(out / name)
        with pytest.raises(ValueError, match="teacher's weights would be replaced"):
            check_run_inputs_kept(cfg)


def test_unregistered_test_dataset_error_names_up_to_three_close_ones():
    from detectron2.data import DatasetCatalog

    from detkd.config_checks import check_test_datasets

    for name in ("detkd_test_close_1", "detkd_test_close_2"):
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, list)
    cfg = load_config("configs/demo/pkd_retinanet.py")
    cfg.dataloader.test.dataset.names = ["coco_2017_val", "detkd_test_close_3"]
    with pytest.raises(
        ValueError,
        match=r"^dataloader\.test\.dataset\.names: dataset 'detkd_test_close_3' is not "
        r"registered \(did you mean 'detkd_test_close_2', 'detkd_test_close_1'[,?]",
    ):
        check_test_datasets(cfg)


def test_dataset_names_in_a_list_with_a_lazycall_are_not_checked():
    # a list of names that holds a LazyCall (built with the loader) is no list of names
    from detkd.config_checks import check_test_classes, check_test_datasets

    cfg = load_config("configs/demo/pkd_retinanet.py")
    cfg.dataloader.test.dataset.names = ["coco_2017_val", L(_needs_a)(a="detkd_test_unbuilt")]
    check_test_datasets(cfg)
    check_test_classes(cfg)


def _dataset_of_classes(name, classes):
    """A registered one-image dataset whose metadata has ``thing_classes`` ``classes``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(
        name, lambda: [{"file_name": "x.png", "image_id": 0, "height": 8, "width": 8}]
    )
    MetadataCatalog.get(name).set(thing_classes=list(classes))
    return name


def test_class_checks_refuse_fewer_classes_and_another_order(tmp_path):
    # the student (and the evaluated teacher) of fewer classes than the data is refused as one
    # of more; test data of the training data's classes in another order is refused; without
    # dataloader.evaluator, --eval-only's check of the test data is skipped
    from types import SimpleNamespace

    from detkd.config_checks import (
        check_student_classes,
        check_teacher_eval_classes,
        check_test_classes,
    )

    cfg = load_config("configs/demo/pkd_retinanet.py")
    cfg.dataloader.train.dataset.names = _dataset_of_classes("detkd_test_abcd", "abcd")
    cfg.dataloader.test.dataset.names = _dataset_of_classes("detkd_test_abcd_val", "abcd")
    for n in (3, 5):
        with pytest.raises(
            ValueError,
            match=rf"The model predicts {n} classes but the training dataset "
            rf"'detkd_test_abcd' has 4 \(a, b, c, d\)",
        ):
            check_student_classes(cfg, SimpleNamespace(num_classes=n))
        with pytest.raises(
            ValueError,
            match=rf"the teacher predicts {n} classes but the test dataset "
            r"'detkd_test_abcd_val' has 4",
        ):
            check_teacher_eval_classes(cfg, SimpleNamespace(teacher=SimpleNamespace(num_classes=n)))
    check_student_classes(cfg, SimpleNamespace(num_classes=4))
    check_teacher_eval_classes(cfg, SimpleNamespace(teacher=SimpleNamespace(num_classes=4)))
    check_test_classes(cfg)
    cfg.dataloader.test.dataset.names = _dataset_of_classes("detkd_test_bacd_val", "bacd")
    with pytest.raises(
        ValueError,
        match=r"'detkd_test_bacd_val' \(4: b, a, c, d\) are not those of the training "
        r"dataset 'detkd_test_abcd' \(4: a, b, c, d\); they differ from class 0 on",
    ):
        check_test_classes(cfg)
    cfg.dataloader.test.dataset.names = "detkd_test_abcd_val"
    with pytest.raises(
        ValueError, match=r"predicts 3 classes but the test dataset 'detkd_test_abcd_val' has 4"
    ):
        check_student_classes(cfg, SimpleNamespace(num_classes=3), split="test")
    del cfg.dataloader.evaluator  # nothing is evaluated: not checked
    check_student_classes(cfg, SimpleNamespace(num_classes=3), split="test")


def test_class_checks_name_the_first_missing_class_and_check_training_data_without_evaluator():
    # test classes that are the training classes' first ones differ where the shorter list ends;
    # the training data is checked also without dataloader.evaluator (it is trained on)
    from types import SimpleNamespace

    from detkd.config_checks import (
        check_student_classes,
        check_test_classes,
        teacher_class_mismatch,
    )

    cfg = load_config("configs/demo/pkd_retinanet.py")
    cfg.dataloader.train.dataset.names = _dataset_of_classes("detkd_test_abcd", "abcd")
    cfg.dataloader.test.dataset.names = _dataset_of_classes("detkd_test_abc_val", "abc")
    with pytest.raises(ValueError, match=r"\(3: a, b, c\) are not those of .*from class 3 on"):
        check_test_classes(cfg)
    del cfg.dataloader.evaluator
    with pytest.raises(
        ValueError, match=r"predicts 3 classes but the training dataset 'detkd_test_abcd' has 4"
    ):
        check_student_classes(cfg, SimpleNamespace(num_classes=3))
    cfg.dataloader.train.dataset.names = _dataset_of_classes("detkd_test_abcdef", "abcdef")
    with pytest.raises(ValueError, match=r"'detkd_test_abcdef' has 6 \(a, b, c, d, e, \.\.\.\)\."):
        check_student_classes(cfg, SimpleNamespace(num_classes=5))
    # each test dataset is compared with the evaluated teacher, not only the first
    cfg.dataloader.evaluator = {}
    cfg.dataloader.test.dataset.names = [
        "detkd_test_abc_val",
        _dataset_of_classes("detkd_ab", "ab"),
    ]
    assert teacher_class_mismatch(cfg, SimpleNamespace(num_classes=3)) == (
        "the teacher predicts 3 classes but the test dataset 'detkd_ab' has 2 (a, b)"
    )


def test_class_checks_load_only_test_datasets_whose_metadata_has_no_classes():
    # a test dataset whose metadata already has its classes is compared by them, not loaded
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from detkd.config_checks import check_test_classes

    cfg = load_config("configs/demo/pkd_retinanet.py")
    cfg.dataloader.train.dataset.names = _dataset_of_classes("detkd_test_abcd", "abcd")
    name = "detkd_test_abcd_unloaded"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    loads = []
    DatasetCatalog.register(name, lambda: loads.append(name) or [])
    MetadataCatalog.get(name).set(thing_classes=list("abcd"))
    cfg.dataloader.test.dataset.names = name
    check_test_classes(cfg)
    assert loads == []


def test_clip_grad_is_off_unless_enabled():
    # train.clip_grad = dict(enabled=False, max_norm=...) (every config's default) must leave the
    # gradients as they are: gradient (3, 4), SGD at lr 1 steps by -(3, 4); enabled with
    # max_norm 1e-3 it steps by -(6e-4, 8e-4)
    cfg = load_config("configs/demo/pkd_retinanet.py")
    cfg.optimizer = load_config("configs/PKD/baseline_retinanet_R50_2x.py").optimizer
    cfg.optimizer.update(lr=1.0, momentum=0.0, weight_decay=0.0)
    for enabled, expected in ((False, [-3.0, -4.0]), (True, [-6e-4, -8e-4])):
        cfg.train.clip_grad = dict(enabled=enabled, max_norm=1e-3)
        model = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            model.weight.zero_()
        optimizer = KDTrainer.build_optimizer(cfg, model)
        (model.weight * torch.tensor([3.0, 4.0])).sum().backward()
        optimizer.step()
        assert model.weight.detach().flatten().tolist() == pytest.approx(
            expected, rel=1e-5
        ), enabled


def test_resume_or_load_puts_init_checkpoint_into_student_and_teacher_checkpoint_into_teacher(
    tmp_path,
):
    # a new run: train.init_checkpoint's weights in the student (only), the teacher's file in
    # the teacher; an empty teacher_checkpoint without teacher_random_init is refused
    from detectron2.config import instantiate

    from detkd.checkpoint import save_student

    files = {}
    for name, (width, fpn) in (("student", (8, 32)), ("teacher", (16, 64))):
        src = instantiate(tiny_retinanet_cfg(width=width, fpn=fpn))
        with torch.no_grad():
            for p in src.parameters():
                p.uniform_(2.0, 3.0)  # far from any initialisation
        save_student(src, str(tmp_path / f"{name}.pth"))
        files[name] = src.state_dict()
    cfg = _small_cfg(tmp_path / "new", max_iter=1)
    cfg.train.update(
        init_checkpoint=str(tmp_path / "student.pth"),
        teacher_checkpoint=str(tmp_path / "teacher.pth"),
        teacher_random_init=False,
    )
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    kd = unwrap_model(trainer.model)
    for part in ("student", "teacher"):
        state = getattr(kd, part).state_dict()
        for k, v in files[part].items():
            assert torch.equal(state[k], v), (part, k)
    assert trainer.start_iter == 0
    cfg.train.teacher_checkpoint = ""
    with pytest.raises(RuntimeError, match="teacher_checkpoint"):
        KDTrainer(cfg).resume_or_load(resume=False)


def test_resume_loads_the_teacher_again_and_a_non_finite_buffer_is_never_saved(tmp_path):
    """Run checkpoints do not hold the teacher: --resume loads train.teacher_checkpoint again
    (a resumed run that skipped it distilled from a random teacher; the resume test's teacher
    is a seeded random init, equal either way). A checkpoint whose buffers are not finite (a
    NaN forward corrupts BatchNorm statistics) is refused like one of non-finite parameters."""
    from detectron2.config import instantiate

    from detkd.checkpoint import save_student

    torch.manual_seed(123)
    save_student(instantiate(tiny_retinanet_cfg(width=16, fpn=64)), str(tmp_path / "t.pth"))
    teacher_file = torch.load(str(tmp_path / "t.pth"), map_location="cpu")["model"]
    cfg = _small_cfg(tmp_path / "run", max_iter=3)
    cfg.train.update(teacher_checkpoint=str(tmp_path / "t.pth"), teacher_random_init=False)
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.iter = 1
    trainer.checkpointer.save("model_0000001", iteration=1)

    torch.manual_seed(0)
    resumed = KDTrainer(cfg)
    teacher = unwrap_model(resumed.model).teacher
    assert any(not torch.equal(v, teacher_file[k]) for k, v in teacher.state_dict().items())
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_file[k]), k

    with torch.no_grad():
        unwrap_model(resumed.model).student.pixel_std.fill_(float("nan"))
    with pytest.raises(
        FloatingPointError,
        match=r"Checkpoint 'x' not written: the training diverged, 1 weights are NaN or inf "
        r"\(\['student\.pixel_std'\]\)",
    ):
        resumed.checkpointer.save("x")
    assert not (tmp_path / "run" / "x.pth").exists()
    assert (tmp_path / "run" / "last_checkpoint").read_text() == "model_0000001.pth"


def test_same_setting_compares_optimizer_settings_by_value():
    """betas may come back as a list where the config gives a tuple: equal settings, no warning;
    tensors compare by value; a different value or length is a change."""
    from detkd.engine import _same_setting

    assert _same_setting([0.9, 0.999], (0.9, 0.999))
    assert _same_setting(torch.tensor(0.01), 0.01) and _same_setting(0.5, 0.5)
    assert not _same_setting([0.9, 0.99], (0.9, 0.999))
    assert not _same_setting([0.9], (0.9, 0.999))
    assert not _same_setting(torch.tensor(0.02), 0.01)


def test_rng_preserved_restores_python_numpy_and_torch_states():
    import random

    import numpy as np

    from detkd.engine import _rng_preserved

    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    with _rng_preserved():
        random.random(), np.random.rand(3), torch.rand(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_teacher_eval_is_skipped_only_for_a_resumed_run_whose_metrics_hold_teacher_keys(tmp_path):
    # metrics.json of an earlier run in the folder: a new run (start_iter 0, no --resume)
    # evaluates its teacher again; a resumed one does when the file has no teacher/ key (a
    # student metric whose name merely contains "teacher" is not the teacher's evaluation),
    # or when the record of what was evaluated names another teacher checkpoint, or is missing
    # (an earlier run of teacher T1 in the folder, then a new run of T2 there without the
    # evaluation, resumed with it: T1's teacher/ lines were taken for T2's)
    import json
    from types import SimpleNamespace

    from detkd.engine import TeacherEvalHook

    cfg = _small_cfg(tmp_path, max_iter=1)
    cfg.train.teacher_checkpoint = "/teachers/t2.pth"
    hook = TeacherEvalHook(cfg)
    metrics = tmp_path / "metrics.json"
    record = tmp_path / "inference_teacher" / "teacher_eval.json"
    record.parent.mkdir()
    for start_iter, lines, teacher, logged in (
        (2, ['{"iteration": 0, "teacher/bbox/AP": 1.0}'], "/teachers/t2.pth", True),
        (2, ['{"iteration": 0, "teacher/bbox/AP": 1.0}'], "/teachers/t1.pth", False),
        (2, ['{"iteration": 0, "teacher/bbox/AP": 1.0}'], None, False),
        (0, ['{"iteration": 0, "teacher/bbox/AP": 1.0}'], "/teachers/t2.pth", False),
        (
            2,
            ['{"iteration": 0, "bbox/AP-teacher": 1.0, "loss_teacher_kd": 0.5}'],
            "/teachers/t2.pth",
            False,
        ),
    ):
        metrics.write_text("\n".join(lines) + "\n")
        if teacher is None:
            record.unlink(missing_ok=True)
        else:
            record.write_text(json.dumps({"teacher_checkpoint": teacher}))
        hook.trainer = SimpleNamespace(start_iter=start_iter)
        assert hook._logged_before() is logged, (start_iter, lines, teacher)
        # resumed with another teacher checkpoint (train_net.py): those results are another
        # teacher's, so the teacher is evaluated again
        hook.trainer = SimpleNamespace(start_iter=start_iter, teacher_changed=True)
        assert hook._logged_before() is False


def test_hooks_follow_export_student_and_teacher_eval_keys_and_kd_only(tmp_path):
    # train.export_student (True when a config lacks it) and teacher_eval_at_start only for a
    # DistillationDetector: a plain detector (the README's `model = teacher` in a copy of the
    # distillation config) gets neither hook; KDTrainer.before_train starts the inner trainer's
    # hooks (KD scalars written after the backward)
    def names(cfg):
        return [type(h).__name__ for h in KDTrainer(cfg)._hooks]

    cfg = _small_cfg(tmp_path / "h", max_iter=1)
    cfg.train.teacher_eval_at_start = True
    assert {"ExportStudentHook", "TeacherEvalHook"} <= set(names(cfg))
    cfg.train.export_student = False
    assert "ExportStudentHook" not in names(cfg)
    del cfg.train.export_student
    assert "ExportStudentHook" in names(cfg)
    plain = _small_cfg(tmp_path / "p", max_iter=1)
    plain.model = plain.model.teacher
    plain.train.teacher_eval_at_start = True
    assert not {"ExportStudentHook", "TeacherEvalHook"} & set(names(plain))

    from detectron2.utils.events import EventStorage

    trainer = KDTrainer(_small_cfg(tmp_path / "b", max_iter=1))
    assert not unwrap_model(trainer.model).scalars_after_backward
    with EventStorage(0) as trainer.storage:
        trainer.before_train()
    assert unwrap_model(trainer.model).scalars_after_backward


def test_cpu_processes_keep_the_users_omp_num_threads(monkeypatch):
    """OMP_NUM_THREADS set by the user, or a single process: its thread count is kept (no
    torch.set_num_threads)."""
    monkeypatch.syspath_prepend(REPO)
    import train_net

    monkeypatch.setattr(train_net.comm, "get_local_size", lambda: 2)
    monkeypatch.setattr(train_net.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    threads = []
    monkeypatch.setattr(train_net.torch, "set_num_threads", threads.append)
    train_net._share_cpu_threads()
    assert threads == []
    monkeypatch.delenv("OMP_NUM_THREADS")
    train_net._share_cpu_threads()
    assert threads == [max(1, train_net._usable_cpus() // 2)]
    # one process: torch's own count
    monkeypatch.setattr(train_net.comm, "get_local_size", lambda: 1)
    train_net._share_cpu_threads()
    assert len(threads) == 1


_PAGE_FAULTS = """
import json, resource, torch
from detkd.utils import keep_freed_cpu_memory

def faults_of_a_step():  # 20 blocks of 4 MiB, written, then freed: a step's allocations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(1 << 20) for _ in range(20)]
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

applied = keep_freed_cpu_memory()  # first: glibc's mmap threshold is still its initial 128 KiB
print(json.dumps([applied, [faults_of_a_step() for _ in range(5)]]))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's malloc",
)
def test_kept_freed_cpu_memory_is_not_faulted_back_in_each_step():
    """keep_freed_cpu_memory: with glibc's defaults every repeat of an 80 MiB allocation pattern
    of 4 MiB blocks faults its pages back in (~20480 pages of 4 KiB: the blocks are mapped and
    unmapped, or the heap is trimmed after them); applied, the first repeat takes the pages and,
    once the heap has grown around the small allocations between the blocks (a fresh clone's
    second repeat took 3 more blocks), the later ones reuse them, also when it is applied
    before glibc's dynamic mmap threshold has grown past the blocks (no trimming alone would
    leave them mapped one by one). In its own process: mallopt is process-wide."""
    proc = subprocess.run(
        [sys.executable, "-c", _PAGE_FAULTS], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    applied, faults = json.loads(proc.stdout.strip().splitlines()[-1])
    pages = 80 * 2**20 // resource.getpagesize()
    assert applied is True
    assert faults[0] > 0.9 * pages  # the first repeat takes its pages
    # with glibc's defaults each of the 4 later repeats faults ~pages (~4 * pages in all)
    assert sum(faults[1:]) < 0.5 * pages, faults


def test_cpu_runs_keep_freed_memory_unless_the_config_says_not(tmp_path, monkeypatch):
    """KDTrainer applies keep_freed_cpu_memory for train.device=cpu (train.keep_freed_cpu_memory
    defaults to True, also for a config without the key) and not with the key False or on CUDA."""
    import detkd.engine as engine

    calls = []
    monkeypatch.setattr(engine, "keep_freed_cpu_memory", lambda: calls.append(1) or True)
    cfg = _small_cfg(tmp_path / "kept", max_iter=2)
    assert cfg.train.keep_freed_cpu_memory is True and cfg.train.device == "cpu"
    KDTrainer(cfg)
    assert calls == [1]
    cfg = _small_cfg(tmp_path / "returned", max_iter=2)
    cfg.train.keep_freed_cpu_memory = False
    KDTrainer(cfg)
    assert calls == [1]
    del cfg.train["keep_freed_cpu_memory"]
    assert engine._keep_freed_cpu_memory(cfg) is True and calls == [1, 1]
    cfg.train.device = "cuda:0"
    assert engine._keep_freed_cpu_memory(cfg) is False and calls == [1, 1]


class _DirEvaluator:
    """An evaluator config target that takes ``output_dir`` (build_evaluator tests)."""

    def __init__(self, output_dir=None):
        self.output_dir = output_dir


def _assert_other(**kwargs):
    raise AssertionError("an assertion of the loader's own")


def test_build_evaluator_keeps_a_set_output_dir_and_train_loader_keeps_other_assertions(tmp_path):
    # build_evaluator fills only an unset output_dir (train.output_dir/inference, or the
    # teacher's folder); build_train_loader turns only detectron2's "No valid data found" into
    # the filter_empty message, not any other assertion of the loader
    cfg = _small_cfg(tmp_path / "o", max_iter=1)
    cfg.dataloader.evaluator = L(_DirEvaluator)()
    assert KDTrainer.build_evaluator(cfg).output_dir == os.path.join(
        str(tmp_path / "o"), "inference"
    )
    assert KDTrainer.build_evaluator(cfg, output_folder="elsewhere").output_dir == "elsewhere"
    cfg.dataloader.evaluator.output_dir = "mine"
    assert KDTrainer.build_evaluator(cfg, output_folder="elsewhere").output_dir == "mine"
    cfg.dataloader.train = L(_assert_other)(
        dataset=dict(names=_dataset_of_classes("detkd_test_ab", "ab"))
    )
    with pytest.raises(AssertionError, match="an assertion of the loader's own"):
        KDTrainer.build_train_loader(cfg)


def test_an_unusable_last_checkpoint_names_the_three_latest_others(tmp_path):
    from detkd.engine import unusable_last_checkpoint

    for name in (
        "model_0000001.pth",
        "model_0000003.pth",
        "model_0000005.pth",
        "model_0000007.pth",
        "model_final_student.pth",
        "model_final.pth",
        "model_teacher.pth",
    ):
        (tmp_path / name).write_bytes(b"")
    e = unusable_last_checkpoint(str(tmp_path), str(tmp_path / "model_final.pth"), "is bad")
    assert (
        "resume from another checkpoint there (model_0000003.pth, model_0000005.pth, "
        "model_0000007.pth)" in str(e)
    )


def test_ddp_model_leaves_device_ids_unset_for_a_model_off_cuda(monkeypatch):
    # DDP over gloo of a CPU model needs device_ids=None (detectron2 passes the local rank's GPU);
    # a single process and a given device_ids are left to detectron2
    import detkd.engine as engine

    seen = []
    monkeypatch.setattr(
        engine, "create_ddp_model", lambda model, **kwargs: seen.append(kwargs) or model
    )
    model = torch.nn.Linear(2, 2)
    engine.ddp_model(model, broadcast_buffers=False)
    monkeypatch.setattr(engine.comm, "get_world_size", lambda: 2)
    engine.ddp_model(model, broadcast_buffers=False)
    engine.ddp_model(model, device_ids=[3])
    assert seen == [
        {"broadcast_buffers": False},
        {"broadcast_buffers": False, "device_ids": None},
        {"device_ids": [3]},
    ]


def test_resume_with_another_teacher_logs_it_in_log_txt_and_evaluates_the_teacher_again(
    tmp_path, monkeypatch
):
    """train_net.py --resume with another train.teacher_checkpoint: the warning was printed
    before log.txt was set up (not in it, no timestamp), and teacher_eval_at_start skipped the
    evaluation because metrics.json held the old teacher's AP: the only teacher AP on record
    was that of a teacher no longer used."""
    from detectron2.config import instantiate
    from detectron2.engine import default_argument_parser

    monkeypatch.syspath_prepend(REPO)
    import train_net

    teacher = instantiate(load_config("configs/demo/pkd_retinanet.py").model.teacher)
    for name in ("a.pth", "b.pth"):
        torch.save({"model": teacher.state_dict()}, tmp_path / name)
    out = tmp_path / "run"

    def main(max_iter, teacher_file, *flags):
        train_net.main(
            default_argument_parser().parse_args(
                [
                    "--config-file",
                    os.path.join(REPO, "configs/demo/pkd_retinanet.py"),
                    *flags,
                    f"train.output_dir={out}",
                    f"train.max_iter={max_iter}",
                    f"train.teacher_checkpoint={teacher_file}",
                    "train.teacher_eval_at_start=True",
                    "train.eval_period=0",
                    "train.checkpointer.period=1",
                    "dataloader.train.dataset.names.num_images=4",
                    "dataloader.test.dataset.names.num_images=4",
                    "dataloader.train.num_workers=0",
                    "dataloader.test.num_workers=0",
                    "dataloader.train.total_batch_size=2",
                ]
            )
        )

    def teacher_evals():
        return [m for m in _metrics(str(out)) if any(k.startswith("teacher/") for k in m)]

    main(1, tmp_path / "a.pth")
    assert len(teacher_evals()) == 1
    main(2, tmp_path / "a.pth", "--resume")  # the same teacher: not evaluated again
    assert len(teacher_evals()) == 1
    main(3, tmp_path / "b.pth", "--resume")
    assert len(teacher_evals()) == 2
    log = (out / "log.txt").read_text()
    assert f"--resume: train.teacher_checkpoint is '{tmp_path / 'b.pth'}'" in log
    assert "Resumed with another teacher checkpoint: the teacher is evaluated again." in log


def test_eval_only_with_resume_evaluates_the_runs_last_checkpoint(tmp_path, monkeypatch):
    """--eval-only --resume in a run's folder evaluates the checkpoint last_checkpoint names, as
    detectron2's tools/train_net.py does; it said only "train.init_checkpoint is empty"."""
    from detectron2.engine import default_argument_parser

    monkeypatch.syspath_prepend(REPO)
    import train_net

    out = tmp_path / "run"

    def main(*args):
        return train_net.main(
            default_argument_parser().parse_args(
                [
                    "--config-file",
                    os.path.join(REPO, "configs/demo/pkd_retinanet.py"),
                    *args,
                    f"train.output_dir={out}",
                    "train.max_iter=2",
                    "train.teacher_checkpoint=",
                    "train.teacher_random_init=True",
                    "train.checkpointer.period=1",
                    "dataloader.train.dataset.names.num_images=4",
                    "dataloader.test.dataset.names.num_images=4",
                    "dataloader.train.num_workers=0",
                    "dataloader.test.num_workers=0",
                    "dataloader.train.total_batch_size=2",
                ]
            )
        )

    main()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    student = torch.load(out / "model_final_student.pth", weights_only=False)["model"]
    loaded = []
    monkeypatch.setattr(
        train_net,
        "load_student",
        lambda model, path, strict, key: loaded.append(path)
        or model.load_state_dict(
            student
            if path.endswith("final.pth")
            else {
                k[len("student.") :]: v
                for k, v in torch.load(path, weights_only=False)["model"].items()
                if k.startswith("student.")
            }
        ),
    )
    main("--eval-only", "--resume")
    (out / "last_checkpoint").write_text("model_0000000.pth")
    main("--eval-only", "--resume")
    assert loaded == [str(out / "model_final.pth"), str(out / "model_0000000.pth")]
    assert (
        "--eval-only --resume: evaluating the last checkpoint of" in (out / "log.txt").read_text()
    )
    monkeypatch.undo()
    monkeypatch.syspath_prepend(REPO)
    (out / "last_checkpoint").write_text("model_final.pth")
    predictions = out / "inference_eval" / "coco_instances_results.json"
    main("--eval-only", "--resume", "model.student.test_score_thresh=0.0")  # the real loading
    resumed = json.loads(predictions.read_text())
    main(
        "--eval-only",
        f"train.init_checkpoint={out / 'model_final_student.pth'}",
        "model.student.test_score_thresh=0.0",
    )
    assert resumed and resumed == json.loads(predictions.read_text())


def test_resume_with_another_teacher_checkpoint_says_so(tmp_path, monkeypatch):
    """Checkpoints do not hold the teacher: a --resume whose train.teacher_checkpoint differs from
    the run's (its config.yaml, as detectron2 writes it) warns that the rest of the run distils
    from another teacher; the same teacher, or a config.yaml that is not a config, says nothing."""
    from detectron2.config import LazyConfig

    monkeypatch.syspath_prepend(REPO)
    import train_net

    cfg = load_config("configs/demo/pkd_retinanet.py")
    cfg.train.update(output_dir=str(tmp_path), teacher_checkpoint="teachers/old.pth")
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    run_config = (tmp_path / "config.yaml").read_bytes()
    assert train_net._teacher_change(cfg, run_config) is None
    assert train_net._teacher_change(cfg, b"not: [a config") is None
    cfg.train.teacher_checkpoint = "teachers/new.pth"
    note = train_net._teacher_change(cfg, run_config)
    assert "train.teacher_checkpoint is 'teachers/new.pth'" in note
    assert (
        "trained with 'teachers/old.pth'" in note
        and "train.teacher_checkpoint=teachers/old.pth" in note
    )


def test_class_checks_see_the_shapes_datasets_of_the_demo_configs():
    """The demo configs' data is a LazyCall of register_shapes: the class-count checks read no
    dataset name from it and a student of 2 (or 5) classes trained on the 3 shapes silently.
    The name it registers is read now, so the check names the mismatch and the fix."""
    from detectron2.config import instantiate

    from detkd.config_checks import _dataset_names, check_student_classes

    cfg = load_config("configs/demo/pkd_retinanet.py")
    cfg.dataloader.train.dataset.names.num_images = 4  # the default root, as the other tests
    assert _dataset_names(cfg, "train") == ["detkd_shapes_train_4_s0"]
    cfg.model.student.num_classes = 2
    with pytest.raises(
        ValueError,
        match=r"student predicts 2 classes but the training dataset "
        r"'detkd_shapes_train_4_s0' has 3 .*model.student.num_classes = 3",
    ):
        check_student_classes(cfg, instantiate(cfg.model), split="train")


def test_max_iter_below_one_is_a_clear_error(tmp_path):
    # train.max_iter=0 (to "just evaluate the teacher") stopped in the lr scheduler on a bare
    # ZeroDivisionError
    for bad in (0, -5, 2.5):
        cfg = _small_cfg(tmp_path / "z", max_iter=2)
        cfg.train.max_iter = bad
        with pytest.raises(
            ValueError,
            match=rf"train\.max_iter must be an int >= 1, got {bad}.*--eval-only "
            r"with train\.init_checkpoint=",
        ):
            KDTrainer(cfg)
    assert not (tmp_path / "z").exists() or not any((tmp_path / "z").glob("*.pth"))


def _train_net_module(monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    import train_net

    return train_net


def test_resume_warnings_compare_teachers_and_name_added_and_removed_model_keys(
    tmp_path, monkeypatch
):
    """--resume's warnings: an empty teacher_checkpoint and none at all are the same (no
    teacher); model keys this config adds or drops are named, as changed ones are."""
    from detectron2.config import LazyConfig

    train_net = _train_net_module(monkeypatch)
    cfg = load_config("configs/demo/student_retinanet.py")
    cfg.train.output_dir = str(tmp_path)
    assert cfg.train.teacher_checkpoint == ""
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    run_config = (tmp_path / "config.yaml").read_bytes()
    del cfg.train["teacher_checkpoint"]
    assert train_net._teacher_change(cfg, run_config) is None
    cfg.train.teacher_checkpoint = "t.pth"
    assert "train.teacher_checkpoint is 't.pth'" in train_net._teacher_change(cfg, run_config)

    # a key one side leaves to its default is "not set", not None: `--resume ...ca_weight=0.5`
    # on a run that kept D3ETR's default said the run had "ca_weight: None"
    changes = train_net._changes(
        {"a": 1, "b": {"c": 2, "e": None}}, {"a": 1, "b": {"d": 3, "e": 4}}, "model"
    )
    assert changes == [
        "model.b.c: 2 (this config: not set (the default))",
        "model.b.d: not set (the default) (this config: 3)",
        "model.b.e: None (this config: 4)",
    ]
    cfg.model.test_topk_candidates_extra = 7
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    change = train_net._model_change(cfg, run_config)
    assert "model.test_topk_candidates_extra: not set (the default) (this config: 7)" in change


class _Loaded(Exception):
    pass


def _eval_only_loads(train_net, monkeypatch, config, out, *opts, flags=()):
    """The weights ``train_net.py --config-file config --eval-only flags ... opts`` evaluates:
    stopped when it loads them."""
    from detectron2.engine import default_argument_parser

    loaded = []

    def load(model, path, strict, key):
        loaded.append(path)
        raise _Loaded

    monkeypatch.setattr(train_net, "load_student", load)
    args = [
        "--config-file",
        str(config),
        "--eval-only",
        *flags,
        f"train.output_dir={out}",
        "dataloader.test.dataset.names.num_images=4",
        "dataloader.test.num_workers=0",
        *opts,
    ]
    with pytest.raises(_Loaded):
        train_net.main(default_argument_parser().parse_args(args))
    return loaded


def test_eval_only_evaluates_init_checkpoint_without_resume_and_needs_no_optimizer(
    tmp_path, monkeypatch
):
    """--eval-only in a training run's folder evaluates train.init_checkpoint (the run's last
    checkpoint only with --resume, as detectron2's tools), and a config without the training
    sections (optimizer, lr_multiplier) is enough to evaluate; --eval-only --resume there logs
    no teacher-change warning (it does not resume training)."""
    train_net = _train_net_module(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"w")
    (out / "last_checkpoint").write_text("model_final.pth")
    student = os.path.join(REPO, "configs/demo/student_retinanet.py")
    mine = str(tmp_path / "mine.pth")
    loads = _eval_only_loads(train_net, monkeypatch, student, out, f"train.init_checkpoint={mine}")
    assert loads == [mine]

    config = tmp_path / "eval_cfg.py"
    config.write_text(
        "from detectron2.config import LazyConfig\n"
        f"c = LazyConfig.load({student!r})\n"
        "model, dataloader, train = c.model, c.dataloader, c.train\n"
    )
    loads = _eval_only_loads(
        train_net, monkeypatch, config, tmp_path / "e", "train.init_checkpoint=x.pth"
    )
    assert loads == ["x.pth"]

    from detectron2.config import LazyConfig

    kd = load_config("configs/demo/pkd_retinanet.py")
    kd.train.output_dir, kd.train.teacher_checkpoint = str(out), "the_runs_teacher.pth"
    LazyConfig.save(kd, str(out / "config.yaml"))
    kd_config = os.path.join(REPO, "configs/demo/pkd_retinanet.py")
    opts = ("train.teacher_checkpoint=another.pth", "train.teacher_random_init=True")
    loads = _eval_only_loads(train_net, monkeypatch, kd_config, out, *opts, flags=["--resume"])
    assert loads == [str(out / "model_final.pth")]
    log = (out / "log.txt").read_text()
    assert "evaluating the last checkpoint" in log
    assert "--resume: train.teacher_checkpoint" not in log


def test_clip_grad_without_enabled_or_without_clip_grad_is_off():
    # train.clip_grad clips only with enabled=True: a dict of only max_norm (or no clip_grad at
    # all) leaves the gradients as they are
    from detkd.engine import _clip_max_norm

    cfg = load_config("configs/demo/pkd_retinanet.py")
    cfg.optimizer = load_config("configs/PKD/baseline_retinanet_R50_2x.py").optimizer
    cfg.optimizer.update(lr=1.0, momentum=0.0, weight_decay=0.0)
    cfg.train.clip_grad = dict(max_norm=1e-3)
    assert _clip_max_norm(cfg) is None
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    optimizer = KDTrainer.build_optimizer(cfg, model)
    (model.weight * torch.tensor([3.0, 4.0])).sum().backward()
    optimizer.step()
    assert model.weight.detach().flatten().tolist() == [-3.0, -4.0]
    del cfg.train.clip_grad
    assert _clip_max_norm(cfg) is None
    cfg.train.clip_grad = dict(enabled=True, max_norm=2)
    assert _clip_max_norm(cfg) == 2.0 and isinstance(_clip_max_norm(cfg), float)


def test_teacher_eval_records_not_of_this_hook_and_teacher_inside_a_key_are_no_evaluation(
    tmp_path, caplog
):
    # a record that is no JSON object, or whose teacher_checkpoint is no string, is no record (the
    # log says none was found); a metrics key with "teacher/" after its start is a student's
    import json
    from types import SimpleNamespace

    from detkd.engine import TeacherEvalHook

    cfg = _small_cfg(tmp_path, max_iter=1)
    cfg.train.teacher_checkpoint = "/teachers/t2.pth"
    hook = TeacherEvalHook(cfg)
    hook.trainer = SimpleNamespace(start_iter=2)
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"iteration": 0, "teacher/bbox/AP": 1.0}\n')
    record = tmp_path / "inference_teacher" / "teacher_eval.json"
    record.parent.mkdir()
    for text in ("[1]", "not json", '{"teacher_checkpoint": 3}', '{"teacher_checkpoint": null}'):
        record.write_text(text)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="detkd.engine"):
            assert hook._logged_before() is False, text
        assert (
            "(no inference_teacher/teacher_eval.json: an earlier run in this folder)" in caplog.text
        ), text
    record.write_text(json.dumps({"teacher_checkpoint": "/teachers/t2.pth"}))
    assert hook._logged_before() is True
    metrics.write_text('{"iteration": 0, "kd/teacher/AP": 1.0}\n')
    assert hook._logged_before() is False


def test_untagged_checkpoints_error_names_the_three_latest_and_the_last_to_echo(tmp_path):
    from detkd.engine import untagged_checkpoints_error

    for name in ("model_0000001.pth", "model_0000003.pth", "model_0000005.pth", "model_final.pth"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "model_final_student.pth").write_bytes(b"")  # no run checkpoint
    tag = tmp_path / "last_checkpoint"
    e = str(untagged_checkpoints_error(str(tmp_path)))
    assert (
        "holds run checkpoints (model_0000003.pth, model_0000005.pth, model_final.pth) but no " in e
    )
    assert f"(e.g. `echo model_final.pth > {tag}`)" in e
    tag.write_text("model_0000003.pth")
    assert untagged_checkpoints_error(str(tmp_path)) is None
    assert untagged_checkpoints_error(str(tmp_path / "none")) is None


def test_max_iter_true_and_an_indexed_cuda_device_without_cuda_are_clear_errors(tmp_path):
    # True is an int to Python (1) but no iteration count; train.device='cuda:0' is a CUDA
    # device as 'cuda' is
    cfg = _small_cfg(tmp_path / "z", max_iter=2)
    cfg.train.max_iter = True
    with pytest.raises(ValueError, match=r"train\.max_iter must be an int >= 1, got True"):
        KDTrainer(cfg)
    if not torch.cuda.is_available():
        cfg.train.device = "cuda:0"
        with pytest.raises(
            RuntimeError, match=r"train\.device='cuda:0', but torch finds no CUDA GPU"
        ):
            KDTrainer.build_model(cfg)


class _FixedResults:
    """An evaluator config target whose results hold a value that is no number."""

    def reset(self):
        pass

    def process(self, inputs, outputs):
        pass

    def evaluate(self):
        return {"bbox": {"AP": 12.5, "AP-names": ["a", "b"]}}


def test_teacher_eval_logs_and_records_numbers_only_of_its_teacher_checkpoint(tmp_path):
    # the record names train.teacher_checkpoint, and only the numbers are logged; a config
    # without an evaluator evaluates nothing and records nothing
    from detectron2.utils.events import EventStorage

    cfg = _small_cfg(tmp_path / "s", max_iter=1)
    cfg.dataloader.test.dataset.names.num_images = 1
    cfg.dataloader.evaluator = L(_FixedResults)()
    cfg.train.teacher_eval_at_start = True
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    cfg.train.teacher_checkpoint = "/teachers/t.pth"  # read by the hook only for its record
    hook = [h for h in trainer._hooks if type(h).__name__ == "TeacherEvalHook"][0]
    with EventStorage(0) as trainer.storage:
        hook.before_train()
    assert hook.results == {"bbox": {"AP": 12.5, "AP-names": ["a", "b"]}}
    assert {k: v for k, (v, _) in trainer.storage.latest().items()} == {"teacher/bbox/AP": 12.5}
    record = tmp_path / "s" / "inference_teacher" / "teacher_eval.json"
    assert json.loads(record.read_text()) == {
        "teacher_checkpoint": "/teachers/t.pth",
        "results": {"teacher/bbox/AP": 12.5},
    }

    del cfg.dataloader.evaluator
    record.unlink()
    hook.results = None
    with EventStorage(0) as trainer.storage:
        hook.before_train()
    assert hook.results is None and trainer.storage.latest() == {} and not record.exists()


def test_other_model_names_two_shapes_three_missing_and_three_extra_keys(tmp_path):
    # how another model's run checkpoint differs (a new run there would replace it): the first
    # two shape mismatches, three missing and three extra keys; the student's extra state (an
    # older version's files lack it) is no difference, a file that is no .pth is not read
    trainer = KDTrainer(_small_cfg(tmp_path / "o", max_iter=1))
    ours = trainer.checkpointer.model.state_dict()
    assert "_extra_state" in ours
    keys = [k for k, v in ours.items() if isinstance(v, torch.Tensor) and v.dim() > 1]
    theirs = dict(ours)
    for k in keys[:3]:
        theirs[k] = torch.zeros(1)
    for k in keys[3:7] + ["_extra_state"]:
        del theirs[k]
    theirs.update({f"x.{c}": torch.zeros(1) for c in "abcd"})
    path = tmp_path / "model_final.pth"
    torch.save({"model": theirs}, path)
    assert trainer._other_model(str(path)) == (
        f"shape mismatch: {keys[0]}: file (1,) vs model {tuple(ours[keys[0]].shape)}; "
        f"{keys[1]}: file (1,) vs model {tuple(ours[keys[1]].shape)}; "
        f"model keys not in the file: {keys[3:6]}; file keys the model lacks: ['x.a', 'x.b', 'x.c']"
    )
    torch.save({"model": {k: v for k, v in ours.items() if k != "_extra_state"}}, path)
    assert trainer._other_model(str(path)) is None
    torch.save({"model": theirs}, tmp_path / "model_final.pkl")
    assert trainer._other_model(str(tmp_path / "model_final.pkl")) is None


def test_test_logs_the_results_copypaste_lines_and_no_evaluator_evaluates_nothing(tmp_path):
    # KDTrainer.test logs detectron2's copypaste lines of the results (what a user copies into a
    # table); a config without dataloader.evaluator runs no inference
    cfg = _small_cfg(tmp_path / "t", max_iter=1)
    cfg.dataloader.test.dataset.names.num_images = 1
    cfg.dataloader.evaluator = L(_FixedResults)()
    calls = []

    def model(inputs):
        calls.append(len(inputs))
        return [{} for _ in inputs]

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    testing = logging.getLogger("detectron2.evaluation.testing")
    level = testing.level
    testing.addHandler(handler)
    testing.setLevel(logging.INFO)
    try:
        results = KDTrainer.test(cfg, model)
    finally:
        testing.removeHandler(handler)
        testing.setLevel(level)
    assert results == {"bbox": {"AP": 12.5, "AP-names": ["a", "b"]}} and calls == [1]
    assert lines == ["copypaste: Task: bbox", "copypaste: AP", "copypaste: 12.5000"]
    del cfg.dataloader.evaluator
    assert KDTrainer.test(cfg, model) == {} and calls == [1]


def test_resume_with_other_optimizer_parameter_groups_is_a_clear_error(tmp_path):
    # a weight decay of the biases' own: a parameter group more than the run had (torch's
    # ValueError on load), refused like another optimizer; nothing is overwritten
    from detkd.checkpoint import CheckpointMismatchError

    out = tmp_path / "g"
    _run(_small_cfg(out, 1))
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".pth"}
    cfg = _small_cfg(out, 2)
    cfg.optimizer.params.weight_decay_bias = 0.5
    with pytest.raises(
        CheckpointMismatchError,
        match=r"^--resume: the last checkpoint of .* does not fit the model of this config \(its "
        r"optimizer state does not fit this config's torch\.optim\.sgd\.SGD \(ValueError: loaded "
        r"state dict has a different number of parameter groups\)\)",
    ):
        KDTrainer(cfg).resume_or_load(resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".pth"} == files
