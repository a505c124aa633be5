#!/usr/bin/env python
"""
Cost of distillation per training iteration, for every method with a demo config.

For each ``configs/demo/<method>_<detector>.py`` (and, with ``--large`` or on a GPU, the
R50/R101 paper configs, on 2 random 640 x 640 images by default: ``--large-batch`` and
``--large-size``, e.g. ``800x1333`` for the papers' COCO training size; ``--large-only`` skips
the demo configs) this times, on one fixed batch:

  (a) a training step of the student alone,
  (b) the teacher's forward alone, as far as the method needs (``detkd.distiller.run_teacher``),
  (c) a training step of the DistillationDetector (student + teacher + distiller),

one (a), one (b), one (c) in turn, ``iters * rounds`` times, and prints the ratio of median
times ``kd_step / (student_step + teacher_forward)`` (and, as "rounds", the lowest and highest
ratio of the rounds' own medians: how much it moves within the run; the ratio of the medians
over all rounds need not lie between them): 1.0 means distillation
costs nothing beyond running both models; targets are PKD <= 1.05, ReviewKD and GID <= 1.10,
D3ETR <= 1.15. It also prints peak memory of (c) against (a) plus the teacher's weights
(no teacher activations are kept for backward: ``tests/test_distiller.py`` checks it for
every method with saved-tensor hooks; a kept one would also raise this ratio): on a GPU from
``max_memory_allocated`` (less the distillers' weights, gradients and optimizer state during
(a)), on a CPU from the profiler's memory timeline; each step measured on the second of two
extra calls, both profiled on a CPU (see ``_peak``). ReviewKD and D3ETR are also measured at a
cheaper non-paper setting (``VARIANTS``; ``--no-variants`` skips them). For these two, the
"floor" column is the ratio
that the trainable compute the method adds by design (ReviewKD's ABFs, D3ETR's auxiliary query
group; see ``FLOORS``), timed alone, already costs: an estimate of the lowest ratio an
implementation of the method can have (timed with its own noise and a little overhead of its
own, so a measured ratio can fall slightly below it). This is a benchmark, not a test: it
prints ratios.

Usage::

    python benchmarks/kd_overhead.py [--iters 10] [--rounds 3] [--device cuda] [--large]
        [--large-only] [--large-batch 2] [--large-size 640 | 800x1333]
        [--methods gid ...] [--no-variants] [--teacher-precision fp16] [--set key=value ...]
        [--return-freed-memory]

On a CPU the steps run as a training run's do (``train.keep_freed_cpu_memory``): memory a step
frees stays in the process; ``--return-freed-memory`` times them with glibc's defaults, under
which the KD steps fault back hundreds of MB per step that the student's steps do not.
"""

import argparse
import contextlib
import glob
import json
import os
import sys
import tempfile
import time
import warnings

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.utils.events import EventStorage, get_event_storage

from detkd.demo import applicable_overrides, check_overrides, int_at_least
from detkd.distiller import inputs_on_device, run_teacher
from detkd.utils import keep_freed_cpu_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {"pkd": 1.05, "reviewkd": 1.10, "gid": 1.10, "d3etr": 1.15}
LARGE = {
    "pkd": "configs/PKD/retinanet_R50_from_retinanet_R101_2x.py",
    "reviewkd": "configs/ReviewKD/faster_rcnn_R50_from_faster_rcnn_R101.py",
    "gid": "configs/GID/retinanet_R50_from_retinanet_R101_2x.py",
    "d3etr": "configs/D3ETR/r50_from_r101_12ep.py",
}


