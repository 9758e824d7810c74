"""Step time of one task on 1 and 2 processes under torchrun (gloo on CPU, NCCL on GPUs).

    .venv/bin/python tools/ddp_bench.py [--size 32 --nf 16 --global-batch 16 --steps 10]

Times the stand-in GAN memory step of tests/dist_worker.py (generator update, discriminator update
with R1, gradient all-reduce of the task's parameters, Adam, EMA) at the same global batch, for:
1 process with 1 thread, 1 process with T threads, N processes with T/N threads each (T = the
cores given to the run, ``--threads``). Prints the median step time of rank 0 and the speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, threads: int, args) -> list[float]:
    """Rank 0's step times (seconds) of one torchrun launch with ``nproc`` processes."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER),
               "--out", out, "--bench", str(args.warmup), "--steps", str(args.steps), "--size", str(args.size),
               "--nf", str(args.nf), "--global-batch", str(args.global_batch)]
        subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        return json.loads((Path(out) / "rank0.json").read_text())["step_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--nf", type=int, default=16)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores shared by the processes")
    args = ap.parse_args()
    configs = [(1, 1), (1, args.threads), (args.nproc, max(1, args.threads // args.nproc))]
    print(f"stand-in GAN memory step, size {args.size}, nf {args.nf}, global batch {args.global_batch}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    base = None
    for nproc, threads in dict.fromkeys(configs):
        times = run(nproc, threads, args)
        med = statistics.median(times)
        base = base or med
        print(f"{nproc} process(es) x {threads} thread(s): median {med * 1e3:8.1f} ms/step "
              f"(min {min(times) * 1e3:.1f}), {base / med:.2f}x vs the first line", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
