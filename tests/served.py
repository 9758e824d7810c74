"""What the ``gmem serve`` tests share: a small memory and the real command on a free loopback port."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gmem import GANMemory

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["shirts", "faces", "classes"]  # the tasks of small_memory, in order; "classes" is conditional


def small_memory(directory: Path) -> Path:
    """Learn :data:`TASKS` on the embedded base (a few iterations each) and save them to ``directory``."""
    mem = GANMemory.default()
    mem.learn("shirts", "fashion_mnist", iterations=1, batch_size=4, seed=0, progress=False)
    mem.learn("faces", "emoji", iterations=1, batch_size=4, seed=1, progress=False)
    # a large step, so that the classes differ visibly after two iterations
    mem.learn("classes", "fashion_mnist", iterations=2, batch_size=16, seed=2, progress=False, labels=True,
              lr=1e-2)
    mem.save(directory)
    return directory


class Served:
    """``url`` of the running server; ``output`` (stdout and stderr) once it has stopped."""

    url: str
    output: str = ""


@contextlib.contextmanager
def serving(directory: Path, deadline_s: float = 120):
    """Run ``gmem serve directory`` on a free loopback port until the block ends (SIGTERM)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "gmem.cli", "serve", str(directory), "--port", str(port)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    served = Served()
    served.url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                httpx.get(served.url + "api/memory", timeout=5).raise_for_status()
                break
            except httpx.TransportError:
                if p.poll() is not None or time.monotonic() > deadline:
                    os.killpg(p.pid, signal.SIGKILL)
                    pytest.fail(f"gmem serve did not come up:\n{p.communicate()[0][-3000:]}")
                time.sleep(0.3)
        yield served
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
        served.output = p.communicate(timeout=30)[0]
