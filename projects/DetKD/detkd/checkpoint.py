"""
Weights in and out of a :class:`detkd.DistillationDetector`.

* the student is initialised from ``train.init_checkpoint`` (:func:`load_student`),
* the teacher from ``train.teacher_checkpoint`` (:func:`load_teacher`, strict),
* the trained student leaves alone (:func:`export_student`), loadable by stock detectron2;
* a trained detector's backbone leaves alone (:func:`export_backbone`), as a pretrained backbone
  for another detector (the CPU demo's DETRs start from its RetinaNets' backbones).

Both loaders go through detectron2's :class:`DetectionCheckpointer`, so ``detectron2://``
model-zoo URLs, model-zoo ``.pkl`` files (dict with "model" of numpy arrays) and ``.pth`` files
all work. Loading into ``model.student`` / ``model.teacher`` separately matters: detectron2's
suffix-matching heuristics would otherwise fill both backbones from one file.
"""

import logging
import os
import pickle
from typing import Any, Dict, List, Union

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from torch import nn

from .utils import without_file_scheme

__all__ = [
    "CheckpointMismatchError",
    "TeacherCheckpointError",
    "load_student",
    "load_teacher",
    "save_student",
    "export_student",
    "export_backbone",
    "student_state_dict",
]

logger = logging.getLogger(__name__)

STUDENT_PREFIX = "student."


class CheckpointMismatchError(RuntimeError):
    """A checkpoint that must fit a model exactly (``--eval-only`` weights, a run resumed with
    ``--resume``) is missing or does not fit it."""


class TeacherCheckpointError(CheckpointMismatchError):
    """The teacher checkpoint is missing, unreadable, or does not fit the teacher model."""


# Keys a model may legitimately lack in a checkpoint: the wrapper's extra state (checkpoints of
# older versions have none); detectron2 already drops pixel_mean/pixel_std and cell anchors.
_OPTIONAL_KEYS = ("_extra_state",)


def _module_extras(model: nn.Module, unexpected) -> list:
    """
    The unexpected checkpoint keys that show that ``model`` is not the checkpoint's
    architecture: a key inside a container the model has (``res4.6.*`` in a shallower ResNet's
    ``res4``, ``cls_subnet.4.*`` in a head with fewer convs, a decoder layer more), inside one
    of a container's units (``res3.0.conv2_offset.*``: deformable convs beside the block's
    ``conv2``, whose weights were trained for them) or a parameter an existing submodule lacks
    (``conv.bias`` of a conv without bias). Keys of whole parts the model does not have (e.g.
    the mask head of a Mask R-CNN checkpoint loaded into a Faster R-CNN), top-level buffers
    (pixel_mean/std of old checkpoints) and BatchNorm's ``num_batches_tracked`` (a counter: a
    BN- or SyncBN-trained file fits a FrozenBN model, as in stock detectron2) are not.

    The keys of a file loaded by detectron2's name-matching heuristics (a Caffe2 / Detectron1
    ``.pkl``, ``matching_heuristics``) that matched nothing keep the file's names, without
    the model's prefixes (``res4.6.conv1.weight`` for ``backbone.bottom_up.res4``): a key
    whose leading names are no module of ``model`` is placed by the modules whose names end
    with them (all of them must be such an owner).
    """
    modules = dict(model.named_modules())
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    units = {  # the modules held by a container: a ResNet block, a decoder layer, a head's conv
        id(child) for m in modules.values() if isinstance(m, containers) for child in m.children()
    }

    def is_extra(owner, i, parts) -> bool:
        return (
            isinstance(owner, containers) or id(owner) in units or (i > 0 and i == len(parts) - 1)
        )

    extras = []
    for key in unexpected:
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        i = len(parts) - 1
        while i > 0 and ".".join(parts[:i]) not in modules:
            i -= 1
        if i == 0:  # no module of this name: one of the model's, by suffix (heuristic names)
            for j in range(len(parts) - 1, 0, -1):
                suffix = "." + ".".join(parts[:j])
                owners = [m for n, m in modules.items() if n.endswith(suffix)]
                if owners:
                    if all(is_extra(m, j, parts) for m in owners):
                        extras.append(key)
                    break
            continue
        if is_extra(modules[".".join(parts[:i])], i, parts):
            extras.append(key)
    return extras


def _reportable_keys(model: nn.Module) -> List[str]:
    """``model``'s state keys that a load can report as missing: fvcore never reports
    BatchNorm's ``num_batches_tracked``, and detectron2's FrozenBatchNorm2d fills its
    ``running_mean`` / ``running_var`` itself (0 and 1) when a file without its version metadata
    lacks them (an ImageNet .pkl, a torchvision .pth, another model's file), so they never are
    (the norm of detectron2's yacs defaults and of the model zoo's detectors)."""
    frozen = {
        f"{name}.{buf}" if name else buf
        for name, m in model.named_modules()
        if isinstance(m, FrozenBatchNorm2d)
        for buf in ("running_mean", "running_var")
    }
    return [
        k for k in model.state_dict() if not k.endswith("num_batches_tracked") and k not in frozen
    ]


