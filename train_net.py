#!/usr/bin/env python
"""
DetKD training and evaluation script, for LazyConfig files (``configs/**.py``).

Derived from detectron2's ``tools/lazyconfig_train_net.py``; training is done by
:class:`detkd.KDTrainer` (a DefaultTrainer built from the LazyConfig) so that the teacher of a
:class:`detkd.DistillationDetector` is loaded from ``train.teacher_checkpoint`` and the student
is exported alone at the end. Plain detectors (teachers, baselines) train the same way.

Usage::

    python train_net.py --config-file configs/demo/pkd_retinanet.py train.max_iter=100
    python train_net.py --config-file CFG --num-gpus 8 train.teacher_checkpoint=teacher.pkl
    python train_net.py --config-file CFG --resume                  # continue an interrupted run
    python train_net.py --config-file CFG --eval-only train.init_checkpoint=model_final_student.pth
        # (results also in train.output_dir/eval_results.json)
    python train_net.py --config-file CFG --eval-only --resume      # the run's last checkpoint
"""

import json
import logging
import os

import torch
from detectron2.config import LazyConfig
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from detkd.checkpoint import load_student
from detkd.config_checks import (
    check_config_sections,
    check_flag_order,
    check_input_format,
    check_override_keys,
    check_run_inputs_kept,
    check_student_classes,
)
from detkd.distiller import student_of
from detkd.engine import (
    KDTrainer,
    ddp_model,
    last_checkpoint_problem,
    untagged_checkpoints_error,
    unusable_last_checkpoint,
)
from detkd.utils import file_prefix

logger = logging.getLogger("detectron2")


