"""The benchmark's measuring helpers (the benchmarks themselves print ratios, they are not tests)."""
import importlib.util
import os

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kd_overhead():
    spec = importlib.util.spec_from_file_location("kd_overhead", os.path.join(REPO, "benchmarks", "kd_overhead.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_peak_memory_of_a_known_allocation_pattern():
    kd = _kd_overhead()
    kept = torch.ones(250_000)  # 1 MB allocated before the call and used in it

    def step():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(2_000_000)  # 8 MB: a + b + kept = 13 MB live
        del a
        c = torch.empty(500_000)  # 2 MB: b + c + kept = 11 MB
        return (b.sum() + c.sum() + kept.sum()).item()

    peak = kd._peak(step, torch.device("cpu"))
    assert peak is not None
    assert 13_000_000 <= peak <= 13_000_000 + 4096, peak
