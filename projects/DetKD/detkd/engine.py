"""
:class:`KDTrainer`: detectron2's DefaultTrainer, built from a LazyConfig, that knows about the
teacher of a :class:`detkd.DistillationDetector`.

The LazyConfig has the five top-level names ``model``, ``dataloader`` (``train``, ``test``,
``evaluator``), ``optimizer``, ``lr_multiplier`` and ``train``. DetKD adds six ``train`` keys
and sets a default for detectron2's ``train.seed`` (``configs/common/kd_train.py``):

* ``train.teacher_checkpoint``: the teacher's weights, loaded strictly into ``model.teacher``;
* ``train.teacher_random_init``: allow an empty ``teacher_checkpoint`` (tests, smoke runs);
* ``train.export_student``: write ``model_final_student.pth`` at the end of training;
* ``train.clip_grad``: ``dict(enabled=True, max_norm=0.1)`` clips the global gradient norm
  (off by default);
* ``train.teacher_eval_at_start``: evaluate the loaded teacher before training
  (:class:`TeacherEvalHook`, logged as ``teacher/bbox/AP`` ...);
* ``train.keep_freed_cpu_memory``: on the CPU, memory a step frees stays in the process for the
  next step (:func:`detkd.utils.keep_freed_cpu_memory`; True by default);
* ``train.seed``: 0, the seed detectron2's ``default_setup`` gives the run (-1 would draw one).

``train.init_checkpoint`` loads into ``model.student`` only. ``model`` may also be a plain
detector (e.g. training the teacher or a baseline), then the trainer is a LazyConfig version of
detectron2's DefaultTrainer.

The checks of a config and its overrides that KDTrainer and ``train_net.py`` run before
anything is built are :mod:`detkd.config_checks`; the public ones are re-exported here.
"""

import contextlib
import copy
import inspect
import json
import logging
import os
import random
import weakref
from typing import List, Optional

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model, default_writers
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.solver import LRMultiplier
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger
from detectron2.utils.registry import locate

from .checkpoint import (
    _OPTIONAL_KEYS,
    CheckpointMismatchError,
    _describe_mismatch,
    _save,
    load_student,
    load_teacher,
    save_student,
)
from .config_checks import (
    _check_train_settings,
    _dataset_names,
    _no_training_images,
    check_config_sections,
    check_input_format,
    check_override_keys,
    check_run_inputs_kept,
    check_student_classes,
    check_teacher_eval_classes,
    check_test_classes,
    check_test_datasets,
    check_train_datasets,
)
from .distiller import DistillationDetector, student_of
from .utils import file_prefix, is_run_checkpoint, keep_freed_cpu_memory, unwrap_model

__all__ = [
    "KDTrainer",
    "ExportStudentHook",
    "TeacherEvalHook",
    "unwrap_model",
    "student_of",
    "ddp_model",
    "check_config_sections",
    "check_override_keys",
    "check_test_datasets",
    "check_train_datasets",
    "check_student_classes",
    "check_teacher_eval_classes",
    "check_test_classes",
    "check_input_format",
    "check_run_inputs_kept",
]

logger = logging.getLogger(__name__)


def ddp_model(model, **kwargs):
    """
    detectron2's ``create_ddp_model`` (the model itself in a single process) that also works for
    a model on the CPU: ``device_ids`` is left unset there (DDP over gloo, e.g. ``--num-gpus 2``
    on a machine without CUDA), where detectron2 always passes the local rank's GPU.

    Args:
        kwargs: ``train.ddp`` (``broadcast_buffers``, ``find_unused_parameters``,
            ``fp16_compression``, ...).
    """
    if comm.get_world_size() > 1 and "device_ids" not in kwargs:
        device = next(model.parameters()).device
        if device.type != "cuda":
            kwargs["device_ids"] = None
    return create_ddp_model(model, **kwargs)


def share_student_buffers(model) -> None:
    """Give every process rank 0's buffers of the trained detector (BatchNorm running
    statistics). DDP with detectron2's ``broadcast_buffers=False`` lets each process keep its
    own, and the evaluation during training ran each process's share of the test images with
    them, while checkpoints hold rank 0's: the logged AP was not the saved model's (demo DETR,
    two processes: 6.79 against 8.65 AP from --eval-only of the same weights). Called by every
    process before such an evaluation; afterwards they train on from the same statistics, as a
    resumed run does."""
    if comm.get_world_size() == 1:
        return
    with torch.no_grad():
        for b in student_of(model).buffers():
            torch.distributed.broadcast(b, src=0)


def _clip_max_norm(cfg) -> Optional[float]:
    """``train.clip_grad.max_norm`` where ``train.clip_grad.enabled``, else None."""
    clip = cfg.train.get("clip_grad", None)
    return float(clip.max_norm) if clip and clip.get("enabled", False) else None


