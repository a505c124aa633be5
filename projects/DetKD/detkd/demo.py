"""
The embedded demo: the whole DetKD story on the CPU, on the synthetic shapes data.

1. train the teacher (``configs/demo/teacher_retinanet.py``, twice the students' iterations),
2. train the student alone (``configs/demo/student_retinanet.py``),
3. distill the same student from the teacher's final checkpoint with each chosen method
   (``configs/demo/<method>_<detector>.py``),
4. print one table of COCOEvaluator results (AP, AP50, AP75) with the deltas.

The DETR family (``--methods d3etr``) starts from pretrained backbones, as DETRs do: its teacher
from the RetinaNet teacher's backbone, its student runs from the seed-0 RetinaNet student alone's
(``PRETRAINED_BACKBONES``; those runs are trained first if they are not yet, and their backbones
written to ``<--output>/backbones`` by :func:`detkd.checkpoint.export_backbone`).

``--seeds 0 1 2`` repeats steps 2-3 with each ``train.seed`` (same data, same teacher; another
initialisation, data order and dropout) and prints each row's mean and standard deviation over
the seeds, the deltas paired by seed: on a demo this small, one seed's delta can be noise.

``--heldout N`` also evaluates every run's final model on a fresh split of N images (its own
seed, 7), which no run trained on and no setting was chosen by, and prints a second table: the
same rows on far more images than the validation split's 128.

Every step is ``train_net.py`` run as a user would run it; finished runs (a ``model_final.pth``
and final metrics in their output folder, trained with the same arguments: another ``--iters``
or override retrains them, as does a teacher trained again since) are reused, so a second
``make demo`` only trains what is missing. Usage::

    python -m detkd.demo --methods pkd reviewkd --iters 1000 [--seeds 0 1 2] [--heldout 1024]
"""

import argparse
import ast
import glob
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .utils import remove_run_files

__all__ = [
    "main",
    "final_metrics",
    "heldout_metrics",
    "summarize",
    "applicable_overrides",
    "check_overrides",
    "paths_from_here",
    "check_reserved",
    "int_at_least",
    "check_same_students",
    "run_env",
]

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


_MISSING = object()
_LOADED: Dict[str, object] = {}


def _override_parent(opt: str) -> Optional[str]:
    """The parent key of a ``a.b.c=value`` override (``a.b``), or None for other forms."""
    key = opt.split("=", 1)[0] if "=" in opt else ""
    if not key or key.startswith(("+", "~")) or "." not in key:
        return None
    return key.rsplit(".", 1)[0]


def applicable_overrides(config: str, opts: Sequence[str]) -> List[str]:
    """
    The overrides of ``opts`` that apply to ``config``: a ``key=value`` whose parent key exists
    in it (``model.distillers.pkd.loss_weight=10`` reaches the PKD configs, not the teacher's or
    the student-alone config, which have no ``model.distillers.pkd``: there it would add a key
    that their model cannot take). Other forms are kept.
    """
    cfg = _loaded(config)
    parents = [_override_parent(o) for o in opts]
    return [o for o, p in zip(opts, parents) if p is None or _has_key(cfg, p)]


def _loaded(config: str):
    """``LazyConfig.load(config)``, loaded once per path (read only: not to be changed)."""
    from detectron2.config import LazyConfig

    path = os.path.abspath(config)
    if path not in _LOADED:
        _LOADED[path] = LazyConfig.load(path)
    return _LOADED[path]


def _has_key(cfg, key: str) -> bool:
    """Whether the config ``cfg`` has the dotted ``key``."""
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING


