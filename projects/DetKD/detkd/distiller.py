"""
:class:`DistillationDetector`: a student detector trained with a frozen teacher twin.
"""

import contextlib
import difflib
import logging
from typing import Dict, List, Optional

import torch
from detectron2.config import instantiate
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import ImageList
from detectron2.utils.events import _CURRENT_STORAGE_STACK
from torch import nn

from .capture import FeatureCapture
from .losses.base import (
    DistillContext,
    Distiller,
    deferred_scalars,
    float_tensors,
    pair_fpn_levels,
    put_scalar,
    write_deferred_scalars,
)
from .utils import host_tensor, unwrap_model

__all__ = ["DistillationDetector", "run_teacher", "student_of"]

logger = logging.getLogger(__name__)


def _input_format(model: nn.Module) -> Optional[str]:
    return getattr(model, "input_format", None)


def _check_given_format(role: str, given: Optional[str], own: Optional[str]) -> None:
    """ValueError when the format given for the ``role`` model contradicts its own input_format."""
    if given and own and given != own:
        why = " (the order its checkpoint was trained in)" if role == "teacher" else ""
        raise ValueError(
            f"{role}_input_format={given!r} but the {role}'s input_format is {own!r}: the {role} "
            f"normalises its images as {own}{why}. Drop {role}_input_format (it is for "
            f"{role}s without an input_format, e.g. detectron2's FCOS) or set the {role}'s "
            "input_format."
        )


def channel_orders(student, teacher, student_input_format=None, teacher_input_format=None):
    """(student's data order, teacher's order) as DistillationDetector decides them: the given
    formats, else the models' ``input_format`` (detectron2's FCOS has none), a teacher without
    one taking the student's. A given format contradicting the model's own is an error (the
    model normalises its images in its own order, and its checkpoint was trained in it)."""
    own, theirs = _input_format(student), _input_format(teacher)
    _check_given_format("student", student_input_format, own)
    _check_given_format("teacher", teacher_input_format, theirs)
    s_fmt = student_input_format or own
    return s_fmt, teacher_input_format or theirs or s_fmt


def _padding_constraints(model: nn.Module):
    return getattr(getattr(model, "backbone", None), "padding_constraints", None)


def _size_divisibility(model: nn.Module, *, required: bool = False) -> int:
    """The multiple ``model`` pads its inputs to in detectron2's preprocessing; with
    ``required``, the multiple its backbone needs: also the one detectron2's
    SimpleFeaturePyramid (ViTDet) declares under the misspelt key ``"size_divisiblity"``, which
    detectron2's preprocessing does not read (ViTDet's square padding to 1024 is a multiple).
    A teacher is not padded to its square size (:meth:`DistillationDetector.teacher_images`),
    so it needs this one: without it, a ViT teacher drops the rows and columns past the last
    multiple of its patch size."""
    div = getattr(model, "size_divisibility", None)
    if div is None:  # detectron2's preprocessing: padding_constraints' value overrides
        constraints = _padding_constraints(model) or {}
        div = constraints.get("size_divisibility", getattr(model.backbone, "size_divisibility", 0))
        if required:
            div = max(int(div or 0), int(constraints.get("size_divisiblity", 0) or 0))
    return int(div or 0)


def _square_size(model: nn.Module) -> int:
    """The square size ``model`` pads its inputs to (ViTDet's ``square_pad``), 0 if none."""
    return int((_padding_constraints(model) or {}).get("square_size", 0) or 0)


def normalized_images(
    model: nn.Module,
    batched_inputs: List[dict],
    *,
    flip_channels: bool = False,
    size_divisibility: int = 0,
    square_size: Optional[int] = None,
) -> ImageList:
    """
    ``model``'s input tensor for detectron2 inputs: the images (channels flipped if
    ``flip_channels``) normalised with the model's pixel mean/std and padded to a multiple of
    ``max(size_divisibility, the model's own)``, and to a square of ``square_size`` (default:
    the model's own ``padding_constraints``; 0: no square padding).

    Returns:
        ImageList: tensor (N, 3, Hp, Wp).
    """
    images = [x["image"].to(model.pixel_mean.device) for x in batched_inputs]
    if flip_channels:
        images = [x.flip(0) for x in images]
    images = [(x - model.pixel_mean) / model.pixel_std for x in images]
    div = max(_size_divisibility(model, required=True), size_divisibility)
    if square_size is None:
        square_size = _square_size(model)
    return ImageList.from_tensors(images, div, padding_constraints={"square_size": square_size})


