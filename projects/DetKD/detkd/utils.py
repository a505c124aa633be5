"""Small device helpers shared by the models and the distillers."""
import torch

__all__ = ["host_tensor"]


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