def check_overrides(
    configs: Sequence[str], opts: Sequence[str], tool: str = "demo", select=None
) -> None:
    """Raise SystemExit naming the overrides of ``opts`` that apply to none of ``configs``
    (a typo, or a method that is not run), or one that ``train_net.py`` would refuse in a config
    it applies to (a key its parent does not have, e.g. ``model.distillers.pkd.loss_wieght=10``:
    :func:`detkd.config_checks.check_override_keys`), before anything trains.
    ``select(config)``: the overrides that reach ``config``'s run (default:
    :func:`applicable_overrides`)."""
    from .config_checks import check_override_keys

    select = select or (lambda c: applicable_overrides(c, opts))
    used = {o for c in configs for o in select(c)}
    unused = [o for o in opts if o not in used]
    if unused:
        names = ", ".join(os.path.basename(c) for c in configs)
        raise SystemExit(
            f"[{tool}] the overrides {unused} apply to none of the configs ({names}): "
            "their parent keys exist in none of them"
        )
    for c in configs:  # else the run of that config fails, after the runs before it trained
        try:
            check_override_keys(_loaded(c), select(c))
        except KeyError as e:
            raise SystemExit(f"[{tool}] {os.path.basename(c)}: {e.args[0]}") from e


def run_env() -> Dict[str, str]:
    """The environment of a ``train_net.py`` run started in the repository root: the synthetic
    data's folder (``$DETKD_DATASETS``, default ``./datasets``) as an absolute path from here,
    where this process (e.g. the PKD picture) reads it; relative, the runs wrote it under the
    repository and the picture here, twice."""
    from .data.shapes import shapes_root

    return dict(os.environ, DETKD_DATASETS=os.path.abspath(shapes_root()))


def check_same_students(pairs: Sequence[Tuple[str, str]], opts: Sequence[str]) -> None:
    """
    Raise SystemExit unless, for each ``(distilled config, student-alone config)`` pair, the
    overrides of ``opts`` that reach each run (:func:`applicable_overrides`) leave them training
    the same student the same way (:func:`detkd.repro.paired_differences`: ``model.student`` vs
    ``model``, data, optimizer, schedule, test data and evaluator, ...). An override reaches a
    config where its parent key exists:
    ``model.anchor_matcher.thresholds=...`` reaches the student alone's ``model``, not the
    distilled config's (there it is ``model.student.anchor_matcher``), and the table's delta
    compared two different students without a word.
    """
    from detectron2.config import LazyConfig

    from .repro import paired_differences

    for kd_config, base_config in pairs:
        kd = LazyConfig.apply_overrides(
            LazyConfig.load(kd_config), applicable_overrides(kd_config, opts)
        )
        base = LazyConfig.apply_overrides(
            LazyConfig.load(base_config), applicable_overrides(base_config, opts)
        )
        differ = paired_differences(kd, base)
        if differ:
            hint = ""
            if "model.student" in differ:
                hint = (
                    " An override of the student alone's model.X reaches the distilled config as "
                    "model.student.X: give both (model.X=... model.student.X=...)."
                )
            raise SystemExit(
                f"[demo] with the overrides, {os.path.basename(kd_config)} and "
                f"{os.path.basename(base_config)} "
                f"would train or evaluate different students: {', '.join(differ)} differ "
                "(distilled vs "
                "alone), and "
                f"the table's delta would compare them.{hint}"
            )


def check_reserved(opts: Sequence[str], reserved: Dict[str, str], tool: str) -> None:
    """Raise SystemExit naming an override of ``opts`` that sets (or deletes) a key the tool sets
    itself for each run (``reserved``: key -> what to pass instead). ``train.output_dir`` would
    put every run of a pair or table into one folder: the later runs replace the earlier ones'
    checkpoints and metrics, and the tool reads its results where no run wrote."""
    for o in opts:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in reserved:
            raise SystemExit(
                f"[{tool}] the override {o} is not for {tool}: it sets {key} of each run "
                f"itself; {reserved[key]}"
            )


