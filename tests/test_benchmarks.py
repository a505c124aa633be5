"""The benchmark's measuring helpers (the benchmarks themselves print ratios, they are not
tests)."""

import importlib.util
import os

import torch

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark(name):
    """Import benchmarks/<name>.py (the folder is not a package; kd_profile imports kd_overhead)."""
    import sys

    folder = os.path.join(REPO, "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kd_overhead():
    return _benchmark("kd_overhead")


def test_cpu_peak_memory_of_a_known_allocation_pattern():
    kd = _kd_overhead()
    kept = torch.ones(250_000)  # 1 MB allocated before the call and used in it

    def step():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(2_000_000)  # 8 MB: a + b + kept = 13 MB live
        del a
        c = torch.empty(500_000)  # 2 MB: b + c + kept = 11 MB
        return (b.sum() + c.sum() + kept.sum()).item()

    peak = kd._peak(step, torch.device("cpu"))
    assert peak is not None
    assert 13_000_000 <= peak <= 13_000_000 + 4096, peak


def test_ratio_spread_is_the_range_of_per_round_median_ratios():
    kd = _kd_overhead()
    # 2 rounds of 3 calls: medians (s, t, kd) = (1, 1, 2.2) then (2, 1, 3.9); outliers ignored
    t_s, t_t = [1, 1, 5, 2, 2, 0], [1, 1, 1, 1, 1, 1]
    t_kd = [2.2, 0, 9, 3.9, 0, 3.9]
    low, high = kd._ratio_spread(t_s, t_t, t_kd, rounds=2)
    assert abs(low - 1.1) < 1e-12 and abs(high - 1.3) < 1e-12
    assert kd._ratio_spread([1], [1], [1], rounds=1) is None


def test_cpu_peak_counts_the_resident_modules_weights_that_the_call_does_not_run():
    from torch import nn

    import pytest

    kd = _kd_overhead()
    teacher = nn.Sequential(nn.Linear(500, 500), nn.Linear(500, 100))  # 1,002,000 + 200,400 bytes
    x = torch.ones(1, 500)  # 2000 bytes, used by the call

    def first_layer_only():
        with torch.no_grad():
            teacher[0](x)  # output (1, 500): 2000 bytes

    def nothing_of_the_teacher():
        torch.empty(250_000).fill_(1.0)  # 1 MB

    # the first layer's weights are used (seen by the profiler), the second's added as resident
    assert (
        kd._peak(first_layer_only, torch.device("cpu"), teacher)
        == 1_002_000 + 2000 + 2000 + 200_400
    )
    assert kd._peak(nothing_of_the_teacher, torch.device("cpu"), teacher) == 1_000_000 + 1_202_400

    def broken():
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):  # not hidden as "no memory column"
        kd._peak(broken, torch.device("cpu"), teacher)


def _kd_profile():
    return _benchmark("kd_profile")


def test_op_differences_are_kd_minus_student_per_op():
    prof = _kd_profile()
    student = {"conv": (10.0, 4.0, 2.0), "add": (1.0, 0.5, 3.0)}
    kd = {"conv": (25.0, 9.0, 5.0), "mine": (7.0, 2.0, 4.0)}
    rows = {r[0]: r[1:] for r in prof.op_differences(student, kd)}
    assert rows == {"conv": (15.0, 5.0, 3.0), "add": (-1.0, -0.5, -3.0), "mine": (7.0, 2.0, 4.0)}
    # less the teacher forward's ops (in the ratio's denominator: not the distillation's cost)
    teacher = {"conv": (12.0, 3.0, 2.0), "pool": (2.0, 1.0, 1.0)}
    rows = {r[0]: r[1:] for r in prof.op_differences(student, kd, teacher)}
    assert rows == {
        "conv": (3.0, 2.0, 1.0),
        "add": (-1.0, -0.5, -3.0),
        "mine": (7.0, 2.0, 4.0),
        "pool": (-2.0, -1.0, -1.0),
    }


