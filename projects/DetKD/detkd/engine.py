"""
:class:`KDTrainer`: detectron2's DefaultTrainer, built from a LazyConfig, that knows about the
teacher of a :class:`detkd.DistillationDetector`.

The LazyConfig has the five top-level names ``model``, ``dataloader`` (``train``, ``test``,
``evaluator``), ``optimizer``, ``lr_multiplier`` and ``train``. DetKD adds five ``train`` keys
and sets a default for detectron2's ``train.seed`` (``configs/common/kd_train.py``):

* ``train.teacher_checkpoint``: the teacher's weights, loaded strictly into ``model.teacher``;
* ``train.teacher_random_init``: allow an empty ``teacher_checkpoint`` (tests, smoke runs);
* ``train.export_student``: write ``model_final_student.pth`` at the end of training;
* ``train.clip_grad``: ``dict(enabled=True, max_norm=0.1)`` clips the global gradient norm
  (off by default);
* ``train.teacher_eval_at_start``: evaluate the loaded teacher before training
  (:class:`TeacherEvalHook`, logged as ``teacher/bbox/AP`` ...);
* ``train.seed``: 0, the seed detectron2's ``default_setup`` gives the run (-1 would draw one).

``train.init_checkpoint`` loads into ``model.student`` only. ``model`` may also be a plain
detector (e.g. training the teacher or a baseline), then the trainer is a LazyConfig version of
detectron2's DefaultTrainer.
"""

import contextlib
import copy
import difflib
import inspect
import json
import logging
import math
import os
import random
import weakref
from typing import List, Optional

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model, default_writers
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.solver import LRMultiplier
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger
from detectron2.utils.registry import locate
from torch.nn.parallel import DataParallel, DistributedDataParallel

from .checkpoint import (
    _OPTIONAL_KEYS,
    CheckpointMismatchError,
    _describe_mismatch,
    _is_local,
    _local_path,
    _save,
    _yacs_classes_key,
    load_student,
    load_teacher,
    save_student,
)
from .distiller import DistillationDetector
from .utils import is_run_checkpoint

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
    "check_student_classes",
    "check_teacher_eval_classes",
    "check_test_classes",
    "check_input_format",
    "check_run_inputs_kept",
]

logger = logging.getLogger(__name__)


def unwrap_model(model):
    """Returns the module inside a (Distributed)DataParallel wrapper."""
    if isinstance(model, (DistributedDataParallel, DataParallel)):
        return model.module
    return model


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


def check_config_sections(cfg, config_file: str, *, training: bool = True) -> None:
    """
    Raise ``ValueError`` when ``config_file`` is not a LazyConfig that ``train_net.py`` can run:
    a yacs ``.yaml`` (detectron2's ``tools/train_net.py`` format: ``MODEL``, ``_BASE_``), or a
    LazyConfig without one of the top-level keys a run reads (``model``, ``dataloader``,
    ``train``, and for training ``optimizer`` and ``lr_multiplier``). Both failed later with an
    omegaconf ``Missing key`` trace, the second after ``config.yaml`` and ``log.txt`` were written.
    """
    yacs = [k for k in ("MODEL", "_BASE_", "SOLVER", "DATASETS") if k in cfg]
    # a .py LazyConfig may hold a dict of its own named like a yacs section
    if yacs and (str(config_file).endswith((".yaml", ".yml")) or "model" not in cfg):
        raise ValueError(
            f"{config_file} is a yacs config (it has {yacs}), the format of detectron2's "
            "tools/train_net.py; DetKD's train_net.py runs LazyConfig .py files. Take a config of "
            "configs/ and set its model to your yacs model with "
            'L(detkd.modeling.build_yacs_detector)(config_file=...) (README: "A teacher or '
            'student from a yacs .yaml config").'
        )
    needed = ["model", "dataloader", "train"] + (["optimizer", "lr_multiplier"] if training else [])
    missing = [k for k in needed if k not in cfg]
    if missing:
        raise ValueError(
            f"{config_file} defines no {', '.join(missing)}: a LazyConfig run reads "
            f"{', '.join(needed)} at its top level ({'training' if training else '--eval-only'}). "
            "Define or import them there, as configs/demo/student_retinanet.py does (e.g. "
            "`from ..common.kd_train import train`)."
        )


