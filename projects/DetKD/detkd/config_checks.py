"""
The checks that :mod:`train_net`, :class:`detkd.engine.KDTrainer` and the tools (``detkd.demo``,
``detkd.repro``) run on a LazyConfig and its command-line overrides before anything is built or
written: missing sections, misplaced flags and override typos, a teacher checkpoint inside the
run's own folder, test datasets without images, class-count and channel-order (input format)
mismatches between the student, the teacher and the data, and unknown or invalid ``train`` keys.
Each error names the problem and the fix.
"""

import copy
import difflib
import inspect
import math
import os
from typing import List

from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import hooks
from detectron2.utils.registry import locate
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import _is_local, _local_path, _yacs_classes_key
from .distiller import DistillationDetector, student_of
from .utils import file_prefix, is_run_checkpoint, unwrap_model

__all__ = [
    "check_config_sections",
    "check_flag_order",
    "check_override_keys",
    "check_run_inputs_kept",
    "check_test_datasets",
    "check_train_datasets",
    "check_student_classes",
    "check_test_classes",
    "teacher_class_mismatch",
    "check_teacher_eval_classes",
    "check_input_format",
]


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
        # the example has the config file once: --config-file=C.py is that flag too
        others = "".join(f" {f}" for f in flags if f.split("=")[0] != "--config-file")
        raise ValueError(
            f"{flags} come after the key=value overrides, which take every argument after the "
            "first one: put the flags (--config-file, --resume, --eval-only, --num-gpus, ...) "
            f"before them, e.g. train_net.py --config-file <config>{others} key=value ..."
        )


def _keys_named(node, name: str, prefix: str, depth: int = 4) -> list:
    """The keys ending in ``name`` at most ``depth`` levels below the config node ``node``
    (``model.student.num_classes`` for ``name="num_classes"`` below ``model``), in full."""
    from omegaconf import DictConfig

    if depth == 0:
        return []
    found = []
    for k in node.keys():
        path = f"{prefix}.{k}" if prefix else str(k)
        try:
            value = node.get(k)
        except Exception:  # an interpolation that does not resolve: not a key to suggest
            continue
        if k == name:
            found.append(path)
        if isinstance(value, DictConfig):
            found += _keys_named(value, name, path, depth - 1)
    return found


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
        add = f"(Write +{key}=... to add a new key on purpose.)"
        if target is not None and i == len(parts) - 1:
            fn = locate(target) if isinstance(target, str) else target
            try:
                params = inspect.signature(fn).parameters
            except (TypeError, ValueError):
                return
            if name in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
                return  # an argument the config leaves at its default
            known += [k for k in params if k not in known]
            callee = getattr(fn, "__qualname__", str(target))
            add = f"({callee} takes no argument {name!r}: +{key}=... would fail too.)"
        where = f"'{parent_key}'" if parent_key else "the config"
        close = difflib.get_close_matches(name, known, n=3)
        hint = (
            f" Did you mean {', '.join(repr('.'.join(parts[:i] + [c])) for c in close)}?"
            if close
            else ""
        )
        # model.num_classes of a distillation config: model.student.num_classes and the teacher's
        below = _keys_named(parent, name, parent_key)
        if below:
            hint += f" Keys named {name!r} below it: {below[:5]}{' ...' if len(below) > 5 else ''}."
        raise KeyError(
            f"Override {key!r}: {where} has no key {name!r}.{hint} Keys there: {sorted(known)}. "
            + add
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


def _check_registered(cfg, split: str, consequence: str) -> None:
    """``ValueError`` naming the first of ``dataloader.<split>.dataset.names`` that is not
    registered, with up to three registered names close to it."""
    names = _dataset_names(cfg, split)  # first: the shapes LazyCall registers its name
    registered = DatasetCatalog.list()
    for name in names:
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ValueError(
                f"dataloader.{split}.dataset.names: dataset {name!r} is not registered{hint}, "
                f"{consequence}. Register it (e.g. register_coco_instances in the config) or fix "
                "the name."
            )


def check_test_datasets(cfg) -> None:
    """
    Fail at the start of training when ``dataloader.test.dataset.names`` (a name or a list of
    names) names a dataset that is not registered: otherwise only the first evaluation, after
    ``train.eval_period`` iterations or at the end of the run, would find out. A ``names`` that is
    a LazyCall other than the shapes data's (whose name it registers) is built with the loader and
    is not checked here.
    """
    _check_registered(cfg, "test", "so the evaluation would fail after training")


def check_train_datasets(cfg) -> None:
    """
    Fail before the models are built when ``dataloader.train.dataset.names`` names a dataset
    that is not registered (detectron2 would fail later, listing every builtin dataset), with
    the registered names close to it (``my_trian``: ``my_train``).
    """
    _check_registered(cfg, "train", "so there is no training data")


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
    "keep_freed_cpu_memory",
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
