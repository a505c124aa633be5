"""
Reproducibility harness: run a distillation config and its baseline twin with the same seed,
schedule and data, and print teacher AP, student AP, distilled AP and the delta.

The baseline twin is found by name next to the config (``<student>_from_<teacher>_<sched>.py``
-> ``baseline_<student>_<sched>.py``; demo ``<method>_<det>.py`` -> ``student_<det>.py``) or
given with ``--baseline``. Before anything trains, the pair is checked to share the seed (a
fixed one), schedule, initialisation, training data, optimizer and student (:func:`check_pair`),
after the overrides, and to be evaluated on the same test data. The teacher is evaluated once
before distillation (``train.teacher_eval_at_start``) and reported from its own
``teacher/bbox/*`` keys; a teacher of another class set than the test data's (e.g. a model-zoo
COCO teacher on your own data) is not evaluated, and its row stays empty. The runs
start in the repository root; configs, ``--output`` and the override values that name files
here (``train.teacher_checkpoint=T.pth``) are taken relative to the working directory. The runs
go to ``<--output>/<config's folder>/<config's name>/{baseline,distilled}`` (e.g.
``output/repro/PKD/retinanet_R50_from_retinanet_R101_2x/baseline``). Usage::

    python -m detkd.repro configs/PKD/retinanet_R50_from_retinanet_R101_2x.py --num-gpus 8
    python -m detkd.repro configs/demo/pkd_retinanet.py train.max_iter=300 \\
        train.teacher_checkpoint=output/demo/teacher_retinanet/model_final.pth
"""

import argparse
import json
import os
import re
import subprocess
import sys

from .demo import (
    REPO,
    _has_key,
    _loaded,
    applicable_overrides,
    check_overrides,
    check_reserved,
    final_metrics,
    int_at_least,
    paths_from_here,
    run_env,
)
from .utils import remove_run_files, without_file_scheme

__all__ = ["baseline_of", "check_pair", "pair_overrides", "main"]

_SCHEDULE = re.compile(r"_(\d+x|\d+ep)$")


def baseline_of(config: str) -> str:
    """The baseline twin's path of a distillation config, by the naming convention."""
    folder, name = os.path.split(config)
    name = name[:-3] if name.endswith(".py") else name
    if "_from_" in name:
        student, rest = name.split("_from_", 1)
        sched = _SCHEDULE.search(rest)
        cand = f"baseline_{student}{sched.group(0) if sched else ''}.py"
    elif "_" in name:
        cand = f"student_{name.split('_', 1)[1]}.py"
    else:
        raise SystemExit(
            f"[repro] {config}: no baseline twin follows from the name; pass --baseline"
        )
    path = os.path.join(folder, cand)
    if not os.path.isfile(os.path.join(REPO, path)) and not os.path.isfile(path):
        raise SystemExit(f"[repro] no baseline twin {path} for {config}; pass --baseline")
    return path


def _resolve(config: str) -> str:
    """An absolute config path: as given from the working directory, else under the
    repository (the runs start in the repository root)."""
    if os.path.isfile(config):
        return os.path.abspath(config)
    path = os.path.join(REPO, config)
    if not os.path.isfile(path):
        raise SystemExit(f"[repro] config not found: {config} (neither here nor under {REPO})")
    return path


def _key(opt: str) -> str:
    return opt.split("=", 1)[0].lstrip("+~")


def pair_overrides(config: str, other: str, opts):
    """
    The overrides of ``opts`` for the run of ``config`` in a pair with ``other``: those whose
    parent key ``config`` has (:func:`detkd.demo.applicable_overrides`), less those whose key
    ``config`` lacks and ``other`` has, and that ``config``'s run would refuse as a typo
    (:func:`detkd.config_checks.check_override_keys`). ``train.teacher_checkpoint=T`` is for the
    distilled run; a baseline whose ``train`` is detectron2's own (no DetKD keys) has the parent
    ``train`` but not the key, and its run refused the override as a typo. ``+key=value`` (adds
    the key on purpose, e.g. ``+train.seed=0`` to such a baseline, whose ``train`` has no seed)
    and an argument of a LazyCall that ``config`` leaves at its default reach ``config``'s run.
    """
    from .config_checks import check_override_keys

    mine = applicable_overrides(config, opts)
    cfg, theirs = _loaded(config), _loaded(other)

    def accepted(o):  # as config's train_net.py run takes it
        try:
            check_override_keys(cfg, [o])
        except KeyError:
            return False
        return True

    return [
        o for o in mine if _has_key(cfg, _key(o)) or not _has_key(theirs, _key(o)) or accepted(o)
    ]