# Keys that are read with a default where a config lacks them, so an override of them is valid
# although the configs do not set them (detectron2's default_setup: train.cudnn_benchmark).
_OPTIONAL_OVERRIDE_KEYS = ("train.cudnn_benchmark",)


def check_flag_order(overrides) -> None:
    """``ValueError`` for flags among the ``key=value`` overrides (``train_net.py --config-file
    C key=value --resume``): detectron2's parser takes every argument after the first override
    as one, so the flag would be an override (Hydra's bare lexer error), or, for
    ``--config-file`` itself, leave the config file empty (detectron2's "Config file  has to be
    a python or yaml file"). A bare ``--`` among them (``train_net.py`` drops a leading one, the
    separator ``python -m detkd.demo ... -- key=value`` takes) would be an override too."""
    if "--" in overrides:
        raise ValueError(
            f"'--' among the key=value overrides {list(overrides)}: detectron2's parser would pass "
            "it on as an override. Drop it (only a '--' right before the first override is "
            "allowed), e.g. train_net.py --config-file <config> key=value ..."
        )
    flags = [o for o in overrides if str(o).startswith("--")]
    if flags:
        others = "".join(f" {f}" for f in flags if f != "--config-file")
        raise ValueError(
            f"{flags} come after the key=value overrides, which take every argument after the "
            "first one: put the flags (--config-file, --resume, --eval-only, --num-gpus, ...) "
            f"before them, e.g. train_net.py --config-file <config>{others} key=value ..."
        )


def check_override_keys(cfg, overrides) -> None:
    """
    Raise ``KeyError`` for a ``key=value`` override (``train_net.py ... key=value``) whose key is
    neither in ``cfg`` nor an argument of the LazyCall that would receive it: LazyConfig would
    add it silently (``train.max_ite=100`` trains the config's ``max_iter``;
    ``train.teacher_chekpoint=x`` keeps the config's teacher). ``+key=value`` and
    ``++key=value`` add a key on purpose and are not checked, nor are the keys that detectron2
    reads with a default although configs rarely set them (``_OPTIONAL_OVERRIDE_KEYS``, e.g.
    ``train.cudnn_benchmark``). Each override is checked against the config as the overrides
    before it leave it (``model.distillers={...} model.distillers.pkd.loss_weight=5``).

    Also ``ValueError`` for a Hydra sweep (``optimizer.lr=1,5``: LazyConfig fails on it with an
    omegaconf trace that does not name the override) and for a dict override of
    ``*.distillers`` that leaves out distillers of the config: LazyConfig merges dicts, so
    ``model.distillers={gid:{...}}`` on the PKD config would run PKD and GID.
    """
    from detectron2.config import LazyConfig

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import DictConfig, OmegaConf

    check_flag_order(overrides)
    missing = object()

    def check(cfg, text, o) -> None:
        key = o.key_or_group
        if o.is_sweep_override():
            raise ValueError(
                f"Override {text!r} is a Hydra sweep (a comma outside brackets or quotes), which "
                "LazyConfig cannot apply: write one value (1.5, not 1,5), a list in brackets "
                f"({key}=[1,5]) or a quoted string ('{key}=\"a,b\"')."
            )
        old, value = OmegaConf.select(cfg, key, default=missing), o.value()
        if (
            key.split(".")[-1] == "distillers"
            and isinstance(old, DictConfig)
            and isinstance(value, dict)
        ):
            kept = [str(k) for k in old.keys() if k not in value]
            if kept:
                raise ValueError(
                    f"Override {text!r}: a dict override merges into the config's {key}, it does "
                    f"not replace it: {kept} would still run. An override cannot remove a "
                    f"distiller; choose them in a config file that sets {key} (configs/demo/ has "
                    "one per method, and pkdgid_retinanet.py with two)."
                )
        if (
            o.is_add()
            or o.is_force_add()
            or key in _OPTIONAL_OVERRIDE_KEYS
            or OmegaConf.select(cfg, key, default=missing) is not missing
        ):
            return
        parts = key.split(".")
        i = len(parts) - 1
        while i > 0 and OmegaConf.select(cfg, ".".join(parts[:i]), default=missing) is missing:
            i -= 1
        parent_key = ".".join(parts[:i])
        parent = OmegaConf.select(cfg, parent_key, default=missing) if i else cfg
        if not isinstance(parent, DictConfig):
            return  # a list index or a value: LazyConfig itself reports it
        name = parts[i]
        known = [str(k) for k in parent.keys() if k != "_target_"]
        target = parent.get("_target_", None)
        if target is not None and i == len(parts) - 1:
            fn = locate(target) if isinstance(target, str) else target
            try:
                params = inspect.signature(fn).parameters
            except (TypeError, ValueError):
                return
            if name in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
                return  # an argument the config leaves at its default
            known += [k for k in params if k not in known]
        where = f"'{parent_key}'" if parent_key else "the config"
        close = difflib.get_close_matches(name, known, n=3)
        hint = (
            f" Did you mean {', '.join(repr('.'.join(parts[:i] + [c])) for c in close)}?"
            if close
            else ""
        )
        raise KeyError(
            f"Override {key!r}: {where} has no key {name!r}.{hint} Keys there: {sorted(known)}. "
            f"(Write +{key}=... to add a new key on purpose.)"
        )

    overrides = list(overrides)
    cfg = copy.deepcopy(cfg)  # the earlier overrides are applied to a copy, not to the caller's
    for text, o in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        check(cfg, text, o)
        try:
            LazyConfig.apply_overrides(cfg, [text])
        except Exception:  # e.g. a deletion: train_net.py's own apply_overrides reports it
            pass


