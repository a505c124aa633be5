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


def test_ratio_spread_is_the_range_of_per_round_median_ratios():
    kd = _kd_overhead()
    # 2 rounds of 3 calls: medians (s, t, kd) = (1, 1, 2.2) then (2, 1, 3.9); outliers ignored
    t_s, t_t = [1, 1, 5, 2, 2, 0], [1, 1, 1, 1, 1, 1]
    t_kd = [2.2, 0, 9, 3.9, 0, 3.9]
    low, high = kd._ratio_spread(t_s, t_t, t_kd, rounds=2)
    assert abs(low - 1.1) < 1e-12 and abs(high - 1.3) < 1e-12
    assert kd._ratio_spread([1], [1], [1], rounds=1) is None


def test_cpu_peak_counts_the_resident_modules_weights_that_the_call_does_not_run():
    import pytest
    from torch import nn

    kd = _kd_overhead()
    teacher = nn.Sequential(nn.Linear(500, 500), nn.Linear(500, 100))  # 1,002,000 + 200,400 bytes
    x = torch.ones(1, 500)  # 2000 bytes, used by the call

    def first_layer_only():
        with torch.no_grad():
            teacher[0](x)  # output (1, 500): 2000 bytes

    def nothing_of_the_teacher():
        torch.empty(250_000).fill_(1.0)  # 1 MB

    # the first layer's weights are used (seen by the profiler), the second's added as resident
    assert kd._peak(first_layer_only, torch.device("cpu"), teacher) == 1_002_000 + 2000 + 2000 + 200_400
    assert kd._peak(nothing_of_the_teacher, torch.device("cpu"), teacher) == 1_000_000 + 1_202_400

    def broken():
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):  # not hidden as "no memory column"
        kd._peak(broken, torch.device("cpu"), teacher)