# What a baseline and a distilled run must share to be compared: (distilled key, baseline key).
_PAIRED = (
    ("train.seed", "train.seed"),
    ("train.max_iter", "train.max_iter"),
    ("train.init_checkpoint", "train.init_checkpoint"),
    ("model.student", "model"),
    ("dataloader.train", "dataloader.train"),
    ("optimizer", "optimizer"),
    ("lr_multiplier", "lr_multiplier"),
    ("train.clip_grad", "train.clip_grad"),
    ("train.amp", "train.amp"),
    # and be evaluated the same way: a delta between two test sets measures nothing
    ("dataloader.test", "dataloader.test"),
    ("dataloader.evaluator", "dataloader.evaluator"),
)


def paired_value(cfg, key):
    """``key`` of ``cfg`` as a plain value, as :data:`_PAIRED` compares it (None if absent)."""
    from omegaconf import OmegaConf

    v = OmegaConf.select(cfg, key, default=None)
    return _training_setting(key, OmegaConf.to_container(v) if OmegaConf.is_config(v) else v)


def paired_differences(kd, base):
    """The :data:`_PAIRED` keys (the distilled config's) in which the loaded distilled config
    ``kd`` and baseline ``base`` do not train the student the same way."""
    return [k for k, kb in _PAIRED if paired_value(kd, k) != paired_value(base, kb)]


def _training_setting(key, v):
    """``train.clip_grad`` / ``train.amp`` as they act: absent or disabled is off, whatever else
    they hold (detectron2's configs have no clip_grad; DetKD's default is disabled)."""
    if key in ("train.clip_grad", "train.amp"):
        if not isinstance(v, dict) or not v.get("enabled", False):
            return {"enabled": False}
    return v


def check_pair(config: str, baseline: str, opts) -> None:
    """
    SystemExit unless ``config`` (with the overrides of ``opts`` that apply to it) distils and
    ``baseline`` trains the same student alone with the same seed (a fixed one: a negative
    ``train.seed`` draws one per run), schedule, initialisation, training data, optimizer,
    gradient clipping and mixed precision, and evaluates it on the same test data with the same
    evaluator, unless ``train_net.py`` accepts the overrides of each
    (:func:`check_override_keys`), and unless the distilled run's ``train.teacher_checkpoint``
    is a URL or a file that exists.

    Returns:
        the distilled run's config (loaded, with its overrides).
    """
    from detectron2.config import LazyConfig

    from omegaconf import OmegaConf

    from .config_checks import check_override_keys

    def load(path):  # a fresh copy: apply_overrides changes it
        cfg, here = LazyConfig.load(path), pair_overrides(
            path, baseline if path == config else config, opts
        )
        try:  # as train_net.py will, before the other run trains for nothing
            check_override_keys(cfg, here)
        except KeyError as e:
            raise SystemExit(f"[repro] {os.path.basename(path)}: {e.args[0]}") from e
        return LazyConfig.apply_overrides(cfg, here)

    kd, base = load(config), load(baseline)
    if OmegaConf.select(kd, "model.teacher", default=None) is None:
        raise SystemExit(
            f"[repro] {config} is not a distillation config (its model has no teacher)"
        )
    if OmegaConf.select(base, "model.teacher", default=None) is not None:
        raise SystemExit(
            f"[repro] the baseline {baseline} is a distillation config; pass the student's own "
            "config"
        )

    value = paired_value
    seed = value(kd, "train.seed")
    if not isinstance(seed, int) or seed < 0:
        raise SystemExit(
            f"[repro] train.seed is {seed!r}: each run would draw its own seed; set train.seed=N"
        )
    differ = paired_differences(kd, base)
    if differ:
        shown = [
            (
                f"{k} ({value(kd, k)!r} vs {value(base, kb)!r})"
                if not isinstance(value(kd, k), (dict, list))
                else k
            )
            for k, kb in _PAIRED
            if k in differ
        ]
        raise SystemExit(
            f"[repro] {os.path.basename(baseline)} does not train and evaluate the student of "
            f"{os.path.basename(config)} the same way: {', '.join(shown)} differ "
            "(distilled vs baseline)"
        )

    # The distilled run trains second: a teacher it cannot load would fail only after the
    # baseline's whole schedule. A local file is looked up as train_net.py will, from the
    # repository root (URLs are left to the run).
    teacher = value(kd, "train.teacher_checkpoint") or ""
    local = without_file_scheme(teacher)
    if not teacher and not value(kd, "train.teacher_random_init"):
        raise SystemExit(
            f"[repro] train.teacher_checkpoint of {os.path.basename(config)} is empty: "
            "set train.teacher_checkpoint=<the teacher's weights>"
        )
    if teacher and "://" not in local and not os.path.isfile(os.path.join(REPO, local)):
        raise SystemExit(
            f"[repro] the teacher checkpoint {teacher} of {os.path.basename(config)} does not exist"
            + ("" if os.path.isabs(local) else f" (train_net.py looks for it under {REPO})")
            + ": train the teacher first, or set train.teacher_checkpoint=<the teacher's weights>"
        )
    # A teacher of a yacs config (detkd.modeling.build_yacs_detector) is also built only then.
    for key, node in _yacs_nodes(OmegaConf.select(kd, "model.teacher"), "model.teacher"):
        _check_yacs_node(key, node, os.path.basename(config))
    return kd