def check_run_inputs_kept(cfg, *, checkpoints: bool = True, config_yaml: bool = True) -> None:
    """
    Fail before anything is written when the run would overwrite a file it reads from its own
    ``train.output_dir`` (e.g. the folder its teacher was trained in): the ``.yaml`` of a
    :func:`detkd.modeling.build_yacs_detector` node that is the folder's ``config.yaml`` (the
    one detectron2's DefaultTrainer wrote next to the teacher), which ``default_setup``
    replaces with this run's config before the model is built; or the teacher's checkpoint
    (``train.teacher_checkpoint``) or the student's starting weights
    (``train.init_checkpoint``) under a name the run saves its own checkpoints to
    (``model_final.pth``, ``model_0004999.pth``, ``model_final_student.pth``), which the run
    would replace.

    Args:
        checkpoints (bool): the run saves checkpoints (training; not ``--eval-only``).
        config_yaml (bool): the run writes ``train.output_dir/config.yaml`` (train_net.py).
    """
    from omegaconf import OmegaConf

    out = cfg.train.get("output_dir", None)
    if not _is_local(out):
        return
    out = _local_path(out)
    fix = " Give this run another train.output_dir (or move the teacher's files out of it)."
    run_config = os.path.join(out, "config.yaml")
    for node in ("model.teacher", "model.student", "model") if config_yaml else ():
        if not _is_yacs_node(cfg, node):
            continue
        config_file = OmegaConf.select(cfg, node + ".config_file", default=None)
        if _is_local(config_file) and _local_path(config_file) == run_config:
            raise ValueError(
                f"{node}.config_file {config_file!r} is the config.yaml of this run's "
                f"train.output_dir ({cfg.train.output_dir!r}), which the run replaces with its "
                "own config before building the model: that .yaml would be lost." + fix
            )
    if not checkpoints:
        return
    prefix = file_prefix(cfg)
    # only a DistillationDetector reads train.teacher_checkpoint (KDTrainer.resume_or_load): a
    # plain model, e.g. the teacher trained by a copy of its distillation config with
    # `model = teacher`, has no teacher whose weights could be lost
    inputs = [
        ("train.init_checkpoint", "the weights the student starts from", True),
        ("train.teacher_checkpoint", "the teacher's weights", _may_build_kd_model(cfg)),
    ]
    for key, what, read in inputs:
        value = cfg.train.get(key.split(".", 1)[1], "")
        if not (read and _is_local(value)):
            continue
        path = _local_path(value)
        name = os.path.basename(path)
        saved_as = is_run_checkpoint(name, prefix) or name == "model_final_student.pth"
        if os.path.dirname(path) == out and saved_as:
            raise ValueError(
                f"{key} {value!r} is in this run's train.output_dir ({cfg.train.output_dir!r}) "
                f"under a name the run saves its own checkpoints to: {what} would be replaced by "
                "this run's. Give this run another train.output_dir (or copy the file out of it "
                f"and set {key} to the copy)."
            )


