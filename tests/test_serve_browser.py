"""``gmem serve`` in a real browser: headless Chromium loads the page against a small memory.

Chromium (Debian's ``chromium``; ``.ci/run`` installs it) runs the page's JavaScript: every task's grid
must arrive as an image, the page's ``#move-slider`` step moves the interpolation slider to 1 and must
get a new image, and a screenshot is taken (``GMEM_SCREENSHOT=PATH`` keeps it, e.g. for docs/).
Without Chromium the test says so and skips; the HTTP-level tests (tests/test_serve.py) still run.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from gmem import GANMemory

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


def _chromium(*args: str, timeout: float = 120) -> str:
    """Run headless Chromium (no network beyond loopback, a fresh profile) and return its stdout."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("browser") / "memory"
    mem = GANMemory.default()
    mem.learn("shirts", "fashion_mnist", iterations=1, batch_size=4, seed=0, progress=False)
    mem.learn("smileys", "emoji", iterations=1, batch_size=4, seed=1, progress=False)
    mem.learn("classes", "fashion_mnist", iterations=1, batch_size=4, seed=2, progress=False, labels=True)
    mem.save(directory)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "gmem.cli", "serve", str(directory), "--port", str(port)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(url + "api/memory", timeout=5).raise_for_status()
            break
        except httpx.TransportError:
            if p.poll() is not None or time.monotonic() > deadline:
                os.killpg(p.pid, signal.SIGKILL)
                pytest.fail("gmem serve did not come up")
            time.sleep(0.3)
    yield url
    os.killpg(p.pid, signal.SIGTERM)
    p.wait(timeout=30)


def test_page_in_chromium_shows_every_task_and_moves_the_slider(server, tmp_path):
    dom = _chromium("--virtual-time-budget=60000", "--dump-dom", server + "#move-slider")
    assert 'data-ready="1"' in dom, dom[-3000:]
    assert re.findall(r'<div class="task" data-task="([^"]+)">', dom) == ["source", "shirts", "smileys", "classes"]
    grids = re.findall(r'<img class="grid" alt="samples" src="blob:[^"]+" data-url="[^"]+" data-loads="(\d+)"', dom)
    assert len(grids) == 4 and all(int(k) >= 1 for k in grids), "every task's grid arrived"
    interp = re.search(r'<img id="iimg" class="grid" alt="interpolation" src="blob:[^"]+" data-url="[^"]+" '
                       r'data-loads="(\d+)"', dom)
    assert interp and int(interp.group(1)) == 2, "moving the slider fetched a new interpolation"
    assert 'id="lamv">1.00<' in dom
    assert "<option" in dom and 'class="cls"' in dom, "the conditional task has a class picker"

    shot = Path(os.environ.get("GMEM_SCREENSHOT", tmp_path / "page.png"))
    _chromium("--virtual-time-budget=60000", "--window-size=1100,1500", f"--screenshot={shot}", server)
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