def inputs_on_device(batched_inputs: List[dict], device, *, instances: bool = False) -> List[dict]:
    """
    ``batched_inputs`` in new dicts (the caller's are unchanged) with each ``"image"`` on
    ``device``, copied from host memory through pinned memory without blocking
    (:func:`detkd.utils.host_tensor`), and with ``instances`` each ``"instances"`` too
    (``Instances.to``). A training step of :class:`DistillationDetector` moves them once for
    both models: the models' own ``x["image"].to(device)`` then copies nothing, where the
    student's plain copies from pageable memory (detectron2's preprocessing) made the host wait
    for the teacher's whole forward on the device before queueing the student's, and copied
    every image a second time.

    Returns:
        list[dict]: images (3, H, W) on ``device``; other entries as given.
    """
    device = torch.device(device)

    def moved(img):
        if img.device == device:
            return img
        return host_tensor(img, device) if img.device.type == "cpu" else img.to(device)

    out = []
    for x in batched_inputs:
        x = dict(x, image=moved(x["image"]))
        if instances and x.get("instances") is not None:
            x["instances"] = x["instances"].to(device)
        out.append(x)
    return out


def _head_stage(model: nn.Module, features: Dict[str, torch.Tensor]) -> None:
    """
    Run the part of ``model`` right after its backbone that produces dense predictions,
    without label assignment, losses or post-processing: the dense head (+ anchors) of a
    RetinaNet/FCOS, or the RPN head (+ anchors) of a GeneralizedRCNN. Outputs reach the hooks.
    """
    if isinstance(model, DenseDetector):
        feats = [features[f] for f in model.head_in_features]
        model.head(feats)
        if hasattr(model, "anchor_generator"):
            model.anchor_generator(feats)
    elif isinstance(model, GeneralizedRCNN) and model.proposal_generator is not None:
        rpn = model.proposal_generator
        feats = [features[f] for f in rpn.in_features]
        rpn.rpn_head(feats)
        rpn.anchor_generator(feats)
    else:
        raise TypeError(
            f"DetKD cannot run the head of a {type(model).__name__} teacher in isolation; "
            "supported: RetinaNet, FCOS, GeneralizedRCNN with an RPN, or a model with "
            "`forward_predictions(images)`."
        )


def run_teacher(teacher: nn.Module, images: ImageList, capture: FeatureCapture) -> None:
    """
    Run ``teacher`` only as far as the taps of ``capture`` need, under the hooks of ``capture``.

    Stages: backbone (all FPN distillers stop here); then the dense head or RPN head with its
    anchors (GID); models that define ``forward_predictions(images)`` (DETR-style detectors)
    run it when anything beyond the backbone is needed. Never runs losses or NMS.
    """
    with capture:
        needs = set(capture.names)
        if hasattr(teacher, "forward_predictions") and needs - {"backbone"}:
            teacher.forward_predictions(images)
        else:
            features = teacher.backbone(images.tensor)
            if any(n not in capture for n in needs):
                _head_stage(teacher, features)
        missing = [n for n in needs if n not in capture]
        if missing:
            raise RuntimeError(
                f"Teacher taps {missing} were not produced by the teacher's backbone or head "
                f"stage ({type(teacher).__name__}); check the distillers' teacher_taps."
            )


_TEACHER_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _state_names(module: nn.Module) -> set:
    """The names of ``module``'s parameters and persistent buffers (its ``state_dict`` keys,
    without building it)."""
    names = {n for n, _ in module.named_parameters()}
    for prefix, m in module.named_modules():
        names.update(
            f"{prefix}.{b}" if prefix else b
            for b, t in m._buffers.items()
            if t is not None and b not in m._non_persistent_buffers_set
        )
    return names


def _describe_bound(name: str, distiller: Distiller) -> str:
    """What a bound distiller distils, for the run's log: its level pairs (student -> teacher,
    chosen by stride or index, num_levels ...), its decoder layers, its trainable parameters."""
    parts = []
    pairs = getattr(distiller, "pairs", None)
    if pairs:
        parts.append("levels " + ", ".join(f"{s}->{t}" for s, t in pairs))
    layers = getattr(distiller, "num_layers", None)
    if isinstance(layers, int) and not isinstance(layers, bool):
        parts.append(f"{layers} decoder layers")
    trainable = sum(p.numel() for p in distiller.parameters() if p.requires_grad)
    parts.append(f"{trainable} trainable parameters")
    return f"{name} ({type(distiller).__name__}): {', '.join(parts)}"