def _may_build_kd_model(cfg) -> bool:
    """False when ``cfg.model`` is a LazyCall of a class that is not a
    :class:`DistillationDetector` (a plain detector) or of ``build_yacs_detector``; True
    otherwise (another factory function may return one)."""
    if _is_yacs_node(cfg, "model"):  # detectron2's build_model: never a DistillationDetector
        return False
    target = _node_target(cfg, "model")
    return not inspect.isclass(target) or issubclass(target, DistillationDetector)


def _dataset_names(cfg, split: str) -> List[str]:
    """The registered-dataset names ``dataloader.<split>.dataset.names`` gives (a name or a list
    of names), also the name that a LazyCall of :func:`detkd.data.register_shapes` registers
    (the demo configs'; it writes the data only once and returns the same name on every call);
    [] when it is anything else (another LazyCall, whose side effects are its own) or missing."""
    try:
        names = cfg.dataloader[split].dataset.names
    except (AttributeError, KeyError):
        return []
    from .data import register_shapes

    if _node_target(cfg.dataloader[split].dataset, "names") is register_shapes:
        names = instantiate(names)
    if isinstance(names, str):
        return [names]
    if isinstance(names, (list, tuple)) or type(names).__name__ == "ListConfig":
        names = list(names)
        return names if all(isinstance(n, str) for n in names) else []
    return []


def check_test_datasets(cfg) -> None:
    """
    Fail at the start of training when ``dataloader.test.dataset.names`` (a name or a list of
    names) names a dataset that is not registered: otherwise only the first evaluation, after
    ``train.eval_period`` iterations or at the end of the run, would find out. A ``names`` that is
    a LazyCall (the shapes data) is built with the loader and is not checked here.
    """
    names = _dataset_names(cfg, "test")
    registered = DatasetCatalog.list()
    for name in names:
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ValueError(
                f"dataloader.test.dataset.names: dataset {name!r} is not registered{hint}, so the "
                "evaluation would fail after training. Register it (e.g. register_coco_instances "
                "in the config) or fix the name."
            )


def _no_training_images(names: List[str]) -> str:
    """The error for training datasets ``names`` of which detectron2's ``filter_empty`` kept no
    image: how many images they have, without and with only ``iscrowd=1`` annotations."""
    dicts = [d for name in names for d in DatasetCatalog.get(name)]
    crowd = sum(
        1
        for d in dicts
        if d.get("annotations") and all(a.get("iscrowd", 0) for a in d["annotations"])
    )
    return (
        f"dataloader.train: no image of {', '.join(map(repr, names))} has an annotation to "
        "train on "
        f"({len(dicts)} images: {len(dicts) - crowd} without annotations, {crowd} with only "
        "iscrowd=1 ones), and detectron2 drops such images from training "
        "(dataloader.train.dataset.filter_empty, True by default), which left none. Check the "
        "json's \"annotations\" (their image_id must be an image's id), or set "
        "dataloader.train.dataset.filter_empty = False to train on the images as background."
    )


def _class_count(model):
    """A detector's number of classes (RetinaNet, FCOS, ConditionalDETR: ``num_classes``; an
    R-CNN: its ROI heads'), or None (e.g. a proposal network)."""
    n = getattr(model, "num_classes", None)
    if n is None:
        n = getattr(getattr(model, "roi_heads", None), "num_classes", None)
    return n if isinstance(n, int) else None


def _is_yacs_node(cfg, key: str) -> bool:
    """Whether ``cfg``'s ``key`` is a :func:`detkd.modeling.build_yacs_detector` node, whose
    settings are the keys of a yacs .yaml (``INPUT.FORMAT``), not the model's arguments."""
    from .modeling.from_yacs import build_yacs_detector

    return _node_target(cfg, key) is build_yacs_detector


def _node_target(cfg, key: str):
    """What ``cfg``'s ``key`` LazyCalls (its ``_target_``, located), or None when ``key`` is no
    LazyCall node."""
    from omegaconf import OmegaConf

    try:
        target = OmegaConf.select(cfg, key + "._target_", default=None)
    except Exception:  # not a node
        return None
    return locate(target) if isinstance(target, str) else target


