"""Timing and argument helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

import argparse
import math
import statistics
import time
from pathlib import Path

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


def _int_at_least(low: int):
    """argparse type: an integer >= ``low`` (a count of 0 crashed the scripts late, or measured
    nothing; a negative warm-up shortened the timed rounds)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def seed_int(text: str) -> int:
    """argparse type: a seed in [0, 2**63 - 1) (a script that also seeds with ``seed + 1`` overflowed
    torch.Generator's signed 64 bits only when it got there, after the parts before it had run)."""
    value = non_negative_int(text)
    if value >= 2**63 - 1:
        raise argparse.ArgumentTypeError(f"expected an integer below 2**63 - 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (a negative or nan limit silently turned a layer off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def json_path(text: str) -> Path:
    """argparse type: a file to write the results to, in a folder that exists (checked before the
    runs: the results were lost when the write failed at the end)."""
    path = Path(text)
    if path.is_dir() or not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: expected a file in an existing folder")
    return path


def device_arg(text: str) -> torch.device:
    """argparse type: a torch device this machine has, cpu or cuda (``cuda`` without a GPU, ``cuda:N``
    past the last GPU, or another type such as ``mps`` or ``meta`` was a traceback later)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu or cuda, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda (the devices these scripts time), got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: torch sees no CUDA GPU here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here")
    return device