def _check_taps(distillers: Dict[str, Distiller], student: nn.Module, teacher: nn.Module) -> None:
    """Every tap a distiller declares names a submodule of its side: the error names the
    distiller, the side and the closest names (FeatureCapture's own lists every name of a
    model, without saying whose taps, nor which of two models of the same class)."""
    for side, model in (("student", student), ("teacher", teacher)):
        modules = [n for n, _ in model.named_modules() if n]
        known = set(modules)
        for name, d in distillers.items():
            taps = d.student_taps(model) if side == "student" else d.teacher_taps(model)
            missing = [n for n in taps if n not in known]
            if not missing:
                continue
            close = sorted(
                {c for n in missing for c in difflib.get_close_matches(n, modules, n=3, cutoff=0.5)}
            )
            hint = f" Close names: {close}." if close else ""
            raise KeyError(
                f"distillers['{name}'] ({type(d).__name__}).{side}_taps names {missing}, which the "
                f"{side} ({type(model).__name__}) does not have.{hint} Taps are names of "
                f"{side}.named_modules(), e.g. {[n for n in modules if '.' not in n]}."
            )


def _rename_apart(name: str, distiller, d_losses: dict, losses: dict, student_keys: set) -> dict:
    """The loss dict of distiller ``name`` with its keys made unique among those already in
    ``losses``: a key another distiller returned (two distillers of one method, e.g. PKD on two
    sets of levels) gets ``_<name>`` appended, the config's name of the distiller, so both are
    summed and logged apart (``loss_pkd`` and ``loss_pkd_<name>``). A key of the student's own
    losses is an error: the distiller is summed into the detector's loss under its name."""
    clash = set(d_losses) & set(losses)
    if not clash:
        return d_losses
    if clash & student_keys:
        raise KeyError(
            f"distiller '{name}' ({type(distiller).__name__}) returned loss keys "
            f"{sorted(clash & student_keys)} that the student already returned; loss keys must "
            "be unique: name the distiller's losses loss_<method>[_<part>]"
        )
    renamed = {(f"{k}_{name}" if k in clash else k): v for k, v in d_losses.items()}
    still = set(renamed) & set(losses)
    if still or len(renamed) != len(d_losses):
        raise KeyError(
            f"distiller '{name}' ({type(distiller).__name__}) returned loss keys "
            f"{sorted(clash)} that another distiller already returned, and "
            f"{sorted(still) or 'the renamed keys'} with its name appended clash too; loss keys "
            "must be unique: give the distiller another name in model.distillers"
        )
    return renamed


def _check_distiller_losses(name: str, distiller: Distiller, losses) -> None:
    """A distiller's forward must return ``{"loss_<method>[_<part>]": scalar tensor}``:
    detectron2's trainer adds every value of the loss dict to the loss it backpropagates and
    logs each with ``.item()``, so anything else fails there, far from the distiller, with a
    message that names neither (a non-scalar loss: "grad can be implicitly created only for
    scalar outputs"), or is trained silently (a diagnostic returned among the losses)."""
    where = f"distillers['{name}'] ({type(distiller).__name__}).forward"
    if not isinstance(losses, dict):
        raise TypeError(
            f"{where} returned a {type(losses).__name__}; it must return a dict of scalar "
            "losses, e.g. {'loss_<method>': loss}"
        )
    for key, value in losses.items():
        if not (isinstance(key, str) and key.startswith("loss_")):
            raise ValueError(
                f"{where} returned the key {key!r}: loss keys must start with 'loss_' "
                "(loss_<method>[_<part>]). Every value of the dict is added to the training "
                "loss; log diagnostics with detkd.losses.put_scalar instead."
            )
        if not (
            isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() == 1
        ):
            what = (
                f"a {value.dtype} tensor of shape {tuple(value.shape)}"
                if isinstance(value, torch.Tensor)
                else f"a {type(value).__name__}"
            )
            raise ValueError(
                f"{where} returned {key!r} as {what}; a loss must be a scalar floating tensor: "
                "reduce it (e.g. .mean() over the batch), and return a zero loss as a tensor "
                "connected to the inputs (detkd.losses.zero_loss(feat)), not a Python number."
            )