def check_student_classes(cfg, model, split: str = "train") -> None:
    """
    Fail when the trained detector's class count (``model.student``'s, or a plain detector's)
    differs from the training data's (the ``thing_classes``
    of the datasets ``dataloader.train.dataset.names`` names, once loaded): a student with fewer
    classes would crash or take the data's last classes for background, one with more would
    never see its extra classes and evaluate against a wrong mapping. Datasets without
    ``thing_classes`` and a LazyCall ``names`` (the shapes data) are not checked. With
    ``split="test"`` (``--eval-only``), the test datasets' (loaded if need be; not without
    ``dataloader.evaluator``, which evaluates nothing): COCOEvaluator would stop on its first
    prediction of a class the data lacks, after the whole inference.
    """
    student = student_of(model)
    kd = isinstance(unwrap_model(model), DistillationDetector)
    n_student = _class_count(student)
    if split != "train" and not _evaluates(cfg):  # nothing is evaluated on them
        n_student = None
    for name in _dataset_names(cfg, split) if n_student is not None else ():
        if split == "train":  # filled by the training loader, built before this check
            classes = MetadataCatalog.get(name).get("thing_classes")
        else:
            classes = _loaded_classes(name)
        if classes is not None and len(classes) != n_student:
            # the config key of the trained detector: model.student.* in a distillation config,
            # model.* in a plain detector's (a teacher's or a baseline's)
            node = "model.student" if kd else "model"
            if _is_yacs_node(cfg, node):  # its keys are the .yaml's
                fix = (
                    f"Set {_yacs_classes_key(student)}: {len(classes)} in {node}'s .yaml or "
                    f"{node}.opts"
                )
            else:
                key = "roi_heads.num_classes" if hasattr(student, "roi_heads") else "num_classes"
                where = f"{node}.{key}"
                fix = f"Set {where} = {len(classes)}"
            note = " (the teacher's class count is checked against its checkpoint)" if kd else ""
            raise ValueError(
                f"The {'student' if kd else 'model'} predicts {n_student} classes but the "
                f"{'training' if split == 'train' else 'test'} dataset {name!r} has {len(classes)} "
                f"({_listed(classes)}). "
                f"{fix}{note}."
            )


def _listed(classes) -> str:
    """The first five class names, for an error message."""
    return ", ".join(map(str, classes[:5])) + (", ..." if len(classes) > 5 else "")


def _evaluates(cfg) -> bool:
    """Whether the config evaluates on ``dataloader.test``: without ``dataloader.evaluator``
    nothing is scored (:meth:`KDTrainer.test` and the teacher's evaluation skip it), so the test
    data's classes matter to nothing."""
    try:
        return "evaluator" in cfg.dataloader
    except Exception:  # no dataloader node
        return False


def _loaded_classes(name: str):
    """The ``thing_classes`` of the registered dataset ``name``, loading it when its metadata
    does not have them yet (detectron2's COCO loader fills them when it reads the json), or None
    (e.g. a dataset without classes). A dataset so loaded that has no images is an error."""
    meta = MetadataCatalog.get(name)
    if meta.get("thing_classes") is None and not DatasetCatalog.get(name):
        raise ValueError(
            f"The test dataset {name!r} (dataloader.test.dataset.names) has no images, so there "
            "is nothing to evaluate: detectron2's test loader would stop on it (\"Dataset "
            f"'{name}' is empty!\"), in a training run at its first evaluation. Check the "
            'json\'s "images" (and the folder registered with it), or test on another dataset.'
        )
    return meta.get("thing_classes")


def check_test_classes(cfg) -> None:
    """
    Fail when a test dataset's classes (``dataloader.test.dataset.names``) are not the training
    data's, in name and order: the student's class i is the training data's i-th category, but
    COCOEvaluator reports it as the test data's i-th (detectron2 numbers each json's categories
    by sorted id). Two json files of one dataset with different category lists (e.g. a val.json
    that lists only the categories it annotates) were evaluated against a shifted mapping
    without a word, or stopped at the end of training on COCOEvaluator's assertion. Datasets
    without ``thing_classes``, a LazyCall ``names`` (the shapes data) and a config without
    ``dataloader.evaluator`` (nothing is evaluated) are not checked. A test dataset that is
    loaded here (its metadata has no classes yet) and has no images is an error too: detectron2
    stopped on it only at the first evaluation, by default after the whole run.
    """
    train = _dataset_names(cfg, "train")
    expected = MetadataCatalog.get(train[0]).get("thing_classes") if train else None
    # filled by the training loader, built before this check; no evaluator: nothing is scored
    if not _evaluates(cfg):
        return

    for name in _dataset_names(cfg, "test"):
        classes = _loaded_classes(name)  # a test dataset without images: an error before training
        if expected is None or classes is None or list(classes) == list(expected):
            continue
        pairs = enumerate(zip(classes, expected))
        diff = next((i for i, (a, b) in pairs if a != b), min(len(classes), len(expected)))
        raise ValueError(
            f"The classes of the test dataset {name!r} ({len(classes)}: {_listed(classes)}) are "
            f"not those of the training dataset {train[0]!r} ({len(expected)}: "
            f"{_listed(expected)}); they differ from class {diff} on: the student's class i "
            "would be evaluated as the test data's class i. Give both json files the same "
            "categories (ids and names, also those a split does not annotate; detectron2 "
            "numbers them by sorted id)."
        )


