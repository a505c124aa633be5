"""
The embedded demo: the whole DetKD story on the CPU, on the synthetic shapes data.

1. train the teacher (``configs/demo/teacher_retinanet.py``, twice the students' iterations),
2. train the student alone (``configs/demo/student_retinanet.py``),
3. distill the same student from the teacher's final checkpoint with each chosen method
   (``configs/demo/<method>_<detector>.py``),
4. print one table of COCOEvaluator results (AP, AP50, AP75) with the deltas.

Every step is ``train_net.py`` run as a user would run it; finished runs (a ``model_final.pth``
and final metrics in their output folder) are reused, so a second ``make demo`` only trains
what is missing. Usage::

    python -m detkd.demo --methods pkd reviewkd --iters 1000
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

__all__ = ["main", "final_metrics"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def final_metrics(output_dir: str):
    """Returns the last ``bbox/*`` results logged in ``output_dir/metrics.json``, or None."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    last = None
    with open(path) as f:
        for line in f:
            m = json.loads(line)
            if "bbox/AP" in m:
                last = {k[5:]: v for k, v in m.items() if k.startswith("bbox/")}
    return last


def _train(config: str, output_dir: str, opts, force: bool, log):
    done = os.path.isfile(os.path.join(output_dir, "model_final.pth")) and final_metrics(output_dir)
    if done and not force:
        log(f"[demo] reusing {output_dir} (delete it or pass --force to retrain)")
        return final_metrics(output_dir), None
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config,
           f"train.output_dir={output_dir}"] + list(opts)
    log("[demo] " + " ".join(cmd[1:]))
    start = time.time()
    with open(os.path.join(os.path.dirname(output_dir), os.path.basename(output_dir) + ".log"), "w") as f:
        subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True)
    return final_metrics(output_dir), time.time() - start


def _seconds_per_iter(output_dir: str):
    """Median training time per iteration logged by detectron2 (seconds), or None."""
    path = os.path.join(output_dir, "metrics.json")
    times = []
    with open(path) as f:
        for line in f:
            m = json.loads(line)
            if "time" in m:
                times.append(m["time"])
    return sorted(times)[len(times) // 2] if times else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["pkd"], help="pkd reviewkd gid ...")
    parser.add_argument("--detector", default="retinanet",
                        help="preferred suffix of configs/demo/<method>_<detector>.py (d3etr uses detr)")
    parser.add_argument("--output", default="output/demo")
    parser.add_argument("--iters", type=int, default=None,
                        help="override train.max_iter of every student run (teachers get twice as many)")
    parser.add_argument("--force", action="store_true", help="retrain runs that already finished")
    parser.add_argument("opts", nargs="*", help="key=value overrides for every run (after --)")
    args = parser.parse_args(argv)

    log = lambda s: print(s, flush=True)  # noqa: E731
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    common = ([f"train.max_iter={args.iters}"] if args.iters else []) + list(args.opts)
    cfg = lambda name: os.path.join(REPO, "configs", "demo", f"{name}.py")  # noqa: E731

    rows, bases = [], {}

    def family(method):
        """The detector family of a method's demo config: --detector, else any that exists."""
        found = sorted(os.path.basename(p)[len(method) + 1:-3] for p in glob.glob(cfg(f"{method}_*")))
        if args.detector in found:
            return args.detector
        if not found:
            avail = sorted(os.path.basename(p)[:-3] for p in glob.glob(cfg("*")))
            raise SystemExit(f"[demo] no config configs/demo/{method}_*.py; available: {avail}")
        return found[0]

    for method in args.methods:
        det = family(method)
        teacher_dir = os.path.join(out, f"teacher_{det}")
        student_dir = os.path.join(out, f"student_{det}")
        if det not in bases:
            t_opts = ([f"train.max_iter={2 * args.iters}"] if args.iters else []) + list(args.opts)
            res, _ = _train(cfg(f"teacher_{det}"), teacher_dir, t_opts, args.force, log)
            rows.append((f"teacher ({det})", res, teacher_dir, None))
            res, _ = _train(cfg(f"student_{det}"), student_dir, common, args.force, log)
            rows.append((f"student alone ({det})", res, student_dir, None))
            bases[det] = res
        run_dir = os.path.join(out, f"{method}_{det}")
        opts = common + [f"train.teacher_checkpoint={os.path.join(teacher_dir, 'model_final.pth')}"]
        res, _ = _train(cfg(f"{method}_{det}"), run_dir, opts, args.force, log)
        rows.append((f"student + {method}", res, run_dir, bases[det]))

    header = f"{'model':<28}{'AP':>8}{'AP50':>8}{'AP75':>8}{'dAP':>8}{'s/iter':>9}  output"
    lines = [header, "-" * len(header)]
    for name, res, d, base in rows:
        ap = [res.get(k, float("nan")) for k in ("AP", "AP50", "AP75")]
        delta = f"{ap[0] - base['AP']:+.2f}" if base else ""
        spi = _seconds_per_iter(d)
        lines.append(f"{name:<28}{ap[0]:>8.2f}{ap[1]:>8.2f}{ap[2]:>8.2f}{delta:>8}{spi or 0:>9.3f}  {d}")
    table = "\n".join(lines)
    log("\n" + table + "\n")
    with open(os.path.join(out, "results.txt"), "w") as f:
        f.write(table + "\n")
    if "pkd" in args.methods:
        from .viz import main as viz

        det = family("pkd")
        viz(["pkd", "--config", cfg(f"pkd_{det}"),
             "--teacher", os.path.join(out, f"teacher_{det}", "model_final.pth"),
             "--before", os.path.join(out, f"student_{det}", "model_final.pth"),
             "--after", os.path.join(out, f"pkd_{det}", "model_final_student.pth"),
             "--index", "3", "--out", os.path.join(out, "pkd_fpn.png")])
    log(f"[demo] table saved to {os.path.join(out, 'results.txt')}; each run's log, metrics.json, "
        "TensorBoard events and checkpoints (model_final_student.pth for distilled runs) are in "
        "its output folder.")
    return rows


if __name__ == "__main__":
    main()