# Cheaper, non-paper settings of the methods whose paper settings add trainable compute by
# design (ReviewKD's full-width ABFs, D3ETR's auxiliary query group): measured on the demo pair
# after the paper setting, as separate rows, so the trade-off is printed too. ReviewKD's
# abf_precision=bf16 keeps the paper's ABFs and changes only their arithmetic (bfloat16 on
# channels-last maps): also measured on the R50 pair (LARGE_VARIANTS).
VARIANTS = {
    "reviewkd": [
        ("mid_channels=64", ["model.distillers.reviewkd.mid_channels=64"]),
        ("abf_precision=bf16", ['model.distillers.reviewkd.abf_precision="bf16"']),
    ],
    "d3etr": [
        (
            "adaptive matching only",
            [
                "model.distillers.d3etr.fixed_matching=False",
                "model.distillers.d3etr.aux_gt_loss=False",
            ],
        )
    ],
}
LARGE_VARIANTS = {"reviewkd": [v for v in VARIANTS["reviewkd"] if v[0] == "abf_precision=bf16"]}


# The trainable compute a method adds by design, timed alone as a training step; its "floor"
# ratio (student_step + teacher_forward + extra) / (student_step + teacher_forward) is what no
# implementation of the method can go below. ReviewKD: the ABF chain's forward + backward on the
# student's FPN maps. D3ETR: the student trained with MixMatcher's auxiliary query group (the
# teacher's queries through the student's decoder, with its ground-truth losses) and no
# distillation loss, measured as a whole student step that replaces (a).
def _reviewkd_floor(model, batch, opt):
    distiller = model.distillers["reviewkd"]
    with torch.no_grad():
        feats = model.student.backbone(model.student.preprocess_image(batch).tensor)
    feats = {k: v.detach().requires_grad_() for k, v in feats.items()}

    def abf_step():
        outs = distiller.review(feats)
        sum(o.float().square().mean() for o in outs.values()).backward()
        for v in feats.values():
            v.grad = None
        opt.zero_grad(set_to_none=True)

    return "extra", abf_step


def _d3etr_floor(model, batch, opt):
    student, distiller = model.student, model.distillers["d3etr"]
    if not distiller.fixed_matching:
        return None, None
    N = student.num_queries

    def student_with_aux_group_step():
        queries = model.teacher.query_embed.weight.detach()
        if distiller.query_proj is not None:
            queries = distiller.query_proj(queries)
        with student.extra_query_group(queries):
            out = student.forward_predictions(student.preprocess_image(batch))
        targets = student.prepare_targets([x["instances"] for x in batch])
        logits, boxes = out["pred_logits"], out["pred_boxes"]
        losses = dict(student.compute_gt_losses(logits[:, :, :N], boxes[:, :, :N], targets))
        if distiller.aux_gt_loss:
            aux = student.compute_gt_losses(logits[:, :, N:], boxes[:, :, N:], targets)
            losses.update({"aux_" + k: v for k, v in aux.items()})
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return "student", student_with_aux_group_step


FLOORS = {"reviewkd": _reviewkd_floor, "d3etr": _d3etr_floor}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median(values):
    """The median: the middle value, or the mean of the two middle values of an even count."""
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _timed_interleaved(fns, iters, device):
    """
    Seconds per call of each of ``fns``, calling them in turn ``iters`` times (after 2 warm-up
    turns): step-level interleaving, so that a busy or throttled machine slows every
    measurement alike instead of whichever one ran at the time. Returns one list of times per
    function, in call order.
    """
    for _ in range(2):  # warm-up
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(iters):
        for k, fn in enumerate(fns):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - start)
    return times


