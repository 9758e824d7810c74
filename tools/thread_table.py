#!/usr/bin/env python
"""The thread table of the README: torch threads x OpenMP wait policy, quiet and beside one busy process.

Two measurements, each for ``threads in (1, 2)`` x ``OMP_WAIT_POLICY in (active, passive)``:

* ``step``: one GAN-memory training step (:func:`benchmarks.e2e.train_step_fn`, the embedded base's
  size: 32 px, nf 32, batch 16, the C++ CPU backend). One process per setting (OpenMP reads the wait
  policy once, when torch loads it, and spinning workers of a 2-thread region would slow a later
  1-thread one), ``--trials`` trials of ``--steps`` steps each, the settings in turn ``--repeats``
  times so that each sees the same background load. Reported: the fastest trial (what a quiet moment
  gives) and the median trial, in ms per step.
* ``learn``: wall time of ``gmem learn MEM t emoji --iterations N --no-score`` (start-up included), the
  four settings in turn with the steps above; reported: fastest and median.

Then the same again with one competing busy process (a Python spin loop, niced to 0 like a user's
job). The background load of other users is printed (load average) next to each block: on a shared
machine, "quiet" means only that this script started no competitor.

Usage::

    OMP_NUM_THREADS= python tools/thread_table.py [--steps 3] [--trials 3] [--iterations 24] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("ACTIVE", "PASSIVE")
THREADS = (1, 2)


def _child_steps(threads: int, steps: int, trials: int) -> None:
    """In a child process with ``threads`` torch threads: ``trials`` timings of ``steps`` steps; prints
    a JSON list of ms per step. One thread count per process: with the spinning wait policy, OpenMP
    workers left from a 2-thread region would slow a later 1-thread region down in the same process."""
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.e2e import Model, train_step_fn

    torch.set_num_threads(threads)
    model = Model("base32", size=32, nf=32, z_dim=128, embed_size=64, batch=16, replay_batch=16, replay_tasks=1)
    step = train_step_fn(model, "cpu", "cpu")
    step()  # warm-up
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) * 1e3 / steps)
    print(json.dumps(times))


def _spinner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _steps(threads: int, policy: str, steps: int, trials: int) -> list[float]:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, __file__, "--child", str(threads), "--steps", str(steps), "--trials",
                          str(trials)], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _learn(threads: int, policy: str, iterations: int, work: Path) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": policy, "OMP_NUM_THREADS": str(threads)}
    memory = work / f"m{time.monotonic_ns()}"
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "gmem"), "learn", str(memory), "t", "emoji",
                    "--iterations", str(iterations), "--no-score", "--no-progress", "--threads", str(threads)],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _load() -> str:
    return "%.1f" % os.getloadavg()[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3, help="training steps per trial")
    p.add_argument("--trials", type=int, default=3, help="trials per process")
    p.add_argument("--iterations", type=int, default=24, help="iterations of each gmem learn run")
    p.add_argument("--repeats", type=int, default=2, help="gmem learn runs per setting")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child_steps(args.child, args.steps, args.trials)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for busy in (False, True):
            spinner = _spinner() if busy else None
            try:
                load_start = _load()
                steps = {(t, pol): [] for t in THREADS for pol in POLICIES}
                learn = {(t, pol): [] for t in THREADS for pol in POLICIES}
                for _ in range(args.repeats):  # the settings in turn, so each sees the same background load
                    for t in THREADS:
                        for pol in POLICIES:
                            steps[(t, pol)] += _steps(t, pol, args.steps, args.trials)
                            learn[(t, pol)].append(_learn(t, pol, args.iterations, Path(tmp)))
                load_end = _load()
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
            for t in THREADS:
                for pol in POLICIES:
                    s, lr = steps[(t, pol)], learn[(t, pol)]
                    rows.append({"busy": busy, "threads": t, "policy": pol.lower(),
                                 "step_ms_min": min(s), "step_ms_median": statistics.median(s),
                                 "learn_s_min": min(lr), "learn_s_median": statistics.median(lr),
                                 "load": f"{load_start}-{load_end}"})
    print("| competing busy process | threads | `OMP_WAIT_POLICY` | step ms (fastest / median) "
          "| `gmem learn` s (fastest / median) | load average |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'one' if r['busy'] else 'none'} | {r['threads']} | {r['policy']} "
              f"| {r['step_ms_min']:.0f} / {r['step_ms_median']:.0f} "
              f"| {r['learn_s_min']:.1f} / {r['learn_s_median']:.1f} | {r['load']} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