def _check_not_shared(student: nn.Module, teacher: nn.Module) -> None:
    """Freezing the teacher (``requires_grad_(False)``, eval mode) would silently freeze any
    trainable parameter it shares with the student (the same model passed twice, a shared
    backbone): the student would then train its other parts, or only the distillers' adapters."""
    teacher_params = {id(p) for p in teacher.parameters()}
    shared = [
        n for n, p in student.named_parameters() if p.requires_grad and id(p) in teacher_params
    ]
    if shared:
        owners = sorted({n.split(".")[0] for n in shared})  # top-level submodules
        raise ValueError(
            f"The teacher shares {len(shared)} trainable parameters with the student (in "
            f"{owners}); freezing the teacher would freeze them in the student too. Pass two "
            "separate models (e.g. copy.deepcopy(student) as the teacher for self-distillation)."
        )


def _check_head_levels(student: nn.Module, teacher: nn.Module) -> None:
    """A dense head (RetinaNet, FCOS) or RPN that reads a feature its backbone does not output
    (``head_in_features=["p3", ..., "p8"]`` on an FPN of p3-p7, a teacher config edited for
    another backbone) failed in the first step with a bare ``KeyError: 'p8'``: named here,
    with the levels there are and the key to set."""
    for side, model in (("student", student), ("teacher", teacher)):
        backbone = getattr(model, "backbone", None)
        if backbone is None or not hasattr(backbone, "output_shape"):
            continue
        if isinstance(model, DenseDetector):
            wanted, key = list(model.head_in_features), "head_in_features"
        elif isinstance(model, GeneralizedRCNN) and model.proposal_generator is not None:
            wanted = list(getattr(model.proposal_generator, "in_features", []))
            key = "proposal_generator.in_features"
        else:
            continue
        outputs = list(backbone.output_shape())
        missing = [f for f in wanted if f not in outputs]
        if missing:
            raise ValueError(
                f"The {side}'s {type(model).__name__} reads features {missing} that its backbone "
                f"({type(backbone).__name__}) does not output (it outputs {outputs}). Set "
                f"model.{side}.{key} to levels among those, or give the backbone these levels "
                "(e.g. the FPN's top_block)."
            )