def teacher_not_evaluable(kd) -> str:
    """
    Why the distilled run of the loaded config ``kd`` cannot evaluate its teacher on its test
    data (:func:`detkd.config_checks.check_teacher_eval_classes`: a teacher of another class
    set, e.g. a model-zoo COCO teacher of PKD, ReviewKD or GID's location selection), or ""
    when it can.
    The teacher is built (not loaded) here to count its classes; a teacher this process cannot
    build is left to the run.
    """
    from detectron2.config import instantiate

    from .config_checks import _evaluates, teacher_class_mismatch

    if not _evaluates(kd):  # not evaluated: no teacher to build
        return ""
    try:
        return teacher_class_mismatch(kd, instantiate(kd.model.teacher))
    except Exception:  # a model this process cannot build, a test dataset not registered or
        return ""  # empty: the runs stop on it at their start, with its message


def _yacs_nodes(node, key):
    """(key, node) of the ``build_yacs_detector`` nodes in ``node`` (itself included)."""
    from omegaconf import DictConfig, ListConfig

    from .modeling import build_yacs_detector

    if isinstance(node, DictConfig):
        target = node.get("_target_", None)
        if isinstance(target, str):
            from detectron2.utils.registry import locate

            target = locate(target)
        if target is build_yacs_detector:
            yield key, node
            return
        for k in node:
            yield from _yacs_nodes(node[k], f"{key}.{k}")
    elif isinstance(node, ListConfig):
        for i, v in enumerate(node):
            yield from _yacs_nodes(v, f"{key}[{i}]")


def _check_yacs_node(key: str, node, name: str) -> None:
    """SystemExit unless the yacs config of ``node`` reads as train_net.py will read it: its
    ``config_file`` from the repository root (or the model zoo), then its ``opts``. URLs, and
    ``add_config`` functions this process cannot import, are left to the run."""
    from detectron2 import model_zoo

    from omegaconf import OmegaConf

    from .modeling import load_yacs_config

    given = str(node.config_file)
    local = without_file_scheme(given)
    if "://" in local:
        return
    path = os.path.join(REPO, local)  # an absolute local stays itself
    if not os.path.isfile(path):
        try:
            path = model_zoo.get_config_file(local)
        except RuntimeError:
            raise SystemExit(
                f"[repro] {key}.config_file of {name}, {given}, is neither a file nor a config of "
                f"detectron2's model zoo (train_net.py looks for a relative path under {REPO}): "
                "give the teacher's .yaml from there, or as an absolute path"
            ) from None
    opts = node.get("opts", None)
    opts = OmegaConf.to_container(opts) if OmegaConf.is_config(opts) else opts
    try:
        add_config = node.get("add_config", ())
        if OmegaConf.is_config(add_config):
            add_config = OmegaConf.to_container(add_config)
        load_yacs_config(path, opts, add_config)
    except ImportError:
        return
    except (KeyError, ValueError) as e:
        raise SystemExit(f"[repro] {key} of {name}: {e.args[0] if e.args else e}") from e


