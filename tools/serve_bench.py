"""Throughput of ``gmem serve``: concurrent clients, batched vs one forward per request.

    .venv/bin/python tools/serve_bench.py [--clients 16] [--requests 6] [--n 16] [--json FILE]

Learns a memory of ``--clients`` tasks (1 iteration each: the cost of sampling does not depend on how
long a task trained), then, for each mode, starts ``gmem serve`` on a free loopback port in its own
process (``--batching on --window-ms 5``, or ``--batching off``) and runs ``--clients`` client threads, each asking its
own task ``--requests`` times (``n`` samples, a new seed each time) as fast as answers come. The run is
bounded in requests and in time (``--deadline`` seconds per mode) and stops by itself. Prints requests
per second, p50/p99 latency and the ratio; every batched answer is checked against the same request
answered alone (same bytes). Only loopback addresses are used.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_memory(directory: Path, tasks: int) -> list[str]:
    from gmem import GANMemory

    mem = GANMemory.default()
    data = ("fashion_mnist", "emoji", "oxygen_icons")
    for k in range(tasks):
        mem.learn(f"task{k:02d}", data[k % len(data)], iterations=1, batch_size=4, seed=k, progress=False)
    mem.save(directory)
    return mem.tasks


class Server:
    """``gmem serve MEMORY`` in its own process on a free loopback port, until ``stop()``."""

    def __init__(self, memory: Path, *flags: str, threads: int):
        self.port = _free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "gmem.cli", "serve", str(memory), "--port",
                                      str(self.port), *flags], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                httpx.get(self.url + "/api/memory", timeout=5).raise_for_status()
                return
            except httpx.TransportError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit("serve_bench: gmem serve did not start") from None
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def load(url: str, tasks: list[str], requests: int, n: int, deadline_s: float) -> dict:
    """Each client thread asks its own task ``requests`` times; returns latencies and the answers."""
    latencies, answers, errors = [], {}, []
    stop_at = time.monotonic() + deadline_s
    barrier = threading.Barrier(len(tasks))

    def client(task: str) -> None:
        with httpx.Client(base_url=url, timeout=deadline_s) as c:
            barrier.wait()
            for r in range(requests):
                if time.monotonic() > stop_at:
                    return
                body = {"task": task, "n": n, "seed": r}
                t0 = time.perf_counter()
                resp = c.post("/sample", json=body)
                latencies.append(time.perf_counter() - t0)
                if resp.status_code != 200:
                    errors.append(resp.text)
                answers[(task, r)] = resp.content

    threads = [threading.Thread(target=client, args=(t,)) for t in tasks]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"requests": len(lat), "seconds": wall, "rps": len(lat) / wall, "errors": errors,
            "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "answers": answers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=6, help="requests per client (default 6)")
    p.add_argument("--n", type=int, default=16, help="samples per request (default 16)")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    p.add_argument("--deadline", type=float, default=300, help="seconds per mode at most (default 300)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        memory = Path(tmp) / "memory"
        tasks = make_memory(memory, args.clients)
        results = {}
        for mode, flags in (("batched", ("--batching", "on", "--window-ms", "5")),
                            ("unbatched", ("--batching", "off"))):
            server = Server(memory, *flags, threads=args.threads)
            try:
                load(server.url, tasks[:2], 1, args.n, args.deadline)  # warm-up
                results[mode] = load(server.url, tasks, args.requests, args.n, args.deadline)
                if mode == "batched":  # every batched answer equals the same request answered alone
                    alone = {}
                    with httpx.Client(base_url=server.url, timeout=args.deadline) as c:
                        for task, r in results[mode]["answers"]:
                            alone[(task, r)] = c.post("/sample", json={"task": task, "n": args.n, "seed": r}).content
                    results[mode]["same_bytes_alone"] = all(alone[k] == v for k, v in results[mode]["answers"].items())
            finally:
                server.stop()
    for r in results.values():
        del r["answers"]
    ratio = results["batched"]["rps"] / results["unbatched"]["rps"]
    record = {"clients": args.clients, "requests_per_client": args.requests, "n": args.n, "threads": args.threads,
              "load_before": os.getloadavg()[0], "modes": results, "throughput_ratio": ratio}
    for mode, r in results.items():
        print(f"{mode:>10}: {r['requests']} requests in {r['seconds']:.1f} s = {r['rps']:.2f} req/s, "
              f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, errors {len(r['errors'])}")
    print(f"batched / unbatched throughput: {ratio:.2f}x; batched answers equal to alone: "
          f"{results['batched']['same_bytes_alone']}")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0 if results["batched"]["same_bytes_alone"] and not any(r["errors"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