def int_at_least(minimum: int):
    """An argparse ``type``: an integer no smaller than ``minimum`` (``--iters 0`` was taken as
    the configs' own schedule, or failed in every row)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    return parse


def paths_from_here(opts: Sequence[str]) -> List[str]:
    """
    ``opts`` with each ``key=value`` whose value names an existing file or folder relative to
    the working directory given as that absolute path (quoted where hydra's override grammar
    needs it: a folder ``exp (2)``). The runs (``train_net.py``) start in the
    repository root, where a relative path (``train.teacher_checkpoint=teacher.pth`` typed in
    another folder) would name another file, or none. Values that are Python literals
    (numbers, booleans, quoted strings), bare words without ``/`` or ``.`` (``cuda``, a dataset
    name, even where a file of that name is here), absolute paths and URLs are kept, as are all
    values when the working directory is the repository root.
    """
    out = []
    for o in opts:
        key, sep, value = o.partition("=")
        pathlike = "/" in value or os.sep in value or "." in value  # not a bare word: `cuda`
        if (
            sep
            and pathlike
            and not os.path.isabs(value)
            and "://" not in value
            and os.path.exists(value)
        ):
            try:
                ast.literal_eval(value)
            except (ValueError, SyntaxError):  # not a literal: a path
                if os.path.abspath(value) != os.path.abspath(os.path.join(REPO, value)):
                    o = f"{key}={_override_value(os.path.abspath(value))}"
        out.append(o)
    return out


def _override_value(path: str) -> str:
    """``path`` as the value of a ``key=value`` override: as it is, or quoted where hydra's
    override grammar would read some of its characters as syntax (a folder ``exp (2)`` or
    ``a,b``: a parse error, a sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        if parser.parse_overrides([f"k={path}"])[0].value() == path:
            return path
    except Exception:  # hydra's OverrideParseException
        pass
    return "'" + path.replace("'", "\\'") + "'"


_COMMAND_FILE = "demo_command.json"  # a finished run's train_net.py arguments


def _run_command(output_dir: str):
    """The train_net.py arguments that ``output_dir``'s run was trained with, or None."""
    path = os.path.join(output_dir, _COMMAND_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _newer_inputs(output_dir: str, cmd) -> bool:
    """Whether the run's ``train.teacher_checkpoint`` or ``train.init_checkpoint`` file (a
    pretrained backbone) is newer than its final weights."""
    keys = ("train.teacher_checkpoint=", "train.init_checkpoint=")
    inputs = [a.split("=", 1)[1] for a in cmd if a.startswith(keys)]
    weights = os.path.join(output_dir, "model_final.pth")
    return any(
        os.path.isfile(t) and os.path.getmtime(t) > os.path.getmtime(weights) for t in inputs
    )


def _run_logged(cmd, log_path: str) -> None:
    """Run ``cmd`` (``train_net.py``) in the repository root, its output written to ``log_path``;
    SystemExit naming the log and quoting its last lines if the run fails (the error was only in
    the log, behind a CalledProcessError traceback that did not name it)."""
    with open(log_path, "w") as f:
        try:
            subprocess.run(
                cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True, env=run_env()
            )
            return
        except subprocess.CalledProcessError as e:
            status = e.returncode
    with open(log_path, errors="replace") as f:
        tail = f.read().splitlines()[-10:]
    raise SystemExit(
        f"[demo] the run failed (exit status {status}); its log {log_path} ends with:\n"
        + "\n".join("    " + line for line in tail)
    )


def _train(config: str, output_dir: str, opts, force: bool, log):
    cmd = [
        sys.executable,
        os.path.join(REPO, "train_net.py"),
        "--config-file",
        config,
        f"train.output_dir={output_dir}",
    ] + applicable_overrides(config, opts)
    done = os.path.isfile(os.path.join(output_dir, "model_final.pth")) and final_metrics(output_dir)
    if done and not force:
        # reused only if trained with these arguments (e.g. not a shorter --iters run)
        if _run_command(output_dir) != cmd[1:]:
            log(f"[demo] retraining {output_dir}: it was trained with other arguments")
        elif _newer_inputs(output_dir, cmd):
            log(
                f"[demo] retraining {output_dir}: its teacher or pretrained backbone was trained "
                "again since"
            )
        else:
            log(f"[demo] reusing {output_dir} (delete it or pass --force to retrain)")
            return final_metrics(output_dir), None
    log("[demo] " + " ".join(cmd[1:]))
    start = time.time()
    # the folder's run is being replaced: a run that fails after writing its model_final.pth
    # (in its final evaluation, or stopped there) must not leave the command of the run before it,
    # which would make the next call with that run's arguments reuse these weights and its metrics
    # Its metrics.json goes too: detectron2's writer appends to it, and the new run's final
    # metrics and s/iter would be read among the old run's lines. So do its checkpoints:
    # train_net.py refuses to start over those of another model (e.g. after
    # model.distillers.pkd.num_levels=2, other adapters).
    if os.path.isfile(os.path.join(output_dir, _COMMAND_FILE)):
        os.remove(os.path.join(output_dir, _COMMAND_FILE))
    remove_run_files(output_dir)
    _run_logged(
        cmd, os.path.join(os.path.dirname(output_dir), os.path.basename(output_dir) + ".log")
    )
    with open(os.path.join(output_dir, _COMMAND_FILE), "w") as f:
        json.dump(cmd[1:], f, indent=1)
    return final_metrics(output_dir), time.time() - start


HELDOUT_SEED = 7  # the held-out split's seed (train: 0, val: 1)

# Detector families whose runs start from another family's trained backbone (same layout and
# width): DETRs are trained from pretrained backbones (ImageNet's in the papers), and the demo's
# from scratch barely left their first plateau in its schedule (teacher 4.33 AP). The DETR teacher
# starts from the RetinaNet teacher's backbone; every DETR student run (alone and distilled, every
# seed) from the seed-0 RetinaNet student alone's, as from one set of ImageNet weights.
PRETRAINED_BACKBONES = {"detr": "retinanet"}


def heldout_metrics(config: str, output_dir: str, num_images: int, opts, log):
    """
    ``bbox/*`` results of a finished run's final model (``output_dir/model_final.pth``; a
    distilled run's student) on the held-out shapes split of ``num_images`` images (seed
    ``HELDOUT_SEED``), by ``train_net.py --eval-only``; cached in
    ``output_dir/heldout_<num_images>/eval_results.json`` (redone when the weights are newer).
    """
    out = os.path.join(output_dir, f"heldout_{num_images}")
    path = os.path.join(out, "eval_results.json")
    weights = os.path.join(output_dir, "model_final.pth")
    # none, or stale
    if not os.path.isfile(path) or os.path.getmtime(path) < os.path.getmtime(weights):
        names = "dataloader.test.dataset.names"
        cmd = [
            sys.executable,
            os.path.join(REPO, "train_net.py"),
            "--config-file",
            config,
            "--eval-only",
            *applicable_overrides(config, opts),
            f"train.init_checkpoint={weights}",
            f"train.output_dir={out}",
            f"{names}.split=heldout",
            f"{names}.num_images={num_images}",
            f"{names}.seed={HELDOUT_SEED}",
        ]
        log(f"[demo] held-out evaluation of {output_dir}")
        os.makedirs(out, exist_ok=True)
        _run_logged(cmd, os.path.join(out, "log.txt"))
    with open(path) as f:
        return json.load(f)["bbox"]


def _seconds_per_iter(output_dir: str):
    """Median training time per iteration logged by detectron2 (seconds), or None."""
    path = os.path.join(output_dir, "metrics.json")
    times = []
    with open(path) as f:
        for line in f:
            m = json.loads(line)
            if "time" in m:
                times.append(m["time"])
    return statistics.median(times) if times else None


def summarize(runs):
    """
    Mean and spread of each model's results over seeds, with deltas paired by seed.

    Args:
        runs (list[tuple]): ``(name, seed, results, output_dir, base)`` per run: ``results``
            a dict with "AP", "AP50", "AP75"; ``base`` the name of the row the deltas are taken
            against (the student alone), or None.

    Returns:
        list[dict]: per name, in first-seen order: "name", "seeds" (list), "mean" (dict of the
        three metrics), "sd" (sample standard deviation of AP, 0 for one seed), "delta" (mean of
        AP - base AP over the seeds both have, or None), "delta_sd", "dirs".
    """
    by_name, order = {}, []
    for name, seed, res, d, base in runs:
        if name not in by_name:
            by_name[name] = dict(name=name, base=base, res={}, dirs=[])
            order.append(name)
        by_name[name]["res"][seed] = res
        by_name[name]["dirs"].append(d)

    def sd(xs):
        if len(xs) < 2:
            return 0.0
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    rows = []
    for name in order:
        r = by_name[name]
        seeds = sorted(r["res"])
        mean = {
            k: sum(r["res"][s].get(k, float("nan")) for s in seeds) / len(seeds)
            for k in ("AP", "AP50", "AP75")
        }
        delta = delta_sd = None
        if r["base"] is not None:
            base = by_name[r["base"]]["res"]
            diffs = [r["res"][s]["AP"] - base[s]["AP"] for s in seeds if s in base]
            delta, delta_sd = sum(diffs) / len(diffs), sd(diffs)
        rows.append(
            dict(
                name=name,
                seeds=seeds,
                mean=mean,
                sd=sd([r["res"][s]["AP"] for s in seeds]),
                delta=delta,
                delta_sd=delta_sd,
                dirs=r["dirs"],
            )
        )
    return rows


def _table(runs, several_seeds: bool) -> str:
    """The results table of ``runs`` (see :func:`summarize`): one row per model; with several
    seeds, mean and sd per row and deltas paired by seed."""
    rows = summarize(runs)
    if not several_seeds:
        header = f"{'model':<28}{'AP':>8}{'AP50':>8}{'AP75':>8}{'dAP':>8}{'s/iter':>9}  output"
    else:
        header = (
            f"{'model':<28}{'AP':>8}{'sd':>6}{'AP50':>8}{'AP75':>8}{'dAP':>8}{'sd':>6}"
            f"{'s/iter':>9}  seeds  output"
        )
    lines = [header, "-" * len(header)]
    for r in rows:
        ap = [r["mean"][k] for k in ("AP", "AP50", "AP75")]
        delta = f"{r['delta']:+.2f}" if r["delta"] is not None else ""
        spi = [t for t in (_seconds_per_iter(d) for d in r["dirs"]) if t]
        # none logged: detectron2's timer skips each run's first iterations (a run of 2 has none)
        spi = f"{statistics.median(spi):.3f}" if spi else "-"
        if not several_seeds:
            lines.append(
                f"{r['name']:<28}{ap[0]:>8.2f}{ap[1]:>8.2f}{ap[2]:>8.2f}{delta:>8}{spi:>9}  "
                f"{r['dirs'][0]}"
            )
        else:
            several = len(r["seeds"]) > 1  # the teachers: one run
            dsd = f"{r['delta_sd']:.2f}" if r["delta"] is not None and several else ""
            sd = f"{r['sd']:.2f}" if several else ""
            seeds = ",".join(str(s) for s in r["seeds"])
            lines.append(
                f"{r['name']:<28}{ap[0]:>8.2f}{sd:>6}{ap[1]:>8.2f}{ap[2]:>8.2f}{delta:>8}{dsd:>6}"
                f"{spi:>9}  {seeds:<5}  {r['dirs'][0]}"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["pkd"], help="pkd reviewkd gid ...")
    parser.add_argument(
        "--detector",
        default="retinanet",
        help="preferred suffix of configs/demo/<method>_<detector>.py (d3etr uses detr)",
    )
    parser.add_argument("--output", default="output/demo")
    parser.add_argument(
        "--iters",
        type=int_at_least(1),
        default=None,
        help="override train.max_iter of every student run (teachers get twice as many)",
    )
    parser.add_argument(
        "--seeds",
        type=int_at_least(0),
        nargs="+",
        default=[0],
        help="train.seed of the student runs (teachers keep seed 0); seed s > 0 runs go "
        "to <run>_seed<s>. Several seeds: mean and sd per row, deltas paired by seed",
    )
    parser.add_argument(
        "--heldout",
        type=int_at_least(0),
        default=0,
        metavar="N",
        help=(
            "also evaluate every run on a held-out split of N images (seed 7) and print that "
            "table"
        ),
    )
    parser.add_argument("--force", action="store_true", help="retrain runs that already finished")
    parser.add_argument("opts", nargs="*", help="key=value overrides for every run (after --)")
    args = parser.parse_args(argv)
    check_reserved(
        args.opts,
        {
            "train.output_dir": "each run's folder is <--output>/<run>: pass --output DIR",
            "train.seed": "the student runs' seeds are --seeds (the teachers keep seed 0): "
            "pass --seeds N ...",
            "train.teacher_checkpoint": "the distilled runs take the teacher that the demo trains, "
            "in <--output>/teacher_<detector>",
        },
        "demo",
    )
    args.opts = paths_from_here(args.opts)  # the runs start in the repository root

    log = lambda s: print(s, flush=True)  # noqa: E731
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    common = ([f"train.max_iter={args.iters}"] if args.iters else []) + list(args.opts)
    cfg = lambda name: os.path.join(REPO, "configs", "demo", f"{name}.py")  # noqa: E731

    runs, teachers, configs, finished, inits = [], {}, {}, {}, {}
    t_opts = ([f"train.max_iter={2 * args.iters}"] if args.iters else []) + list(args.opts)

    def train(config, run_dir, opts):
        """``_train`` once per run folder in this call: a run that gives another family its
        backbone can be a row of the table too."""
        if run_dir not in finished:
            finished[run_dir] = _train(config, run_dir, opts, args.force, log)
        return finished[run_dir]

    def init_opts(role, det):
        """The ``train.init_checkpoint`` override of ``det``'s ``role`` runs ("teacher" or
        "student"), or none: the backbone (:func:`detkd.checkpoint.export_backbone`) of the same
        role's run of the family in PRETRAINED_BACKBONES (the student's of seed 0), trained first if
        it is not yet, exported again only when that run was trained again since."""
        source = PRETRAINED_BACKBONES.get(det)
        if source is None:
            return []
        if (role, det) not in inits:
            from .checkpoint import export_backbone

            source_dir = os.path.join(out, f"{role}_{source}")
            train(cfg(f"{role}_{source}"), source_dir, t_opts if role == "teacher" else common)
            weights = os.path.join(source_dir, "model_final.pth")
            path = os.path.join(out, "backbones", f"{role}_{source}.pkl")
            if not os.path.isfile(path) or os.path.getmtime(path) < os.path.getmtime(weights):
                export_backbone(weights, path)
                log(
                    f"[demo] wrote {path}: the backbone of {weights}, which the {det} {role} "
                    "starts from"
                )
            inits[role, det] = [f"train.init_checkpoint={path}"]
        return inits[role, det]

    def family(method):
        """The detector family of a method's demo config: --detector, else any that exists."""
        kd = sorted(
            {os.path.basename(p).split("_")[0] for p in glob.glob(cfg("*_*"))}
            - {"", "teacher", "student"}
        )
        if method in ("teacher", "student"):  # its run folder is that of the table's own row
            raise SystemExit(
                f"[demo] --methods {method}: the teacher and the student alone are in every table; "
                f"methods are distillation configs: {kd}"
            )
        found = sorted(
            os.path.basename(p)[len(method) + 1 : -3] for p in glob.glob(cfg(f"{method}_*"))
        )
        if args.detector in found:
            return args.detector
        if not found:
            # "pkd+gid", "pkd,gid", "PKD": a combination is a config of its own (pkdgid)
            parts = [p for p in re.split(r"[^a-z0-9]+", method.lower()) if p]
            hint = ""
            if "".join(parts) in kd:
                hint = f" (did you mean --methods {''.join(parts)}?"
                if len(parts) > 1:
                    hint += " a combination of methods is a config of its own"
                hint += ")"
            raise SystemExit(
                f"[demo] no config configs/demo/{method}_*.py; available methods: {kd}{hint}. "
                "Several methods are separate words (--methods pkd gid, or make demo "
                'METHOD="pkd gid"), each a row of the table.'
            )
        return found[0]

    dets = {m: family(m) for m in args.methods}  # a mistyped method fails here, before training
    pretrained = sorted({d for d in dets.values() if d in PRETRAINED_BACKBONES})
    if pretrained:
        check_reserved(
            args.opts,
            {
                "train.init_checkpoint": f"the {'/'.join(pretrained)} runs start from the "
                "backbones of the demo's "
                f"{'/'.join(PRETRAINED_BACKBONES[d] for d in pretrained)} runs "
                "(<--output>/backbones)",
            },
            "demo",
        )
    if args.opts:  # every override must reach some run (a typo fails here, before training)
        check_overrides(
            [cfg(f"{m}_{d}") for m, d in dets.items()]
            + [cfg(f"{r}_{d}") for d in set(dets.values()) for r in ("teacher", "student")],
            args.opts,
        )
        check_same_students(
            [(cfg(f"{m}_{d}"), cfg(f"student_{d}")) for m, d in dets.items()], args.opts
        )
    for seed in args.seeds:
        suffix = f"_seed{seed}" if seed else ""
        seed_opts = [f"train.seed={seed}"] if seed else []
        students = set()
        for method in args.methods:
            det = dets[method]
            teacher_dir = os.path.join(out, f"teacher_{det}")
            student_dir = os.path.join(out, f"student_{det}{suffix}")
            base = f"student alone ({det})"
            if det not in teachers:  # one teacher (seed 0) for every seed
                res, _ = train(
                    cfg(f"teacher_{det}"), teacher_dir, t_opts + init_opts("teacher", det)
                )
                configs[teacher_dir] = cfg(f"teacher_{det}")
                teachers[det] = (f"teacher ({det})", 0, res, teacher_dir, None)
                runs.append(teachers[det])
            student_init = init_opts("student", det)
            if det not in students:
                res, _ = train(
                    cfg(f"student_{det}"), student_dir, common + seed_opts + student_init
                )
                configs[student_dir] = cfg(f"student_{det}")
                runs.append((base, seed, res, student_dir, None))
                students.add(det)
            run_dir = os.path.join(out, f"{method}_{det}{suffix}")
            opts = (
                common
                + seed_opts
                + student_init
                + [f"train.teacher_checkpoint={os.path.join(teacher_dir, 'model_final.pth')}"]
            )
            res, _ = train(cfg(f"{method}_{det}"), run_dir, opts)
            configs[run_dir] = cfg(f"{method}_{det}")
            runs.append((f"student + {method}", seed, res, run_dir, base))

    several = len(args.seeds) > 1
    table = _table(runs, several)
    if args.heldout:
        held = [
            (name, seed, heldout_metrics(configs[d], d, args.heldout, args.opts, log), d, base)
            for name, seed, _, d, base in runs
        ]
        table += f"\n\nheld-out split ({args.heldout} images, seed {HELDOUT_SEED}):\n" + _table(
            held, several
        )
    log("\n" + table + "\n")
    with open(os.path.join(out, "results.txt"), "w") as f:
        f.write(table + "\n")
    if "pkd" in args.methods:
        from .viz import main as viz

        det = family("pkd")
        first = f"_seed{args.seeds[0]}" if args.seeds[0] else ""  # the first seed's runs
        try:  # with the distilled run's overrides: its levels, widths and test data
            viz(
                [
                    "pkd",
                    "--config",
                    cfg(f"pkd_{det}"),
                    "--teacher",
                    os.path.join(out, f"teacher_{det}", "model_final.pth"),
                    "--before",
                    os.path.join(out, f"student_{det}{first}", "model_final.pth"),
                    "--after",
                    os.path.join(out, f"pkd_{det}{first}", "model_final_student.pth"),
                    "--index",
                    "3",
                    "--out",
                    os.path.join(out, "pkd_fpn.png"),
                    "--",
                    *applicable_overrides(cfg(f"pkd_{det}"), args.opts),
                ]
            )
        except (Exception, SystemExit) as e:  # the table is saved: a picture does not undo it
            log(
                f"[demo] the PKD picture ({os.path.join(out, 'pkd_fpn.png')}) failed: "
                f"{type(e).__name__}: {e}"
            )
    log(
        f"[demo] table saved to {os.path.join(out, 'results.txt')}; each run's log, metrics.json, "
        "TensorBoard events and checkpoints (model_final_student.pth for distilled runs) are in "
        "its output folder."
    )
    return runs


if __name__ == "__main__":
    main()