def _teacher_metrics(output_dir):
    path = os.path.join(output_dir, "metrics.json")
    res = {}
    with open(path) as f:
        for line in f:
            m = json.loads(line)
            res.update(
                {
                    k[len("teacher/bbox/") :]: v
                    for k, v in m.items()
                    if k.startswith("teacher/bbox/")
                }
            )
    return res or None


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--output", default="output/repro")
    parser.add_argument("--num-gpus", type=int_at_least(1), default=1)
    parser.add_argument(
        "opts",
        nargs="*",
        help="key=value overrides for both runs (each where its parent key exists; "
        "a key that one config of the pair has and the other lacks: that one's run only, "
        "unless +key=value adds it on purpose)",
    )
    # options may follow the config or the overrides (e.g. `CONFIG --num-gpus 8`)
    args = parser.parse_intermixed_args(argv)
    check_reserved(
        args.opts,
        {
            "train.output_dir": "the runs go to <--output>/<config's folder>/<config's "
            "name>/baseline and distilled: pass --output DIR"
        },
        "repro",
    )
    config = _resolve(args.config)  # a missing config is reported as such, before its twin
    baseline = _resolve(args.baseline or baseline_of(args.config))
    args.config = config
    args.opts = paths_from_here(args.opts)  # paths as given here, not from the repository root
    other = {baseline: args.config, args.config: baseline}
    check_overrides(
        [baseline, args.config],
        args.opts,
        tool="repro",
        select=lambda c: pair_overrides(c, other[c], args.opts),
    )
    kd_cfg = check_pair(args.config, baseline, args.opts)
    # a teacher of another class set distils but cannot be scored on the student's test data:
    # its evaluation would stop the distilled run after the baseline's whole schedule
    not_evaluable = teacher_not_evaluable(kd_cfg)
    if not_evaluable:
        print(
            f"[repro] the teacher is not evaluated ({not_evaluable}); its row stays empty",
            flush=True,
        )
    # <config's folder>/<config's name>: configs/PKD and configs/GID hold configs of the same
    # names (retinanet_R50_from_retinanet_R101_2x.py), whose runs must not replace each other's
    name = os.path.basename(args.config)[:-3]
    out = os.path.abspath(
        os.path.join(args.output, os.path.basename(os.path.dirname(args.config)), name)
    )
    runs = {}
    for tag, cfg, extra in (
        # a baseline config with the key may name a teacher that its run would not use
        (
            "baseline",
            baseline,
            (
                ["train.teacher_checkpoint="]
                if _has_key(_loaded(baseline), "train.teacher_checkpoint")
                else []
            ),
        ),
        ("distilled", args.config, [f"train.teacher_eval_at_start={not not_evaluable}"]),
    ):
        run_dir = os.path.join(out, tag)
        # a new run in an earlier one's folder: detectron2's writer appends to metrics.json, and
        # the table would read the earlier run's results (the teacher's too, when this run does
        # not evaluate it); train_net.py refuses to start over the checkpoints of another
        # model's run (other overrides): the earlier run's files go
        remove_run_files(run_dir)
        cmd = [
            sys.executable,
            os.path.join(REPO, "train_net.py"),
            "--config-file",
            cfg,
            "--num-gpus",
            str(args.num_gpus),
            f"train.output_dir={run_dir}",
        ] + extra
        # e.g. model.distillers.* only for the distilled run
        opts = pair_overrides(cfg, other[cfg], args.opts)
        if tag == "baseline":  # the teacher is the distilled run's (its config.yaml would show it)
            opts = [o for o in opts if _key(o) != "train.teacher_checkpoint"]
        cmd += opts
        print("[repro] " + " ".join(cmd[1:]), flush=True)
        try:
            subprocess.run(cmd, check=True, cwd=REPO, env=run_env())  # the data's folder: as here
        except subprocess.CalledProcessError as e:  # its error is in the output above
            raise SystemExit(
                f"[repro] the {tag} run ({os.path.basename(cfg)}) failed (exit status "
                f"{e.returncode}): its error is in its output above"
            ) from None
        runs[tag] = run_dir
    teacher = _teacher_metrics(runs["distilled"]) or {}
    base, dist = final_metrics(runs["baseline"]), final_metrics(runs["distilled"])
    for tag, res in (("baseline", base), ("distilled", dist)):
        if res is None:
            raise SystemExit(
                f"[repro] the {tag} run in {runs[tag]} logged no bbox/AP to metrics.json: its "
                "config has no COCO evaluation at the end (dataloader.evaluator, "
                "train.eval_period)."
            )
    print(f"\n{'':<12}{'AP':>8}{'AP50':>8}{'AP75':>8}")
    for tag, res in (("teacher", teacher), ("student", base), ("distilled", dist)):
        print(
            f"{tag:<12}"
            + "".join(
                f"{res[k]:>8.2f}" if k in res else f"{'-':>8}" for k in ("AP", "AP50", "AP75")
            )
        )
    print(f"{'delta':<12}{dist['AP'] - base['AP']:>+8.2f}")
    return dict(teacher=teacher, baseline=base, distilled=dist)


if __name__ == "__main__":
    main()
