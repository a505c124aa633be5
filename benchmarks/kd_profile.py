"""
Where a distiller's cost goes: a per-op profile of the KD training step against the student's.

For each config (default: the demo configs; ``--large``: the R50/R101 pairs of
``kd_overhead.py``) this builds the DistillationDetector on one fixed batch (as
``kd_overhead.py`` does), warms up, and prints

* the median time of a student step and of a KD step;
* the distillers' own cost (:func:`distiller_split`): the time of their ``forward`` calls, and
  of their forward + backward as the KD step less the same step whose distillers return no
  losses, against student step + teacher forward (kd_overhead.py's denominator);
* on CUDA, the host synchronisations of one step of each, by call site
  (``torch.cuda.set_sync_debug_mode``): each one makes the host wait for the device queue;
* the ops whose self CPU time (dispatch, launches) and self device time grow most from the
  student step to the KD step (``torch.profiler``, averaged over ``--steps`` steps), with the
  change in their number of calls.

This is a benchmark, not a test: it prints tables. On a GPU the small steps here are bound by
the host, and the CPU column and the call counts tell what a distiller costs.

Usage::

    python benchmarks/kd_profile.py [--large] [--methods gid ...] [--top 25] [--steps 3] [--compile]
"""

import argparse
import collections
import contextlib
import glob
import os
import sys
import threading
import time
import traceback
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from detkd.demo import int_at_least  # noqa: E402

import kd_overhead  # noqa: E402


def build_model(config, device, batch_size, image_size):
    """(DistillationDetector in train mode, one fixed batch) of ``config``, as kd_overhead.py
    builds them."""
    cfg = LazyConfig.load(os.path.join(kd_overhead.REPO, config))
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device).train()
    return model, kd_overhead._batch(cfg, batch_size, image_size)


def build_steps(config, device, batch_size, image_size, built=None):
    """(student_step, teacher_forward, kd_step) closures on one fixed batch, lr 0: kd_overhead.py's
    steps (its ``_steps``); ``built``: :func:`build_model`'s result to use instead of building one.
    """
    model, batch = built or build_model(config, device, batch_size, image_size)
    return kd_overhead._steps(model, batch, device)[:3]


@contextlib.contextmanager
def _replaced_forwards(model, replace):
    """Within the block, each distiller ``d`` of ``model`` runs ``replace(d.forward)`` as its
    ``forward`` (an instance attribute, removed on exit, or put back to an enclosing block's)."""
    distillers = list(model.distillers.values())
    outer = [d.__dict__.get("forward") for d in distillers]  # an enclosing block's replacement
    try:
        for d in distillers:
            d.forward = replace(d.forward)
        yield
    finally:
        for d, forward in zip(distillers, outer):
            if forward is None:
                d.__dict__.pop("forward", None)
            else:
                d.forward = forward


def without_distiller_losses(model):
    """Within the block, every distiller of ``model`` returns no losses: the KD step still runs
    the teacher, the taps and whatever a distiller does around the student's forward (e.g.
    D3ETR's auxiliary query group), but not the distillers' own forward and backward."""
    return _replaced_forwards(model, lambda forward: lambda student_taps, teacher_taps, ctx: {})


def timed_distiller_forwards(model, device, times):
    """Within the block, the seconds of each call of any distiller's ``forward`` are appended to
    ``times`` (on CUDA with a synchronisation before and after: these steps are not the timed
    ones)."""

    def timed(forward):
        def call(*args, **kwargs):
            kd_overhead._sync(device)
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            kd_overhead._sync(device)
            times.append(time.perf_counter() - start)
            return out

        return call

    return _replaced_forwards(model, timed)


def compiled_distiller_forwards(model):
    """Within the block, every distiller's ``forward`` runs under ``torch.compile`` (inductor,
    default options; compiled on its first calls, one graph per region between graph breaks)."""
    return _replaced_forwards(model, torch.compile)


