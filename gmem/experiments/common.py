"""Pieces both experiments share: the base, thread count, command-line recording, timing."""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import platform
import time
from pathlib import Path
from typing import Callable, Hashable, Iterator, Optional, Sequence

import torch

from .. import __version__
from ..models import load_base, load_default_base
from ..models.base import base_config, default_base_info

__all__ = ["load_base_pair", "threads", "run_record", "Timer", "read_runs", "run_jobs"]


def load_base_pair(base: Optional[str] = None):
    """``(G, D)``: the base in directory ``base`` (``gmem.models.save_base`` layout) or the embedded one."""

    return load_base(base) if base else load_default_base()


@contextlib.contextmanager
def threads(n: Optional[int]) -> Iterator[None]:
    """Run the block with ``n`` torch threads (None: unchanged); the previous count is restored."""
    saved = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def base_sha256(base: Optional[str] = None) -> Optional[str]:
    """The SHA-256 of the weights of base directory ``base`` (None or "embedded": the embedded base), as
    recorded in its ``base.json``; results name the base they were measured on by it."""

    return (default_base_info() if base in (None, "embedded") else base_config(base)).get("sha256")


def read_runs(log: Path, key: Callable[[dict], Hashable]) -> dict:
    """The finished runs of a resumable experiment: ``{key(record): record}`` from its JSON-lines
    ``log`` (empty if there is none). A line cut by a crash is skipped: that run is repeated."""
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                r = json.loads(line)
                done[key(r)] = r
            except (json.JSONDecodeError, KeyError):
                continue
    return done


def run_jobs(jobs: Sequence[dict], fn: Callable[[dict], dict], log: Path, key: Callable[[dict], Hashable],
             done: dict, *, workers: int = 1, describe: Callable[[dict], str] = str) -> None:
    """``fn(job)`` for every job, in this process or in ``workers`` spawned processes (they start clean:
    no forked torch threads); each record is added to ``done`` under ``key(record)``, appended to ``log``
    and synced to disk as soon as it finishes (so :func:`read_runs` resumes after a crash), and printed
    as ``describe(record)``. ``fn`` must be importable by the workers (a module-level function)."""
    if not jobs:
        return
    with open(log, "a") as sink:
        def keep(r):
            done[key(r)] = r
            sink.write(json.dumps(r) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            print(describe(r), flush=True)

        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                keep(fn(job))
        else:
            with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for r in pool.imap_unordered(fn, jobs):
                    keep(r)


def run_record(module: str, settings: dict, argv: Optional[list] = None) -> dict:
    """What a results file says about how it was made (``argv``: the command-line arguments, if any),
    including the SHA-256 of the base when ``settings`` name one (key ``base``)."""

    return {"command": None if argv is None else " ".join(["python -m", module] + list(argv)),
            "settings": settings, "gmem_version": __version__,
            "base_sha256": base_sha256(settings["base"]) if "base" in settings else None,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "python": platform.python_version(),
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}


class Timer:
    """Accumulated seconds per key: ``with timer("gan_memory"): ...``.

    ``seconds``: wall time; ``cpu_seconds``: this process's CPU time (all threads), which other
    processes on a busy machine inflate far less than the wall time (with one thread it estimates
    the wall time on a quiet machine).
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        t0, c0 = time.time(), time.process_time()
        try:
            yield
        finally:
            self.seconds[key] = round(self.seconds.get(key, 0.0) + time.time() - t0, 2)
            self.cpu_seconds[key] = round(self.cpu_seconds.get(key, 0.0) + time.process_time() - c0, 2)