def _clip_before_step(optimizer, max_norm: float) -> None:
    """Clip the global gradient norm of the optimizer's parameters before every step
    (``train.clip_grad``, e.g. DETR's 0.1), as an optimizer step pre-hook: ``optimizer.step``
    itself stays the bound method that torch's LR schedulers wrap. Under AMP, GradScaler
    unscales the gradients before it calls ``step`` (so they are clipped unscaled) and skips
    the step, hook included, when they overflowed; an optimizer that unscales in its own step
    (``fused=True``) gets them still scaled, with the scale as ``optimizer.grad_scale``: the
    scaled norm is clipped at ``max_norm * grad_scale`` (``max_norm`` once unscaled)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def clip(opt, args, kwargs):
        scale = getattr(opt, "grad_scale", None)
        limit = max_norm if scale is None else scale.to(torch.float32) * max_norm
        torch.nn.utils.clip_grad_norm_(params, limit)

    optimizer.register_step_pre_hook(clip)


def run_checkpoints(folder: str, prefix: str = "model") -> List[str]:
    """The names of the run checkpoints in ``folder`` (:func:`detkd.utils.is_run_checkpoint`:
    periodic ones, then ``model_final.pth``); [] where there is no such folder."""
    if not folder or not PathManager.isdir(folder):
        return []
    return sorted(f for f in PathManager.ls(folder) if is_run_checkpoint(f, prefix))


def unusable_last_checkpoint(
    folder: str, path: str, problem: str, prefix: str = "model"
) -> CheckpointMismatchError:
    """The error of ``--resume`` (also with ``--eval-only``) when the file that ``folder``'s
    last_checkpoint names, ``path``, is unusable (``problem``): it names the other checkpoints
    there to resume from instead."""
    name = os.path.basename(path)
    others = [f for f in run_checkpoints(folder, prefix) if f != name]
    fix = (
        f"resume from another checkpoint there ({', '.join(others[-3:])}) by writing its name "
        f"into {os.path.join(folder, 'last_checkpoint')}"
        if others
        else "there is no other checkpoint there: start the run again without --resume"
    )
    return CheckpointMismatchError(
        f"--resume: the last checkpoint of {folder!r}, {path}, {problem}. To continue, {fix}."
    )


def last_checkpoint_problem(folder: str, path: str) -> Optional[str]:
    """What makes ``path``, the file that ``folder``'s last_checkpoint names, unusable before it
    is read (an empty tag, a folder, a missing file), or None."""
    if PathManager.isfile(path):
        return None
    if os.path.relpath(path, folder) == ".":
        return "is not a file: last_checkpoint is empty"
    return "is a folder" if PathManager.isdir(path) else "does not exist"


def untagged_checkpoints_error(
    folder: str, prefix: str = "model"
) -> Optional[CheckpointMismatchError]:
    """``--resume`` in a ``folder`` that holds run checkpoints but no ``last_checkpoint`` file
    (deleted, checkpoints copied there, a crash between the first save and its tag):
    detectron2 starts again at iteration 0 and replaces them. The error to raise instead, or
    None (no such checkpoints, or a tagged run)."""
    found = run_checkpoints(folder, prefix)
    if not found or PathManager.exists(os.path.join(folder, "last_checkpoint")):
        return None
    tag = os.path.join(folder, "last_checkpoint")
    return CheckpointMismatchError(
        f"--resume: {folder!r} holds run checkpoints ({', '.join(found[-3:])}) but no "
        f"last_checkpoint file naming the one to continue from; the run would start again at "
        f"iteration 0 and replace them. To continue from one, write its name into {tag} (e.g. "
        f"`echo {found[-1]} > {tag}`); to start a new run, use another train.output_dir. No "
        "checkpoint was overwritten."
    )


class _UnreadableCheckpoint(Exception):
    """The file of a run's last checkpoint cannot be read (``--resume``)."""


