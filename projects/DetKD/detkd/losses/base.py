"""
What every DetKD distiller shares: the :class:`Distiller` interface used by
:class:`detkd.DistillationDetector`, the context it receives, FPN level pairing and small helpers.
"""

import contextlib
import math
import numbers
import threading
from collections.abc import Iterable as _IterableABC
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.layers import ShapeSpec
from detectron2.structures import ImageList
from detectron2.utils.events import _CURRENT_STORAGE_STACK
from torch import nn

from ..capture import _map_tensors

__all__ = [
    "Distiller",
    "DistillContext",
    "pair_fpn_levels",
    "check_weight",
    "check_positive_int",
    "check_fraction",
    "check_flag",
    "check_level_names",
    "check_num_levels",
    "check_pair_by",
    "put_scalar",
    "deferred_scalars",
    "float_tensors",
    "zero_loss",
]


@dataclass
class DistillContext:
    """
    What a distiller may read besides the captured tensors during one training step.

    Attributes:
        student (nn.Module): the student detector (being trained).
        teacher (nn.Module): the frozen teacher detector (eval mode).
        batched_inputs (list[dict]): the detectron2 inputs of this step (with "instances"),
            images on the student's device (and detectron2 students' instances).
        teacher_images (ImageList): the teacher's normalized, padded images. The student's
            padded images have the same ``image_sizes``.
        autocast (bool): the step runs under mixed precision (``torch.autocast`` of the images'
            device was enabled when the wrapper was called). Losses are computed in fp32 in any
            case; a distiller may run its own trainable layers (e.g. ReviewKD's ABFs) under
            :meth:`amp` to make them as cheap as the student's.
    """

    student: nn.Module
    teacher: nn.Module
    batched_inputs: List[Dict[str, Any]]
    teacher_images: ImageList
    autocast: bool = False

    def amp(self):
        """A context that re-enables the step's mixed precision (no-op in fp32 training)."""
        device = self.teacher_images.tensor.device.type
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=torch.get_autocast_dtype(device))


class Distiller(nn.Module):
    """
    Base class of a distillation loss module driven by :class:`detkd.DistillationDetector`.

    A distiller declares the submodules whose outputs it reads on each side
    (:meth:`student_taps`, :meth:`teacher_taps`); the wrapper records them with forward hooks
    (:class:`detkd.FeatureCapture`) while the student runs its normal forward and while the
    teacher runs only as far as some distiller needs. :meth:`bind` is called once, with both
    detectors, before the optimizer is built: it validates the pair (clear errors for level,
    class or channel mismatches) and creates trainable parts such as adapters, which are then
    trained with the student, saved in run checkpoints and dropped by student export.

    Attributes:
        resizes_levels (bool): :meth:`forward` handles a student map and the teacher map it is
            compared with of different sizes (ReviewKD: maps of equal stride are cropped to the
            part both cover, others resized), so it trains on a pair whose maps of equal stride
            differ in size (models that pad their inputs to different size divisibilities)
            instead of failing.
    """

    resizes_levels = False

    def student_taps(self, student: nn.Module) -> List[str]:
        """Returns the names of the student's submodules whose outputs :meth:`forward` reads."""
        return ["backbone"]

    def teacher_taps(self, teacher: nn.Module) -> List[str]:
        """Returns the names of the teacher's submodules whose outputs :meth:`forward` reads."""
        return ["backbone"]

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Validate the student/teacher pair and build trainable parts. Default: nothing."""

    def student_context(self, teacher_taps: Dict[str, Any], ctx: DistillContext):
        """
        Returns a context manager active around the student's forward (e.g. to feed teacher
        queries to a DETR student as an auxiliary group), or None.
        """
        return None

    def forward(
        self, student_taps: Dict[str, Any], teacher_taps: Dict[str, Any], ctx: DistillContext
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            student_taps, teacher_taps (dict[str, Any]): recorded outputs keyed by the names
                given by :meth:`student_taps` / :meth:`teacher_taps`; floating tensors are fp32.
            ctx (DistillContext): the detectors and inputs of this step.

        Returns:
            dict[str, Tensor]: scalar losses named ``loss_<method>[_<part>]`` (anything else is
            an error: detectron2 adds every value of the dict to the training loss). A zero
            loss is a tensor connected to the inputs (:func:`zero_loss`); diagnostics go to
            :func:`put_scalar`.
        """
        raise NotImplementedError


# Per thread, a stack of lists of (storage, name, scalar tensor, kwargs): the tensors put inside
# `deferred_scalars`.
_DEFERRED = threading.local()


def _deferred() -> List[list]:
    if not hasattr(_DEFERRED, "stack"):
        _DEFERRED.stack = []
    return _DEFERRED.stack