def _backbone_only(model: nn.Module, missing) -> bool:
    """Whether a load left unloaded everything of ``model`` but (part of) its backbone: the file
    is a pretrained backbone (an ImageNet ``.pkl``, :func:`export_backbone`'s file), not a
    trained detector's checkpoint."""
    missing = set(missing)
    keys = _reportable_keys(model)
    loaded = [k for k in keys if k not in missing]
    return (
        bool(loaded)
        and all(k.startswith("backbone.") for k in loaded)
        and any(not k.startswith("backbone.") for k in missing)
    )


_BACKBONE_ONLY = (
    "The file holds backbone weights only: it is a pretrained backbone (an ImageNet .pkl, or "
    "export_backbone's file), not a trained detector's checkpoint."
)


def _other_architecture_hint(model: nn.Module, missing, unexpected) -> str:
    """For a file of which nothing fits ``model`` although it has weights (``unexpected``): a
    RetinaNet's ``backbone.bottom_up.*`` and ``head.cls_subnet.*`` for a DETR teacher, whose
    ``backbone`` and ``head`` are other modules. Empty where any of the model's keys loaded."""
    missing = set(missing)
    if not unexpected or any(k not in missing for k in _reportable_keys(model)):
        return ""
    # the modules the weights belong to, to two names (bn1, layer1.0, backbone.bottom_up)
    parts = sorted({".".join(k.rsplit(".", 1)[0].split(".")[:2]) for k in unexpected})
    return (
        f"None of model.teacher's weights is in the file, whose {len(unexpected)} weights are "
        f"all of parts model.teacher does not have ({parts[:8]}{' ...' if len(parts) > 8 else ''})"
        ": it is the checkpoint of another architecture. Set model.teacher to the architecture "
        "the file was trained as (the model of the config that wrote it), or set "
        "train.teacher_checkpoint to a checkpoint of model.teacher's architecture."
    )


def _missing_hint(model: nn.Module, missing) -> str:
    """What the ``missing`` keys of ``model`` say about the file: containers it fills only in
    part (``res4`` with 6 of an R101's 23 blocks: a smaller architecture's file) and parts of
    ``model`` it has nothing of (the mask head of a Mask R-CNN teacher: a Faster R-CNN file)."""
    if _backbone_only(model, missing):
        return (
            f"{_BACKBONE_ONLY} Use the trained detector's checkpoint (e.g. the model zoo's "
            "model_final_*.pkl of model.teacher's architecture, or a run's model_final.pth)."
        )
    missing = set(missing)
    keys = _reportable_keys(model)
    modules = dict(model.named_modules())
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    partial, absent = {}, []
    for key in sorted(missing):
        parts = key.split(".")
        for i in range(1, len(parts)):  # the shallowest module of which the file has nothing
            prefix = ".".join(parts[:i]) + "."
            if all(k in missing for k in keys if k.startswith(prefix)):
                name = prefix[:-1]
                if name not in absent:
                    absent.append(name)
                break
    for name in absent:
        parent, _, child = name.rpartition(".")
        owner = modules.get(parent) if parent else None
        if isinstance(owner, containers):
            loaded = [
                c
                for c in owner._modules
                if any(k.startswith(f"{parent}.{c}.") and k not in missing for k in keys)
            ]
            if loaded:
                partial[parent] = (len(loaded), len(owner._modules))
    whole = [n for n in absent if n.rpartition(".")[0] not in partial]
    hints = []
    if partial:
        counts = ", ".join(f"{c}: {a} of its {b}" for c, (a, b) in partial.items())
        hints.append(
            f"The file fills only part of these containers ({counts}): it is the checkpoint of a "
            "smaller architecture (e.g. a shallower backbone: an R50 file for an R101 teacher). "
            "Set model.teacher to the checkpoint's architecture (e.g. "
            "model.teacher.backbone.bottom_up.stages.depth=50 for an R50 checkpoint) or use a "
            "checkpoint of model.teacher's."
        )
    if whole:
        hints.append(
            f"The file has nothing of {whole[:10]}: it is the checkpoint of a detector without "
            "these parts (e.g. a Faster R-CNN file for a Mask R-CNN teacher, which has "
            "roi_heads.mask_head). Use the checkpoint of model.teacher's architecture (e.g. the "
            "model zoo's mask_rcnn_R_101_FPN_3x), or a teacher config without those parts (for "
            "a Faster R-CNN: configs/common/twins.py's faster_rcnn)."
        )
    return " ".join(hints)


def _describe_mismatch(inc, shapes_hint: str, unexpected) -> list:
    """Sentences naming the keys of detectron2's incompatible-keys record ``inc`` that do not
    fit (of its unexpected keys, those in ``unexpected``)."""
    problems = []
    if inc.incorrect_shapes:
        shapes = "; ".join(f"{k}: file {a} vs model {b}" for k, a, b in inc.incorrect_shapes[:10])
        problems.append(f"shape mismatch: {shapes} ({shapes_hint})")
    wrong_shape = {k for k, _, _ in inc.incorrect_shapes}
    missing = [k for k in inc.missing_keys if k not in _OPTIONAL_KEYS and k not in wrong_shape]
    if missing:
        problems.append(
            f"{len(missing)} model parameters are not in the file: "
            f"{missing[:20]}{' ...' if len(missing) > 20 else ''}"
        )
    if unexpected:
        keys = list(unexpected)
        problems.append(
            f"{len(keys)} keys of the file are not in the model: "
            f"{keys[:20]}{' ...' if len(keys) > 20 else ''}"
        )
    return problems