class _RunCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer of a run. While :attr:`strict` (``--resume``), a checkpoint
    whose model part does not fit the model exactly raises :class:`CheckpointMismatchError`
    before the optimizer, scheduler or iteration are restored (detectron2 would only log the
    mismatch and continue with partly random weights, or fail later with a raw shape error)."""

    strict = False
    # the run's train.clip_grad.max_norm where clipping is on, else None: what a diverged run's
    # error advises (a lower limit, or turning clipping on)
    clip_max_norm: Optional[float] = None

    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except Exception as e:  # a truncated or damaged file: torch names neither file nor fix
            if not self.strict:
                raise
            raise _UnreadableCheckpoint(f"{type(e).__name__}: {e}") from e

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if self.strict and incompatible is not None:
            problems = _describe_mismatch(
                incompatible,
                "this config's num_classes or layer sizes differ from those of the run that "
                "wrote it",
                incompatible.unexpected_keys,
            )
            if problems:
                raise CheckpointMismatchError("; ".join(problems))
        return incompatible

    def save(self, name, **kwargs):
        """
        See :meth:`fvcore.common.checkpoint.Checkpointer.save`, with two differences:

        * weights that are no longer finite are refused (:class:`FloatingPointError`): a step
          whose gradients were NaN/inf (the loss itself finite, so detectron2 only stops at the
          next step) would otherwise be saved, tagged as the last checkpoint for ``--resume``,
          and let ``max_to_keep`` delete the last good one;
        * the file is written under a temporary name and then renamed: a failure while writing
          (a full disk, a preemption) never truncates the file it replaces (a longer run's
          ``model_final.pth``, a re-run's ``model_0004999.pth``) and leaves last_checkpoint as it
          was.
        """
        if not self.save_dir or not self.save_to_disk:
            return
        self._check_finite(name)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        _save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """fvcore's, written under a temporary name and then renamed (a local folder): its
        ``open(..., "w")`` empties ``last_checkpoint`` before writing the name, so a failure in
        between (a full disk, a preemption) left an empty tag that ``--resume`` cannot use."""
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        if "://" in save_file:  # another PathManager handler: fvcore's own write
            return super().tag_last_checkpoint(last_filename_basename)
        tmp = save_file + ".tmp"
        try:
            with self.path_manager.open(tmp, "w") as f:
                f.write(last_filename_basename)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        os.replace(tmp, save_file)

    def _check_finite(self, name) -> None:
        tensors = [
            (k, t)
            for k, t in list(self.model.named_parameters()) + list(self.model.named_buffers())
            if t.is_floating_point()
        ]
        if not tensors:
            return
        finite = torch.stack([t.detach().isfinite().all() for _, t in tensors]).tolist()
        bad = [k for (k, _), ok in zip(tensors, finite) if not ok]
        if not bad:
            return
        last = self.get_checkpoint_file() if self.has_checkpoint() else ""
        clip = (
            "train.clip_grad.enabled=True"
            if self.clip_max_norm is None
            else f"a lower train.clip_grad.max_norm (now {self.clip_max_norm:g})"
        )
        where = (
            f"The last checkpoint is still {last}: continue from it with --resume and "
            f"{clip} (--resume keeps the run's base lr: for a lower "
            f"optimizer.lr, start a new run from it, train.init_checkpoint={last}, in another "
            "train.output_dir)"
            if last
            else "No earlier checkpoint was written: start the run again, with a lower "
            f"optimizer.lr or {clip}"
        )
        raise FloatingPointError(
            f"Checkpoint {name!r} not written: the training diverged, {len(bad)} weights are "
            f"NaN or inf ({bad[:10]}{' ...' if len(bad) > 10 else ''}). {where}."
        )


class _KDScalarsHook(hooks.HookBase):
    """Writes the scalars a :class:`DistillationDetector` step logged, after the backward pass
    (:meth:`DistillationDetector.write_pending_scalars`). A hook of the trainer that runs the
    step (KDTrainer's inner SimpleTrainer / AMPTrainer, whose ``train`` is not called: KDTrainer
    calls its hooks' ``before_train`` / ``after_train``)."""

    def before_train(self):
        unwrap_model(self.trainer.model).scalars_after_backward = True

    def after_backward(self):
        unwrap_model(self.trainer.model).write_pending_scalars()

    def after_train(self):
        model = unwrap_model(self.trainer.model)
        model.write_pending_scalars()  # those of a last step that stopped after its forward
        model.scalars_after_backward = False


class ExportStudentHook(hooks.HookBase):
    """After a training run that reached ``max_iter``, write the student alone to
    ``OUTPUT_DIR/model_final_student.pth`` (main process only)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, "model_final_student.pth")

    def after_train(self):
        # after_train also runs when training raised: never export a half-trained student.
        # TrainerBase.train sets iter = max_iter only once the loop has finished (a failure in
        # the last iteration leaves max_iter - 1; resuming a finished run gives max_iter + 1).
        if self.trainer.iter < self.trainer.max_iter or not comm.is_main_process():
            return
        save_student(student_of(self.trainer.model), self.path)
        logger.info(f"Student exported to {self.path}")


class _EvalHook(hooks.EvalHook):
    """detectron2's EvalHook without its final evaluation of a run that failed in its last
    iteration: TrainerBase.train then leaves ``iter = max_iter - 1``, which passes EvalHook's
    ``iter + 1 >= max_iter`` test, so the unfinished (e.g. diverged) model was evaluated and
    logged to metrics.json as the run's final ``bbox/*`` results (and a preempted run spent a
    whole evaluation before exiting)."""

    def after_train(self):
        if self.trainer.iter < self.trainer.max_iter:  # the loop did not finish
            self._eval_after_train = False
        super().after_train()


@contextlib.contextmanager
def _rng_preserved():
    """Restore the global random states (Python, NumPy, torch CPU and CUDA) on exit, so that
    what runs inside leaves a seeded run's later draws (its loader's worker seeds, flips,
    dropout) as they would have been without it."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class TeacherEvalHook(hooks.HookBase):
    """
    Before training, evaluate the loaded teacher once on ``dataloader.test`` with
    ``dataloader.evaluator`` and log its results as ``teacher/<task>/<metric>`` (e.g.
    ``teacher/bbox/AP``), never under the student's keys. Enabled by
    ``train.teacher_eval_at_start=True``; results are also kept in ``self.results``. The
    random states are restored after it: the training run is the same as without it. A resumed
    run whose ``metrics.json`` already holds the teacher's results does not evaluate it again
    (on COCO, a whole evaluation per ``--resume``), unless it resumes with another
    ``train.teacher_checkpoint`` than the run's (``trainer.teacher_changed``, set by
    train_net.py).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.results = None

    # what the evaluation was of: train.teacher_checkpoint (its results are in metrics.json)
    RECORD = os.path.join("inference_teacher", "teacher_eval.json")

    def _logged_before(self) -> bool:
        """Whether this run's metrics.json has the teacher's results (the main process's view,
        shared with every process so that all of them evaluate, or none): ``teacher/*`` keys,
        and a record (:attr:`RECORD`) that they are of this ``train.teacher_checkpoint`` (those
        of an earlier run in the folder, of another teacher, stay in the appended file)."""
        found = False
        if getattr(self.trainer, "teacher_changed", False):  # its results are another teacher's
            logger.info("Resumed with another teacher checkpoint: the teacher is evaluated again.")
        elif comm.is_main_process() and self.trainer.start_iter > 0:
            path = os.path.join(self.cfg.train.output_dir, "metrics.json")
            if PathManager.isfile(path):
                with PathManager.open(path) as f:
                    found = any('"teacher/' in line for line in f)
            if found:
                evaluated = self._recorded_teacher()
                found = evaluated == self.cfg.train.get("teacher_checkpoint", "")
                if not found:
                    of = f"it is of {evaluated!r}" if evaluated is not None else f"no {self.RECORD}"
                    logger.info(
                        "metrics.json holds a teacher evaluation (teacher/*), but not one of this "
                        f"train.teacher_checkpoint ({of}: an earlier run in this folder): the "
                        "teacher is evaluated."
                    )
        return comm.all_gather(found)[0] if comm.get_world_size() > 1 else found

    def _recorded_teacher(self) -> Optional[str]:
        """The teacher checkpoint of the evaluation recorded in :attr:`RECORD`, or None."""
        path = os.path.join(self.cfg.train.output_dir, self.RECORD)
        if not PathManager.isfile(path):
            return None
        try:
            with PathManager.open(path) as f:
                teacher = json.load(f).get("teacher_checkpoint")
        except (ValueError, AttributeError):  # not written by this hook
            return None
        return teacher if isinstance(teacher, str) else None

    def before_train(self):
        if self._logged_before():
            logger.info(
                "Resumed: the teacher's evaluation before training is in this run's metrics.json "
                "(teacher/*); it is not repeated."
            )
            return
        kd = unwrap_model(self.trainer.model)
        check_teacher_eval_classes(self.cfg, kd)
        folder = os.path.join(self.cfg.train.output_dir, "inference_teacher")
        evaluator = KDTrainer.build_evaluator(self.cfg, output_folder=folder)
        if evaluator is None:
            return
        # the teacher's inputs as in training (its channel order), not the student's; the
        # evaluation's loader draws from the global RNGs: training then draws as without it
        with _rng_preserved():
            self.results = KDTrainer.test(self.cfg, kd.teacher_inference, evaluator)
        if comm.is_main_process():  # the other processes' results are empty ({})
            logger.info(f"Teacher evaluation before training: {dict(self.results)}")
            flat = {
                f"teacher/{task}/{k}": v
                for task, res in self.results.items()
                for k, v in res.items()
                if isinstance(v, (int, float))
            }
            self.trainer.storage.put_scalars(**flat, smoothing_hint=False)
            record = os.path.join(self.cfg.train.output_dir, self.RECORD)
            PathManager.mkdirs(os.path.dirname(record))
            with PathManager.open(record, "w") as f:
                json.dump(
                    {
                        "teacher_checkpoint": self.cfg.train.get("teacher_checkpoint", ""),
                        "results": flat,
                    },
                    f,
                    indent=1,
                )


# Parameter-group entries that are not settings of the optimizer: the parameters, and the lrs
# (the base lr has its own warning on --resume; the current lr is the schedule's).
_NOT_SETTINGS = ("params", "lr", "initial_lr")


def _same_setting(a, b) -> bool:
    """Equal optimizer settings (betas come back from a checkpoint as lists, not tuples)."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    return a == b


def _keep_freed_cpu_memory(cfg) -> bool:
    """:func:`detkd.utils.keep_freed_cpu_memory` for a run on the CPU (``train.device``) unless
    ``train.keep_freed_cpu_memory`` is False; whether it was applied."""
    cpu = str(cfg.train.get("device", "cuda")).startswith("cpu")
    if not (cpu and cfg.train.get("keep_freed_cpu_memory", True)):
        return False
    kept = keep_freed_cpu_memory()
    if kept:
        logging.getLogger(__name__).info(
            "CPU run: memory freed during a step is kept for the next steps, not returned to the "
            "OS (train.keep_freed_cpu_memory=False returns it)"
        )
    return kept


class KDTrainer(DefaultTrainer):
    """
    DefaultTrainer built from a LazyConfig (see the module docstring for the keys). Same
    hooks as detectron2's: iteration timer, LR scheduler, periodic checkpoints, evaluation
    every ``train.eval_period`` with ``dataloader.evaluator`` (COCOEvaluator), console / JSON /
    TensorBoard writers of every loss, plus DetKD's :class:`TeacherEvalHook` (with
    ``train.teacher_eval_at_start``), :class:`ExportStudentHook` (with
    ``train.export_student``) and, for a DistillationDetector, ``_KDScalarsHook`` (writes the
    distillers' scalars after the backward pass). The evaluation hook is ``_EvalHook``:
    detectron2's, without the final evaluation of a run that stopped before ``max_iter``.
    """

    def __init__(self, cfg):
        """
        Args:
            cfg (omegaconf.DictConfig): a LazyConfig with model, dataloader, optimizer,
                lr_multiplier and train.
        """
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        max_iter = cfg.train.max_iter
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(
                f"train.max_iter must be an int >= 1, got {max_iter!r} (the lr schedule divides by "
                "it). To evaluate a model without training, run train_net.py --eval-only with "
                "train.init_checkpoint=<its weights> (the teacher: with the teacher's config)."
            )
        _check_train_settings(cfg)
        _keep_freed_cpu_memory(cfg)
        self.teacher_changed = False  # train_net.py: --resume with another teacher checkpoint
        check_train_datasets(cfg)
        check_test_datasets(cfg)
        check_run_inputs_kept(cfg, config_yaml=False)  # train_net.py checks config.yaml itself
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        check_student_classes(cfg, model)  # the datasets' metadata is filled once loaded
        check_test_classes(cfg)
        check_input_format(cfg, model)

        model = ddp_model(model, **cfg.train.ddp)
        self._trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(
            model, data_loader, optimizer
        )
        if isinstance(unwrap_model(model), DistillationDetector):
            # on the trainer that runs the step: DefaultTrainer's own hooks get no after_backward
            self._trainer.register_hooks([_KDScalarsHook()])
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = _RunCheckpointer(
            model, cfg.train.output_dir, trainer=weakref.proxy(self)
        )
        self.checkpointer.clip_max_norm = _clip_max_norm(cfg)
        self.start_iter = 0
        self.max_iter = cfg.train.max_iter
        self.cfg = cfg
        self._teacher_loaded = False  # resume_or_load loads it
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        """
        Load the teacher from ``train.teacher_checkpoint`` (always, strictly, before anything
        else so a bad teacher fails before training). Then, if ``resume`` and the output
        folder has a checkpoint, restore the whole run (student, distiller parameters,
        optimizer, scheduler, iteration); otherwise load ``train.init_checkpoint`` into the
        student only and start at iteration 0.
        """
        if resume:
            untagged = untagged_checkpoints_error(self.cfg.train.output_dir, file_prefix(self.cfg))
            if untagged is not None:
                raise untagged
        model = unwrap_model(self.model)
        if isinstance(model, DistillationDetector):
            load_teacher(
                model.teacher,
                self.cfg.train.get("teacher_checkpoint", ""),
                allow_random=self.cfg.train.get("teacher_random_init", False),
            )
            self._teacher_loaded = True
        if resume and self.checkpointer.has_checkpoint():
            path = self.checkpointer.get_checkpoint_file()
            problem = last_checkpoint_problem(self.cfg.train.output_dir, path)
            if problem:
                raise self._unusable_last_checkpoint(path, problem)
            config_lrs = [g.get("initial_lr") for g in self.optimizer.param_groups]
            config_groups = [
                {k: v for k, v in g.items() if k not in _NOT_SETTINGS}
                for g in self.optimizer.param_groups
            ]
            self.checkpointer.strict = True
            try:
                self.checkpointer.resume_or_load("", resume=True)
            except _UnreadableCheckpoint as e:
                raise self._unusable_last_checkpoint(
                    path, f"cannot be read ({e}); it is damaged"
                ) from e
            except CheckpointMismatchError as e:
                raise CheckpointMismatchError(
                    f"--resume: the last checkpoint of {self.cfg.train.output_dir!r} ({path}) "
                    f"does not fit the model of this config ({e}). It was written by another "
                    "model or config. "
                    "Resume with the config of that run, or start this one in a new "
                    "train.output_dir (or without --resume); no checkpoint was overwritten."
                ) from e
            finally:
                self.checkpointer.strict = False
            self.start_iter = self.iter + 1
            run_lrs = [g.get("initial_lr") for g in self.optimizer.param_groups]
            if None not in config_lrs + run_lrs and config_lrs != run_lrs:
                logger.warning(
                    f"--resume: the run's base learning rates {sorted(set(run_lrs))} are kept "
                    f"(from {path}); this config's {sorted(set(config_lrs))} (optimizer.lr and its "
                    "parameter groups) are not used. To train at another base lr, start a new run "
                    "(train.init_checkpoint=<this checkpoint>) in another train.output_dir."
                )
            changed = sorted(
                {
                    f"{k} {run[k]!r} (this config: {v!r})"
                    for cfg_group, run in zip(config_groups, self.optimizer.param_groups)
                    for k, v in cfg_group.items()
                    if k in run and not _same_setting(run[k], v)
                }
            )
            if changed:
                logger.warning(
                    f"--resume: the run's optimizer settings are kept (from {path}): "
                    f"{'; '.join(changed)}. To train with this config's, start a new run "
                    "(train.init_checkpoint=<this checkpoint>) in another train.output_dir."
                )
            # The optimizer's saved lr is the one the old schedule gave this step; with
            # train.max_iter (or lr_multiplier) changed, the first resumed step would train at
            # it. Set it from this config's schedule (the same value when nothing changed).
            if isinstance(self.scheduler, LRMultiplier):
                # The schedule's position is the iteration: a checkpoint without the scheduler's
                # state (written by other tools, or with the LRScheduler hook left out) would
                # leave it at step 0 and train the resumed run at the warm-up lr again.
                if self.scheduler.last_epoch != self.start_iter:
                    logger.warning(
                        f"--resume: {path} holds no learning-rate schedule state for "
                        f"iteration {self.start_iter} (the schedule was at step "
                        f"{self.scheduler.last_epoch}); the schedule goes on from the "
                        "checkpoint's iteration."
                    )
                    self.scheduler.last_epoch = self.start_iter
                    # its base lrs are this config's: the run's (the optimizer's) are kept
                    self.scheduler.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
                if self.start_iter < self.max_iter:
                    for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr()):
                        group["lr"] = lr
            if self.start_iter >= self.max_iter:  # also a finished run resumed as it was
                how = "more than" if self.start_iter > self.max_iter else "all of"
                logger.warning(
                    f"--resume: the run in {self.cfg.train.output_dir!r} has trained "
                    f"{self.start_iter} iterations, {how} train.max_iter={self.max_iter}: "
                    "nothing is trained, and its last checkpoint is evaluated and exported as "
                    "this run's final model. To train on, raise train.max_iter."
                )
        else:
            if not resume and self.checkpointer.has_checkpoint():
                last = self.checkpointer.get_checkpoint_file()
                other = self._other_model(last)
                if other:
                    raise CheckpointMismatchError(
                        f"{self.cfg.train.output_dir!r} holds the run of another model (its last "
                        f"checkpoint {last} does not fit this config's: {other}), whose "
                        "checkpoints this run would replace. Start it in another "
                        "train.output_dir (or delete that run's files first); no checkpoint was "
                        "overwritten."
                    )
                logger.warning(
                    f"{self.cfg.train.output_dir!r} holds a run's checkpoints (last: "
                    f"{last}) and --resume was not given: "
                    "training starts again at iteration 0, and its checkpoints replace those of "
                    "the same names. Pass --resume to continue that run instead."
                )
            load_student(student_of(model), self.cfg.train.init_checkpoint)

    def _unusable_last_checkpoint(self, path, problem):
        """The error of ``--resume`` when the file that last_checkpoint names is unusable."""
        return unusable_last_checkpoint(
            self.cfg.train.output_dir, path, problem, file_prefix(self.cfg)
        )

    def _other_model(self, path) -> Optional[str]:
        """How the model part of the run checkpoint ``path`` differs from this trainer's model
        (keys or shapes: another detector, class count or width), or None where it fits or
        cannot be read (a damaged file is no run to keep: the warning of a new run there says
        which files it replaces)."""
        if not path.endswith(".pth"):  # a run's checkpoints are .pth (a .pkl is renamed on load)
            return None
        try:
            with PathManager.open(path, "rb") as f:
                data = torch.load(f, map_location="cpu", weights_only=False)
        except Exception:
            return None
        theirs = data.get("model") if isinstance(data, dict) else None
        if not isinstance(theirs, dict):
            return None
        ours = self.checkpointer.model.state_dict()

        def shape(v):
            return tuple(v.shape) if isinstance(v, torch.Tensor) else None

        problems = []
        wrong = [
            f"{k}: file {shape(theirs[k])} vs model {shape(v)}"
            for k, v in ours.items()
            if k in theirs and shape(theirs[k]) != shape(v)
        ]
        if wrong:
            problems.append(f"shape mismatch: {'; '.join(wrong[:2])}")
        missing = [k for k in ours if k not in theirs and k not in _OPTIONAL_KEYS]
        if missing:
            problems.append(f"model keys not in the file: {missing[:3]}")
        extra = [k for k in theirs if k not in ours]
        if extra:
            problems.append(f"file keys the model lacks: {extra[:3]}")
        return "; ".join(problems) or None

    # A plain detector's (a teacher's or baseline's run) EMA loss normaliser, a float attribute
    # outside its state_dict; a DistillationDetector saves its student's itself (extra state).
    _MODEL_STATS_KEY = "model_ema_stats"
    # The optimizer's class: its state_dict does not say, and another optimizer's state fails in
    # torch's load_state_dict or at the first step with a bare KeyError ('step', 'momentum').
    _OPTIMIZER_KEY = "optimizer_class"

    @staticmethod
    def _class_name(obj) -> str:
        return f"{type(obj).__module__}.{type(obj).__qualname__}"

    def state_dict(self):
        """detectron2's trainer state, plus a plain detector's EMA loss normaliser (RetinaNet's,
        FCOS's ``loss_normalizer``): without it a resumed baseline restarted it at 100 and its
        losses differed from an uninterrupted run's (by 5 % on the demo's first resumed step)."""
        ret = super().state_dict()
        model = unwrap_model(self.model)
        if not isinstance(model, DistillationDetector):
            stats = {
                k: float(getattr(model, k))
                for k in DistillationDetector._STUDENT_EMA_ATTRS
                if isinstance(getattr(model, k, None), (int, float))
            }
            if stats:
                ret[self._MODEL_STATS_KEY] = stats
        ret[self._OPTIMIZER_KEY] = self._class_name(self.optimizer)
        return ret

    def load_state_dict(self, state_dict):
        """
        Restore the run's trainer state (iteration, hooks, optimizer, AMP grad scaler, a plain
        detector's EMA loss normaliser). A run
        resumed with ``train.amp.enabled`` switched on from a checkpoint trained without AMP
        has no grad-scaler state (detectron2's AMPTrainer would stop on a bare ``KeyError``):
        the scaler starts afresh, as in a new AMP run, and a warning says so.
        """
        model = unwrap_model(self.model)
        state_dict = dict(state_dict)
        theirs, ours = state_dict.pop(self._OPTIMIZER_KEY, None), self._class_name(self.optimizer)
        if theirs is not None and theirs != ours:
            raise CheckpointMismatchError(f"the run's optimizer is {theirs}, this config's {ours}")
        for k, v in state_dict.get(self._MODEL_STATS_KEY, {}).items():
            setattr(model, k, v)  # set at the first step (detectron2's DenseDetector._ema_update)
        inner = state_dict.get("_trainer", {})
        if isinstance(self._trainer, AMPTrainer) and "grad_scaler" not in inner:
            logger.warning(
                f"--resume: iteration {state_dict.get('iteration')} of the run was trained "
                "without AMP (its checkpoint has no grad-scaler state); with train.amp.enabled "
                "the loss scale starts afresh."
            )
            inner = {**inner, "grad_scaler": self._trainer.grad_scaler.state_dict()}
            state_dict = {**state_dict, "_trainer": inner}
        try:
            super().load_state_dict(state_dict)
        except (
            KeyError,
            ValueError,
        ) as e:  # torch's optimizer load (a checkpoint without the class)
            raise CheckpointMismatchError(
                f"its optimizer state does not fit this config's {ours} ({type(e).__name__}: {e})"
            ) from e
        # Another optimizer's parameter groups lack this one's settings (torch fills in only the
        # ones it added in later versions): the first step would stop on a bare KeyError.
        lacking = sorted(
            {k for g in self.optimizer.param_groups for k in self.optimizer.defaults if k not in g}
        )
        if lacking:
            raise CheckpointMismatchError(
                f"its optimizer's parameter groups lack {lacking}, settings of this config's {ours}"
            )

    def build_hooks(self):
        cfg = self.cfg
        ret = [hooks.IterationTimer(), hooks.LRScheduler()]
        is_kd = isinstance(unwrap_model(self.model), DistillationDetector)
        if is_kd and cfg.train.get("teacher_eval_at_start", False):
            ret.append(TeacherEvalHook(cfg))
        if comm.is_main_process():
            ret.append(hooks.PeriodicCheckpointer(self.checkpointer, **cfg.train.checkpointer))

        def test_and_save_results():
            share_student_buffers(self.model)  # the checkpoints' (rank 0's) statistics
            self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        # The export before the final evaluation: an evaluation that fails (e.g. a test set that
        # does not load) would otherwise stop the hooks after it and leave a finished run without
        # model_final_student.pth.
        if is_kd and cfg.train.get("export_student", True):
            ret.append(ExportStudentHook(cfg.train.output_dir))
        ret.append(_EvalHook(cfg.train.eval_period, test_and_save_results))
        if comm.is_main_process():
            ret.append(hooks.PeriodicWriter(self.build_writers(), period=cfg.train.log_period))
        return ret

    def build_writers(self):
        return default_writers(self.cfg.train.output_dir, self.max_iter)

    def _check_amp_device(self) -> None:
        """``train.amp.enabled`` with a model outside CUDA: detectron2's AMPTrainer (CUDA's fp16
        autocast and grad scaler) asserts CUDA at its first step, after the hooks'
        ``before_train`` (a teacher evaluation, ...); said here, before anything runs."""
        if not isinstance(self._trainer, AMPTrainer):
            return
        device = next(unwrap_model(self.model).parameters()).device
        if device.type != "cuda":
            raise ValueError(
                f"train.amp.enabled=True, but the model is on {device.type!r} "
                f"(train.device={self.cfg.train.get('device')!r}): detectron2's AMPTrainer trains "
                "on CUDA only (fp16 autocast and a CUDA grad scaler). Set train.amp.enabled=False, "
                "or train.device='cuda' on a machine with a GPU."
            )

    def train(self):
        """Run training; returns the last evaluation results (or None). For a
        :class:`DistillationDetector`, call :meth:`resume_or_load` first: it loads the teacher."""
        self._check_amp_device()
        if isinstance(unwrap_model(self.model), DistillationDetector) and not self._teacher_loaded:
            raise RuntimeError(
                "KDTrainer.train(): the teacher was not loaded, and a distillation run would learn "
                "from a randomly initialised teacher. Call trainer.resume_or_load(resume=False) "
                "(or resume=True) before trainer.train(), as train_net.py does: it loads "
                "train.teacher_checkpoint into model.teacher and train.init_checkpoint into the "
                "student."
            )
        TrainerBase.train(self, self.start_iter, self.max_iter)
        return getattr(self, "_last_eval_results", None)

    def before_train(self):
        # the inner trainer's hooks (_KDScalarsHook) get no before_train / after_train
        # otherwise: its own train is never called
        for h in self._trainer._hooks:
            h.before_train()
        super().before_train()

    def after_train(self):
        if self.start_iter >= self.max_iter:
            # nothing trained (a finished run resumed): TrainerBase.train counted one iteration
            # all the same, and the evaluation of the last checkpoint was logged one (or more)
            # past the iterations trained; it is logged at the run's own count
            self.iter = self.start_iter
        # first the inner trainer's hooks: the scalars of a step that failed after its forward
        # are written before KDTrainer's writers' last write, and scalars_after_backward reset
        try:
            for h in self._trainer._hooks:
                h.after_train()
        finally:
            super().after_train()

    @classmethod
    def build_model(cls, cfg):
        """
        Instantiate ``cfg.model`` on ``train.device``. For a DistillationDetector the student is
        built first, as its baseline builds it; the teacher and the distillers' trainable parts
        are then built with the random states restored after them. A distilled run and its
        baseline of the same ``train.seed`` thus leave the states alike for what draws after
        the model: the training loader's worker seeds (its flips), the sampler's order, dropout.
        """
        model_cfg = cfg.model
        target = model_cfg.get("_target_", None) if hasattr(model_cfg, "get") else None
        if isinstance(target, str):
            target = locate(target)
        if (
            isinstance(target, type)
            and issubclass(target, DistillationDetector)
            and "student" in model_cfg
        ):
            model_cfg = copy.deepcopy(model_cfg)
            student = instantiate(model_cfg.student)
            model_cfg.student = student
            with _rng_preserved():
                model = instantiate(model_cfg)
        else:
            model = instantiate(model_cfg)
        device = str(cfg.train.device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(
                f"train.device={device!r}, but torch finds no CUDA GPU on this machine "
                "(torch.cuda.is_available() is False): run on a machine with a GPU and a CUDA "
                "build of torch, or set train.device=cpu (the configs/demo/ runs' setting; slow "
                "for COCO-sized models)."
            )
        model.to(device)
        logger.info("Model:\n{}".format(model))
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        # The teacher is neither a registered submodule nor trainable: only the student and
        # the distillers' adapters reach the optimizer.
        cfg.optimizer.params.model = model
        optimizer = instantiate(cfg.optimizer)
        max_norm = _clip_max_norm(cfg)
        if max_norm is not None:
            _clip_before_step(optimizer, max_norm)
        return optimizer

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return LRMultiplier(
            optimizer, multiplier=instantiate(cfg.lr_multiplier), max_iter=cfg.train.max_iter
        )

    @classmethod
    def build_train_loader(cls, cfg):
        """``dataloader.train``, instantiated. Training data whose every image detectron2 drops
        (no annotation but ``iscrowd=1`` ones, with ``filter_empty``, its default) is a
        ValueError that says so and names the fix, instead of detectron2's assertion "No valid
        data found in <names>"."""
        try:
            return instantiate(cfg.dataloader.train)
        except AssertionError as e:
            names = _dataset_names(cfg, "train")
            if not names or not str(e).startswith("No valid data found"):
                raise
            raise ValueError(_no_training_images(names)) from e

    @classmethod
    def build_test_loader(cls, cfg, dataset_name=None):
        return instantiate(cfg.dataloader.test)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name=None, output_folder=None):
        """Instantiate ``dataloader.evaluator`` (None if the config has none); a COCOEvaluator
        without ``output_dir`` writes its results to ``OUTPUT_DIR/inference``."""
        if "evaluator" not in cfg.dataloader:
            return None
        evaluator = copy.deepcopy(cfg.dataloader.evaluator)
        target = evaluator._target_
        if isinstance(target, str):
            target = locate(target)
        accepts_dir = "output_dir" in inspect.signature(target).parameters
        if accepts_dir and evaluator.get("output_dir") is None:
            evaluator.output_dir = output_folder or os.path.join(cfg.train.output_dir, "inference")
        return instantiate(evaluator)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """
        Evaluate ``model`` on ``dataloader.test`` with ``dataloader.evaluator``: the student (a
        DistillationDetector in eval mode runs the student only), or any callable on batched
        inputs (:class:`TeacherEvalHook` passes ``DistillationDetector.teacher_inference``).

        The model runs outside its DDP wrapper: with ``train.ddp.broadcast_buffers=True`` the
        wrapper broadcasts buffers before a forward, and a process that the inference sampler
        gives no image (fewer test images than processes) never joins it.

        Returns:
            dict: the evaluator's results, e.g. ``{"bbox": {"AP": ..., "AP50": ...}}``.
        """
        evaluator = evaluators if evaluators is not None else cls.build_evaluator(cfg)
        if evaluator is None:
            logger.warning("No dataloader.evaluator in the config: skipping evaluation.")
            return {}
        results = inference_on_dataset(unwrap_model(model), cls.build_test_loader(cfg), evaluator)
        if comm.is_main_process() and results:
            print_csv_format(results)
        return results
