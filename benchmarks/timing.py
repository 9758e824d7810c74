"""Timing and peak memory of a callable.

Method: warm-up calls first (they also absorb lazy initialisation, autotuning and the first
compile), then repeated timed calls; the reported time is the median.

* CPU: wall clock (``time.perf_counter``) around each call, with the thread count fixed by the
  caller (``torch.set_num_threads``, recorded with the results); or, with ``Budget.clock = "cpu"``,
  this process's CPU time (``time.process_time``, all its threads), which leaves out the time the
  core spends on other processes or the hypervisor: on a shared virtual machine that time comes in
  bursts that make wall-clock medians of sub-millisecond calls wander by tens of percent.
* GPU: CUDA events around each call, and before each call the L2 cache is flushed by writing a
  buffer larger than it, so every repetition reads its inputs from HBM like the real workload
  (the same method as ``triton.testing.do_bench``).

Peak memory is the largest amount of memory the call allocates beyond what existed before it
(``torch.cuda.max_memory_allocated`` on GPU; on CPU the running sum of the allocator events seen
by the profiler during one call).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

#: the clocks a CPU call can be timed with (Budget.clock)
CPU_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Budget:
    """How long to measure: at least ``min_reps`` timed calls, more until ``min_time_s`` of
    timed calls (at most ``max_reps``), after ``warmup`` calls (at least ``warmup_s`` seconds)."""

    warmup: int = 2
    warmup_s: float = 0.05
    min_reps: int = 5
    max_reps: int = 100
    min_time_s: float = 0.5
    #: the clock of a CPU call: "wall" (time.perf_counter) or "cpu" (time.process_time)
    clock: str = "wall"

    def __post_init__(self):
        if self.clock not in CPU_CLOCKS:
            raise ValueError(f"Budget.clock must be one of {sorted(CPU_CLOCKS)}, got {self.clock!r}")


# Quick: the time budget (0.1 s of timed calls) decides, up to 200 calls: sub-millisecond cases
# then get enough calls for a stable median (20 calls of a 50 us op measured 2.5x its steady time).
QUICK = Budget(warmup=3, warmup_s=0.02, min_reps=7, max_reps=200, min_time_s=0.1)
FULL = Budget(warmup=3, warmup_s=0.1, min_reps=10, max_reps=200, min_time_s=1.0)
TINY = Budget(warmup=1, warmup_s=0.0, min_reps=2, max_reps=3, min_time_s=0.0)

_L2_FLUSH: dict[int, torch.Tensor] = {}


def _flush_buffer(device_index: int) -> torch.Tensor:
    # 256 MiB: larger than the L2 of any current GPU (H100: 50 MB, H200: 60 MB)
    if device_index not in _L2_FLUSH:
        _L2_FLUSH[device_index] = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device=f"cuda:{device_index}")
    return _L2_FLUSH[device_index]


def _time_one(fn: Callable[[], object], device: str, flush: Optional[torch.Tensor], clock: str = "wall") -> float:
    """Milliseconds of one call (CUDA events after an L2 flush on GPU, ``clock`` on CPU)."""
    if device != "cuda":
        now = CPU_CLOCKS[clock]
        t0 = now()
        fn()
        return (now() - t0) * 1e3
    flush.zero_()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


def _time_reps(fn: Callable[[], object], device: str, budget: Budget) -> list[float]:
    """Warm up, then time single calls until the budget's repetitions and time are reached."""
    flush = _flush_buffer(torch.cuda.current_device()) if device == "cuda" else None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(max(budget.warmup, 1)):
        fn()
    sync()
    while time.perf_counter() - start < budget.warmup_s:
        fn()
        sync()
    times, spent = [], 0.0
    while len(times) < budget.max_reps and (len(times) < budget.min_reps or spent < budget.min_time_s):
        ms = _time_one(fn, device, flush, budget.clock)
        times.append(ms)
        spent += ms / 1e3
    return times


def measure_many(fns: dict[str, Callable[[], object]], device: str, budget: Budget) -> dict[str, dict]:
    """Time several providers of one case, interleaved: round after round, one call of each.

    On a shared or thermally varying machine every provider then sees the same conditions, so
    their ratios stay meaningful even when absolute times drift. A provider stops being timed
    once it has ``min_reps`` calls and ``min_time_s`` of timed calls (or ``max_reps``).
    Returns ``{name: stats}`` as :func:`measure`.
    """
    flush = _flush_buffer(torch.cuda.current_device()) if device == "cuda" else None
    for fn in fns.values():  # warm-up
        start = time.perf_counter()
        for _ in range(max(budget.warmup, 1)):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        while time.perf_counter() - start < budget.warmup_s:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}

    def done(name: str) -> bool:
        t = times[name]
        return len(t) >= budget.max_reps or (len(t) >= budget.min_reps and sum(t) / 1e3 >= budget.min_time_s)

    while not all(done(name) for name in fns):
        for name, fn in fns.items():
            if not done(name):
                times[name].append(_time_one(fn, device, flush, budget.clock))
    return {name: _stats(t) for name, t in times.items()}


def measure(fn: Callable[[], object], device: str, budget: Budget) -> dict:
    """Time ``fn``: ``{"ms": median, "ms_min", "ms_mean", "ms_stdev", "reps"}`` (milliseconds)."""
    return _stats(_time_reps(fn, device, budget))


def _stats(times: list[float]) -> dict:
    return {
        "ms": statistics.median(times),
        "ms_min": min(times),
        "ms_mean": statistics.fmean(times),
        "ms_stdev": statistics.stdev(times) if len(times) > 1 else 0.0,
        "reps": len(times),
    }


def peak_memory(fn: Callable[[], object], device: str) -> int | None:
    """Bytes allocated by one call of ``fn`` at its peak, beyond what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    try:
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = prof.profiler.kineto_results.events()
        allocations = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except Exception:  # noqa: BLE001 - the profiler's internals vary between versions: then unknown
        return None
    current = peak = 0
    for _, nbytes in allocations:
        current += nbytes
        peak = max(peak, current)
    return int(peak)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ start/stop chatter on file descriptor 2 (restored afterwards)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