def student_state_dict(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """
    Returns the student's weights from a DetKD run state dict (keys ``student.*``; distiller
    keys ``distillers.*`` are dropped). A state dict without ``student.*`` keys is a plain
    detector's and is returned unchanged.
    """
    if not any(k.startswith(STUDENT_PREFIX) for k in state_dict):
        return state_dict
    n = len(STUDENT_PREFIX)
    return {k[n:]: v for k, v in state_dict.items() if k.startswith(STUDENT_PREFIX)}


class _DetectorCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer for one detector that also accepts DetKD run checkpoints and
    remembers the incompatible keys of its last load."""

    last_incompatible = None
    # whether the last file was a DetKD run checkpoint (its student.* part was loaded), and
    # whether it also had teacher.* weights (another framework's format: DetKD never saves them)
    last_was_run = False
    last_had_teacher = False

    def _load_file(self, filename):
        """detectron2's, except for a ``.pkl`` without ``"__author__"`` that holds PyTorch-named
        weights (``pickle.dump(model.state_dict())``, or ``{"model": ...}``): detectron2 takes
        every such file for Caffe2 blobs and renames its keys (``fpn_lateral3`` to
        ``fpn.lateral3``), so no key fitted ("leaves 128 teacher parameters unloaded:
        ['backbone.fpn_lateral3.weight', ...]", the keys the file has) or, for ``{"model":
        ...}``, it stopped on "Unsupported type found in checkpoint! model: <class 'dict'>".
        Caffe2 blob names have no dots: such a file is loaded by its own names, matched by
        name suffix as detectron2 matches any .pkl (a backbone's alone, ``stem.conv1.weight``,
        fits ``backbone.bottom_up.stem.conv1.weight``) but without Caffe2's renaming."""
        loaded = super()._load_file(filename)
        if not (filename.endswith(".pkl") and loaded.get("__author__") == "Caffe2"):
            return loaded
        data = loaded["model"]
        state = data["model"] if isinstance(data.get("model"), dict) else data
        if not any("." in k for k in state):
            return loaded  # Caffe2 / Detectron1 blobs
        return {
            "model": state,
            "__author__": "a pickled state dict",
            "matching_heuristics": state is data or bool(data.get("matching_heuristics", True)),
        }

    def _load_model(self, checkpoint):
        keys = checkpoint["model"].keys()
        self.last_was_run = any(k.startswith(STUDENT_PREFIX) for k in keys)
        self.last_had_teacher = self.last_was_run and any(k.startswith("teacher.") for k in keys)
        checkpoint["model"] = student_state_dict(checkpoint["model"])
        aligned = None
        if checkpoint.get("matching_heuristics", False):
            # detectron2's name matching (a Caffe2 / Detectron1 .pkl), done here to see its
            # result: it skips a tensor of another shape with a warning, which then left only a
            # "missing" model key and an "unexpected" file key (cls_score of an 80-class file)
            self._convert_ndarray_to_tensor(checkpoint["model"])
            checkpoint["model"] = align_and_update_state_dicts(
                self.model.state_dict(),
                checkpoint["model"],
                c2_conversion=checkpoint.get("__author__", None) == "Caffe2",
            )
            checkpoint["matching_heuristics"] = False
            aligned = {k: tuple(v.shape) for k, v in checkpoint["model"].items()}
        self.last_incompatible = super()._load_model(checkpoint)
        if aligned is not None and self.last_incompatible is not None:
            _shape_mismatches_by_suffix(self.model, self.last_incompatible, aligned)
        return self.last_incompatible


def _shape_mismatches_by_suffix(model: nn.Module, inc, shapes: Dict[str, tuple]) -> None:
    """
    Move the pairs of a heuristic load that detectron2 matched by name but skipped for their
    shapes (a model key missing, a file key that is a dot-suffix of it unexpected) from
    ``inc.missing_keys`` / ``inc.unexpected_keys`` to ``inc.incorrect_shapes`` (key, file
    shape, model shape), as a load without heuristics reports them.

    Args:
        shapes (dict[str, tuple]): the shape of every tensor of the aligned file, by key.
    """
    state = model.state_dict()
    unexpected = set(inc.unexpected_keys)
    for key in list(inc.missing_keys):
        found = [u for u in unexpected if key == u or key.endswith("." + u)]
        if not found or key not in state:
            continue
        u = max(found, key=len)  # detectron2's choice: the longest match
        if shapes[u] != tuple(state[key].shape):
            inc.missing_keys.remove(key)
            inc.unexpected_keys.remove(u)
            unexpected.discard(u)
            inc.incorrect_shapes.append((key, shapes[u], tuple(state[key].shape)))


def _is_local(path) -> bool:
    """Whether ``path`` is a non-empty local path (plain or ``file://``), not a URL."""
    return (
        isinstance(path, str) and bool(path) and ("://" not in path or path.startswith("file://"))
    )


def _local_path(path: str) -> str:
    """The file system path of a local ``path`` (plain or ``file://``), resolved."""
    return os.path.realpath(without_file_scheme(path))


def _repo_config(group: str, name: str) -> str:
    """``configs/<group>/<name>.py`` of this repository (or of the working directory), or ""."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    for root in ("", os.path.abspath(repo)):
        rel = os.path.join("configs", group, f"{name}.py")
        if os.path.isfile(os.path.join(root, rel)):
            return (
                rel if not root or os.path.samefile(root, os.getcwd()) else os.path.join(root, rel)
            )
    return ""


def _written_by_hint(path: str) -> str:
    """
    For a missing checkpoint that a run of this repository's configs writes, how to make it.
    The configs keep their outputs in ``output/<group>/<name>`` (``configs/<group>/<name>.py``):
    ``.../output/<group>/<name>/model_final.pth`` is that config's final weights (e.g. the demo's
    teacher, or the D3ETR teacher a distillation config names), and
    ``.../output/demo/backbones/<role>_<family>.pkl`` the backbone ``python -m detkd.demo
    --methods d3etr`` exports from the demo's ``<role>_<family>`` run for its DETRs.
    """
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) < 4 or parts[-4] != "output":
        return ""
    group, name, file = parts[-3:]
    if name == "backbones" and file.endswith(".pkl"):
        stem = file[: -len(".pkl")]
        source = _repo_config(group, stem)
        if not source:
            return ""
        weights = os.path.join(os.path.dirname(os.path.dirname(path)), stem, "model_final.pth")
        by_hand = f"detkd.checkpoint.export_backbone('{weights}', '{path}')"
        if group == "demo":
            return (
                f"; it is the backbone of {source}'s final weights: `python -m detkd.demo "
                f"--methods d3etr` (or `make demo METHOD=d3etr`) trains that run and writes it "
                f"(by hand: {by_hand})"
            )
        return f"; it is the backbone of {source}'s final weights: train it, then {by_hand}"
    source = _repo_config(group, name)
    if not source or not file.startswith("model_"):
        return ""
    folder = os.path.dirname(path)
    last = os.path.join(folder, "last_checkpoint")
    if file == "model_final.pth" and os.path.isfile(last):  # a run that has not finished
        where = f"output/{group}/{name}"
        out = "" if os.path.normpath(folder) == where else f" train.output_dir={folder}"
        return (
            f"; {folder} holds an unfinished run of {source}: finish it with `python "
            f"train_net.py --config-file {source} --resume{out}`, which writes {file}"
        )
    demo = " (`python -m detkd.demo` trains the demo's runs in order)" if group == "demo" else ""
    return (
        f"; it is written by training {source} first: `python train_net.py --config-file "
        f"{source}`{demo}"
    )


def _unreadable_hint(path: str, key: str = "train.init_checkpoint") -> str:
    """What to check when the checkpoint ``path`` (of config key ``key``) cannot be loaded."""
    if _is_local(path):
        local = _local_path(path)
        if os.path.isdir(local):
            found = sorted(f for f in os.listdir(local) if f.endswith((".pth", ".pkl")))
            example = os.path.join(local, found[-1] if found else "model_final.pth")
            return (
                f"it is a folder, not a checkpoint file: set {key} to the file in it (e.g. "
                f"{example}{'; the folder holds ' + ', '.join(found[:6]) if found else ''})"
            )
        return "check that the file exists and is a detectron2 .pkl/.pth checkpoint" + (
            _written_by_hint(without_file_scheme(path)) if not os.path.exists(local) else ""
        )
    return (
        "it could not be downloaded (no network?): download it elsewhere and set "
        f"{key} to the local file"
    )


def load_student(
    student: nn.Module, path: str, *, strict: bool = False, key: str = "train.init_checkpoint"
) -> None:
    """
    Load ``path`` into ``student`` (``train.init_checkpoint``), like detectron2 loads
    ``MODEL.WEIGHTS``: missing keys are logged, not fatal (e.g. an ImageNet backbone only).
    An empty path does nothing; a file of which none of the student's convolution or linear
    weights loads (an unconverted torchvision ``.pth``, another model's checkpoint, a wider
    teacher's of which only some biases fit) raises :class:`CheckpointMismatchError`, where
    detectron2 would log it and train from scratch.

    Args:
        strict (bool): the weights must be the student's, all of them (``--eval-only``): an
            empty path, or a file that leaves student parameters unloaded, has tensors of other
            shapes or keys the student does not have, raises :class:`CheckpointMismatchError`.
        key (str): what ``path`` is, as errors name it: the config key it was read from, or
            e.g. "the last checkpoint of <folder>" (``--eval-only --resume``).
    """
    if not path:
        if strict:
            raise CheckpointMismatchError(
                "train.init_checkpoint is empty: there are no weights to evaluate. Set "
                "train.init_checkpoint to the student's weights (model_final_student.pth, or a "
                "run's model_final.pth)."
            )
        logger.info(
            "train.init_checkpoint is empty: the student starts from its random initialisation."
        )
        return
    ckpt = _DetectorCheckpointer(student)
    try:
        ckpt.load(path, checkpointables=[])
    except Exception as e:  # fvcore's "Checkpoint x not found!", urllib's URLError (offline)
        raise CheckpointMismatchError(
            f"Cannot load {key} {path!r} ({type(e).__name__}: {e}); "
            + _unreadable_hint(path, key)
            # --eval-only (strict) refuses an empty one: there would be no weights to evaluate
            + (
                "."
                if strict
                else " (an empty train.init_checkpoint starts the student from random weights)."
            )
        ) from e
    inc = ckpt.last_incompatible
    if inc is not None:
        not_loaded = set(inc.missing_keys) | {k for k, _, _ in inc.incorrect_shapes}
        own = _reportable_keys(student)
        state = student.state_dict()
        # detectron2 would only log it and train from scratch; so it would where only biases or
        # norms fit (a wider teacher's checkpoint: its class/box biases have the student's
        # shapes), which leaves every convolution and linear layer random
        weights = [k for k in own if state[k].dim() >= 2]
        if own and (
            not_loaded.issuperset(own)
            # strict (--eval-only) names every mismatch below instead
            or (not strict and weights and not_loaded.issuperset(weights))
        ):
            theirs = list(inc.unexpected_keys)[:3]
            fit = sorted(k for k in own if k not in not_loaded)
            shapes = [
                f"{k}: file {tuple(a)} vs student {tuple(b)}"
                for k, a, b in inc.incorrect_shapes
                if k in weights
            ][:2]
            what = (
                f"only {len(fit)} of its tensors fit the student's, biases or norms "
                f"({', '.join(fit[:3])}{', ...' if len(fit) > 3 else ''}), none of its convolution "
                f"or linear weights{' (e.g. ' + '; '.join(shapes) + ')' if shapes else ''}"
                if fit
                else "none of its keys"
                f"{' (e.g. ' + ', '.join(theirs) + ')' if theirs else ''} fits one "
                f"of the student's ({', '.join(own[:3])}, ...)"
            )
            raise CheckpointMismatchError(
                f"{key} {path!r} holds none of the student's weights: {what}. A torchvision "
                "checkpoint must first be converted with detectron2's "
                "tools/convert-torchvision-to-d2.py, and a teacher's checkpoint (another width or "
                "depth) does not initialise the student; use weights of this student's "
                "architecture (an ImageNet backbone in detectron2's format, or a checkpoint of the "
                "same detector)."
            )
    if strict and inc is not None:
        problems = _describe_mismatch(
            inc,
            "a class-count mismatch means the config's num_classes must match the checkpoint's",
            _module_extras(student, inc.unexpected_keys),
        )
        if problems:
            fix = (
                "Evaluate it with the config it was trained with (for a distilled run's student, "
                "the distillation config or the student's own config)."
            )
            if _backbone_only(student, inc.missing_keys):
                fix = (
                    f"{_BACKBONE_ONLY} Set train.init_checkpoint to the trained student's weights "
                    "(model_final_student.pth, or a run's model_final.pth)."
                )
            raise CheckpointMismatchError(
                f"The checkpoint {path!r} does not fit the model of this config "
                f"({'; '.join(problems)}). " + fix
            )


def _broadcast_from_main(module: nn.Module) -> None:
    """Give every process rank 0's parameters and buffers of ``module``. The teacher is not in
    DDP (which does this for the student at construction), and detectron2 seeds each process
    differently (``train.seed + rank``), so a random teacher would differ between processes."""
    if comm.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            torch.distributed.broadcast(t.data, src=0)


def _yacs_classes_key(model) -> str:
    """The yacs key of ``model``'s class count (MODEL.ROI_HEADS.NUM_CLASSES for R-CNNs)."""
    if hasattr(model, "roi_heads"):
        return "MODEL.ROI_HEADS.NUM_CLASSES"
    return f"MODEL.{type(model).__name__.upper()}.NUM_CLASSES"


def load_teacher(teacher: nn.Module, path: str, *, allow_random: bool = False) -> None:
    """
    Load the teacher's weights strictly (``train.teacher_checkpoint``).

    Args:
        teacher (nn.Module): the teacher detector.
        path (str): local file, ``detectron2://`` URL, or any path PathManager resolves.
        allow_random (bool): accept an empty ``path`` and keep the teacher's random
            initialisation (``train.teacher_random_init=True``, for tests and smoke runs).

    Raises:
        TeacherCheckpointError: if ``path`` is empty (and random init was not asked for),
            cannot be found or read, has tensors of the wrong shape (e.g. a class-count
            mismatch), leaves teacher parameters unloaded (the missing keys are listed), has
            weights the teacher has no place for (the checkpoint of a larger architecture), or
            holds both ``student.*`` and ``teacher.*`` weights (which of them is meant is unclear).
    """
    if not path:
        if allow_random:
            logger.warning("train.teacher_checkpoint is empty: the teacher keeps random weights.")
            _broadcast_from_main(teacher)
            return
        raise TeacherCheckpointError(
            "train.teacher_checkpoint is empty. Set it to the teacher's weights (a local .pkl/"
            ".pth or a detectron2:// model-zoo URL), or set train.teacher_random_init=True if a "
            "random teacher is really intended."
        )
    ckpt = _DetectorCheckpointer(teacher)
    try:
        ckpt.load(path, checkpointables=[])
    except Exception as e:
        raise TeacherCheckpointError(
            f"Cannot load the teacher checkpoint {path!r} ({type(e).__name__}: {e}); "
            f"{_unreadable_hint(path, 'train.teacher_checkpoint')}."
        ) from e
    inc = ckpt.last_incompatible
    # A distillation run's checkpoint in train.teacher_checkpoint: its student was loaded (a
    # distilled student as the next teacher). When it does not fit, the file was most likely
    # meant for the teacher of that run, which its checkpoints do not hold.
    run_note = ""
    if ckpt.last_was_run:
        run_note = (
            " The file is a distillation run's checkpoint: its student ('student.*' weights) was "
            "loaded as the teacher. "
            + (
                "Its 'teacher.*' weights (not a DetKD checkpoint: DetKD never saves the teacher) "
                "are not read: write them to a checkpoint of their own, without the 'teacher.' "
                "prefix, and set train.teacher_checkpoint to it."
                if ckpt.last_had_teacher
                else "A DetKD run's checkpoints do not hold its teacher: set "
                "train.teacher_checkpoint to the teacher's own weights (that run's "
                "train.teacher_checkpoint)."
            )
        )
    if inc is not None and inc.incorrect_shapes:
        shapes = "; ".join(f"{k}: file {a} vs model {b}" for k, a, b in inc.incorrect_shapes[:10])
        key = "roi_heads.num_classes" if hasattr(teacher, "roi_heads") else "num_classes"
        # only detectron2's registered meta-architectures have a yacs config (ConditionalDETR
        # and FCOS have none: no MODEL.<NAME>.NUM_CLASSES key exists for them)
        yacs = (
            f" (for a build_yacs_detector teacher: {_yacs_classes_key(teacher)} in its .yaml or "
            "model.teacher.opts)"
            if type(teacher).__name__ in META_ARCH_REGISTRY
            else ""
        )
        raise TeacherCheckpointError(
            f"The teacher checkpoint {path!r} does not fit the teacher model (shape mismatch: "
            f"{shapes}). A class-count mismatch means model.teacher.{key} must match the "
            f"checkpoint's{yacs}; otherwise the teacher config is not the checkpoint's "
            "architecture." + run_note
        )
    if inc is not None and inc.missing_keys:
        keys = inc.missing_keys
        raise TeacherCheckpointError(
            f"The teacher checkpoint {path!r} leaves {len(keys)} teacher parameters unloaded: "
            f"{keys[:20]}{' ...' if len(keys) > 20 else ''}. "
            + (
                _other_architecture_hint(teacher, keys, inc.unexpected_keys)
                or _missing_hint(teacher, keys)
                or "Is it the checkpoint of the architecture in model.teacher?"
            )
            + run_note
        )
    extras = _module_extras(teacher, inc.unexpected_keys) if inc is not None else []
    if extras:
        raise TeacherCheckpointError(
            f"The teacher checkpoint {path!r} has {len(extras)} weights that model.teacher has no "
            f"place for: {extras[:20]}{' ...' if len(extras) > 20 else ''}. It is the checkpoint "
            "of a larger architecture (e.g. deeper backbone, more head convs or decoder layers): "
            "set model.teacher to the checkpoint's architecture (e.g. "
            "model.teacher.backbone.bottom_up.stages.depth=101 for an R101 checkpoint)."
            + (
                " Its '*_offset' weights are deformable convolutions' offsets: build the teacher's "
                "ResNet with them (deform_on_per_stage; MODEL.RESNETS.DEFORM_ON_PER_STAGE in a "
                "yacs config)."
                if any("_offset." in k for k in extras)
                else ""
            )
            + run_note
        )
    if ckpt.last_had_teacher:
        raise TeacherCheckpointError(
            f"The teacher checkpoint {path!r} has both 'student.*' and 'teacher.*' weights (not a "
            "DetKD checkpoint: DetKD never saves the teacher); its student fits model.teacher, but "
            "which of the two is meant is ambiguous. Write the one meant to a checkpoint of its "
            "own, without the prefix, and set train.teacher_checkpoint to it."
        )
    # (BatchNorm's step counters of a BN-trained file in a FrozenBN teacher: nothing to report)
    ignored = (
        [k for k in inc.unexpected_keys if not k.endswith("num_batches_tracked")] if inc else []
    )
    if ignored:
        logger.warning(
            f"The teacher checkpoint {path!r} has weights of parts model.teacher does not have "
            f"(ignored): {ignored[:10]}{' ...' if len(ignored) > 10 else ''}"
        )
    logger.info(f"Teacher weights loaded from {path}")


def save_student(student: nn.Module, path: str) -> None:
    """Save ``student.state_dict()`` as ``{"model": ...}``, the format stock detectron2's
    DetectionCheckpointer loads (e.g. ``lazyconfig_train_net.py --eval-only``): a ``.pth``
    (torch), or a ``.pkl`` in the model zoo's format; see :func:`_write_student` (it refuses to
    replace a run checkpoint)."""
    state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    _write_student(state, path, "save_student")


# The keys of a file that holds weights only (DetKD's student exports, the model zoo's .pkl):
# anything else (DefaultTrainer's / KDTrainer's "trainer" and "iteration", an "optimizer") is
# a run's state that a student export written over it would lose.
_WEIGHTS_ONLY_KEYS = {"model", "__author__", "matching_heuristics"}
# The "__author__" of the student exports and of export_backbone's files: the only weights each
# replaces (an older file of its own kind).
_AUTHOR = "DetKD"
_BACKBONE_AUTHOR = "DetKD export_backbone"


def _load_any(path: str):
    """The object in ``path``: a torch file, else a plain pickle (the model zoo's .pkl); None
    when it is neither."""
    try:
        with PathManager.open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=False)
    except Exception:
        pass
    try:
        with PathManager.open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception:  # not a checkpoint: nothing of a run to lose
        return None