def test_profile_of_the_demo_pkd_step_shows_the_distiller_ops():
    """One profiled step of each kind on the CPU: PKD's level-loss function runs once per level
    pair in the KD step only (forward and backward), and the op counts grow."""
    prof = _kd_profile()
    from detectron2.utils.events import EventStorage

    cpu = torch.device("cpu")
    built = prof.build_model("configs/demo/pkd_retinanet.py", cpu, 2, 64)
    student_step, teacher_forward, kd_step = prof.build_steps(None, cpu, 2, 64, built=built)
    with EventStorage():
        kd_step()
        ops_s, ops_kd = prof.op_table(student_step, cpu, 1), prof.op_table(kd_step, cpu, 1)
        ops_t = prof.op_table(teacher_forward, cpu, 1)
        assert prof.sync_sites(kd_step, cpu) == {}  # host synchronisations are counted on CUDA only
    rows = {r[0]: r[1:] for r in prof.op_differences(ops_s, ops_kd, ops_t)}
    assert "_PKDLevelLoss" not in ops_s
    n_levels = rows["_PKDLevelLoss"][2]
    assert n_levels >= 3 and rows["_PKDLevelLossBackward"][2] == n_levels
    assert sum(v[2] for v in ops_kd.values()) > sum(v[2] for v in ops_s.values())
    # with the teacher's forward taken out, the convolutions the KD step adds are the
    # distillers' own (PKD's 4 1x1 adapters; with the teacher's, 32)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in built[0].distillers.modules())
    assert rows["aten::convolution"][2] == n_convs


def test_profile_sync_recorder_names_the_thread_that_synchronised():
    """Synchronisations of other threads (D3ETR's match thread) are counted under their thread's
    name, the main thread's under None, each with its call site."""
    import collections
    import threading

    prof = _kd_profile()
    sites = collections.Counter()
    record = prof.sync_recorder(sites)
    record("called a synchronizing CUDA operation\nmore", UserWarning, "x.py", 1)
    worker = threading.Thread(
        target=record,
        args=("called a synchronizing CUDA operation", UserWarning, "x.py", 1),
        name="detkd-d3etr-match_0",
    )
    worker.start()
    worker.join()
    assert {(k[0], k[2]) for k in sites} == {
        ("called a synchronizing CUDA operation", None),
        ("called a synchronizing CUDA operation", "detkd-d3etr-match_0"),
    }
    assert sum(sites.values()) == 2


def test_cpu_peak_counts_what_the_step_frees_of_its_previous_call():
    """A training step frees what its previous call left (the last step's gradients) after
    allocating its own activations: those bytes are live at the peak. The CPU allocator reports
    the free of a block to the profiler only if the block was allocated while memory profiling
    was on, so the previous call must run under the profiler too, whatever ran before it."""
    kd = _kd_overhead()
    state = {}

    def step():
        a = torch.empty(1_000_000)  # 4 MB of activations
        b = torch.empty(500_000)  # 2 MB more: with the 4 MB left by the previous call, 10 MB
        state.pop("grads", None)  # the previous call's "gradients" freed (zero_grad)
        del b
        state["grads"] = torch.empty(1_000_000)  # this call's: 8 MB with a
        return a.sum().item()

    for _ in range(2):
        step()  # the state a benchmark's timing loop leaves: allocated with profiling off
        peak = kd._peak(step, torch.device("cpu"))
        assert peak is not None
        assert 10_000_000 <= peak <= 10_000_000 + 4096, peak


