"""
Record the outputs of named submodules with forward hooks.

Distillers never fork a detector's ``forward``: they declare the submodules whose outputs they
need (``"backbone"`` for the FPN dict, ``"head"`` for a dense head,
``"proposal_generator.rpn_head"`` for the RPN, ``"anchor_generator"``, DETR decoder layers ...)
and :class:`FeatureCapture` records those outputs while the detector runs unchanged.
"""

import copy
from typing import Any, Dict, Iterable, List

import torch
from detectron2.structures import Boxes, Instances, RotatedBoxes
from torch import nn

__all__ = ["FeatureCapture"]


def _map_tensors(fn, obj):
    """Apply ``fn`` to every tensor inside nested dicts / lists / tuples and detectron2's
    ``Boxes`` / ``RotatedBoxes`` / ``Instances``, rebuilding the containers with their types (a
    namedtuple, a defaultdict with its factory)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (Boxes, RotatedBoxes)):  # e.g. an anchor generator's list[Boxes]
        return type(obj)(fn(obj.tensor))
    if isinstance(obj, Instances):
        return Instances(
            obj.image_size, **{k: _map_tensors(fn, v) for k, v in obj.get_fields().items()}
        )
    if isinstance(obj, dict):
        out = copy.copy(obj)  # the same type and attributes (a defaultdict's factory)
        for k, v in obj.items():
            out[k] = _map_tensors(fn, v)
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple: positional fields
        return type(obj)(*(_map_tensors(fn, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(fn, v) for v in obj)
    return obj


def _tensors(obj) -> List[torch.Tensor]:
    """The tensors inside nested dicts / lists / tuples, ``Boxes`` and ``Instances``, in order
    (nothing is rebuilt)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (Boxes, RotatedBoxes)):
        return [obj.tensor]
    if isinstance(obj, Instances):
        obj = obj.get_fields()
    values = (
        obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    )
    return [t for v in values for t in _tensors(v)]


def _versions(obj) -> List[int]:
    """The version counters of the tensors inside ``obj``; -1 for an inference tensor (made
    under ``torch.inference_mode``, e.g. a validation loss computed in training mode), which
    has none: its in-place changes cannot be detected."""
    return [-1 if t.is_inference() else t._version for t in _tensors(obj)]


class FeatureCapture:
    """
    Record the outputs of named submodules of a model through forward hooks.

    Used as a context manager around one forward pass::

        capture = FeatureCapture(model, ["backbone", "head"])
        with capture:
            model(batched_inputs)
        fpn = capture["backbone"]          # dict[str, Tensor], e.g. {"p3": (N, C, H, W), ...}

    Hooks are attached on ``__enter__`` and removed on ``__exit__``, so the model is untouched
    outside the context (and can be pickled, deep-copied or wrapped by DDP).

    Captured tensors keep their autograd history (gradients of a distillation loss flow back into
    the student). A later in-place op on a captured tensor would silently change what a distiller
    reads; this is detected through the tensor's version counter and reported as an error when
    the tap is read. Pass ``clone=True`` to store copies instead (costs one copy of the tap).
    Outputs made under ``torch.inference_mode`` have no version counter and are not checked.
    Containers (dicts, lists, tuples, ``Boxes``, ``Instances``) are recorded as shallow copies,
    so a later ``features["p3"] = ...`` by the model does not reach the tap.

    A tap records one call per forward: a submodule called twice inside one ``with`` block
    (e.g. a weight-shared head applied level by level) is an error, not a silently kept last
    call. A forward that raises leaves nothing recorded (no autograd graph is kept alive).
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, clone: bool = False):
        """
        Args:
            model (nn.Module): the model whose submodules are recorded.
            names (iterable[str]): dotted submodule names as in ``model.named_modules()``.
                A name that does not resolve is an error listing the valid names.
            clone (bool): store clones of the outputs instead of the outputs themselves.
        """
        self.names = list(dict.fromkeys(names))
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            valid = sorted(n for n in modules if n and n.count(".") < 3)
            raise KeyError(
                f"FeatureCapture: submodule(s) {missing} not found in {type(model).__name__}. "
                f"Valid names (up to depth 3) are: {valid}"
            )
        self._modules = {n: modules[n] for n in self.names}
        self.clone = clone
        self._handles = []
        self._outputs: Dict[str, Any] = {}
        self._versions: Dict[str, List[int]] = {}

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if name in self._outputs:
                raise RuntimeError(
                    f"FeatureCapture: '{name}' ({type(module).__name__}) was called more than "
                    "once in one forward pass; a tap records one call. Tap a submodule that "
                    "runs once per forward (e.g. the module that loops over the levels), or "
                    "one module per call."
                )
            # clone=False: new containers around the same tensors (a later replacement of an
            # entry of the model's dict is not seen by the tap; in-place ops are checked)
            output = _map_tensors((lambda t: t.clone()) if self.clone else (lambda t: t), output)
            self._outputs[name] = output
            self._versions[name] = _versions(output)

        return hook

    def __enter__(self):
        self.clear()
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, exc_type, exc, tb):
        for h in self._handles:
            h.remove()
        self._handles = []
        if exc_type is not None:
            self.clear()  # a failed forward's taps (and the autograd graph they hold) go now
        return False

    def clear(self):
        """Forget all recorded outputs."""
        self._outputs = {}
        self._versions = {}

    def __contains__(self, name: str) -> bool:
        return name in self._outputs

    def __getitem__(self, name: str):
        """
        Returns the recorded output of submodule ``name``.

        Raises:
            KeyError: if ``name`` was not requested, or its hook did not fire during the forward
                (e.g. the detector never called that submodule).
            RuntimeError: if a captured tensor was modified in place after it was recorded.
        """
        if name not in self._modules:
            raise KeyError(f"FeatureCapture: '{name}' is not a recorded tap; taps: {self.names}")
        if name not in self._outputs:
            raise KeyError(
                f"FeatureCapture: the hook on '{name}' did not fire during the forward pass "
                f"(the model never called that submodule). Recorded: {sorted(self._outputs)}"
            )
        out = self._outputs[name]
        now = _versions(out)
        if now != self._versions[name]:
            raise RuntimeError(
                f"FeatureCapture: an output of '{name}' was modified in place after it was "
                "recorded; construct the capture with clone=True for this model (in a "
                "DistillationDetector: construct it with clone_taps=True, e.g. the config "
                "override model.clone_taps=True)."
            )
        return out

    def as_dict(self) -> Dict[str, Any]:
        """Returns the outputs of all taps, checked as in :meth:`__getitem__` (so a tap whose
        hook did not fire is an error)."""
        return {n: self[n] for n in self.names}