def _write_student(state: Dict[str, Any], output: str, caller: str) -> None:
    """
    Write a student's state dict to ``output``: ``.pkl`` in the model zoo's format (numpy arrays
    in a pickle, which detectron2 reads as a ``.pkl``; a ``torch.save`` file under that name it
    could not read), else ``torch.save``. An older student export (or a file that is no
    checkpoint) is replaced.

    Raises:
        ValueError: see :func:`_check_export_output`.
    """
    _check_export_output(output, caller)
    _dump_student(state, output)


def _dump_student(state: Dict[str, Any], output: str) -> None:
    """:func:`_write_student` without the check of ``output`` (done by the caller)."""
    if output.endswith(".pkl"):  # the model zoo's format: numpy arrays in a pickle (exact names)
        _save({"model": _numpy_state(state), "__author__": _AUTHOR}, output, dump=pickle.dump)
    else:
        _save({"model": state, "__author__": _AUTHOR}, output)


def _check_export_output(
    output: str, caller: str, author: str = _AUTHOR, example: str = "model_final_student.pth"
) -> None:
    """
    Check that the file ``output`` may be written by ``caller``, which writes weights under
    ``"__author__": author`` (a student export; ``example`` is a file name for it).

    Raises:
        ValueError: ``output`` is a folder, or a file of a run or of other weights: keys other
            than :data:`_WEIGHTS_ONLY_KEYS` (a teacher's or baseline's ``model_final.pth`` trained
            by DefaultTrainer, a raw state dict), ``student.*`` weights (a DetKD run's
            ``model_final.pth``), or weights ``caller`` did not write (the model zoo's ``.pkl``
            of the teacher, an ImageNet backbone, stock ``DetectionCheckpointer.save`` files).
            Writing there would lose them (and ``--resume`` would refuse a run's file). Only an
            older file of ``caller``'s kind, or a file that is no checkpoint, is replaced.
    """
    if output.endswith(("/", os.sep)) or (PathManager.exists(output) and PathManager.isdir(output)):
        raise ValueError(
            f"{caller}: {output!r} is a folder; give the file name in it (e.g. "
            f"{os.path.join(output, example)!r})."
        )
    if PathManager.exists(output):
        existing = _load_any(output)
        if isinstance(existing, dict):
            model = existing.get("model")
            others = sorted(str(k) for k in existing if k not in _WEIGHTS_ONLY_KEYS)
            run = isinstance(model, dict) and any(str(k).startswith(STUDENT_PREFIX) for k in model)
            written_by = existing.get("__author__")
            if others:
                what = f"keys {others[:6]}{' ...' if len(others) > 6 else ''}"
            elif run:
                what = "a DetKD run's model"
            else:
                what = f"weights {caller} did not write: __author__ {written_by!r}"
            if others or run or written_by != author:
                raise ValueError(
                    f"{caller}: {output!r} is a training run's checkpoint or other weights "
                    f"({what}): "
                    "writing there would lose them (and --resume would refuse a run's file). Give "
                    f"another file name (e.g. {example})."
                )


