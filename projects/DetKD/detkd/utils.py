"""Small helpers shared by the models, the distillers and the tools."""

import ctypes
import os
import platform
import re
import sys
from typing import List

import torch
from torch.nn.parallel import DataParallel, DistributedDataParallel

__all__ = [
    "file_prefix",
    "host_tensor",
    "is_run_checkpoint",
    "keep_freed_cpu_memory",
    "memory_format_of",
    "remove_run_files",
    "unwrap_model",
    "without_file_scheme",
]


def without_file_scheme(path: str) -> str:
    """``path`` without a leading ``file://`` (a local path, as DetKD takes checkpoint and
    config paths); other paths unchanged."""
    return path[len("file://") :] if path.startswith("file://") else path


def is_run_checkpoint(name: str, prefix: str = "model") -> bool:
    """Whether the file name ``name`` is one a training run saves its checkpoints under
    (detectron2's PeriodicCheckpointer, ``train.checkpointer.file_prefix``: ``model_0004999.pth``,
    ``model_final.pth``); not the student export ``model_final_student.pth``, nor a file of
    one's own such as ``model_teacher.pth``."""
    return re.fullmatch(rf"{re.escape(prefix)}_(final|\d{{7}})\.pth", name) is not None


def remove_run_files(folder: str, prefix: str = "model") -> List[str]:
    """
    Remove the files of the training run in ``folder`` that a new run there replaces: its
    checkpoints (:func:`is_run_checkpoint`), ``last_checkpoint``, the student export and
    ``metrics.json`` (detectron2's writer appends to it). For tools that retrain a folder they
    manage (``detkd.demo``, ``detkd.repro``): ``train_net.py`` refuses to start a run over the
    checkpoints of another model's run. Returns the names removed.
    """
    if not os.path.isdir(folder):
        return []
    fixed = ("last_checkpoint", "model_final_student.pth", "metrics.json")
    names = sorted(n for n in os.listdir(folder) if n in fixed or is_run_checkpoint(n, prefix))
    for name in names:
        os.remove(os.path.join(folder, name))
    return names


def host_tensor(data, device, dtype=None) -> torch.Tensor:
    """
    ``torch.tensor(data, dtype=dtype, device=device)`` for small host data (sizes, counts,
    indices) without a host-device synchronisation: a copy from pageable host memory to a CUDA
    device waits for everything queued before it, so on CUDA the data goes through pinned
    memory with a non-blocking copy (PyTorch keeps the pinned block until the copy is done).

    Args:
        data: a (nested) list of numbers or an ndarray. device: torch.device or str.

    Returns:
        Tensor on ``device``.
    """
    device = torch.device(device)
    t = torch.as_tensor(data, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def index_put_value_(x: torch.Tensor, indices, value: float) -> torch.Tensor:
    """
    ``x[indices] = value`` (advanced indexing by index tensors) in place, without a host-device
    synchronisation: for a CUDA ``x``, ``x[indices] = value`` puts the Python number in a host
    tensor and copies it to the device from pageable memory, which waits for everything queued
    (seen with ``torch.cuda.set_sync_debug_mode``); here the value is made on ``x``'s device.

    Returns:
        Tensor: ``x``.
    """
    return x.index_put_(tuple(indices), x.new_full((), value))


# glibc's <malloc.h>: mallopt's parameters, and the largest mmap threshold it takes (64-bit:
# 4 MiB * sizeof(long), the ceiling of its own dynamic threshold)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20


def keep_freed_cpu_memory() -> bool:
    """
    Have glibc's malloc keep the memory that CPU tensors free for this process's next
    allocations instead of handing it back to the OS: the heap's free top is never trimmed
    (``mallopt(M_TRIM_THRESHOLD, -1)``) and blocks up to 32 MiB come from the heap, not from
    their own mappings (``M_MMAP_THRESHOLD``; larger ones are still mapped and unmapped each
    time). A training step allocates about what the step before freed; memory returned in
    between comes back one page fault (a zeroed 4 KiB page) at a time. With glibc's defaults a
    DistillationDetector's CPU step, whose teacher, taps and losses come and go around the
    student's, faulted 250-400 MB back every step (D3ETR R50 from R101, 2 x 640^2: ~100k faults,
    5.0-5.3 s a step; 0 faults and 4.3-4.6 s with this), while the student alone faulted none.
    The process's peak memory stays the same; what the OS sees in use between steps is that
    peak, as with CUDA's caching allocator. Process-wide, for the process's lifetime; the
    trainer applies it to CPU runs (``train.keep_freed_cpu_memory``).

    Returns:
        bool: whether it was applied (False where the C library is not glibc, e.g. musl or
        macOS, or mallopt refused a value).
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # the mmap threshold first: setting either fixes glibc's dynamic one where it stands
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, -1)
    )


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-d map laid out NHWC (and not also NCHW, as when C == 1
    or H == W == 1), else ``torch.contiguous_format``."""
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if nhwc and not x.is_contiguous() else torch.contiguous_format


def unwrap_model(model):
    """Returns the module inside a (Distributed)DataParallel wrapper."""
    if isinstance(model, (DistributedDataParallel, DataParallel)):
        return model.module
    return model


def file_prefix(cfg) -> str:
    """The name prefix of a run's checkpoints (``train.checkpointer.file_prefix``, "model")."""
    return str((cfg.train.get("checkpointer", None) or {}).get("file_prefix", "model"))