def distiller_split(model, batch, device, iters, steps=None):
    """
    The distillers' own cost per KD step, in ms: ``forward`` (their ``forward`` calls, summed
    per step), ``own`` (KD step minus the same step with :func:`without_distiller_losses`: their
    forward and backward), ``floor`` (student step + teacher forward, the ratio's denominator) and
    the two KD steps' medians, ``kd`` and ``kd_no_losses``. The four steps are interleaved as in
    kd_overhead.py; the forwards are timed in ``iters`` further KD steps. ``steps``:
    ``kd_overhead._steps(model, batch, device)`` already built for ``model`` (one optimizer state).
    """
    student_step, teacher_forward, kd_step = (steps or kd_overhead._steps(model, batch, device))[:3]

    def kd_no_losses():
        with without_distiller_losses(model):
            kd_step()

    fns = [student_step, teacher_forward, kd_no_losses, kd_step]
    t_s, t_t, t_none, t_kd = (
        kd_overhead._median(t) for t in kd_overhead._timed_interleaved(fns, iters, device)
    )
    forwards = []
    with timed_distiller_forwards(model, device, forwards):
        for _ in range(iters):
            kd_step()
    per_step = sum(forwards) / iters
    ms = 1e3
    return dict(
        forward=per_step * ms,
        own=(t_kd - t_none) * ms,
        floor=(t_s + t_t) * ms,
        kd=t_kd * ms,
        kd_no_losses=t_none * ms,
    )


def sync_recorder(sites, depth=3):
    """A ``warnings.showwarning`` replacement that counts each warning in ``sites`` under
    (message, call site, thread): the call site is the innermost ``depth`` frames in detkd or
    detectron2 of the thread that warned, and the thread is None for the main thread, else its
    name (a host thread's synchronisation, e.g. D3ETR's match thread waiting for its copy, does
    not stall the step's queueing)."""

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [
            f
            for f in traceback.extract_stack()[:-1]
            if "/detkd/" in f.filename or "/detectron2/" in f.filename
        ]
        where = " <- ".join(
            f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in reversed(frames[-depth:])
        )
        thread = threading.current_thread()
        name = None if thread is threading.main_thread() else thread.name
        sites[(str(message).split("\n")[0][:50], where, name)] += 1

    return record


def sync_sites(fn, device, depth=3):
    """Counter of (message, call site, thread) of the host synchronisations during one call of
    ``fn`` (CUDA only; an empty Counter elsewhere), see :func:`sync_recorder`."""
    sites = collections.Counter()
    if device.type != "cuda":
        fn()
        return sites

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = sync_recorder(sites, depth)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sites