def _save(obj, path: str, dump=None) -> None:
    """``dump(obj, file)`` (default ``torch.save``) into ``path`` through a temporary file (see
    below)."""
    remote = "://" in path  # a path of another PathManager handler (e.g. iopath's S3)
    if not remote:  # (os.path.abspath of a URL is a local path: it made local folders)
        PathManager.mkdirs(os.path.dirname(os.path.abspath(path)))
    tmp = path + ".tmp"
    try:
        with PathManager.open(tmp, "wb") as f:
            (dump or torch.save)(obj, f)
    except BaseException:
        if PathManager.exists(tmp):  # e.g. a full disk: free what was written
            PathManager.rm(tmp)
        raise
    # Never leave a half-written checkpoint under the final name, and replace an older one:
    # iopath's mv refuses to overwrite (it only logs it), so a re-export would keep the old file.
    if not remote:  # a local file: atomic replace
        try:
            os.replace(tmp, path)
        except BaseException:  # e.g. path is a folder: leave no full-size hidden file behind
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return
    # Another handler: an existing file is overwritten by one copy, so that it is never removed
    # before its replacement is in place (a rename after removing it would lose both to a failed
    # rename); a new file is renamed, or copied where the handler has no rename (iopath's S3).
    moved = False
    if PathManager.exists(path):
        try:
            moved = PathManager.copy(tmp, path, overwrite=True)
        except NotImplementedError:  # no copy: replace by remove + rename (the file is in tmp)
            PathManager.rm(path)
    if not moved and not PathManager.exists(path):
        try:
            moved = PathManager.mv(tmp, path)
        except NotImplementedError:
            moved = PathManager.copy(tmp, path, overwrite=True)
    if moved and PathManager.exists(tmp):
        PathManager.rm(tmp)
    if not moved:
        raise OSError(f"could not move the written checkpoint {tmp} to {path}")