def teacher_class_mismatch(cfg, teacher) -> str:
    """
    Why ``teacher`` (a built detector) cannot be evaluated on ``cfg``'s test data, or "": its
    class count differs from that of a dataset of ``dataloader.test.dataset.names``. A LazyCall
    ``names`` (the shapes data) and a config without ``dataloader.evaluator`` (the teacher is
    not evaluated) are not checked.
    """
    n_teacher = _class_count(teacher) if _evaluates(cfg) else None  # else it is not evaluated
    for name in _dataset_names(cfg, "test") if n_teacher is not None else ():
        classes = _loaded_classes(name)
        if classes is not None and len(classes) != n_teacher:
            return (
                f"the teacher predicts {n_teacher} classes but the test dataset {name!r} has "
                f"{len(classes)} ({_listed(classes)})"
            )
    return ""


def check_teacher_eval_classes(cfg, model) -> None:
    """
    Fail before ``train.teacher_eval_at_start`` evaluates a teacher whose class count differs
    from the test data's (:func:`teacher_class_mismatch`): a teacher of another class set
    (e.g. a model-zoo COCO teacher of 80 classes, which PKD, ReviewKD and GID's location
    selection accept) stopped the run in COCOEvaluator's assertion on its first prediction of a
    class the dataset does not have, and one of fewer classes was scored against a wrong
    mapping.
    """
    mismatch = teacher_class_mismatch(cfg, unwrap_model(model).teacher)
    if mismatch:
        raise ValueError(
            f"train.teacher_eval_at_start: {mismatch}, so its predictions cannot be evaluated "
            "on it (a teacher of another class set, e.g. a model-zoo COCO teacher). Set "
            "train.teacher_eval_at_start=False (distillation does not need it), or evaluate the "
            "teacher on its own data with its own config."
        )


def _mapper_format(cfg, split: str):
    """``dataloader.<split>.mapper.image_format``, or None: no such key (e.g. a mapper of another
    kind), or "L" (one grey channel, which the normalisation of an RGB/BGR detector broadcasts
    over its three: grayscale training, not a mismatch)."""
    try:
        fmt = cfg.dataloader[split].mapper.image_format
    except Exception:  # a missing key (AttributeError, KeyError, omegaconf's errors)
        return None
    return fmt if isinstance(fmt, str) and fmt != "L" else None