def _ratio_spread(t_s, t_t, t_kd, rounds):
    """(lowest, highest) ratio of the per-round medians: how much the ratio moves within a run."""
    n = len(t_kd) // rounds
    if rounds < 2 or n < 1:
        return None
    ratios = [
        _median(t_kd[i * n : (i + 1) * n])
        / (_median(t_s[i * n : (i + 1) * n]) + _median(t_t[i * n : (i + 1) * n]))
        for i in range(rounds)
    ]
    return min(ratios), max(ratios)


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 (where C++ libraries write) to /dev/null for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak(fn, device, resident=None, foreign=()):
    """
    Peak bytes of live tensors during one call of ``fn``, counting the weights of ``resident``
    (the teacher) as resident throughout. ``fn`` is called twice and the second call measured:
    the measured call then starts from the state a call of its own kind leaves (the previous
    step's gradients, which it frees after its forward), as in its own training loop, whatever
    ran before. CUDA: ``max_memory_allocated``, which counts every tensor on the device, less
    the bytes of ``foreign`` (tensors on the device that are no part of this step's training
    run, e.g. the distillers' weights, gradients and optimizer state during a student-alone
    step; they must stay untouched by ``fn``). CPU: the profiler's memory timeline, which only
    counts the tensors the call allocates or uses, plus the parameters and buffers of the
    ``resident`` submodules the call did not run (a student-alone step runs none of the
    teacher's, a KD step only the parts its distillers need); the first call also runs under a
    profiler, because the CPU allocator reports the free of a block to the profiler only if
    the block was allocated while memory profiling was on (what the measured call frees of
    what an unprofiled call left would go uncounted). None where the profiler cannot give a
    timeline; errors of ``fn`` itself propagate.
    """
    if device.type == "cuda":
        fn()
        _sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        seen, foreign_bytes = set(), 0
        for t in foreign:
            if t is not None and t.device.type == "cuda" and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                foreign_bytes += t.numel() * t.element_size()
        return torch.cuda.max_memory_allocated(device) - foreign_bytes
    from torch.profiler import ProfilerActivity, profile

    modules = list(resident.modules()) if resident is not None else []
    ran = set()
    # export_memory_timeline: deprecated, still the CPU way; the profiler's own start/stop
    # messages to stderr are silenced.
    with warnings.catch_warnings(), _quiet_stderr():
        warnings.simplefilter("ignore")
        try:
            prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            prof.start()
        except Exception:  # a profiler without CPU memory profiling: no memory column
            return None
        try:
            fn()  # the state the measured call starts from, allocated under memory profiling
        finally:
            prof.stop()
        hooks = [m.register_forward_pre_hook(lambda mod, args: ran.add(mod)) for m in modules]
        try:
            prof = profile(
                activities=[ProfilerActivity.CPU],
                profile_memory=True,
                record_shapes=True,
                with_stack=True,
            )
            prof.start()
            try:
                fn()
            finally:
                prof.stop()
        finally:
            for h in hooks:
                h.remove()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "memory.json")
                prof.export_memory_timeline(path, device="cpu")
                with open(path) as f:
                    _, sizes = json.load(f)  # [times, [bytes per category] per time]
        except Exception:  # an older or newer profiler without the timeline
            return None
    unused = [
        t
        for m in modules
        if m not in ran
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
    ]
    return max((sum(s) for s in sizes), default=0) + sum(
        t.numel() * t.element_size() for t in unused
    )


def _batch(cfg, batch_size, image_size):
    """One batch of the config's training data (shapes), or random images for COCO configs
    (``image_size``: a side or an ``(height, width)`` pair)."""
    if "coco" in str(cfg.dataloader.train.dataset.names):
        from detectron2.structures import Boxes, Instances

        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        g = torch.Generator().manual_seed(0)
        out = []
        for _ in range(batch_size):
            inst = Instances((h, w))
            xy = torch.rand(4, 2, generator=g) * min(h, w) * 0.6
            inst.gt_boxes = Boxes(torch.cat([xy, xy + 32 + torch.rand(4, 2, generator=g) * 128], 1))
            inst.gt_classes = torch.randint(0, 80, (4,), generator=g)
            img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
            out.append({"image": img, "height": h, "width": w, "instances": inst})
        return out
    cfg.dataloader.train.total_batch_size = batch_size
    cfg.dataloader.train.num_workers = 0
    return next(iter(instantiate(cfg.dataloader.train)))


