"""Step time of ``gmem learn`` (the real trainer) on 1 and N processes under torchrun (gloo on CPU).

    .venv/bin/python tools/ddp_bench.py [--data emoji --batch-size 16 --steps 10 --warmup 3 --nproc 2]

Runs :meth:`gmem.GANMemory.learn` on the embedded default base (the GP-GAN step of gmem.training:
generator update, discriminator update with R1 on reals, all-reduce of the task's trainable gradients,
Adam, EMA) through ``tests/dist_worker.py learn`` at the same global batch, for: 1 process with 1
thread, 1 process with T threads, N processes with T/N threads each (T = the cores given to the
run, ``--threads``). Prints rank 0's median wall time per iteration after the warm-up and the speed-up.
``--standin`` times the stand-in step of tests/dist_worker.py instead (no GANMemory).
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
    """Rank 0's timed iterations (seconds) of one torchrun launch with ``nproc`` processes."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER)]
        if args.standin:
            cmd += ["--out", out, "--bench", str(args.warmup), "--steps", str(args.steps), "--size", "32",
                    "--nf", "16", "--global-batch", str(args.batch_size)]
        else:
            cmd += ["learn", str(Path(out) / "memory"), args.data, "--iterations", str(args.warmup + args.steps),
                    "--batch-size", str(args.batch_size), "--lr", "1e-4", "--checkpoint-every", "1000000",
                    "--times", str(Path(out) / "times.json")]
        subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        if args.standin:
            return json.loads((Path(out) / "rank0.json").read_text())["step_s"]
        return json.loads((Path(out) / "times.json").read_text())[args.warmup:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="emoji", help="training images (default: the embedded emoji set)")
    ap.add_argument("--batch-size", type=int, default=16, help="global batch (default 16)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores shared by the processes")
    ap.add_argument("--standin", action="store_true", help="time tests/dist_worker.py's stand-in step")
    args = ap.parse_args()
    configs = [(1, 1), (1, args.threads), (args.nproc, max(1, args.threads // args.nproc))]
    what = "stand-in step (size 32, nf 16)" if args.standin else f"gmem learn on the default base, data {args.data}"
    print(f"{what}, global batch {args.batch_size}, {args.steps} timed iterations after {args.warmup} warm-up")
    base = None
    for nproc, threads in dict.fromkeys(configs):
        times = run(nproc, threads, args)
        med = statistics.median(times)
        base = base or med
        print(f"{nproc} process(es) x {threads} thread(s): median {med * 1e3:8.1f} ms/iteration "
              f"(min {min(times) * 1e3:.1f}), {base / med:.2f}x vs the first line", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