def _usable_cpus() -> int:
    """The number of cores this process may run on: its CPU affinity where the OS reports one."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _share_cpu_threads() -> None:
    """Processes of a CPU-only multi-process run (``--num-gpus N`` without CUDA) split the
    cores this process may run on (its CPU affinity, e.g. a Slurm or cgroup binding, not the
    machine's count) instead of each taking all of them (unless OMP_NUM_THREADS is set)."""
    if (
        comm.get_local_size() > 1
        and not torch.cuda.is_available()
        and "OMP_NUM_THREADS" not in os.environ
    ):
        threads = max(1, _usable_cpus() // comm.get_local_size())
        torch.set_num_threads(threads)
        logger.info(
            f"CPU-only run with {comm.get_local_size()} processes: "
            f"{threads} thread{'' if threads == 1 else 's'} each"
        )


def _read_output_file(cfg, name: str):
    """The bytes of ``train.output_dir/<name>``, or None."""
    path = os.path.join(cfg.train.output_dir, name) if cfg.train.get("output_dir") else None
    if not path or not PathManager.isfile(path):
        return None
    with PathManager.open(path, "rb") as f:
        return f.read()


def _read_run_config(cfg):
    """The bytes of ``train.output_dir/config.yaml`` (the config of the run there), or None."""
    return _read_output_file(cfg, "config.yaml")


def _holds_training_run(cfg) -> bool:
    """Whether ``train.output_dir`` holds a training run's checkpoints (``last_checkpoint``)."""
    out = cfg.train.get("output_dir")
    return bool(out) and PathManager.isfile(os.path.join(out, "last_checkpoint"))


def _last_checkpoint_file(cfg) -> str:
    """The checkpoint that ``train.output_dir/last_checkpoint`` names (detectron2's format)."""
    name = _read_output_file(cfg, "last_checkpoint").decode().strip()
    return os.path.join(cfg.train.output_dir, name)


def _checkpoint_tag(cfg):
    """``train.output_dir/last_checkpoint``'s content and modification time (a save rewrites
    it, also with the same name), or None: whether a run wrote a checkpoint since."""
    data = _read_output_file(cfg, "last_checkpoint")
    if data is None:
        return None
    try:
        return data, os.stat(os.path.join(cfg.train.output_dir, "last_checkpoint")).st_mtime_ns
    except OSError:  # not a local path: the content alone
        return data, None


def _write_run_config(cfg, data: bytes) -> None:
    with PathManager.open(os.path.join(cfg.train.output_dir, "config.yaml"), "wb") as f:
        f.write(data)


def _keep_run_config(cfg, run_config: bytes) -> None:
    """--eval-only in a training run's folder: the config default_setup just wrote moves to
    ``config_eval.yaml`` and the run's own ``config.yaml`` is put back."""
    out = cfg.train.output_dir
    with PathManager.open(os.path.join(out, "config.yaml"), "rb") as f:
        written = f.read()
    with PathManager.open(os.path.join(out, "config_eval.yaml"), "wb") as f:
        f.write(written)
    _write_run_config(cfg, run_config)
    logger.info(
        f"Evaluating in a training run's folder: its config.yaml is kept, this one is in "
        f"{os.path.join(out, 'config_eval.yaml')}"
    )


def _yaml_config(data: bytes):
    """A ``config.yaml`` detectron2 wrote (``LazyConfig.save``), as plain dicts (python objects
    it tags are not built: None), or None where it is not one."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    try:
        cfg = yaml.load(data, Loader=Loader)
    except yaml.YAMLError:
        return None
    return cfg if isinstance(cfg, dict) else None


def _teacher_change(cfg, run_config: bytes):
    """--resume with another ``train.teacher_checkpoint`` than the run's (its ``config.yaml``):
    checkpoints do not hold the teacher, so the rest of the run would distil from another
    teacher without a word. Returns the warning to log (None: the same teacher, or a
    config.yaml that is not a config); logged by ``main`` once log.txt is set up."""
    run = _yaml_config(run_config)
    train = run.get("train") if run is not None else None
    if not isinstance(train, dict):  # not a config detectron2 wrote: nothing to compare
        return None
    theirs = train.get("teacher_checkpoint")
    ours = cfg.train.get("teacher_checkpoint")
    if isinstance(theirs, str) and theirs != ours and (theirs or ours):
        return (
            f"--resume: train.teacher_checkpoint is {ours!r}, the run in {cfg.train.output_dir!r} "
            f"was trained with {theirs!r} (its config.yaml); the rest of the run distils from "
            "this one (train.teacher_eval_at_start evaluates it again). If that file moved, this "
            f"is the same teacher; otherwise resume with train.teacher_checkpoint={theirs}."
        )
    return None


_UNSET = object()  # a key one config sets and the other leaves to the callable's default


def _changes(theirs, ours, prefix: str):
    """The dotted keys under ``prefix`` whose values differ between two plain configs, each as
    ``key: <theirs> (this config: <ours>)``; a key a config does not set reads "not set (the
    default)", not None (which a config may set: ``num_levels: null``)."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        return [
            change
            for k in sorted(set(theirs) | set(ours), key=str)
            for change in _changes(theirs.get(k, _UNSET), ours.get(k, _UNSET), f"{prefix}.{k}")
        ]
    if theirs == ours:
        return []
    theirs, ours = ("not set (the default)" if v is _UNSET else repr(v) for v in (theirs, ours))
    return [f"{prefix}: {theirs} (this config: {ours})"]


def _model_change(cfg, run_config: bytes):
    """--resume with a ``model`` section other than the run's (its ``config.yaml``, which
    default_setup has just replaced by this config's): e.g. a distiller's ``loss_weight``. The
    checkpoint fits (its tensors are checked on load), and the rest of the run trains with this
    config's settings. Returns the warning to log, or None. (The teacher checkpoint and the
    optimizer settings have their own warnings.)"""
    theirs, ours = _yaml_config(run_config), _yaml_config(_read_run_config(cfg) or b"")
    if theirs is None or ours is None:
        return None
    changes = _changes(theirs.get("model"), ours.get("model"), "model")
    if not changes:
        return None
    return (
        f"--resume: this config's model settings differ from those the run in "
        f"{cfg.train.output_dir!r} was trained with (its config.yaml, now replaced by this "
        f"config's): {'; '.join(changes[:8])}{' ...' if len(changes) > 8 else ''}. The rest of "
        "the run trains with this config's; to continue the run as it was, resume with its "
        "settings."
    )


def main(args):
    # the usual separator before the overrides (python -m detkd.demo ... -- key=value):
    # detectron2's parser keeps it among them
    if args.opts[:1] == ["--"]:
        args.opts = args.opts[1:]
    # before the config is read: a --config-file among them leaves it empty
    check_flag_order(args.opts)
    if not args.config_file:
        raise ValueError(
            "No config file: give one with --config-file before any key=value override, e.g. "
            "train_net.py --config-file configs/demo/pkd_retinanet.py train.max_iter=100"
        )
    cfg = LazyConfig.load(args.config_file)
    check_config_sections(cfg, args.config_file, training=not args.eval_only)
    check_override_keys(cfg, args.opts)  # a typo would otherwise add a key nothing reads
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    # default_setup replaces OUTPUT_DIR/config.yaml; a --resume refused below (a run of another
    # config, a bad teacher) puts back the config of the run whose checkpoints are there, and so
    # does a run there that fails before it writes a checkpoint (a bad teacher path, a class
    # mismatch, AMP on the CPU), and --eval-only in a training run's folder (its own config goes
    # to config_eval.yaml).
    resuming = args.resume and not args.eval_only and comm.is_main_process()
    # a training run's folder (read before anything is written)
    holds_run = _holds_training_run(cfg)
    in_run = comm.is_main_process() and holds_run
    run_config = _read_run_config(cfg) if resuming or in_run else None
    teacher_change = None
    if resuming and run_config is not None and holds_run:
        teacher_change = _teacher_change(cfg, run_config)
    # --eval-only in a training run's folder: its predictions (inference/) are the run's too
    eval_in_run = args.eval_only and holds_run
    # a teacher trained in train.output_dir: its config.yaml (replaced by default_setup) and its
    # checkpoint (by the run's own) are refused here, before anything is written
    check_run_inputs_kept(
        cfg,
        checkpoints=not args.eval_only,
        config_yaml=not eval_in_run,  # else restored below
    )
    if args.resume:  # refused before anything is written (also by KDTrainer.resume_or_load)
        untagged = untagged_checkpoints_error(cfg.train.output_dir, file_prefix(cfg))
        if untagged is not None:
            raise untagged
    if args.eval_only and args.resume and holds_run:  # the run's last checkpoint is evaluated
        last = _last_checkpoint_file(cfg)
        problem = last_checkpoint_problem(cfg.train.output_dir, last)
        if problem:
            raise unusable_last_checkpoint(cfg.train.output_dir, last, problem, file_prefix(cfg))
    default_setup(cfg, args)
    if args.eval_only and in_run and run_config is not None:
        _keep_run_config(cfg, run_config)
    # DetKD's own messages (teacher loaded, student exported) on the console and in log.txt
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="detkd")
    if teacher_change:  # now also in log.txt
        logging.getLogger("detkd.train_net").warning(teacher_change)
    if resuming and run_config is not None and holds_run:
        model_change = _model_change(cfg, run_config)
        if model_change:
            logging.getLogger("detkd.train_net").warning(model_change)
    _share_cpu_threads()

    if args.eval_only:
        # Evaluates the student: a DistillationDetector in eval mode never runs its teacher.
        model = KDTrainer.build_model(cfg)
        check_input_format(cfg, model, splits=("test",))
        check_student_classes(cfg, model, split="test")
        weights, key = cfg.train.init_checkpoint, "train.init_checkpoint"
        # as detectron2's tools/train_net.py: the run's last checkpoint
        if args.resume and holds_run:
            weights, key = (
                _last_checkpoint_file(cfg),
                f"the last checkpoint of {cfg.train.output_dir!r}",
            )
            logger.info(
                f"--eval-only --resume: evaluating the last checkpoint of {cfg.train.output_dir}, "
                f"{weights} (train.init_checkpoint is not read)"
            )
        elif args.resume:
            logger.warning(
                f"--eval-only --resume: {cfg.train.output_dir!r} holds no training run (no "
                f"last_checkpoint file): evaluating train.init_checkpoint {weights!r} instead."
            )
        load_student(student_of(model), weights, strict=True, key=key)
        # no buffer broadcast before a forward: with fewer test images than processes, a process
        # without images never runs the forward whose broadcast the others wait for (a hang)
        model = ddp_model(model, broadcast_buffers=False)
        folder = os.path.join(cfg.train.output_dir, "inference_eval") if eval_in_run else None
        if folder:
            logger.info(
                f"Evaluating in a training run's folder: its inference/ is kept, these "
                f"predictions go to {folder}"
            )
        results = KDTrainer.test(cfg, model, KDTrainer.build_evaluator(cfg, output_folder=folder))
        if comm.is_main_process() and results:  # for scripts (e.g. detkd.demo --heldout)
            with open(os.path.join(cfg.train.output_dir, "eval_results.json"), "w") as f:
                json.dump(results, f, indent=1)
        return results

    tag = _checkpoint_tag(cfg) if run_config is not None else None  # main process: see run_config
    try:
        trainer = KDTrainer(cfg)
        trainer.teacher_changed = teacher_change is not None
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    except BaseException:
        # a run that failed before writing a checkpoint (in construction, loading, or train()'s
        # checks and hooks before the first save: AMP on the CPU, a teacher evaluation that
        # fails) leaves the folder's checkpoints those of the run before it: so is its config
        if run_config is not None and _checkpoint_tag(cfg) == tag:
            _write_run_config(cfg, run_config)
        raise
    if comm.is_main_process() and results:
        logger.info(f"Final evaluation: {dict(results)}")
    return results


def _main_in_process(args):
    """``main`` in one of ``launch``'s processes, which then leave together and close their
    process group: a process that finished first (e.g. one the evaluation gave no image) and
    exited with the group's threads alive was at times aborted ("terminate called without an
    active exception"), failing the whole launch."""
    results = main(args)
    if comm.get_world_size() > 1:
        comm.synchronize()
        torch.distributed.destroy_process_group()
    return results


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    launch(
        _main_in_process,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
