"""The clone's ``.venv/bin`` runs the README's commands as written (tools/venv.sh).

``tools/venv.sh`` rewrites every console script of the shared environment (``torchrun``, ``pytest``,
``pytorch-fid``, ...) to run the clone's python, the one that imports this clone's gmem. These tests run
those scripts from outside the clone, with no PYTHONPATH, as a user with ``.venv`` activated would.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gmem import GANMemory

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.prefix) / "bin"
DEADLINE_S = 300  # three torch imports and two ranks on a loaded 2-core machine

pytestmark = pytest.mark.skipif(
    not (Path(sys.prefix) / ".gmem-shared").is_file(),
    reason="not running from an environment made by tools/venv.sh (make test VENV=system)",
)


def _env() -> dict:
    """The caller's environment without torchrun's variables or a PYTHONPATH: the scripts must find gmem
    through the environment alone."""
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith(("TORCHELASTIC_", "MASTER_")) and k not in (
               "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    p = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"{cmd[0]} did not end within {DEADLINE_S} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out)


@pytest.mark.parametrize("script", ["gmem", "torchrun", "pytest", "pytorch-fid", "ruff"])
def test_console_scripts_are_in_the_venv(script, tmp_path):
    path = VENV_BIN / script
    assert path.is_file() and os.access(path, os.X_OK), f"{path} missing: the README's `{script}` would fail"
    head = path.read_bytes()[:200]
    if head.startswith(b"#!"):  # a Python script: it must run the clone's python, which imports this gmem
        assert head.split(b"\n")[0] == b"#!" + str(VENV_BIN / "python").encode()
    r = _run([str(path), "--help"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:]


def test_readme_torchrun_line_through_the_venv(tmp_path):
    """README "Scale-out": ``torchrun --nproc_per_node 2 -m gmem.cli learn MEMORY NAME DATA ...`` (gloo)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    memory = tmp_path / "memory"
    r = _run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(port), "-m", "gmem.cli", "learn", str(memory), "shirts", "fashion_mnist",
              "--iterations", "2", "--batch-size", "4", "--no-score", "--no-progress"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:]
    assert GANMemory.load(memory).tasks == ["shirts"]