def check_input_format(cfg, model, splits=("train", "test")) -> None:
    """
    Fail when a data loader's channel order (``dataloader.<split>.mapper.image_format``)
    differs from the one the trained detector normalises its images for (``model.student``'s
    ``input_format``, or ``model.student_input_format`` for a student without one; a plain
    detector's ``input_format``). detectron2 ties the two only in its yacs configs
    (``INPUT.FORMAT``); in a LazyConfig they are two keys, and a config that changes one of
    them (e.g. an RGB student of torchvision weights whose loader was left at BGR) trained
    silently on swapped channels. In a distillation run the teacher's images came out wrong
    too: they are flipped from the student's declared order, not the loader's.
    """
    kd = unwrap_model(model)
    if isinstance(kd, DistillationDetector):
        s_fmt = kd.student_format
        where = (
            "model.student_input_format"
            if getattr(kd.student, "input_format", None) is None
            else "model.student.input_format"
        )
        who = "the student"
    else:
        s_fmt, where, who = getattr(kd, "input_format", None), "model.input_format", "the model"
    node = where.rpartition(".")[0]
    if where.endswith(".input_format") and _is_yacs_node(cfg, node):  # its keys are the .yaml's
        where = f"INPUT.FORMAT of {node}'s .yaml or {node}.opts"
    if s_fmt not in ("RGB", "BGR"):
        return
    for split in splits:
        fmt = _mapper_format(cfg, split)
        if fmt is not None and fmt != s_fmt:
            if fmt in ("RGB", "BGR"):
                teacher = (
                    " (and the teacher's images would be flipped from the wrong order)"
                    if isinstance(kd, DistillationDetector)
                    else ""
                )
                problem = f"its images would reach it with the channels swapped{teacher}"
            else:  # e.g. "YUV-BT.601" (float64: a dtype error in the first convolution), "RGBA"
                problem = f"its images would reach it in {fmt}, which it is not normalised for"
            raise ValueError(
                f"dataloader.{split}.mapper.image_format is {fmt!r} but {who} takes {s_fmt!r} "
                f"images ({where}): {problem}. "
                "Set both to the channel order of the weights it starts from (torchvision's "
                "ImageNet weights converted to detectron2: 'RGB', with torchvision's pixel_mean / "
                "pixel_std; MSRA weights and detectron2's model zoo: 'BGR')."
            )


def student_of(model):
    """The detector that is being trained: ``model.student`` of a DistillationDetector, else
    the model itself."""
    model = unwrap_model(model)
    return model.student if isinstance(model, DistillationDetector) else model


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


def _is_int(x) -> bool:
    """An int, or a float of a whole number (``1e3`` on the command line is 1000.0)."""
    if isinstance(x, float):
        return math.isfinite(x) and x == int(x)
    return isinstance(x, int) and not isinstance(x, bool)


# The keys of ``train`` that a run reads: detectron2's configs/common/train.py (its
# lazyconfig_train_net.py and KDTrainer), detectron2's default_setup (seed, cudnn_benchmark) and
# DetKD's configs/common/kd_train.py.
_TRAIN_KEYS = (
    "output_dir",
    "init_checkpoint",
    "max_iter",
    "amp",
    "ddp",
    "checkpointer",
    "eval_period",
    "log_period",
    "device",
    "seed",
    "cudnn_benchmark",
    "teacher_checkpoint",
    "teacher_random_init",
    "export_student",
    "teacher_eval_at_start",
    "clip_grad",
)
# A key of ``train`` that is not read, but this close (difflib's ratio) to one that is, is
# taken for a typo. Every one-letter slip or swap in keys of 6 letters and more scores above it
# (``eval_perod`` 0.95, ``max_nrom`` 0.88, ``devise`` 0.83), and a dropped or doubled letter in
# 4 (``sed`` 0.86); names of keys of one's own stay below it (``teacher_eval_at_end`` 0.80,
# ``student_checkpoint`` 0.79, ``amp_enabled`` 0.78, ``my_note`` 0.53).
_TRAIN_KEY_CUTOFF = 0.82


def _train_dict_keys() -> dict:
    """The keys that are read of the dicts in ``train``, by dict. ``checkpointer`` and ``ddp``
    become keyword arguments (of detectron2's PeriodicCheckpointer; of ``create_ddp_model`` and
    torch's DistributedDataParallel), ``amp`` and ``clip_grad`` are read key by key."""

    def args(fn, skip):
        return [p for p in inspect.signature(fn).parameters if p not in skip]

    return {
        "checkpointer": args(hooks.PeriodicCheckpointer.__init__, ("self", "checkpointer")),
        "ddp": ["fp16_compression"] + args(DistributedDataParallel.__init__, ("self", "module")),
        "amp": ["enabled"],
        "clip_grad": ["enabled", "max_norm"],
    }


