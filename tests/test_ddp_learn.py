"""The real trainer under torchrun: ``GANMemory.learn`` / ``gmem learn`` / ``train-base`` on 2 processes.

Two launches of ``python -m torch.distributed.run`` (gloo, 127.0.0.1) share one story: a script runs
``GANMemory.learn`` (and a tiny ``train_base``) on 2 ranks and rank 1 is killed (SIGKILL) after
iteration 2; the run must fail with a clear message in bounded time. Then ``gmem learn`` on 2 ranks,
the same command a user would rerun, resumes from the checkpoint and finishes; its memory must match
one process trained on the same global batch. The killed run's checkpoint also resumes in one process.
Last, two plain `gmem learn` processes, one task each, write into one memory at the same time.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_worker import learn_run_dir

from gmem import GANMemory
from gmem import distributed as dist
from gmem.cli import main as cli_main
from gmem.data import as_dataset
from gmem.train_base import train_base
from gmem.training import RealBatches

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE")
LAUNCH_DEADLINE_S = 300.0  # importing torch 3 times on a loaded 2-core machine takes most of it
COLLECTIVE_TIMEOUT_S = 60
ITERATIONS, BATCH, LR, KILL_AT = 3, 4, 1e-3, 2
BASE = dict(iterations=2, size=16, nf=8, z_dim=16, batch_size=4, lr=1e-3)  # the worker's train_base (tiny)
# Tolerances, 2 ranks vs 1 process (float32, 3 Adam steps at lr 1e-3, EMA with warm-up). The ranks sum
# each gradient in another order; Adam divides by sqrt(v), so an entry whose gradient is nearly zero
# can move by up to a few percent of one step (seen: 3.4e-5 on 1 of 431,585 entries), while the
# median entry agrees to ~1e-9. A missing or wrong all-reduce moves the median by about a step (1e-3).
TOL_MAX, TOL_MEDIAN = 2e-4, 1e-6


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, nproc: int = 2) -> dict:
    """Run ``torchrun --nproc_per_node nproc ARGS`` to its end (or the deadline, then stop it all)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", GMEM_DIST_TIMEOUT=str(COLLECTIVE_TIMEOUT_S),
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "--monitor_interval", "0.2", *map(str, args)]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)  # its own process group: a timeout stops the ranks too
    try:
        output, _ = p.communicate(timeout=LAUNCH_DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        output, _ = p.communicate()
        pytest.fail(f"torchrun did not end within {LAUNCH_DEADLINE_S} s:\n{output[-3000:]}")
    return {"rc": p.returncode, "output": output, "seconds": time.monotonic() - t0}


def _learn(data, out_dir=None, callback=None) -> GANMemory:
    mem = GANMemory.default()
    mem.learn("t", as_dataset(str(data), mem.size, mem.channels), iterations=ITERATIONS, batch_size=BATCH, seed=0,
              lr=LR, progress=False, out_dir=out_dir, checkpoint_every=1, callback=callback)
    return mem


def _tensors(mem: GANMemory) -> dict:
    mem.sample("t", 1, seed=0)  # a loaded memory reads its task file when first used
    return mem.registry.task_tensors("t")


def _assert_close(got: dict, want: dict, start: dict) -> None:
    assert sorted(got) == sorted(want) and got
    diff = torch.cat([(got[k].double() - want[k].double()).abs().flatten() for k in want])
    moved = torch.cat([(want[k].double() - start[k].double()).abs().flatten() for k in want])
    assert float(moved.median()) > 100 * TOL_MEDIAN  # training moved the parameters: not a vacuous check
    assert float(diff.max()) < TOL_MAX and float(diff.median()) < TOL_MEDIAN, (float(diff.max()), float(diff.median()))


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "images.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    return path


@pytest.fixture(scope="module")
def reference(data):
    """One process, global batch BATCH: the task's tensors before and after ITERATIONS iterations."""
    start = GANMemory.default()
    start.registry.add("t", None, {"name": "t"})
    return {"start": start.registry.task_tensors("t"), "end": _tensors(_learn(data))}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Rank 1 of a 2-process script is killed after iteration KILL_AT; then `gmem learn` reruns on 2."""
    tmp = tmp_path_factory.mktemp("ddp")
    memory, base = tmp / "memory", tmp / "base"
    killed = _torchrun(WORKER, "learn", memory, data, "--iterations", ITERATIONS, "--batch-size", BATCH, "--lr", LR,
                       "--kill-at", KILL_AT, "--train-base", base)
    run_dir = learn_run_dir(memory, "t")
    killed["saved_memory"] = (memory / "manifest.json").exists()
    if not (run_dir / "checkpoint.pt").is_file():
        pytest.fail(f"the killed run left no checkpoint (rc {killed['rc']}):\n{killed['output'][-3000:]}")
    shutil.copytree(run_dir, tmp / "copy")  # what the killed run left, for the one-process resume
    rerun = _torchrun("-m", "gmem.cli", "learn", memory, "t", data, "--iterations", ITERATIONS, "--batch-size", BATCH,
                      "--lr", LR, "--checkpoint-every", 1, "--no-score")
    return {"killed": killed, "rerun": rerun, "memory": memory, "run_dir": run_dir, "copy": tmp / "copy",
            "base": base}


def test_killing_a_rank_fails_the_run_with_a_clear_message(runs):
    killed, run_dir = runs["killed"], runs["run_dir"]
    out = killed["output"]
    assert killed["rc"] != 0, out[-3000:]
    assert "SIGKILL" in out and "rank" in out, out[-3000:]  # torchrun's summary names the killed rank
    assert "PeerFailure" in out and "rank 0 of 2" in out, out[-3000:]  # the survivor says why it stops
    assert "rerun the same command" in out and str(run_dir) in out
    assert killed["seconds"] < COLLECTIVE_TIMEOUT_S + 120  # bounded: no hang (launch time included)
    assert not killed["saved_memory"]
    assert not list(run_dir.glob("*.tmp"))


def test_the_rerun_resumes_on_two_processes_and_matches_one_process(runs, reference):
    rerun = runs["rerun"]
    out = rerun["output"]
    assert rerun["rc"] == 0, out[-3000:]
    assert out.count("(resumed)") == 1 and out.count("learned task 't'") == 1, out  # rank 0 alone reports
    mem = GANMemory.load(runs["memory"])
    assert mem.tasks == ["t"] and mem.records["t"]["metrics"]["iterations_done"] == ITERATIONS
    _assert_close(_tensors(mem), reference["end"], reference["start"])
    ck = torch.load(runs["run_dir"] / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ck["iteration"] == ITERATIONS


def test_a_two_process_checkpoint_resumes_in_one_process(runs, reference, data):
    ck = torch.load(runs["copy"] / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ck["iteration"] in range(1, KILL_AT + 1)  # written by rank 0 before the kill
    seen = []
    mem = _learn(data, out_dir=runs["copy"], callback=lambda it, losses: seen.append(it))
    assert seen == list(range(ck["iteration"] + 1, ITERATIONS + 1))  # resumed, not restarted
    _assert_close(mem.registry.task_tensors("t"), reference["end"], reference["start"])


def test_train_base_on_two_processes_matches_one_process(runs, data, tmp_path):
    two = torch.load(runs["base"] / "checkpoint.pt", map_location="cpu", weights_only=True)
    one = train_base(str(data), tmp_path, progress=False, **BASE)
    start = train_base(str(data), tmp_path / "start", progress=False, **{**BASE, "iterations": 0})
    assert two["iteration"] == BASE["iterations"]
    for key, net in (("generator", "G"), ("discriminator", "D")):  # the trained networks (the EMA barely moves)
        _assert_close(two[key], getattr(one, net).state_dict(), getattr(start, net).state_dict())


def test_a_global_batch_that_does_not_divide_is_refused(monkeypatch, data):
    for module in (dist, dist.sharding):  # pretend to be one of 3 ranks
        monkeypatch.setattr(module, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="global batch size 4 does not divide over 3 processes"):
        RealBatches(as_dataset(str(data), 32, 3), 4, seed=0)


def test_torchrun_ranks_outside_the_process_group_are_refused(monkeypatch, data, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    mem = GANMemory.default()
    with pytest.raises(RuntimeError, match="not joined to the process group"):
        mem.learn("t", as_dataset(str(data), 32, 3), iterations=1, batch_size=4, progress=False)
    assert mem.tasks == []  # the failed task was removed again
    assert cli_main(["info", "nowhere"]) == 1
    assert "only learn and train-base run under torchrun" in capsys.readouterr().err


def test_one_process_per_task_into_one_memory_then_one_mixed_sample(data, tmp_path):
    """Tasks are independent (the paper's footnote 5): concurrent `gmem learn` runs share one memory."""
    memory = tmp_path / "memory"
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    names = ["a", "b"]
    procs = [subprocess.Popen([sys.executable, "-m", "gmem.cli", "learn", str(memory), name, str(data), "--iterations",
                               "1", "--batch-size", str(BATCH), "--lr", str(LR), "--seed", str(seed), "--no-score",
                               "--no-progress"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for seed, name in enumerate(names)]
    outputs = [p.communicate(timeout=LAUNCH_DEADLINE_S)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    mem = GANMemory.load(memory)
    assert sorted(mem.tasks) == names and all(problem is None for problem in mem.verify().values())
    z = torch.randn(4, mem.z_dim, generator=torch.Generator().manual_seed(0))
    mixed = mem.sample(["a", "b", "a", "b"], z=z)  # one forward through both tasks' style sets
    alone = {name: mem.sample(name, z=z[i::2]) for i, name in enumerate(names)}
    assert not torch.allclose(alone["a"], mem.sample("b", z=z[0::2]), atol=1e-3)  # the tasks differ
    torch.testing.assert_close(mixed[0::2], alone["a"], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1::2], alone["b"], atol=1e-5, rtol=0)