def test_student_and_kd_steps_keep_one_momentum_buffer_per_parameter():
    """The student-alone and KD optimizers share their state: on CUDA every tensor on the device
    counts, and a second momentum buffer per student parameter would be counted in both peaks.
    distiller_state() is what the student-alone peak leaves out there: the distillers' weights,
    gradients and momentum."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.utils.events import EventStorage

    kd = _kd_overhead()
    cfg = LazyConfig.load(os.path.join(REPO, "configs/demo/pkd_retinanet.py"))
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    batch = kd._batch(cfg, 2, 64)
    student_step, _, kd_step, opt_s, opt_kd, distiller_state = kd._steps(
        model, batch, torch.device("cpu")
    )
    with EventStorage():
        student_step()
        kd_step()
        student_step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    buffers = {
        v.data_ptr(): v
        for opt in (opt_s, opt_kd)
        for st in opt.state.values()
        for v in st.values()
        if torch.is_tensor(v)
    }
    n_student, n_distillers = nbytes(model.student.parameters()), nbytes(
        model.distillers.parameters()
    )
    assert n_distillers > 0
    assert nbytes(buffers.values()) == n_student + n_distillers
    assert nbytes(distiller_state()) == 3 * n_distillers  # weights, gradients, momentum


def test_cuda_peak_is_the_second_call_less_the_foreign_tensors(monkeypatch):
    """CUDA path, with the device calls replaced: the peak is reset between the two calls, and
    the foreign tensors on the device are subtracted once each."""
    from types import SimpleNamespace

    kd = _kd_overhead()
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 10_000_000)

    def fake(ptr, numel, device="cuda"):
        return SimpleNamespace(
            device=torch.device(device),
            data_ptr=lambda: ptr,
            numel=lambda: numel,
            element_size=lambda: 4,
        )

    weight = fake(1, 100_000)
    foreign = [weight, fake(2, 50_000), weight, None, fake(3, 1_000_000, device="cpu")]
    peak = kd._peak(lambda: events.append("call"), torch.device("cuda"), None, foreign=foreign)
    assert events == ["call", "reset", "call"]
    assert peak == 10_000_000 - 600_000


def test_median_of_an_even_count_is_the_mean_of_the_middle_two(tmp_path):
    kd = _kd_overhead()
    assert kd._median([4.0, 1.0, 3.0]) == 3.0
    assert kd._median([4.0, 1.0, 3.0, 2.0]) == 2.5  # not 3.0, the upper of the two middle values
    low, high = kd._ratio_spread([1, 3, 1, 1], [1, 1, 1, 1], [3, 5, 2, 2], rounds=2)
    # rounds of 2 calls: medians (s, t, kd) = (2, 1, 4), then (1, 1, 2)
    assert low == 1.0 and abs(high - 4 / 3) < 1e-12, (low, high)

    import json

    from detkd.demo import _seconds_per_iter

    with open(tmp_path / "metrics.json", "w") as f:
        for t in (0.4, 0.1, 0.3, 0.2):
            f.write(json.dumps({"time": t, "iteration": 1}) + "\n")
        f.write(json.dumps({"bbox/AP": 1.0}) + "\n")
    assert abs(_seconds_per_iter(str(tmp_path)) - 0.25) < 1e-12


def test_a_mistyped_method_is_an_error_not_an_empty_table(monkeypatch, capsys):
    # `kd_overhead.py --methods gdi` printed the header and no row, and exited 0
    import sys

    import pytest

    kd_overhead, kd_profile = _kd_overhead(), _benchmark("kd_profile")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    for module, tool, argv in (
        (kd_overhead, "kd_overhead", ["--methods", "gid", "gdi", "--device", "cpu"]),
        (kd_profile, "kd_profile", ["--methods", "gid", "gdi", "--device", "cpu"]),
        (kd_profile, "kd_profile", ["--methods", "pkdgid", "--large", "--device", "cpu"]),
    ):
        monkeypatch.setattr(sys, "argv", [tool + ".py", *argv])
        monkeypatch.setattr(
            module,
            "bench" if tool == "kd_overhead" else "report",
            lambda *a, **k: pytest.fail("nothing may run"),
        )
        bad = argv[2] if argv[2] != "--large" else "pkdgid"
        with pytest.raises(
            SystemExit,
            match=rf"\[{tool}\] --methods {bad}: no such method here; available: \[.*'gid'",
        ):
            module.main()
    # known ones pass
    kd_overhead.check_methods(["pkd", "pkdgid"], {"pkd", "pkdgid", "gid"}, "kd_overhead")
    kd_overhead.check_methods(None, {"pkd"}, "kd_overhead")


def test_counts_below_their_minimum_are_usage_errors(monkeypatch, capsys):
    # `kd_overhead.py --iters 0` built every model and printed "failed: IndexError: list index
    # out of range" in each row (medians of no times), `--rounds 0` a ZeroDivisionError;
    # `kd_profile.py --steps 0` empty tables; `detkd.demo --iters 0` (and effectiveness.py's)
    # trained the configs' full schedule; a negative seed drew a random one per run
    import subprocess
    import sys

    from detkd import demo, repro

    import pytest

    kd_overhead, kd_profile = _kd_overhead(), _benchmark("kd_profile")
    effectiveness = _benchmark("effectiveness")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    for module in (kd_overhead, kd_profile):
        monkeypatch.setattr(
            module,
            "bench" if module is kd_overhead else "report",
            lambda *a, **k: pytest.fail("nothing may run"),
        )
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing may train"))
    cases = [
        (kd_overhead.main, ["--iters", "0"], "--iters: 0 is less than 1"),
        (kd_overhead.main, ["--rounds", "0"], "--rounds: 0 is less than 1"),
        (kd_profile.main, ["--steps", "0"], "--steps: 0 is less than 1"),
        (demo.main, ["--iters", "0"], "--iters: 0 is less than 1"),
        (demo.main, ["--seeds", "0", "-1"], "--seeds: -1 is less than 0"),
        (demo.main, ["--heldout", "-5"], "--heldout: -5 is less than 0"),
        (demo.main, ["--iters", "ten"], "--iters: 'ten' is not an integer"),
        (effectiveness.main, ["--iters", "0"], "--iters: 0 is less than 1"),
        (
            repro.main,
            ["configs/demo/pkd_retinanet.py", "--num-gpus", "0"],
            "--num-gpus: 0 is less than 1",
        ),
    ]
    for main, argv, message in cases:
        monkeypatch.setattr(sys, "argv", ["tool.py", *argv])  # effectiveness.py reads sys.argv
        with pytest.raises(SystemExit) as e:
            main() if main is effectiveness.main else main(argv)
        assert e.value.code == 2, argv
        assert message in capsys.readouterr().err, argv


def test_a_device_this_machine_lacks_is_a_usage_error(monkeypatch, capsys):
    # `--device cuda` without CUDA was a RuntimeError traceback ("Found no NVIDIA driver") from
    # the first CUDA call, `--device gpu` one from torch.device
    import sys

    import pytest

    kd_overhead, kd_profile = _kd_overhead(), _benchmark("kd_profile")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    for module in (kd_overhead, kd_profile):
        monkeypatch.setattr(
            module,
            "bench" if module is kd_overhead else "report",
            lambda *a, **k: pytest.fail("nothing may run"),
        )
        for device, message in (
            ("cuda", "CUDA is not available here: use --device cpu"),
            ("gpu", "'gpu' is not a torch device (cpu, cuda, cuda:1, ...)"),
        ):
            monkeypatch.setattr(sys, "argv", ["tool.py"])
            with pytest.raises(SystemExit) as e:
                module.main(["--methods", "pkd", "--device", device])
            assert e.value.code == 2
            assert f"argument --device: {message}" in capsys.readouterr().err
    assert kd_overhead.parse_device("cpu") == torch.device("cpu")


def test_a_cuda_device_index_this_machine_lacks_is_a_usage_error(monkeypatch):
    # `--device cuda:1` on a machine with one GPU passed the check (CUDA is available) and
    # failed at the first CUDA call ("invalid device ordinal") after the configs were built
    import argparse

    import pytest

    kd_overhead = _kd_overhead()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(
        argparse.ArgumentTypeError, match=r"this machine has 1 CUDA device \(cuda:0 to cuda:0\)"
    ):
        kd_overhead.parse_device("cuda:1")
    assert kd_overhead.parse_device("cuda:0") == torch.device("cuda", 0)
    assert kd_overhead.parse_device("cuda") == torch.device("cuda")


def test_variant_rows_override_keys_their_configs_have():
    """kd_overhead's variant rows (VARIANTS on the demo configs, LARGE_VARIANTS on the R50 pairs):
    each override names a key of the config it runs on (a renamed or mistyped one would stop the
    benchmark at that row), and the R50 pair's row is the demo's bf16 ABF row, picked by label."""
    import glob

    from detectron2.config import LazyConfig

    from detkd.config_checks import check_override_keys

    kd = _kd_overhead()
    for method, variants in kd.VARIANTS.items():
        demo = glob.glob(os.path.join(REPO, "configs", "demo", method + "_*.py"))
        assert demo, method
        for path in demo:
            for _, opts in variants:
                check_override_keys(LazyConfig.load(path), opts)
    ((label, opts),) = kd.LARGE_VARIANTS["reviewkd"]
    assert label == "abf_precision=bf16" and (label, opts) in kd.VARIANTS["reviewkd"]
    cfg = LazyConfig.load(os.path.join(REPO, kd.LARGE["reviewkd"]))
    check_override_keys(cfg, opts)
    assert LazyConfig.apply_overrides(cfg, opts).model.distillers.reviewkd.abf_precision == "bf16"
    assert set(kd.LARGE_VARIANTS) == {"reviewkd"}


def test_distiller_split_removes_and_times_exactly_the_distillers_forward():
    """kd_profile's split: inside ``without_distiller_losses`` the KD step's losses are the
    student's alone (no loss_pkd) and the distiller's forward is back afterwards; the forward
    timer sees one call per KD step; the split's numbers are its steps' differences."""
    prof = _kd_profile()
    from detectron2.utils.events import EventStorage

    cpu = torch.device("cpu")
    model, batch = prof.build_model("configs/demo/pkd_retinanet.py", cpu, 2, 64)
    pkd = model.distillers["pkd"]
    forward = pkd.forward
    with EventStorage():
        with prof.without_distiller_losses(model):
            keys = set(model(batch))
        assert keys and not any(k.startswith("loss_pkd") for k in keys)
        assert pkd.forward == forward and "forward" not in vars(pkd)  # the class's method again
        assert "loss_pkd" in model(batch)
        times = []
        with prof.timed_distiller_forwards(model, cpu, times):
            model(batch)
            model(batch)
        assert len(times) == 2 and all(t > 0 for t in times) and pkd.forward == forward
        split = prof.distiller_split(model, batch, cpu, 1)
    assert split["own"] == pytest.approx(split["kd"] - split["kd_no_losses"])
    assert 0 < split["forward"] < split["kd"] and split["floor"] > 0


def test_distiller_split_blocks_nest_inside_the_compiled_forwards():
    """``kd_profile --compile`` times the split inside ``compiled_distiller_forwards``: an inner
    block (no losses, timed forwards) must put the compiled forward back on exit, not the class's
    eager one; the outer block then restores the class's method. Nothing is called compiled here
    (compilation is lazy), so this costs no compile time."""
    prof = _kd_profile()
    from detectron2.utils.events import EventStorage

    cpu = torch.device("cpu")
    model, batch = prof.build_model("configs/demo/pkd_retinanet.py", cpu, 2, 64)
    pkd = model.distillers["pkd"]
    eager = pkd.forward
    with prof.compiled_distiller_forwards(model):
        compiled = pkd.forward
        assert compiled != eager and getattr(compiled, "_torchdynamo_orig_callable", None) == eager
        with EventStorage(), prof.without_distiller_losses(model):
            keys = set(model(batch))
        assert keys and not any(k.startswith("loss_pkd") for k in keys)
        assert pkd.forward is compiled
        with prof.timed_distiller_forwards(model, cpu, []):
            assert pkd.forward is not compiled
        assert pkd.forward is compiled
    assert pkd.forward == eager and "forward" not in vars(pkd)


def test_kd_step_reads_its_scalars_after_backward_as_training_does_and_threads_follow_omp(
    monkeypatch,
):
    """The KD step read its logged scalars between forward and backward (scalars_after_backward
    False: on a GPU a host sync before the backward is queued, which KDTrainer's steps do not
    have); it reads them after, as _KDScalarsHook does. A user's $OMP_NUM_THREADS is kept."""
    from detectron2.utils.events import EventStorage

    prof = _kd_profile()
    kd_overhead = _kd_overhead()
    cpu = torch.device("cpu")
    model, batch = prof.build_model("configs/demo/pkd_retinanet.py", cpu, 2, 64)
    order = []
    write = model.write_pending_scalars

    def write_and_record():
        if model._pending_scalars:  # (each forward first writes a previous step's: none here)
            order.append("scalars")
        write()

    monkeypatch.setattr(model, "write_pending_scalars", write_and_record)
    kd_step = prof.build_steps(None, cpu, 2, 64, built=(model, batch))[2]
    loss_backward = torch.Tensor.backward
    monkeypatch.setattr(
        torch.Tensor, "backward", lambda *a, **k: order.append("backward") or loss_backward(*a, **k)
    )
    with EventStorage() as storage:
        kd_step()
    assert model.scalars_after_backward is True and order == ["backward", "scalars"]
    assert any(k.startswith("kd_diag/") or k.startswith("pkd") for k in storage.histories())

    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    kd_overhead.cpu_threads(cpu)
    assert threads == []
    monkeypatch.delenv("OMP_NUM_THREADS")
    kd_overhead.cpu_threads(cpu)
    assert len(threads) == 1 and threads[0] >= 1

    # freed memory kept on the CPU as the trainer keeps it, unless --return-freed-memory
    kept = []
    monkeypatch.setattr(kd_overhead, "keep_freed_cpu_memory", lambda: kept.append(1) or True)
    assert kd_overhead.cpu_memory(cpu) is True and kept == [1]
    assert kd_overhead.cpu_memory(cpu, keep=False) is False and kept == [1]
    assert kd_overhead.cpu_memory(torch.device("cuda")) is False and kept == [1]