def _check_train_keys(cfg) -> None:
    """
    Raise ``ValueError`` for a key of ``train`` (or of ``train.checkpointer``, ``train.ddp``,
    ``train.amp``, ``train.clip_grad``) that no part of the run reads but that is a near miss of
    one that is (``_TRAIN_KEY_CUTOFF``): a config file's ``train.teacher_eval_at_strat=True``
    left the teacher unevaluated and ``train.clip_grad.max_nrom=0.5`` the default limit, without
    a word (``check_override_keys`` only sees the command line). Other keys of one's own stay
    allowed in ``train``, ``amp`` and ``clip_grad``; ``checkpointer`` and ``ddp`` take no others,
    since every key of theirs becomes a keyword argument (a ``TypeError`` once the model is
    built; for ``ddp``, once a run has more than one process).
    """
    nested = _train_dict_keys()
    dicts = [("train", cfg.train, _TRAIN_KEYS)] + [
        (f"train.{d}", cfg.train.get(d), known) for d, known in nested.items()
    ]
    for where, node, known in dicts:
        if not hasattr(node, "keys"):
            continue  # absent, None, or a value: read (and checked) where it is used
        for name in (str(k) for k in node.keys()):
            if name in known:
                continue
            close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=_TRAIN_KEY_CUTOFF)
            if close:
                now = repr(node.get(close[0])) if close[0] in node else "its default"
                raise ValueError(
                    f"{where}.{name}: the config sets {name!r}, a key that detectron2 and DetKD "
                    f"do not read, so the run would ignore it and keep {where}.{close[0]} at "
                    f"{now}. Did you mean {where}.{close[0]}? Correct the spelling in the config "
                    "file (a key of your own needs a name that is not a near miss of one the run "
                    "reads)."
                )
            if where in ("train.checkpointer", "train.ddp"):
                callee = (
                    "PeriodicCheckpointer"
                    if where == "train.checkpointer"
                    else ("DistributedDataParallel")
                )
                raise ValueError(
                    f"{where}.{name}: every key of {where} is passed to {callee} as a keyword "
                    f"argument, and it takes no {name!r}. Remove it from the config, or use one of "
                    f"{sorted(known)}."
                )


def _check_train_settings(cfg) -> None:
    """Periods and limits of ``train`` that detectron2 and fvcore divide by or assert on deep in
    the run (``ZeroDivisionError`` after the first step for ``train.checkpointer.period=0``, by
    analogy with ``train.eval_period=0`` = off), or that train wrongly without a word
    (``train.clip_grad.max_norm <= 0``: a negative norm limit flips every gradient, 0 zeroes
    them), and misspelt keys (:func:`_check_train_keys`): a ``ValueError`` naming the key and the
    fix, before anything is built."""
    _check_train_keys(cfg)
    ckpt = cfg.train.get("checkpointer", None) or {}
    period = ckpt.get("period", None)
    if not _is_int(period) or period < 1:
        raise ValueError(
            f"train.checkpointer.period must be an int >= 1 (iterations between checkpoints), got "
            f"{period!r}; for model_final.pth only, set it above train.max_iter "
            f"({cfg.train.max_iter})."
        )
    keep = ckpt.get("max_to_keep", None)
    if keep is not None and (not _is_int(keep) or keep < 1):
        raise ValueError(
            f"train.checkpointer.max_to_keep must be an int >= 1 (how many periodic checkpoints "
            f"to keep) or None (keep all), got {keep!r}."
        )
    log_period = cfg.train.get("log_period", 20)
    if not _is_int(log_period) or log_period < 1:
        raise ValueError(
            f"train.log_period must be an int >= 1 (iterations between metrics writes), got "
            f"{log_period!r}; to log rarely, set it to train.max_iter ({cfg.train.max_iter})."
        )
    eval_period = cfg.train.get("eval_period", 0)
    if not _is_int(eval_period) or eval_period < 0:
        raise ValueError(
            "train.eval_period must be an int >= 0 (0: evaluate once, at the end), "
            f"got {eval_period!r}."
        )
    clip = cfg.train.get("clip_grad", None)
    if clip and clip.get("enabled", False):
        norm = clip.get("max_norm", None)
        if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not 0 < norm < math.inf:
            raise ValueError(
                f"train.clip_grad.max_norm must be a number > 0 (the largest global gradient norm) "
                f"while train.clip_grad.enabled, got {norm!r}: a negative limit turns every "
                "gradient around, 0 zeroes them. To train without clipping, set "
                "train.clip_grad.enabled=False."
            )


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


def file_prefix(cfg) -> str:
    """The name prefix of a run's checkpoints (``train.checkpointer.file_prefix``, "model")."""
    return str((cfg.train.get("checkpointer", None) or {}).get("file_prefix", "model"))


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
        self.teacher_changed = False  # train_net.py: --resume with another teacher checkpoint
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
