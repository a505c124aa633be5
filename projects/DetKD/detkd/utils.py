"""Small helpers shared by the models, the distillers and the tools."""
import torch

__all__ = ["host_tensor", "memory_format_of", "without_file_scheme"]


def without_file_scheme(path: str) -> str:
    """``path`` without a leading ``file://`` (a local path, as DetKD takes checkpoint and
    config paths); other paths unchanged."""
    return path[len("file://"):] if path.startswith("file://") else path


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


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-d map laid out NHWC (and not also NCHW, as when C == 1
    or H == W == 1), else ``torch.contiguous_format``."""
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if nhwc and not x.is_contiguous() else torch.contiguous_format