def test_large_only_runs_the_r50_pairs_at_the_given_batch_and_size(monkeypatch, capsys):
    """--large-only times only the R50/R101 pairs (no demo row), each with --large-batch images
    of --large-size (a side or HxW), named in the setting; without the options they keep their
    2 x 640x640 and the plain name. bench is replaced by a recorder: no model is built."""
    kd = _kd_overhead()
    calls = []

    def recorder(path, iters, device, bs, size, *rest):
        calls.append((path, bs, size))
        times = dict(student=1.0, teacher=1.0, kd=2.0)
        return dict(times, floor=None, mem_s=None, mem_kd=None, spread=None)

    monkeypatch.setattr(kd, "bench", recorder)
    paper_size = "--large-only --large-batch 3 --large-size 800x1333 --methods pkd reviewkd"
    kd.main(["--device", "cpu", *paper_size.split()])
    assert calls == [
        (kd.LARGE["pkd"], 3, (800, 1333)),
        (kd.LARGE["reviewkd"], 3, (800, 1333)),
        (kd.LARGE["reviewkd"], 3, (800, 1333)),  # its abf_precision=bf16 row
    ]
    rows = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith(("pkd", "rev"))
    ]
    assert len(rows) == 3 and all("(3 x 800x1333)" in r for r in rows)
    assert "demo" not in "".join(rows)
    calls.clear()
    kd.main("--device cpu --large --methods pkd --no-variants".split())
    assert calls == [("configs/demo/pkd_retinanet.py", 8, 128), (kd.LARGE["pkd"], 2, 640)]
    assert "R50 pair retinanet_R50_from_retinanet_R101_2x " in capsys.readouterr().out
    calls.clear()
    kd.main("--device cpu --large-only --large-size 512 --methods pkd".split())
    assert calls == [(kd.LARGE["pkd"], 2, 512)]


def test_image_size_argument_and_rectangular_coco_batches():
    import argparse

    kd = _kd_overhead()
    assert kd.parse_image_size("640") == 640
    assert kd.parse_image_size("800x1333") == (800, 1333)
    assert kd.parse_image_size("800X1333") == (800, 1333)
    for bad in ("", "x", "800x", "16", "800x1333x640", "8.5x100", "800x20"):
        with pytest.raises(argparse.ArgumentTypeError, match="not an image size"):
            kd.parse_image_size(bad)
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(os.path.join(REPO, kd.LARGE["pkd"]))
    batch = kd._batch(cfg, 2, (48, 80))
    assert [tuple(x["image"].shape) for x in batch] == [(3, 48, 80)] * 2
    assert [(x["height"], x["width"]) for x in batch] == [(48, 80)] * 2
    assert batch[0]["instances"].image_size == (48, 80)
    square = kd._batch(cfg, 1, 64)
    assert tuple(square[0]["image"].shape) == (3, 64, 64) and square[0]["height"] == 64
