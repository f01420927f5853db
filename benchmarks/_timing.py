"""Timing helper shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

import statistics
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn, device, repeats, warmup=1):
    """Median wall time of fn() in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