def op_table(fn, device, steps):
    """{op name: (self CPU us, self device us, calls)} per call of ``fn``, averaged over
    ``steps``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with warnings.catch_warnings(), kd_overhead._quiet_stderr():
        warnings.simplefilter("ignore")
        with profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
            kd_overhead._sync(device)
    return {
        e.key: (
            e.self_cpu_time_total / steps,
            getattr(e, "self_device_time_total", 0.0) / steps,
            e.count / steps,
        )
        for e in prof.key_averages()
    }


def op_differences(student, kd, teacher=None):
    """
    Per op, KD step minus student step minus teacher forward (``teacher``: its table, already in
    the ratio's denominator, so not the distillation's cost): rows (name, d self CPU us,
    d self device us, d calls), for the ops of any table.
    """
    zero = (0.0, 0.0, 0.0)
    teacher = teacher or {}
    names = sorted(set(student) | set(kd) | set(teacher))
    return [
        (
            k,
            *(
                a - b - c
                for a, b, c in zip(kd.get(k, zero), student.get(k, zero), teacher.get(k, zero))
            ),
        )
        for k in names
    ]


def report(title, config, device, batch_size, image_size, steps, top, compiled=False):
    model, batch = build_model(config, device, batch_size, image_size)
    closures = kd_overhead._steps(model, batch, device)
    student_step, teacher_forward, kd_step = closures[0], closures[1], closures[2]
    with EventStorage():
        for _ in range(3):  # warm-up
            student_step()
            kd_step()
        times = kd_overhead._timed_interleaved([student_step, kd_step], 2 * steps + 1, device)
        t_s, t_kd = (kd_overhead._median(t) for t in times)
        sync_s, sync_kd = sync_sites(student_step, device), sync_sites(kd_step, device)
        ops_s, ops_kd = op_table(student_step, device, steps), op_table(kd_step, device, steps)
        ops_t = op_table(teacher_forward, device, steps)
        split = distiller_split(model, batch, device, 2 * steps + 1, closures)
        if compiled:
            with compiled_distiller_forwards(model):
                start = time.perf_counter()
                for _ in range(3):  # compiles (and recompiles, where a guard fails once)
                    kd_step()
                compile_s = time.perf_counter() - start
                split_c = distiller_split(model, batch, device, 2 * steps + 1, closures)
    print(f"== {title}: student step {t_s * 1e3:.1f} ms, KD step {t_kd * 1e3:.1f} ms")
    print(
        f"   the distillers' own cost: forward {split['forward']:.1f} ms, forward + backward "
        f"{split['own']:.1f} ms (KD step {split['kd']:.1f} ms - "
        f"{split['kd_no_losses']:.1f} ms with no "
        f"distillation losses), against student step + teacher forward {split['floor']:.1f} ms"
    )
    if compiled:
        print(
            f"   under torch.compile: forward {split_c['forward']:.1f} ms, forward + backward "
            f"{split_c['own']:.1f} ms (KD step {split_c['kd']:.1f} ms), against "
            f"{split_c['floor']:.1f} ms; {compile_s:.0f} s in the first 3 steps (compilation)"
        )
    if device.type == "cuda":
        main = [sum(n for k, n in c.items() if k[2] is None) for c in (sync_s, sync_kd)]
        other = sum(n for k, n in sync_kd.items() if k[2] is not None)
        print(
            f"   host synchronisations per step (main thread): student {main[0]}, KD {main[1]}"
            + (f"; {other} more in other threads of the KD step" if other else "")
        )
        extra = sync_kd - sync_s
        for (message, where, thread), n in extra.most_common(top):
            print(f"   +{n:<3d} {where}" + (f"  [thread {thread}]" if thread else ""))
    n_s, n_t, n_kd = (sum(v[2] for v in ops.values()) for ops in (ops_s, ops_t, ops_kd))
    print(
        f"   ops per step: student {n_s:.0f}, teacher forward {n_t:.0f}, KD {n_kd:.0f} "
        f"({n_kd - n_s - n_t:+.0f})"
    )
    rows = op_differences(ops_s, ops_kd, ops_t)
    columns = [("self CPU", 1)] + ([("self device", 2)] if device.type == "cuda" else [])
    for label, col in columns:
        print(
            f"   largest {label} time the KD step adds to the student step and the teacher forward "
            "(ms per step, calls):"
        )
        for row in sorted(rows, key=lambda r: -r[col])[:top]:
            print(f"      {row[0][:64]:<64s} {row[col] / 1e3:+8.2f} ms  {row[3]:+6.0f}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        type=kd_overhead.parse_device,
        default="cuda" if torch.cuda.is_available() else "cpu",
    )
    parser.add_argument(
        "--large", action="store_true", help="the R50/R101 pairs instead of the demo configs"
    )
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument(
        "--steps", type=int_at_least(1), default=3, help="profiled steps of each kind"
    )
    parser.add_argument("--top", type=int_at_least(1), default=15, help="rows per table")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also the distillers' own cost with their forward under torch.compile",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    kd_overhead.cpu_threads(device)  # as kd_overhead.py times these steps
    kd_overhead.cpu_memory(device)
    runs = []
    if args.large:
        runs = [
            (m, f"R50 pair {os.path.basename(p)[:-3]}", p, 2, 640)
            for m, p in kd_overhead.LARGE.items()
        ]
    else:
        for path in sorted(glob.glob(os.path.join(kd_overhead.REPO, "configs/demo/*_*.py"))):
            name = os.path.basename(path)[:-3]
            method = name.split("_")[0]
            if not name.startswith("_") and method not in ("teacher", "student"):
                runs.append(
                    (method, f"demo {name}", os.path.relpath(path, kd_overhead.REPO), 8, 128)
                )
    kd_overhead.check_methods(args.methods, {r[0] for r in runs}, "kd_profile")
    print(
        f"device: {device} "
        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})"
        + (f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else "")
    )
    for method, title, path, batch_size, image_size in runs:
        if args.methods and method not in args.methods:
            continue
        start = time.perf_counter()
        report(title, path, device, batch_size, image_size, args.steps, args.top, args.compile)
        print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