class DistillationDetector(nn.Module):
    """
    A student detector trained with a frozen teacher twin and any number of distillers.

    In training, one step runs the teacher once (only as far as the distillers need: see
    :func:`run_teacher`), then the student's own unchanged forward (its intermediates are
    recorded by forward hooks), and returns the student's detector losses plus every
    distiller's losses in one dict. In eval mode it returns the student's predictions and never
    runs the teacher.

    The teacher is frozen three ways: ``requires_grad_(False)``, kept in eval mode by
    :meth:`train`, and run under ``torch.no_grad()``. It is deliberately *not* a registered
    submodule: it is absent from ``state_dict()`` (run checkpoints hold the student and the
    distillers' trainable parts only), from ``parameters()`` (the optimizer and DDP never see
    it), yet it follows ``model.to(device)`` / ``.cuda()`` / ``.half()`` through :meth:`_apply`.
    Its weights are (re)loaded from ``train.teacher_checkpoint`` by
    :func:`detkd.checkpoint.load_teacher`.
    """

    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: nn.Module,
        distillers: Dict[str, Distiller],
        teacher_input_format: Optional[str] = None,
        student_input_format: Optional[str] = None,
        diag_period: int = 20,
        teacher_precision: str = "fp32",
        clone_taps: bool = False,
    ):
        """
        Args:
            student (nn.Module): a detectron2 detector (GeneralizedRCNN, RetinaNet, FCOS) or
                :class:`detkd.modeling.ConditionalDETR`; called unchanged.
            teacher (nn.Module): a detector of any of these families; may differ from the
                student in input format, pixel mean/std, FPN levels, channels and head.
            distillers (dict[str, Distiller]): name -> distiller (or its LazyConfig, which is
                instantiated); their losses join the loss dict. May be empty (the student
                then trains alone).
            teacher_input_format (str or None): "RGB" or "BGR"; defaults to the teacher's
                ``input_format`` attribute (for a teacher without one; contradicting it is an
                error). When it differs from the student's, the channels of the student's
                images are flipped for the teacher.
            student_input_format (str or None): "RGB" or "BGR", the channel order of the
                training data; defaults to the student's ``input_format`` attribute. Needed
                for a student without one (detectron2's FCOS) whose data is not in the
                teacher's order; when neither is known, the two are assumed equal (a warning
                says so when the teacher's order is known).
            diag_period (int): every ``diag_period`` iterations, when some distiller reads the
                backbone of both models, log the Pearson correlation between the student's and
                the teacher's channel-mean activation maps of each level of equal stride
                (``kd_diag/pearson_<level>``, unsmoothed: metrics.json holds each logged
                iteration's own value); 0 disables it.
            teacher_precision (str): "fp32", or "fp16" / "bf16" to run the teacher's forward
                under ``torch.autocast`` with that dtype (about half the teacher's time on GPUs
                with tensor cores). Its outputs are cast back to fp32 before the distillers.
                Under AMP training the teacher follows the step's precision anyway.
            clone_taps (bool): record copies of the tapped outputs (``FeatureCapture(...,
                clone=True)``), for a detector that changes a tapped output in place after the
                tap (the step then stops with an error saying so); costs one copy of each tap
                per step.
        """
        super().__init__()
        if teacher_precision not in _TEACHER_DTYPES:
            raise ValueError(
                f"teacher_precision must be one of {sorted(_TEACHER_DTYPES)}, "
                f"got {teacher_precision!r}"
            )
        if not isinstance(diag_period, int) or isinstance(diag_period, bool) or diag_period < 0:
            raise ValueError(
                f"diag_period must be an int >= 0 (0 disables it), got {diag_period!r}"
            )
        self.teacher_precision = teacher_precision
        _check_not_shared(student, teacher)
        _check_head_levels(student, teacher)
        self.student = student
        teacher.requires_grad_(False)
        teacher.eval()
        # Not registered as a submodule: see the class docstring.
        object.__setattr__(self, "_teacher", teacher)
        # LazyConfig's instantiate() does not recurse into a plain dict argument.
        distillers = {k: instantiate(v) for k, v in distillers.items()}
        for name, d in distillers.items():
            if not isinstance(d, Distiller):
                raise TypeError(
                    f"distillers['{name}'] is a {type(d).__name__}; it must subclass "
                    "detkd.losses.Distiller"
                )
            try:
                d.bind(student, teacher)
            except (ValueError, TypeError) as e:  # which of several distillers rejects the pair
                raise type(e)(f"distillers['{name}'] ({type(d).__name__}): {e}") from e
            except Exception as e:  # other types may not take one message: a note in the traceback
                if hasattr(e, "add_note"):  # Python >= 3.11
                    e.add_note(
                        f"raised by distillers['{name}'] ({type(d).__name__})"
                        ".bind(student, teacher)"
                    )
                raise
        self.distillers = nn.ModuleDict(distillers)
        logger.info(
            "Distillers bound: " + "; ".join(_describe_bound(n, d) for n, d in distillers.items())
            if distillers
            else "No distillers: the student trains alone."
        )
        # What each distiller saves and trains, fixed once bound (see _check_distiller_state).
        self._bound_state = {name: _state_names(d) for name, d in distillers.items()}

        s_fmt, t_fmt = channel_orders(student, teacher, student_input_format, teacher_input_format)
        if s_fmt is None and t_fmt is not None:
            logger.warning(
                f"The student ({type(student).__name__}) declares no input_format: its images "
                f"are assumed to be in the teacher's channel order ({t_fmt}) and reach the "
                "teacher unflipped. If the training data is in the other order, set "
                "model.student_input_format to it."
            )
        for side, fmt in (("student", s_fmt), ("teacher", t_fmt)):
            if fmt not in (None, "RGB", "BGR"):
                raise ValueError(
                    f"DistillationDetector supports RGB/BGR inputs, got {fmt!r} for the {side} "
                    f"(model.{side}.input_format, or model.{side}_input_format): give it the "
                    "channel order of its weights, 'RGB' or 'BGR' (grey images reach a detector "
                    "as three equal channels, so an 'L' loader needs no 'L' model)"
                )
        self.flip_teacher_channels = s_fmt is not None and t_fmt != s_fmt
        self.student_format = s_fmt  # the student's data order as decided here (None: unknown)

        _check_taps(distillers, student, teacher)
        s_names = sorted({n for d in distillers.values() for n in d.student_taps(student)})
        t_names = sorted({n for d in distillers.values() for n in d.teacher_taps(teacher)})
        self._student_capture = FeatureCapture(student, s_names, clone=clone_taps)
        self._teacher_capture = FeatureCapture(teacher, t_names, clone=clone_taps)

        self.diag_period = diag_period
        # True (KDTrainer): the step's logged tensor scalars are written by
        # write_pending_scalars, after the backward pass (see there), not at the end of forward
        self.scalars_after_backward = False
        self._pending_scalars = []
        # Levels of equal stride of the two backbones, when some distiller reads both: their
        # maps must have equal sizes (checked every step on the finest, logged periodically).
        self._stride_pairs = []
        if "backbone" in s_names and "backbone" in t_names:
            try:
                self._stride_pairs = pair_fpn_levels(
                    student.backbone.output_shape(), teacher.backbone.output_shape()
                )
            except ValueError:  # no level of equal stride: nothing to compare
                pass
        self._diag_pairs = self._stride_pairs if diag_period else []
        # Maps of equal stride that differ in size (a teacher padding to a larger size
        # divisibility than the student's) are an error unless every distiller reading both
        # backbones resizes them (ReviewKD): then a note in the log, once.
        readers = [
            d
            for d in distillers.values()
            if "backbone" in d.student_taps(student) and "backbone" in d.teacher_taps(teacher)
        ]
        self._sizes_resized = all(d.resizes_levels for d in readers)
        self._size_warned = False

    def _teacher_autocast(self, device_type: str):
        dtype = _TEACHER_DTYPES[self.teacher_precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=dtype)

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a registered submodule)."""
        return self._teacher

    @property
    def device(self) -> torch.device:
        return self.student.device

    def train(self, mode: bool = True):
        """See :meth:`nn.Module.train`. The teacher always stays in eval mode."""
        super().train(mode)
        self._teacher.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        # Keeps the (unregistered) teacher on the student's device and dtype.
        super()._apply(fn, *args, **kwargs)
        self._teacher._apply(fn, *args, **kwargs)
        return self

    # Training statistics that detectron2's dense detectors keep as plain float attributes
    # (an EMA of the number of positive anchors normalising their losses). They are not in
    # the student's state_dict, so a resumed run would restart them; the wrapper saves them.
    _STUDENT_EMA_ATTRS = ("loss_normalizer",)

    def get_extra_state(self):
        """See :meth:`nn.Module.get_extra_state`: the student's EMA loss normaliser."""
        values = [float(getattr(self.student, k, float("nan"))) for k in self._STUDENT_EMA_ATTRS]
        return torch.tensor(values, dtype=torch.float64)

    def set_extra_state(self, state):
        for k, v in zip(self._STUDENT_EMA_ATTRS, state.tolist()):
            if v == v:  # NaN: the student had no such statistic yet
                setattr(self.student, k, v)

    def teacher_images(self, batched_inputs: List[dict]) -> ImageList:
        """
        Normalize and pad the student's input images the way the teacher expects.

        Returns:
            ImageList: tensor (N, 3, Hp, Wp) with the teacher's pixel mean/std and channel
            order, padded to a multiple of the larger of the two models' size divisibilities
            (the student's own padding when its divisibility is the larger one) and to the
            student's square size, if any, so that feature maps of equal stride have equal
            sizes on both sides (:meth:`_check_aligned` reports a pair where they do not).
            A teacher's own square padding (e.g. ViTDet's ``square_pad=1024``) is not applied:
            its maps would cover a larger area than the student's (METHODS.md 0: both inputs
            are padded to the same size).
        """
        return normalized_images(
            self._teacher,
            batched_inputs,
            flip_channels=self.flip_teacher_channels,
            size_divisibility=_size_divisibility(self.student),
            square_size=_square_size(self.student),
        )

    @torch.no_grad()
    def teacher_inference(self, batched_inputs: List[dict]) -> List[dict]:
        """
        The teacher's predictions for the student's inputs, with the channel order
        the teacher is trained on (the images flipped when the two input formats differ, as in
        :meth:`teacher_images`); the teacher normalises and pads them itself. For evaluating
        the loaded teacher (``train.teacher_eval_at_start``).

        Args:
            batched_inputs (list[dict]): detectron2's standard inputs, images in the student's
                input format.

        Returns:
            list[dict]: the teacher's outputs, e.g. ``{"instances": Instances}`` per image.
        """
        if self.flip_teacher_channels:
            batched_inputs = [dict(x, image=x["image"].flip(0)) for x in batched_inputs]
        return self._teacher(batched_inputs)  # always in eval mode (see train())

    def forward(self, batched_inputs: List[dict]):
        """
        Args:
            batched_inputs (list[dict]): detectron2's standard inputs (see
                :meth:`GeneralizedRCNN.forward`).

        Returns:
            In training, dict[str, Tensor]: the student's losses plus ``loss_<method>*`` of
            every distiller. In eval, the student's predictions (list[dict]).
        """
        if not self.training:
            return self.student(batched_inputs)
        # Logged tensor scalars (distillers, diagnostics) are written at the end of the step's
        # forward with one device-to-host copy instead of one synchronisation each, or with
        # scalars_after_backward by write_pending_scalars.
        self.write_pending_scalars()  # a previous step's, if nothing wrote them
        pending = self._pending_scalars if self.scalars_after_backward else None
        with deferred_scalars(pending):
            return self._forward_train(batched_inputs)

    def write_pending_scalars(self) -> None:
        """
        Write the tensor scalars that the last training forward logged (with
        ``scalars_after_backward``; else there are none) to the event storage, at the iteration
        they were logged at, with one device-to-host copy. :class:`detkd.engine.KDTrainer` calls
        it after the backward pass, right before detectron2's trainer copies the losses to the
        host: at the end of the forward the copy made the host wait for the device to finish
        the forward before it could queue the backward pass.
        """
        pending, self._pending_scalars = self._pending_scalars, []
        write_deferred_scalars(pending)

    def _forward_train(self, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        # Images on the device once, before the teacher is queued (see inputs_on_device); the
        # ground truth too for detectron2's detectors, which move it first thing themselves
        # (our DETR copies it from the host in one pinned batch: left there).
        batched_inputs = inputs_on_device(
            batched_inputs,
            self._teacher.pixel_mean.device,  # where teacher_images puts them
            instances=isinstance(self.student, (GeneralizedRCNN, DenseDetector)),
        )
        images = self.teacher_images(batched_inputs)
        teacher_taps = {}
        if self._teacher_capture.names:
            with torch.no_grad(), self._teacher_autocast(images.tensor.device.type):
                run_teacher(self._teacher, images, self._teacher_capture)
            try:
                teacher_taps = self._teacher_capture.as_dict()
            finally:
                self._teacher_capture.clear()
        amp = torch.is_autocast_enabled(images.tensor.device.type)
        ctx = DistillContext(self.student, self._teacher, batched_inputs, images, autocast=amp)

        with contextlib.ExitStack() as stack:
            for d in self.distillers.values():
                cm = d.student_context(teacher_taps, ctx)
                if cm is not None:
                    stack.enter_context(cm)
            with self._student_capture:
                losses = dict(self.student(batched_inputs))
        try:
            student_taps = self._student_capture.as_dict()
        finally:  # also when a tap is unreadable: no graph held into the next step
            self._student_capture.clear()

        self._check_aligned(student_taps, teacher_taps)
        self._log_feature_correlation(student_taps, teacher_taps)
        # Distillation arithmetic in fp32, also under AMP (normalisation statistics).
        self._check_distiller_dtypes()
        student_taps, teacher_taps = float_tensors(student_taps), float_tensors(teacher_taps)
        student_keys = set(losses)
        with torch.autocast(images.tensor.device.type, enabled=False):
            for name, d in self.distillers.items():
                try:
                    d_losses = d(student_taps, teacher_taps, ctx)
                except Exception as e:  # which of several distillers failed (its message kept)
                    if hasattr(e, "add_note"):  # Python >= 3.11
                        e.add_note(f"raised by distillers['{name}'] ({type(d).__name__}).forward")
                    raise
                _check_distiller_losses(name, d, d_losses)
                self._check_distiller_state(name, d)
                d_losses = _rename_apart(name, d, d_losses, losses, student_keys)
                losses.update(d_losses)
        return losses

    def _check_distiller_dtypes(self) -> None:
        """The distillers compute in float32 on float32 copies of the taps: parameters cast to
        half precision (``model.half()``, ``model.to(torch.bfloat16)``) would fail in their first
        layer with a bare dtype error, so they are named here with the fix."""
        for name, d in self.distillers.items():
            low = sorted(
                {str(p.dtype) for p in d.parameters() if p.dtype in (torch.float16, torch.bfloat16)}
            )
            if low:
                raise TypeError(
                    f"distillers['{name}'] ({type(d).__name__}) has {'/'.join(low)} parameters: "
                    "DetKD computes distillation losses in float32 and keeps the model's weights "
                    "in float32. For mixed precision train with AMP (train.amp.enabled=True) "
                    "instead of casting the model; a half-precision teacher is "
                    "teacher_precision='fp16' or 'bf16'."
                )

    def _check_distiller_state(self, name: str, distiller: Distiller) -> None:
        """Parameters (or saved buffers) that a distiller creates in forward() are not in the
        optimizer, built before the first step, so they never train; nor are they in a model
        built afresh, so ``--resume`` refuses the run's checkpoints as another model's."""
        bound = self._bound_state.get(name)
        new = sorted(_state_names(distiller) - bound) if bound is not None else []
        if new:
            raise RuntimeError(
                f"distillers['{name}'] ({type(distiller).__name__}) created {new} in forward(): "
                "the optimizer, built before the first step, does not have them (they would "
                "never train), nor would a model built afresh (--resume would refuse the "
                "checkpoints). Build them in bind(student, teacher), which runs before the "
                "optimizer is built."
            )

    def _check_aligned(self, student_taps, teacher_taps) -> None:
        """Maps of equal stride must cover the same padded image: a distiller would otherwise
        pair predictions or features of different positions (GID, PKD). Distillers that compare
        the part both maps cover (``resizes_levels``: ReviewKD) train on such a pair, with a
        note in the log."""
        if not self._stride_pairs:
            return
        s, t = self._stride_pairs[0]  # the finest: no rounding of odd sizes yet
        hs, ht = student_taps["backbone"][s].shape[-2:], teacher_taps["backbone"][t].shape[-2:]
        if hs == ht or (self._sizes_resized and self._size_warned):
            return
        msg = (
            f"The student's '{s}' map is {tuple(hs)} but the teacher's '{t}' of the same "
            f"stride is {tuple(ht)}: the two models pad their inputs to different sizes "
            f"(size divisibility: student {_size_divisibility(self.student)}, teacher "
            f"{_size_divisibility(self._teacher, required=True)})."
        )
        if not self._sizes_resized:
            raise ValueError(
                msg + " Use a student whose size divisibility is a multiple of the teacher's "
                "(detectron2's detectors pad their images to a multiple of their backbone's "
                "size_divisibility property: a custom Backbone overrides it)."
            )
        logger.info(
            msg + " The distillers compare the part of each pair of maps that both cover (the "
            "image and the padding common to both)."
        )
        self._size_warned = True

    @torch.no_grad()
    def _log_feature_correlation(self, student_taps, teacher_taps) -> None:
        if not self._diag_pairs or not len(_CURRENT_STORAGE_STACK):
            return
        if _CURRENT_STORAGE_STACK[-1].iter % self.diag_period:
            return
        for s, t in self._diag_pairs:
            a = student_taps["backbone"][s].float().mean(dim=1, keepdim=True)  # (N, 1, H, W)
            b = teacher_taps["backbone"][t].float().mean(dim=1, keepdim=True)
            # equal strides: maps of different sizes (models padding to different size
            # divisibilities) are compared on the cells both cover, aligned from the image's corner
            h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
            a, b = a[..., :h, :w], b[..., :h, :w]
            a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
            r = (a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-12)
            # logged every diag_period iterations only: unsmoothed, or the writers would show
            # the median of the last 20 logged values (20 * diag_period iterations) under each
            put_scalar(f"kd_diag/pearson_{s}", r, smoothing_hint=False)

    def export_student(self, path: str) -> None:
        """Write the student alone as a checkpoint that stock detectron2 loads
        (``{"model": student.state_dict()}``; ``.pkl``: the model zoo's numpy format); a run's
        checkpoint at ``path`` is an error, not replaced. :func:`detkd.checkpoint.export_student`
        does the same from a run's checkpoint file."""
        from .checkpoint import save_student

        save_student(self.student, path)


def student_of(model):
    """The detector that is being trained: ``model.student`` of a DistillationDetector, else
    the model itself."""
    model = unwrap_model(model)
    return model.student if isinstance(model, DistillationDetector) else model
