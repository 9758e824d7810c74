"""Per-call cost of the gmem ops next to plain ATen ops, on the public API only.

``python -m benchmarks.percall [--threads 1] [--rounds 400] [--json FILE]``

What it times (float32, on the CPU, with ``--threads`` threads; interleaved: round after round, one
call of each provider, so that every provider sees the same machine conditions; each call's process
CPU time (``time.process_time``: time the process waits for a busy machine is left out), median):

* ``madafm_weight`` forward+backward at ``W[16,16,3,3]`` (the per-call case: a few microseconds of
  arithmetic, so the time is the cost of getting from Python to the kernel and back), for every
  backend here, and ``aten``: one ATen op with autograd writing a tensor of the same size
  (``torch.addcmul`` of the broadcast styles and the weight, forward and backward);
* the weight build (``madafm_weight``) at the sizes of the quick suite, each backend's time and its
  ratio to ``reference``.

Only public names are used (``gmem.ops.madafm_weight(..., backend=...)``), so the same script
measures any checkout of gmem: run it with ``PYTHONPATH=<checkout>``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import gmem.ops as ops

# (name, C_out, C_in, k, stacked tasks or 0, pass)
SIZES = [
    ("per-call W[16,16,3,3]", 16, 16, 3, 0, "fwd+bwd"),
    ("W[64,128,3,3]", 64, 128, 3, 0, "fwd+bwd"),
    ("W[256,512,3,3]", 256, 512, 3, 0, "fwd+bwd"),
    ("W[512,512,3,3]", 512, 512, 3, 0, "fwd+bwd"),
    ("W[512,512,3,3] T8", 512, 512, 3, 8, "fwd"),
]


def _case(o: int, i: int, k: int, tasks: int, pass_: str, backend: str):
    torch.manual_seed(0)
    wn = ops.normalize_weight(torch.randn(o, i, k, k))[0]
    lead = (tasks,) if tasks else ()
    bwd = pass_ == "fwd+bwd"
    g = (torch.rand(*lead, o, i) + 0.5).requires_grad_(bwd)
    b = (0.1 * torch.randn(*lead, o, i)).requires_grad_(bwd)
    dy = torch.randn(*lead, o, i, k, k)
    if backend == "aten":
        def forward():
            return torch.addcmul(b[..., None, None], g[..., None, None], wn)
    else:
        def forward():
            return ops.madafm_weight(wn, g, b, backend=backend)
    if not bwd:
        def run():
            with torch.no_grad():
                return forward()
        return run

    def step():
        return torch.autograd.grad(forward(), (g, b), dy)
    return step


def measure(fns: dict, rounds: int) -> dict:
    for fn in fns.values():
        for _ in range(5):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.process_time()  # CPU time of this process: a busy machine's waits are left out
            fn()
            times[name].append((time.process_time() - t0) * 1e6)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.percall", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=400, help="timed rounds at the per-call size")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    backends = [b for b in ops.available_backends() if b in ("reference", "cpu")]
    records = []
    print(f"torch {torch.__version__}, {args.threads} thread(s), backends {backends}; medians in microseconds")
    for name, o, i, k, tasks, pass_ in SIZES:
        providers = backends + (["aten"] if name.startswith("per-call") else [])
        fns = {p: _case(o, i, k, tasks, pass_, p) for p in providers}
        rounds = args.rounds if o * i * k * k < 10**5 else max(20, args.rounds // 20)
        med = measure(fns, rounds)
        ref = med["reference"]
        cells = []
        for p in providers:
            ratio = ref / med[p]
            cells.append(f"{p} {med[p]:9.1f} us (ref/{p} {ratio:4.2f}x)")
            records.append({"op": "madafm_weight", "case": f"{name} {pass_}", "backend": p, "us": round(med[p], 2),
                            "ratio_to_reference": round(ratio, 3), "threads": args.threads, "rounds": rounds})
        if "aten" in med:
            for p in backends:
                cells.append(f"{p}/aten {med[p] / med['aten']:4.2f}x")
        print(f"{name:22s} {pass_:8s} " + " | ".join(cells))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
