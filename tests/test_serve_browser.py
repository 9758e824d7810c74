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
import subprocess
import tempfile
from pathlib import Path

import pytest
from served import TASKS, serving, small_memory

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
    with serving(small_memory(tmp_path_factory.mktemp("browser") / "memory")) as served:
        yield served.url


def test_page_in_chromium_shows_every_task_and_moves_the_slider(server, tmp_path):
    dom = _chromium("--virtual-time-budget=60000", "--dump-dom", server + "#move-slider")
    assert 'data-ready="1"' in dom, dom[-3000:]
    assert re.findall(r'<div class="task" data-task="([^"]+)">', dom) == ["source", *TASKS]
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