def _steps(model, batch, device):
    """
    (student_step, teacher_forward, kd_step, opt_s, opt_kd, distiller_state) on ``batch``: (a), (b)
    and (c) of the module's docstring, with SGD at lr 0 (the update runs, same cost, but
    randomly initialised big models do not diverge). The two optimizers share their state: one
    momentum buffer per student parameter, as in either training run (two would put a second
    copy of the student's optimizer state on the device, counted by both CUDA memory peaks).
    ``distiller_state()``: the distillers' weights, gradients and optimizer state now.
    """
    student, teacher = model.student, model.teacher
    opt_s = torch.optim.SGD(student.parameters(), lr=0.0, momentum=0.9)
    opt_kd = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    opt_s.state = opt_kd.state

    def student_step():
        loss = sum(student(batch).values())
        opt_s.zero_grad(set_to_none=True)
        loss.backward()
        opt_s.step()

    # (b) reads images already on the device: (c) copies them once for both models, (a) once as
    # a student-alone run does; a copy in (b) too would be one the denominator pays and (c) not
    teacher_batch = inputs_on_device(batch, teacher.pixel_mean.device)

    def teacher_forward():
        with torch.no_grad(), model._teacher_autocast(device.type):
            run_teacher(teacher, model.teacher_images(teacher_batch), model._teacher_capture)
        model._teacher_capture.clear()

    # as under KDTrainer (engine._KDScalarsHook): the step's logged scalars are read after the
    # backward pass, not between forward and backward (on a GPU, a host sync before the backward
    # is queued, which training does not have)
    model.scalars_after_backward = True

    def kd_step():
        get_event_storage().step()  # diagnostics run every `diag_period` iterations, as in training
        loss = sum(model(batch).values())
        opt_kd.zero_grad(set_to_none=True)
        loss.backward()
        model.write_pending_scalars()
        opt_kd.step()

    def distiller_state():
        params = list(model.distillers.parameters())
        state = [v for p in params for v in opt_kd.state.get(p, {}).values() if torch.is_tensor(v)]
        return [*params, *(p.grad for p in params if p.grad is not None), *state]

    return student_step, teacher_forward, kd_step, opt_s, opt_kd, distiller_state


def cpu_threads(device) -> None:
    """On a CPU, torch's threads: ``$OMP_NUM_THREADS`` when set (the user's choice, e.g. on a shared
    machine, kept), else one per core this process may use (taskset, Slurm), not all of the
    machine's."""
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        cores = (
            os.sched_getaffinity(0)
            if hasattr(os, "sched_getaffinity")
            else range(os.cpu_count() or 1)
        )
        torch.set_num_threads(max(1, len(cores)))


def cpu_memory(device, keep: bool = True) -> bool:
    """On a CPU, what the trainer does with ``train.keep_freed_cpu_memory`` (its default, True):
    memory a step frees stays in the process (:func:`detkd.utils.keep_freed_cpu_memory`), so
    that these steps are timed as a CPU run trains; ``keep=False`` (``--return-freed-memory``)
    leaves glibc's defaults. Whether it was applied."""
    return device.type == "cpu" and keep and keep_freed_cpu_memory()


def check_methods(methods, available, tool):
    """SystemExit naming the ``methods`` (``--methods``) that are none of ``available``: a typo
    gave an empty table."""
    unknown = [m for m in methods or [] if m not in available]
    if unknown:
        raise SystemExit(
            f"[{tool}] --methods {' '.join(unknown)}: no such method here; "
            f"available: {sorted(available)}"
        )


def parse_device(text):
    """An argparse ``type``: a torch device this machine has (``--device cuda`` without CUDA was a
    RuntimeError traceback from the first CUDA call)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device (cpu, cuda, cuda:1, ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available here: use --device cpu")
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        n = torch.cuda.device_count()
        raise argparse.ArgumentTypeError(
            f"this machine has {n} CUDA device{'s' * (n != 1)} (cuda:0 to cuda:{n - 1})"
        )
    return device


def parse_image_size(text):
    """An argparse ``type``: ``S`` (a square side) or ``HxW``, in pixels, each at least 32."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 32:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an image size: give a side (640) or height x width (800x1333), "
            "each at least 32"
        )
    return sizes[0] if len(sizes) == 1 else tuple(sizes)


