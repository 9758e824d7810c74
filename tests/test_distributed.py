"""gmem.distributed: one task on several processes (gloo on CPU, 127.0.0.1 only).

The multi-process tests start 2 ranks of tests/dist_worker.py with the environment torchrun gives
its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and compare what they did with
a single process run here. Every launch has a deadline: a hang fails the test instead of blocking it.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dist_worker
import pytest
import torch

from gmem import distributed as dist
from gmem.data import InfiniteSampler

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = WORKER.parents[1]
# Trained parameters of 2 ranks vs 1 process after 4 Adam steps (lr 1e-3, float32): the gradients
# differ only in the order of the batch sum, so the parameters agree to far less than one step.
TOL = 2e-5
STEPS = 4
LAUNCH_DEADLINE_S = 300.0  # a loaded 2-core machine needs most of it just to import torch twice
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, *args: str, world: int = 2, wait_for=None) -> list[dict]:
    """Start ``world`` ranks of the worker; wait for the ranks ``wait_for`` (all by default), then
    stop any still running (so also at the deadline) with SIGTERM, and SIGKILL 30 s later.

    Returns per rank: ``rc``, ``output`` (stdout + stderr) and ``end`` (monotonic exit time).
    """
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's own connections stay on the loopback too
    procs, logs = [], []
    for r in range(world):
        log = open(out / f"log{r}.txt", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "--out", str(out), *args],
                                      env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT))
    ends: list = [None] * world
    wait_for = range(world) if wait_for is None else wait_for
    deadline = time.monotonic() + LAUNCH_DEADLINE_S
    while any(ends[r] is None for r in wait_for) and time.monotonic() < deadline:
        for r, p in enumerate(procs):
            if ends[r] is None and p.poll() is not None:
                ends[r] = time.monotonic()
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.terminate()  # SIGTERM, as torchrun stops the other ranks
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for log in logs:
        log.close()
    return [{"rc": p.returncode, "end": e, "output": (out / f"log{r}.txt").read_text()}
            for r, (p, e) in enumerate(zip(procs, ends))]


def _max_diff(a: list, b: list) -> float:
    assert len(a) == len(b) and len(a) > 0
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="module")
def reference():
    """One process, global batch 8: states after 0, 2 and STEPS steps, and the batches it drew."""
    run = dist_worker.StandIn(global_batch=8)
    states = {0: run.state_dict()}
    for _ in range(STEPS):
        run.step()
        states[run.iteration] = run.state_dict()
    return {"states": states, "seen": run.seen, "base": run.base_tensors()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """2 ranks x 4 images train STEPS steps (rank 0 checkpoints each); rank 1 then dies at step STEPS + 1."""
    out = tmp_path_factory.mktemp("two_ranks")
    procs = _launch(out, "--steps", str(STEPS + 1), "--die-at", str(STEPS + 1), "--timeout", "60")
    if not all((out / f"rank{r}.pt").is_file() for r in range(2)):
        pytest.fail("the 2-rank run did not get through its steps:\n" +
                    "\n".join(f"rank {r} (rc {p['rc']}):\n{p['output'][-3000:]}" for r, p in enumerate(procs)))
    records = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return {"out": out, "procs": procs, "records": records}


# ---------------------------------------------------------------------------------- one process


def test_single_process_is_a_noop():
    info = dist.init()
    assert info == dist.DistInfo(0, 1, 0, None, torch.device("cpu"))
    assert (dist.rank(), dist.world_size(), dist.is_main(), dist.is_initialized()) == (0, 1, True, False)
    dist.barrier()
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    grad = p.grad
    dist.all_reduce_gradients([p])
    dist.broadcast_parameters([p])
    assert p.grad is grad and grad.tolist() == [1.0, 2.0, 3.0] and p.tolist() == [0.0, 0.0, 0.0]
    x = torch.arange(6)
    assert torch.equal(dist.shard(x), x)
    assert dist.local_batch_size(6) == 6
    assert dist.average_scalars({"a": 1.5}) == {"a": 1.5}
    assert dist.main_only(lambda: 7)() == 7
    with open(os.devnull, "w") as devnull, dist.progress(total=1, file=devnull) as bar:
        assert not bar.disable
    with dist.distributed() as info2:
        assert info2.world_size == 1
    dist.shutdown()


def test_off_main_ranks_skip_files_progress_and_main_only(tmp_path, monkeypatch):
    monkeypatch.setattr(dist.group, "rank", lambda: 1)  # what is_main() asks
    dist.save_on_main({"x": 1}, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []
    assert dist.main_only(lambda: 7)() is None
    assert dist.progress(total=3).disable


def test_save_on_main_is_atomic(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    dist.save_on_main({"w": torch.ones(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a local lambda cannot be pickled
        dist.save_on_main({"f": lambda: 0}, path)  # the old file must survive
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]


@pytest.mark.parametrize("env, needle", [
    ({"RANK": "0"}, "RANK and WORLD_SIZE"),
    ({"WORLD_SIZE": "2"}, "RANK and WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK=2"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK='x'"),
])
def test_incomplete_or_invalid_torchrun_environment_is_refused(monkeypatch, env, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=needle):
        dist.init()
    assert not dist.is_initialized()


def test_bad_timeout_and_arguments_are_refused(monkeypatch):
    monkeypatch.setenv("GMEM_DIST_TIMEOUT", "soon")
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="GMEM_DIST_TIMEOUT"):
        dist.init()
    with pytest.raises(ValueError, match="timeout_s"):
        dist.init(timeout_s=0)
    with pytest.raises(ValueError, match="backend"):
        dist.init(backend="mpi", timeout_s=1)
    with pytest.raises(TypeError, match=r"params\[1\]"):
        dist.all_reduce_gradients([torch.zeros(1), "w"])
    with pytest.raises(TypeError, match="floating-point"):
        dist.broadcast_parameters([torch.zeros(1, dtype=torch.long)])
    with pytest.raises(ValueError, match="global batch"):
        dist.local_batch_size(0)
    assert not dist.is_initialized()


# ------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_sampler_union_is_the_global_batch(world):
    n, per_rank, seed = 10, 3, 5  # global batch 3 * world, epochs end inside batches
    whole = InfiniteSampler(n, per_rank * world, seed)
    shards = [dist.ShardedInfiniteSampler(n, per_rank, seed, rank=r, world=world) for r in range(world)]
    for _ in range(12):
        parts = [s.next_indices() for s in shards]
        assert all(len(p) == per_rank for p in parts)
        assert torch.equal(torch.cat(parts), whole.next_indices())
    assert all(s.state_dict() == whole.state_dict() for s in shards)


def test_sharded_sampler_resumes_with_another_world_size():
    n, seed, global_batch = 7, 3, 4
    whole = InfiniteSampler(n, global_batch, seed)
    expected = [whole.next_indices() for _ in range(9)]
    two = [dist.ShardedInfiniteSampler(n, 2, seed, rank=r, world=2) for r in range(2)]
    got = [torch.cat([s.next_indices() for s in two]) for _ in range(3)]
    state = two[0].state_dict()
    four = [dist.ShardedInfiniteSampler(n, 1, seed, rank=r, world=4) for r in range(4)]
    for s in four:
        s.load_state_dict(state)
    got += [torch.cat([s.next_indices() for s in four]) for _ in range(3)]
    one = dist.ShardedInfiniteSampler(n, 4, seed, rank=0, world=1)
    plain = InfiniteSampler(n, 4, seed)
    plain.load_state_dict(four[0].state_dict())  # states are interchangeable with InfiniteSampler's
    one.load_state_dict(plain.state_dict())
    got += [one.next_indices() for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("args, needle", [
    ((0, 2, 0, 0, 1), "n must"), ((5, 0, 0, 0, 1), "batch_size_per_rank"), ((5, 2, 0, 0, 0), "world"),
    ((5, 2, 0, 2, 2), "rank must"), ((5, 2, 0, -1, 2), "rank must"), ((5, 2.0, 0, 0, 1), "batch_size_per_rank"),
])
def test_sharded_sampler_rejects_bad_arguments(args, needle):
    with pytest.raises(ValueError, match=needle):
        dist.ShardedInfiniteSampler(*args)


# ------------------------------------------------------------------------------- two processes


def test_two_ranks_reach_the_single_process_parameters(two_ranks, reference):
    ref = reference["states"][STEPS]
    ck = torch.load(two_ranks["out"] / f"ckpt_{STEPS:04d}.pt", weights_only=True)
    assert ck["iteration"] == STEPS
    moved = _max_diff(ref["g"] + ref["d"], reference["states"][0]["g"] + reference["states"][0]["d"])
    assert moved > 100 * TOL  # the comparison below is not vacuous
    for key in ("g", "d", "g_ema"):
        assert _max_diff(ck[key], ref[key]) < TOL, key
    r0, r1 = two_ranks["records"]
    assert r0["iteration"] == r1["iteration"] == STEPS
    for key in ("g", "d", "g_ema"):  # the same all-reduced gradients: identical on both ranks
        assert all(torch.equal(a, b) for a, b in zip(r0[key], r1[key], strict=True)), key
    assert all(torch.equal(a, b) for a, b in zip(r0["base"], reference["base"], strict=True))


def test_ranks_take_disjoint_halves_of_each_global_batch(two_ranks, reference):
    r0, r1 = two_ranks["records"]
    assert [a + b for a, b in zip(r0["seen"], r1["seen"], strict=True)] == reference["seen"]
    assert all(len(a) == 4 for a in r0["seen"])


def test_only_rank0_writes_and_reports(two_ranks):
    r0, r1 = two_ranks["records"]
    assert (r0["rank"], r0["world"], r0["backend"], r0["progress_disabled"], r0["main_only"]) == \
        (0, 2, "gloo", False, "ran")
    assert (r1["rank"], r1["progress_disabled"], r1["main_only"]) == (1, True, None)
    assert sorted(p.name for p in two_ranks["out"].glob("ckpt_*.pt")) == \
        [f"ckpt_{i:04d}.pt" for i in range(1, STEPS + 1)]
    assert not list(two_ranks["out"].glob("*.tmp"))


def test_a_dead_rank_fails_the_other_with_a_clear_message(two_ranks):
    p0, p1 = two_ranks["procs"]
    assert p1["rc"] == 17, p1["output"][-2000:]
    assert p0["end"] is not None and p0["rc"] not in (0, -signal.SIGKILL), p0["output"][-2000:]
    msg = p0["output"]
    assert "PeerFailure" in msg and "rank 0 of 2" in msg and "all-reduce of the gradients" in msg
    assert "rerun the same command" in msg and str(two_ranks["out"]) in msg
    assert p0["end"] - p1["end"] < 60 + 60  # the collective timeout plus slack for a loaded machine


def test_a_two_rank_checkpoint_resumes_in_one_process(two_ranks, reference):
    run = dist_worker.StandIn(global_batch=8)
    run.load_state_dict(torch.load(two_ranks["out"] / "ckpt_0002.pt", weights_only=True))
    while run.iteration < STEPS:
        run.step()
    resumed, ref = run.state_dict(), reference["states"][STEPS]
    for key in ("g", "d", "g_ema"):
        assert _max_diff(resumed[key], ref[key]) < TOL, key
    assert resumed["sampler"] == ref["sampler"]
    assert torch.equal(resumed["rng"], ref["rng"])
    assert run.seen == reference["seen"][2:]


def test_collectives_and_a_hung_rank_times_out(tmp_path):
    timeout = 8.0
    p0, p1 = _launch(tmp_path, "--collectives", "--hang", "--timeout", str(timeout), wait_for=[0])
    res = [json.loads((tmp_path / f"collectives{r}.json").read_text()) for r in range(2)]
    for r, got in enumerate(res):
        assert got["a"] == [[1.5, 1.5]] * 3  # mean of 1 and 2
        assert got["b"] == [0.0, 1.5, 3.0, 4.5, 6.0]
        assert got["unused_is_none"]
        assert "gradient on 1 of 2 ranks" in got["partial_grad_error"]
        assert got["broadcast"] == [10.0] * 4
        assert "different parameter lists" in got["mismatch_error"]
        assert got["scalars"] == {"x": 0.5, "y": 1.0}
        assert got["shard"] == [[0, 1, 2], [3, 4, 5]][r]
    # rank 1 sleeps instead of reaching the last barrier: rank 0 gives up after the timeout
    assert p0["end"] is not None and p0["rc"] not in (0, -signal.SIGTERM, -signal.SIGKILL), p0["output"][-2000:]
    assert "PeerFailure" in p0["output"] and "rank 0 of 2: barrier failed" in p0["output"]
    assert "rerun the same command" in p0["output"]
    # then the launcher stops the silent rank with SIGTERM: it says so and how to resume
    assert p1["end"] is None and p1["rc"] == 1, p1["output"][-2000:]
    assert "rank 1 of 2 was stopped by SIGTERM" in p1["output"] and "rerun the same command" in p1["output"]