def put_scalar(name: str, value, **kwargs) -> None:
    """
    ``get_event_storage().put_scalar`` that does nothing outside an EventStorage. A tensor
    value put inside :func:`deferred_scalars` is written when that block ends (with the
    iteration it was put at), so that logging does not synchronise with the device mid-step.
    """
    if not len(_CURRENT_STORAGE_STACK):
        return
    storage = _CURRENT_STORAGE_STACK[-1]
    if isinstance(value, torch.Tensor):
        if _deferred():  # a copy: the value at put time, also if the caller changes it in place
            kwargs = {"cur_iter": storage.iter, **kwargs}
            _deferred()[-1].append((storage, name, value.detach().reshape(()).clone(), kwargs))
            return
        value = value.detach().float().item()
    storage.put_scalar(name, value, **kwargs)


@contextlib.contextmanager
def deferred_scalars(pending: Optional[list] = None):
    """
    Collect the tensor scalars that :func:`put_scalar` gets inside this block and write them to
    the event storage at its end, with one device-to-host copy per device (one synchronisation
    instead of one per scalar). Used by :meth:`detkd.DistillationDetector.forward` around the
    distillers; nothing is written if the block raises.

    Args:
        pending (list or None): append the collected scalars to this list instead of writing
            them; :func:`write_deferred_scalars` writes them later (with the iteration they
            were put at).
    """
    collected = []
    _deferred().append(collected)
    try:
        yield
    finally:
        _deferred().pop()
    if pending is not None:
        pending.extend(collected)
    else:
        write_deferred_scalars(collected)


def write_deferred_scalars(pending: list) -> None:
    """Write the scalars that :func:`deferred_scalars` collected into ``pending`` to their event
    storages, with one device-to-host copy per device."""
    values = [None] * len(pending)
    by_device: Dict[torch.device, List[int]] = {}
    for i, item in enumerate(pending):
        by_device.setdefault(item[2].device, []).append(i)
    for idx in by_device.values():
        for i, v in zip(idx, torch.stack([pending[i][2].float() for i in idx]).tolist()):
            values[i] = v
    for (storage, name, _, kwargs), v in zip(pending, values):
        storage.put_scalar(name, v, **kwargs)


def zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """
    A loss of exactly +0.0 connected to the autograd graphs of ``tensors`` (every process of a
    DDP run then has gradients for the same parameters). ``x.sum() * 0.0`` alone is -0.0 when
    the sum is negative, which logs as "-0.0".

    Returns:
        Tensor: scalar.
    """
    if not tensors:
        raise TypeError("zero_loss needs the tensors the loss is to be connected to")
    return sum(t.sum() for t in tensors) * 0.0 + 0.0


def float_tensors(obj):
    """Cast every floating tensor inside nested dicts / lists / tuples to fp32."""
    return _map_tensors(lambda t: t.float() if t.is_floating_point() else t, obj)


# Constructor-argument checks shared by the distillers. A distiller is built from a LazyConfig
# (`model.distillers.<name>`), where a command-line override such as
# `model.distillers.pkd.loss_weight=abc` arrives as any Python value: a bad value is an error
# at construction naming the argument, its config key and the value, not a failure (or a silent
# change of the method) at the first training step.


def _key(arg: str) -> str:
    return f"model.distillers.<name>.{arg}"


def _null_hint(arg: str, value) -> str:
    """What to write for None on the command line, when ``value`` is the string an override
    ``...=None`` gives (the override parser reads YAML: None is spelt null there)."""
    if isinstance(value, str) and value.strip().lower() == "none":
        return f" (the string 'None': an override writes None as null, '{_key(arg)}=null')"
    return ""


def check_weight(owner: str, arg: str, value) -> float:
    """
    A loss or cost weight (or another amount that must not be negative, e.g. a size): a real
    number (bool excluded), finite and >= 0. A weight of 0 turns its term off; a negative loss
    weight would train the student away from the teacher.

    Args:
        owner (str): the class, named in the error (e.g. "PKDDistiller").
        arg (str): the argument's name.
        value: the argument.

    Returns:
        float: ``value``.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            f"{owner}: {arg} must be a finite number >= 0 ({_key(arg)}), got {value!r}"
            + _null_hint(arg, value)
        )
    return float(value)


def check_positive_int(owner: str, arg: str, value, meaning: str = "") -> int:
    """
    A count or size: an int >= 1 (bool excluded).

    Args:
        owner (str): the class, named in the error; arg (str): the argument's name.
        meaning (str): what the argument counts, said in the error (e.g. "GIs per image").

    Returns:
        int: ``value``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        what = f" ({meaning})" if meaning else ""
        raise ValueError(f"{owner}: {arg} must be an int >= 1{what} ({_key(arg)}), got {value!r}")
    return int(value)