def bench(
    config,
    iters,
    device,
    batch_size,
    image_size,
    teacher_precision="fp32",
    overrides=(),
    rounds=3,
    method=None,
):
    cfg = LazyConfig.load(os.path.join(REPO, config))
    cfg.model.teacher_precision = teacher_precision
    cfg = LazyConfig.apply_overrides(
        cfg, applicable_overrides(os.path.join(REPO, config), list(overrides))
    )
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device).train()
    batch = _batch(cfg, batch_size, image_size)
    teacher = model.teacher
    student_step, teacher_forward, kd_step, _, opt_kd, distiller_state = _steps(
        model, batch, device
    )

    method = method or os.path.basename(config).split("_")[0].lower()
    kind, floor_step = FLOORS.get(method, lambda *a: (None, None))(model, batch, opt_kd)
    with EventStorage():
        # One student step, one teacher forward, one kd step (and the floor's step), in turn:
        # iters * rounds times.
        steps = (student_step, teacher_forward, kd_step) + ((floor_step,) if floor_step else ())
        times = _timed_interleaved(steps, iters * rounds, device)
        spread = _ratio_spread(*times[:3], rounds)
        t_s, t_t, t_kd, *t_floor = [_median(t) for t in times]
        del steps, floor_step  # what the floor's step holds (ReviewKD's feature maps) is freed
        # on CUDA the distillers' weights, gradients and optimizer state are on the device
        # during the student step too, but no part of a student-alone run
        mem_s = _peak(student_step, device, teacher, foreign=distiller_state())
        mem_kd = _peak(kd_step, device, teacher)
    floor = None
    if t_floor:  # the floor's step either adds to (a) + (b) or replaces (a)
        floor = (
            (t_s + t_t + t_floor[0]) / (t_s + t_t)
            if kind == "extra"
            else (t_floor[0] + t_t) / (t_s + t_t)
        )
    # mem_s is (a) plus the teacher's weights: _peak counts them as resident in both steps
    return dict(
        student=t_s, teacher=t_t, kd=t_kd, floor=floor, mem_s=mem_s, mem_kd=mem_kd, spread=spread
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iters", type=int_at_least(1), default=10, help="timed steps per round")
    parser.add_argument(
        "--rounds",
        type=int_at_least(1),
        default=3,
        help=(
            "rounds: each of the three steps is timed iters * rounds times, in turn; "
            "medians count"
        ),
    )
    parser.add_argument(
        "--device", type=parse_device, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--large", action="store_true", help="also the R50/R101 COCO pairs (slow on CPU)"
    )
    parser.add_argument(
        "--large-only", action="store_true", help="only the R50/R101 pairs (implies --large)"
    )
    parser.add_argument(
        "--large-batch",
        type=int_at_least(1),
        default=2,
        help="images per step of the R50/R101 pairs (the papers' 2 per GPU)",
    )
    parser.add_argument(
        "--large-size",
        type=parse_image_size,
        default=640,
        help="their image size: a side or HxW (800x1333: the papers' COCO training size)",
    )
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument(
        "--no-variants",
        action="store_true",
        help="skip the cheaper non-paper settings (ReviewKD mid_channels=64, D3ETR adaptive only)",
    )
    parser.add_argument(
        "--teacher-precision",
        default="fp32",
        choices=["fp32", "fp16", "bf16"],
        help="DistillationDetector.teacher_precision (both (b) and (c) use it)",
    )
    parser.add_argument(
        "--set",
        dest="opts",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="LazyConfig overrides, each for the configs where its parent key exists, "
        "e.g. model.distillers.d3etr.fixed_matching=False "
        "model.distillers.d3etr.aux_gt_loss=False",
    )
    parser.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="on a CPU, leave glibc's malloc returning freed memory to the OS (as a run with "
        "train.keep_freed_cpu_memory=False; by default it is kept, as training does)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cpu_threads(device)
    kept = cpu_memory(device, keep=not args.return_freed_memory)

    runs, available = [], set()
    for path in sorted(glob.glob(os.path.join(REPO, "configs/demo/*_*.py"))):
        name = os.path.basename(path)[:-3]
        method = name.split("_")[0]
        if name.startswith("_") or method in ("teacher", "student"):
            continue
        available.add(method)
        if (args.methods and method not in args.methods) or args.large_only:
            continue
        runs.append((method, f"demo {name}", os.path.relpath(path, REPO), 8, None, []))
        if not args.no_variants:
            for label, opts in VARIANTS.get(method, []):
                runs.append(
                    (method, f"demo {name}, {label}", os.path.relpath(path, REPO), 8, None, opts)
                )
    if args.large or args.large_only or device.type == "cuda":
        bs, size = args.large_batch, args.large_size
        shape = "x".join(map(str, size)) if isinstance(size, tuple) else f"{size}x{size}"
        scale = "" if (bs, size) == (2, 640) else f" ({bs} x {shape})"
        for method, path in LARGE.items():
            if os.path.isfile(os.path.join(REPO, path)) and (
                not args.methods or method in args.methods
            ):
                setting = f"R50 pair {os.path.basename(path)[:-3]}{scale}"
                runs.append((method, setting, path, bs, size, []))
                if not args.no_variants:
                    for label, opts in LARGE_VARIANTS.get(method, []):
                        runs.append((method, f"{setting}, {label}", path, bs, size, opts))
    check_methods(args.methods, available, "kd_overhead")

    if args.opts:
        check_overrides(
            sorted({os.path.join(REPO, r[2]) for r in runs}), args.opts, tool="kd_overhead"
        )
    print(
        f"device: {device} "
        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"teacher precision {args.teacher_precision}"
        + (f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else "")
        + (
            f", freed memory {'kept' if kept else 'returned to the OS'}"
            if device.type == "cpu"
            else ""
        )
    )
    # times take 9 digits (a CPU step of the R50 pairs runs 10-30 s) and a space before each
    sw = max([46] + [len(r[1]) + 2 for r in runs])  # the setting column fits the longest setting
    head = (
        f"{'method':<9}{'setting':<{sw}}{'student':>12}{'teacher':>12}{'kd':>12}"
        f"{'ratio':>7}{'floor':>7}{'target':>7}"
    )
    head += f"{'mem ratio':>11}{'rounds':>13}"
    print(head)
    print("-" * len(head))
    for method, setting, path, bs, size, variant in runs:
        try:
            r = bench(
                path,
                args.iters,
                device,
                bs,
                size or 128,
                args.teacher_precision,
                [*variant, *args.opts],
                args.rounds,
                method,
            )
        except Exception as e:  # report and go on with the other settings
            print(f"{method:<9}{setting:<{sw}} failed: {type(e).__name__}: {e}", flush=True)
            continue
        ratio = r["kd"] / (r["student"] + r["teacher"])
        mem = ""
        if r["mem_s"] is not None and r["mem_kd"] is not None:
            mem = f"{r['mem_kd'] / r['mem_s']:.2f}"
        target = f"{TARGETS[method]:.2f}" if method in TARGETS else ""  # PKD + GID has none
        floor = f"{r['floor']:.2f}" if r["floor"] is not None else ""
        spread = f"{r['spread'][0]:.2f}-{r['spread'][1]:.2f}" if r["spread"] else ""
        print(
            f"{method:<9}{setting:<{sw}}{r['student'] * 1e3:>10.1f}ms{r['teacher'] * 1e3:>10.1f}ms"
            f"{r['kd'] * 1e3:>10.1f}ms{ratio:>7.2f}{floor:>7}{target:>7}{mem:>11}{spread:>13}",
            flush=True,
        )


if __name__ == "__main__":
    main()