def export_student(checkpoint: Union[str, Dict[str, Any]], output: str) -> Dict[str, Any]:
    """
    Write the student alone from any checkpoint of a DetKD run.

    Args:
        checkpoint (str or dict): path of a run checkpoint (``model_0004999.pth``,
            ``model_final.pth``) or its loaded dict.
        output (str): where to write the student checkpoint: ``.pth`` (torch), or ``.pkl`` for
            the model zoo's format (numpy arrays in a pickle, which detectron2 reads as a
            ``.pkl``; a ``torch.save`` file under that name it could not read).

    Returns:
        dict: the student state dict written (no ``distillers.*`` / teacher keys).

    Raises:
        ValueError: if ``output`` is a run checkpoint (e.g. ``checkpoint`` itself): the student
            alone would replace the run's distillers, optimizer, scheduler and iteration, and
            ``--resume`` would refuse the folder. An older student export is replaced.
        ValueError: if ``checkpoint`` holds no ``student.*`` weights (not a DetKD run's
            checkpoint: a plain detector's is already a student checkpoint).
    """
    _check_export_output(output, "export_student")  # before a (large) run checkpoint is read
    if isinstance(checkpoint, str):
        with PathManager.open(checkpoint, "rb") as f:
            # Our own run checkpoints hold optimizer/scheduler state, not only tensors.
            checkpoint = torch.load(f, map_location="cpu", weights_only=False)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict) or not any(str(k).startswith(STUDENT_PREFIX) for k in state):
        raise ValueError(
            "export_student: the checkpoint has no 'student.*' keys; it is not a DetKD run "
            "checkpoint (a plain detector's checkpoint is already a student checkpoint)."
        )
    student = student_state_dict(state)
    _dump_student(student, output)  # output checked above
    return student