def check_fraction(owner: str, arg: str, value) -> float:
    """A number in [0, 1] (bool excluded), e.g. an IoU threshold. Returns it as a float."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not (0 <= value <= 1)  # also False for NaN
    ):
        raise ValueError(f"{owner}: {arg} must be a number in [0, 1] ({_key(arg)}), got {value!r}")
    return float(value)


def check_flag(owner: str, arg: str, value) -> bool:
    """A switch: True or False, also 0 / 1 or a numpy bool (a string such as "False" would be
    true, and is refused). Returns it as a bool."""
    if isinstance(value, numbers.Integral) and value in (0, 1) or isinstance(value, np.bool_):
        return bool(value)
    if not isinstance(value, bool):
        raise ValueError(
            f"{owner}: {arg} must be True or False ({_key(arg)}=True / False), got {value!r}"
        )
    return value


def check_num_levels(num_levels, owner: Optional[str] = None) -> Optional[int]:
    """``num_levels`` of :func:`pair_fpn_levels`: a positive int or None. Returns it."""
    if num_levels is not None and (
        not isinstance(num_levels, int) or isinstance(num_levels, bool) or num_levels < 1
    ):  # a slice bound: -1 would drop the coarsest pair, 0 every pair
        raise ValueError(
            f"{owner + ': ' if owner else ''}num_levels must be a positive int (the first "
            f"num_levels pairs, finest first) or None (all pairs), got {num_levels!r}"
            + _null_hint("num_levels", num_levels)
        )
    return num_levels


def check_pair_by(pair_by, owner: Optional[str] = None) -> str:
    """``pair_by`` of :func:`pair_fpn_levels`: "stride" or "index". Returns it."""
    if not isinstance(pair_by, str) or pair_by not in ("stride", "index"):
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}pair_by must be 'stride' or 'index', got {pair_by!r}")
    return pair_by


def check_level_names(arg: str, value, owner: Optional[str] = None) -> Optional[List[str]]:
    """
    ``student_levels`` / ``teacher_levels``: None (all levels) or a non-empty list (a tuple,
    an omegaconf ListConfig, any iterable but a string) of distinct level names. A string is
    refused: the override ``model.distillers.pkd.student_levels=p3`` gives the string "p3",
    which a list() would split into the features "p" and "3".

    Args:
        arg (str): the argument's name; owner (str or None): the class, named in the error.

    Returns:
        list[str] or None: ``value`` as a list.
    """
    if value is None:
        return None
    prefix = f"{owner}: " if owner else ""
    if not isinstance(value, (str, bytes)) and isinstance(value, _IterableABC):
        value = list(value)  # a list, tuple, ListConfig, dict_keys, generator ...
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        hint = _null_hint(arg, value)
        example = f"[{value}]" if isinstance(value, str) and value and not hint else "[p3, p4]"
        raise ValueError(
            f"{prefix}{arg} must be a list of level names, e.g. {example} (override: "
            f"'{_key(arg)}={example}'), or None for all levels, got {value!r}{hint}"
        )
    names = value
    if not names:
        raise ValueError(
            f"{prefix}{arg} is empty: list the levels to distil (e.g. [p3, p4]), or set it to "
            "None for all levels"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{prefix}{arg} lists {repeated} more than once: {names}")
    return names


def pair_fpn_levels(
    student_shapes: Dict[str, ShapeSpec],
    teacher_shapes: Dict[str, ShapeSpec],
    *,
    num_levels: int = None,
    pair_by: str = "stride",
    student_levels: Sequence[str] = None,
    teacher_levels: Sequence[str] = None,
    strict: bool = False,
) -> List[Tuple[str, str]]:
    """
    Pair the feature levels of two backbones (FPN outputs ``p2..p6``, ``p3..p7``, ...).

    Args:
        student_shapes, teacher_shapes (dict[str, ShapeSpec]): ``backbone.output_shape()``.
        num_levels (int or None): keep the first ``num_levels`` pairs (finest first);
            None keeps all pairs.
        pair_by (str): "stride" pairs levels of equal stride (p3 with p3 for a Faster R-CNN
            teacher and a RetinaNet student); "index" pairs the i-th finest level of each side
            (mmrazor's PKD setting: the teacher's p2 with the student's p3).
        student_levels, teacher_levels (list[str] or None): restrict each side to these levels
            (a list of distinct names, not a string: :func:`check_level_names`).
        strict (bool): every level named in ``student_levels`` / ``teacher_levels`` must be
            distilled: a listed level left without a partner (no level of its stride on the
            other side; with "index", more levels than the other side has) or cut off by
            ``num_levels`` is an error naming it (PKD's explicit lists). False (the default):
            the lists only restrict each side (e.g. GID's restriction to an R-CNN student's
            box-head levels, which the user did not list).

    Returns:
        list[(str, str)]: (student level, teacher level) pairs, finest first.
    """
    check_pair_by(pair_by)
    check_num_levels(num_levels)
    student_levels = check_level_names("student_levels", student_levels)
    teacher_levels = check_level_names("teacher_levels", teacher_levels)

    def levels(shapes, names, side):
        names = list(names) if names is not None else list(shapes)
        unknown = [n for n in names if n not in shapes]
        if unknown:
            raise ValueError(
                f"{side} backbone has no feature(s) {unknown}; it outputs {sorted(shapes)}"
            )
        no_stride = [n for n in names if not shapes[n].stride]
        if no_stride:  # levels are ordered (and paired) by stride
            raise ValueError(
                f"{side} backbone's output_shape() gives no stride for {no_stride}: "
                f"{ {n: shapes[n] for n in no_stride} }. Levels are paired by stride; a custom "
                "Backbone must return ShapeSpec(channels=..., stride=...) for each feature (or "
                "set _out_feature_strides, which Backbone.output_shape() reads)."
            )
        return sorted(names, key=lambda n: shapes[n].stride)

    s_levels = levels(student_shapes, student_levels, "student")
    t_levels = levels(teacher_shapes, teacher_levels, "teacher")
    if pair_by == "index":
        pairs = list(zip(s_levels, t_levels))
    else:
        t_by_stride = {teacher_shapes[n].stride: n for n in t_levels}
        pairs = [
            (s, t_by_stride[student_shapes[s].stride])
            for s in s_levels
            if student_shapes[s].stride in t_by_stride
        ]
        if not pairs:
            raise ValueError(
                "FPN level mismatch: student levels "
                f"{[(n, student_shapes[n].stride) for n in s_levels]} and teacher levels "
                f"{[(n, teacher_shapes[n].stride) for n in t_levels]} share no stride. "
                "Use pair_by='index' to pair levels by order instead."
            )
    # The sides whose levels were listed: (argument, the side's levels, its index in a pair).
    listed = [
        (arg, mine, i)
        for arg, names, mine, i in (
            ("student_levels", student_levels, s_levels, 0),
            ("teacher_levels", teacher_levels, t_levels, 1),
        )
        if strict and names is not None
    ]
    for arg, mine, i in listed:
        paired = {p[i] for p in pairs}
        unpaired = [n for n in mine if n not in paired]
        if not unpaired:
            continue
        if i == 0:
            other_side, other = "teacher", t_levels
            shapes, other_shapes = student_shapes, teacher_shapes
        else:
            other_side, other = "student", s_levels
            shapes, other_shapes = teacher_shapes, student_shapes
        if pair_by == "index":
            raise ValueError(
                f"FPN level mismatch: {arg} lists {len(mine)} levels {mine}, the {other_side} "
                f"side has {len(other)} ({other}); pair_by='index' pairs the i-th finest levels "
                f"of each side, which leaves {unpaired} without a partner. List as many levels "
                f"on each side ({other_side}_levels), or remove {unpaired} from {arg}."
            )
        raise ValueError(
            f"FPN level mismatch: {arg} lists {[(n, shapes[n].stride) for n in unpaired]}, but "
            f"no {other_side} level has that stride ({other_side} levels "
            f"{[(n, other_shapes[n].stride) for n in other]}), so pair_by='stride' leaves "
            f"them without a partner. Add the {other_side}'s level of that stride to "
            f"{other_side}_levels, remove {unpaired} from {arg}, or pair the levels by order "
            "with pair_by='index'."
        )
    if num_levels is not None:
        if num_levels > len(pairs):
            n = len(pairs)
            # pairing by order pairs min(#student, #teacher) levels: say so where that is enough
            by_index = min(len(s_levels), len(t_levels))
            other = (
                f", or pair the levels by order (pair_by='index': {by_index} pairs)"
                if pair_by == "stride" and by_index >= num_levels
                else ""
            )
            raise ValueError(
                f"FPN level mismatch: {num_levels} levels requested but only {n} "
                f"pair{'s' if n != 1 else ''} exist{'' if n != 1 else 's'} ({pairs}) with "
                f"pair_by={pair_by!r}: set num_levels={n} (the override "
                f"{_key('num_levels')}={n}) or None for every pair "
                f"({_key('num_levels')}=null){other}."
            )
        dropped = pairs[num_levels:]
        for arg, _, i in listed:
            cut = [p[i] for p in dropped]
            if cut:
                raise ValueError(
                    f"num_levels={num_levels} keeps the first {num_levels} of the level pairs "
                    f"{pairs} (finest first), which leaves out {cut} listed in {arg}: set "
                    f"num_levels=None (the override num_levels=null) to distil every listed level, "
                    "or list only the levels to distil."
                )
        pairs = pairs[:num_levels]
    return pairs