def _numpy_state(state: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """A state dict's tensors as numpy arrays (bfloat16, which numpy lacks, as float32)."""
    return {
        k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy()
        for k, v in state.items()
        if torch.is_tensor(v)
    }


def export_backbone(
    checkpoint: Union[str, Dict[str, Any]], output: str, prefix: str = "backbone.bottom_up."
) -> Dict[str, Any]:
    """
    Write the backbone of a trained detector as a pretrained-backbone file, the model zoo's
    ``ImageNetPretrained`` format: a ``.pkl`` of ``{"model": {name: ndarray}, "__author__": ...,
    "matching_heuristics": True}`` with the names below ``prefix`` (``stem.conv1.weight``,
    ``res2.0.conv1.weight``, ...). ``train.init_checkpoint`` (DetKD's loaders and stock
    detectron2's ``DetectionCheckpointer``) then matches them by name suffix into any detector
    with that backbone: ``backbone.bottom_up.*`` of a RetinaNet / R-CNN / FCOS, ``backbone.*`` of
    a :class:`detkd.modeling.ConditionalDETR`; what the other backbone lacks (e.g. res5 for a
    DETR on res4) is left out with detectron2's "not used by the model" warning.

    The DETRs of the CPU demo start from the demo RetinaNets' backbones this way: a DETR trained
    from scratch barely leaves its first plateau in the demo's schedule, and DETRs are trained from
    pretrained backbones (ImageNet's in the papers).

    Args:
        checkpoint (str or dict): a detector checkpoint (``model_final.pth``), a DetKD run's (its
            ``student.*`` part is read) or either one loaded.
        output (str): the file to write (``.pkl``): an older file of export_backbone is replaced,
            other weights are kept (a ValueError).
        prefix (str): the backbone's key prefix in ``checkpoint``: ``"backbone.bottom_up."`` for
            FPN detectors, ``"backbone."`` for a DETR or a C4 detector.

    Returns:
        dict: the written ``{name: ndarray}``.

    Raises:
        ValueError: ``output`` does not end with ``.pkl`` (detectron2 matches by suffix only the
            model zoo's formats), or no key of ``checkpoint`` starts with ``prefix`` (the message
            names the prefixes the file has).
    """
    if not output.endswith(".pkl"):
        raise ValueError(
            f"export_backbone: write a .pkl (got {output!r}): detectron2 matches a pretrained "
            "backbone's names by suffix only in the model zoo's .pkl format"
        )
    _check_export_output(output, "export_backbone", author=_BACKBONE_AUTHOR, example="backbone.pkl")
    if isinstance(checkpoint, str):
        with PathManager.open(checkpoint, "rb") as f:
            checkpoint = torch.load(f, map_location="cpu", weights_only=False)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    state = student_state_dict(state) if isinstance(state, dict) else {}
    backbone = _numpy_state({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    if not backbone:
        heads = sorted({".".join(str(k).split(".")[:2]) + "." for k in state})
        raise ValueError(
            f"export_backbone: no weights under {prefix!r} in the checkpoint (it has {heads[:8]}); "
            "pass prefix='backbone.bottom_up.' for an FPN detector, 'backbone.' for a DETR"
        )
    _save(
        {"model": backbone, "__author__": _BACKBONE_AUTHOR, "matching_heuristics": True},
        output,
        dump=pickle.dump,
    )
    return backbone
