#!/usr/bin/env python
"""Fault injection for a GAN memory store: ``kill -9`` learners and damage files, then check nothing learned is lost.

Starting from a memory with two learned tasks (``t1`` on emoji, ``t2`` on fashion_mnist), each round
launches one learner (sometimes two at once, other names) and SIGKILLs it at a random moment: during
training, or inside the save window (a temporary file of that process appears in ``tasks/`` or next
to the manifest, or it holds the memory's lock). Sometimes a file is then damaged (truncated, one byte
flipped, or deleted): the task file of a task learned in an earlier round (never ``t1``/``t2``), or a
leftover temporary file. Then it checks:

- ``t1``/``t2`` keep their file bytes (SHA-256) and their samples for a fixed seed;
- the manifest loads, and ``gmem verify`` reports exactly the damaged tasks (which are then dropped
  with ``gmem verify --repair`` or ``gmem remove``, alternately: deliberate, not lost);
- a rerun of every killed learner finishes (resuming its checkpoint, or restarting cleanly), or
  finds that the kill came after the task was saved;
- every task reported learned is still in the manifest with the same hash and a readable file.

Usage (real learners, ``python -m gmem.cli learn``)::

    python tools/fault_inject.py --rounds 30 --iterations 20 [--memory DIR] [--seed 0]

``--fake`` replaces the learner by a forked process that writes a small task through
:mod:`gmem.store` exactly as ``GANMemory.save`` does (claim, content-addressed file, merged
manifest commit), so the kill/damage/check loop runs in seconds (``tests/test_fault_inject.py``).
Prints one summary line; exits 1 if any check failed.

``--edges [FAMILIES]`` runs the hostile cases of :mod:`fault_cases` instead (next to this file): the
first-user edge cases of issue 24 (symbolic links out of the memory, a lost or damaged manifest and
the advice given, hints that must work, input bounds), 26 kinds of file damage on task files,
manifests and stored bases, hostile task names, and a full disk at 13 levels (root only). Each must
end in a report or one line (``gmem <command>: error: ...``) without a traceback, a lost task or a
changed file outside the memory.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fault_cases  # noqa: E402  (next to this file)

from gmem.store import Store  # noqa: E402
from gmem.store import files as store_files  # noqa: E402

EARLIER = (("t1", "emoji"), ("t2", "fashion_mnist"))
DATASETS = ("emoji", "fashion_mnist")
FAKE_BASE = {"kind": "default", "sha256": "0" * 64}


def sha256_file(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------- learners
class Learner:
    """One learner process: a real ``gmem learn`` subprocess, or (fake) a forked store writer."""

    def __init__(self, opts, mem: Path, name: str, data: str, log: Path):
        self.name, self.data, self.log, self.killed = name, data, log, None
        if opts.fake:
            pid = os.fork()
            if pid == 0:  # the child: never returns
                code = 1
                try:  # the parent's sys.stdout may be a capture object (pytest): replace it, not just fd 1
                    sys.stdout = sys.stderr = open(log, "w", buffering=1)
                    os.dup2(sys.stdout.fileno(), 1)
                    os.dup2(sys.stdout.fileno(), 2)
                    code = fake_learn(mem, name, opts.iterations, opts.fake_step)
                except BaseException as e:  # noqa: BLE001 - the child must end here, whatever happened
                    print(f"fake learner failed: {e!r}")
                finally:
                    sys.stdout.flush()
                    os._exit(code)
            self.pid, self.proc = pid, None
        else:
            cmd = [sys.executable, "-m", "gmem.cli", "learn", str(mem), name, data, "--iterations",
                   str(opts.iterations), "--batch-size", str(opts.batch_size), "--checkpoint-every",
                   str(opts.checkpoint_every), "--sample-every", "1000000", "--no-progress", "--no-score"]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                       OMP_NUM_THREADS="1")
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
            self.pid = self.proc.pid
        self.started, self.rc = time.monotonic(), None

    def poll(self):
        if self.rc is None:
            if self.proc is not None:
                self.rc = self.proc.poll()
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.rc = os.waitstatus_to_exitcode(status)
        return self.rc

    def kill(self) -> bool:
        """SIGKILL it; True if it was still running (so the kill counts)."""
        if self.poll() is not None:
            return False
        os.kill(self.pid, signal.SIGKILL)
        return self.wait() == -signal.SIGKILL

    def wait(self, timeout: float = 1800.0):
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
            time.sleep(0.05)
        return self.rc

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def fake_learn(mem: Path, name: str, iterations: int, step: float) -> int:
    """Learn a fake task the way ``gmem learn`` + ``GANMemory.save`` store one (claim, checkpoint, file, commit)."""
    import torch

    torch.set_num_threads(1)
    with Store(mem).claim(name) as run:
        manifest = Store(mem).read_manifest()
        if name in {e["name"] for e in manifest["tasks"]}:
            print(f"gmem learn: error: task {name!r} exists already in {mem}")
            return 1
        ck = run / "checkpoint.json"
        start = int(ck.read_text()) if ck.is_file() else 0
        for i in range(start, iterations):
            time.sleep(step)
            store_files.atomic_write_bytes(ck, str(i + 1).encode())
        g = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
        data = store_files.task_bytes({"w": torch.randn(4096, generator=g), "b": torch.randn(64, generator=g)}, name)
        rel, digest = store_files.write_task_file(mem, name, data)
        entry = {"name": name, "file": rel, "sha256": digest, "num_classes": None, "metrics": {}, "training": {}}
        Store(mem).commit(manifest["base"], manifest.get("conversion", {}), [entry])
    print(f"learned task {name!r} ({iterations} iterations); memory saved to {mem}")
    return 0


# ------------------------------------------------------------------------------------- the run
class Run:
    def __init__(self, opts):
        self.opts, self.rng = opts, random.Random(opts.seed)
        self.mem = Path(opts.memory)
        self.logs = Path(tempfile.mkdtemp(prefix="gmem-fault-logs-"))
        self.n = dict(rounds=0, learners=0, kills=0, kills_train=0, kills_save=0, kills_late=0, missed=0, damaged=0,
                      damaged_tmp=0, reruns=0, saved_before_kill=0, lost=0, earlier_changed=0,
                      verify_wrong=0, failures=0)
        self.learned: dict[str, str] = {}   # task -> sha256 when it was reported learned
        self.dropped: set[str] = set()
        self.train_estimate = opts.train_window
        self.counter = 0
        self.problems: list[str] = []

    # ----------------------------------------------------------------- helpers
    def fail(self, key: str, text: str) -> None:
        self.n[key] += 1
        self.problems.append(text)
        print(f"  FAIL: {text}", flush=True)

    def launch(self, name: str, data: str) -> Learner:
        self.n["learners"] += 1
        self.counter += 1
        return Learner(self.opts, self.mem, name, data, self.logs / f"{self.counter:04d}-{name}.log")

    def manifest_tasks(self) -> dict[str, dict]:
        return {e["name"]: e for e in Store(self.mem).read_manifest()["tasks"]}

    def samples(self, names) -> dict[str, str]:
        if self.opts.fake:
            return {}
        from gmem import GANMemory

        mem = GANMemory.load(self.mem)
        return {t: hashlib.sha256(mem.sample(t, 4, seed=0).numpy().tobytes()).hexdigest() for t in names}

    def in_save_window(self, pid: int) -> bool:
        tag = f".{pid}-"
        for d in (self.mem / store_files.TASKS_DIR, self.mem):
            try:
                if any(tag in f and f.endswith(".tmp") for f in os.listdir(d)):
                    return True
            except OSError:
                pass
        try:
            return (self.mem / store_files.LOCK_NAME).read_text().strip() == str(pid)
        except OSError:
            return False

    def claimed(self, learner: Learner) -> bool:
        try:
            claim = self.mem / "runs" / store_files.run_dir_name(learner.name) / store_files.LOCK_NAME
            return claim.read_text().strip() \
                == str(learner.pid)
        except OSError:
            return False

    def finished(self, learner: Learner, rc, out: str) -> None:
        """Record a learner that ran to its end (rc 0: learned; else it must have found its task saved)."""
        tasks = self.manifest_tasks()
        if rc == 0 and "learned task" in out and learner.name in tasks:
            self.learned[learner.name] = tasks[learner.name]["sha256"]
        elif rc != 0 and learner.name in tasks and ("exists already" in out or "just added" in out):
            self.n["saved_before_kill"] += 1
            self.learned[learner.name] = tasks[learner.name]["sha256"]
        else:
            self.fail("failures", f"learner {learner.name!r} ended with rc {rc}: {out.strip()[-600:]}")

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        if self.mem.exists():
            shutil.rmtree(self.mem)
        if self.opts.fake:
            store_files.prepare_directory(self.mem)
            Store(self.mem).commit(FAKE_BASE, {}, [])
        for name, data in EARLIER:
            it = self.opts.iterations
            self.opts.iterations = self.opts.initial_iterations
            learner = self.launch(name, data)
            self.opts.iterations = it
            rc = learner.wait()
            self.finished(learner, rc, learner.output())
        tasks = self.manifest_tasks()
        self.earlier = {t: sha256_file(self.mem / tasks[t]["file"]) for t, _ in EARLIER}
        self.earlier_samples = self.samples([t for t, _ in EARLIER])
        print(f"setup: {sorted(self.earlier)} learned into {self.mem}; logs in {self.logs}", flush=True)

    # ----------------------------------------------------------------- one round
    def round(self, k: int) -> None:
        self.n["rounds"] += 1
        names = [f"r{k}"] + ([f"r{k}b"] if self.rng.random() < self.opts.pair_prob else [])
        learners = [self.launch(n, self.rng.choice(DATASETS)) for n in names]
        modes = [self.rng.choice(self.opts.kill_modes.split(",")) for _ in learners]
        t_kill = [None] * len(learners)
        t_claim = [None] * len(learners)
        saw_window = [False] * len(learners)
        pending = set(range(len(learners)))
        while pending:
            for i in list(pending):
                ln = learners[i]
                if ln.poll() is not None:  # ended before its kill came (a loaded machine, a stale estimate)
                    pending.discard(i)
                    self.n["missed"] += 1
                    if ln.rc == 0 and t_claim[i] is not None:  # claim -> end: where a 'train' kill may fall
                        self.train_estimate = time.monotonic() - t_claim[i]
                    continue
                if t_claim[i] is None and self.claimed(ln):
                    t_claim[i] = time.monotonic()
                    if modes[i] == "train":
                        t_kill[i] = t_claim[i] + self.rng.uniform(0, self.train_estimate)
                if modes[i] == "save" and self.in_save_window(ln.pid):
                    saw_window[i] = True
                    time.sleep(self.rng.uniform(0, self.opts.save_jitter))
                if (t_kill[i] is not None and time.monotonic() >= t_kill[i]) or saw_window[i]:
                    if ln.kill():
                        self.n["kills"] += 1
                        # classified by what the memory shows: the task already committed = a late kill
                        ln.killed = ("late" if ln.name in self.manifest_tasks()
                                     else "save" if saw_window[i] else "train")
                        self.n[f"kills_{ln.killed}"] += 1
                    else:
                        self.n["missed"] += 1
                    pending.discard(i)
            time.sleep(0.002)
        for ln in learners:
            if ln.killed is None:
                self.finished(ln, ln.wait(), ln.output())
        print(f"round {k}: " + ", ".join(f"{ln.name}:{m}->{ln.killed or 'finished'}" for ln, m in
                                          zip(learners, modes)), flush=True)
        damaged = self.damage() if self.rng.random() < self.opts.damage_prob else set()
        self.check(damaged, verify_cli=bool(damaged))
        if damaged:
            self.drop(damaged)
        for ln in learners:
            if ln.killed:
                self.n["reruns"] += 1
                rerun = self.launch(ln.name, ln.data)
                rc = rerun.wait()
                out = rerun.output()
                self.finished(rerun, rc, out)
        self.check(set(), verify_cli=False)

    def damage(self) -> set[str]:
        """Damage one file; returns the tasks whose file it was (empty for a temporary file)."""
        tasks = self.manifest_tasks()
        targets = [(t, self.mem / e["file"]) for t, e in tasks.items() if t in self.learned and t not in self.earlier]
        tmps = [p for d in (self.mem / store_files.TASKS_DIR, self.mem) for p in d.glob(".*.tmp")]
        choices = [("task", t, p) for t, p in targets] + [("tmp", None, p) for p in tmps]
        if not choices:
            return set()
        kind, task, path = self.rng.choice(choices)
        how = self.rng.choice(("truncate", "flip", "delete"))
        data = path.read_bytes()
        if how == "delete" or not data:
            path.unlink()
        elif how == "truncate":
            path.write_bytes(data[: self.rng.randrange(len(data))])
        else:
            i = self.rng.randrange(len(data))
            path.write_bytes(data[:i] + bytes([data[i] ^ (1 << self.rng.randrange(8))]) + data[i + 1:])
        self.n["damaged" if kind == "task" else "damaged_tmp"] += 1
        print(f"  damaged ({how}) {path.relative_to(self.mem)}" + (f" of task {task!r}" if task else ""), flush=True)
        return {task} if task else set()

    def drop(self, damaged: set[str]) -> None:
        if self.n["damaged"] % 2:
            cmd = ["verify", str(self.mem), "--repair"]
        else:
            cmd = ["remove", str(self.mem), *sorted(damaged)]
        if self.opts.fake:
            Store(self.mem).repair() if cmd[0] == "verify" else Store(self.mem).remove_tasks(damaged)
        else:
            r = self.cli(*cmd)
            if r.returncode != 0:
                self.fail("failures", f"gmem {' '.join(cmd)} failed: {r.stdout[-600:]}")
        left = set(self.manifest_tasks()) & damaged
        if left:
            self.fail("failures", f"damaged tasks {sorted(left)} still in the manifest after {cmd[0]}")
        for t in damaged:
            self.learned.pop(t, None)
            self.dropped.add(t)

    def cli(self, *args) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1")
        return subprocess.run([sys.executable, "-m", "gmem.cli", *args], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)

    # ----------------------------------------------------------------- checks
    def check(self, damaged: set[str], verify_cli: bool) -> None:
        try:
            tasks = self.manifest_tasks()
        except Exception as e:  # noqa: BLE001 - any failure to read the manifest is a finding
            self.fail("failures", f"manifest does not load: {e!r}")
            return
        for t, digest in self.earlier.items():
            if t not in tasks or sha256_file(self.mem / tasks[t]["file"]) != digest:
                self.fail("earlier_changed", f"earlier task {t!r} changed or missing")
        for t, digest in self.learned.items():
            path = self.mem / tasks[t]["file"] if t in tasks else None
            if path is None or tasks[t]["sha256"] != digest or not path.is_file() or sha256_file(path) != digest:
                if t not in damaged:
                    self.fail("lost", f"task {t!r} reported learned is lost or changed")
        if verify_cli and not self.opts.fake:
            r = self.cli("verify", str(self.mem))
            reported = set(re.findall(r"^  (.+?): DAMAGED", r.stdout, re.M))
            ok = reported == damaged and (r.returncode == 1) == bool(damaged)
        else:
            reported = {t for t, p in Store(self.mem).verify_files().items() if p}
            ok = reported == damaged
        if not ok:
            self.fail("verify_wrong", f"verify reports {sorted(reported)} damaged, expected {sorted(damaged)}")
        if not self.opts.fake:
            now = self.samples(list(self.earlier))
            changed = [t for t in self.earlier if now[t] != self.earlier_samples[t]]
            if changed:
                self.fail("earlier_changed", f"samples of earlier tasks {changed} changed")

    def summary(self) -> str:
        n = self.n
        return (f"fault_inject: rounds {n['rounds']}, learners {n['learners']}, kills {n['kills']} "
                f"(during training {n['kills_train']}, in save window {n['kills_save']}, after the "
                f"task was committed {n['kills_late']}; {n['missed']} missed: process had ended), "
                f"reruns {n['reruns']} ({n['saved_before_kill']} found their task saved), "
                f"files damaged {n['damaged']} task + {n['damaged_tmp']} tmp, "
                f"tasks lost {n['lost']}, earlier tasks changed {n['earlier_changed']}, verify wrong "
                f"{n['verify_wrong']}, other failures {n['failures']}; tasks in memory {len(self.learned)}, "
                f"dropped as damaged {len(self.dropped)}")


def run_edges(opts, parser) -> int:
    """``--edges``: each family of :mod:`fault_cases` in turn, one line per case, a JSON summary last."""
    families = list(fault_cases.FAMILIES) if opts.edges == "all" else opts.edges.split(",")
    unknown = [f for f in families if f not in fault_cases.FAMILIES]
    if unknown:
        parser.error(f"--edges: unknown families {unknown}; choose from {', '.join(fault_cases.FAMILIES)}")
    work = Path(tempfile.mkdtemp(prefix="gmem-edges-")) if opts.memory is None else Path(opts.memory)
    summary, t0 = {}, time.monotonic()
    for family in families:
        print(f"{family}:", flush=True)
        lines: list[str] = []

        def log(line: str, lines=lines) -> None:
            lines.append(line)
            print(line, flush=True)

        failed = fault_cases.FAMILIES[family](work / family, log=log)
        skipped = [p for _, p in failed if p.startswith("skipped")]
        summary[family] = {"cases": len(lines), "skipped": skipped,
                           "failed": [f"{n}: {p}"[:300] for n, p in failed if not p.startswith("skipped")]}
    bad = sum(len(v["failed"]) for v in summary.values())
    print(f"fault_inject --edges: {sum(v['cases'] for v in summary.values())} cases, {bad} failed; "
          f"{time.monotonic() - t0:.0f} s")
    print(json.dumps(summary))
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--memory", default=None, help="memory directory (default: a new temporary one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=20, help="iterations of each fault-round learner")
    p.add_argument("--initial-iterations", type=int, default=3, help="iterations of t1 and t2")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--pair-prob", type=float, default=0.3, help="probability of two learners in a round")
    p.add_argument("--damage-prob", type=float, default=0.4, help="probability of damaging a file in a round")
    p.add_argument("--train-window", type=float, default=30.0,
                   help="seconds after the claim within which a 'train' kill falls (grows to observed run times)")
    p.add_argument("--save-jitter", type=float, default=0.02, help="max delay of a kill after the save window opens")
    p.add_argument("--kill-modes", default="train,train,save,save,none",
                   help="what each learner gets, drawn from this list: kill during training, in the save window, none")
    p.add_argument("--fake", action="store_true", help="forked store writers instead of gmem learn (fast)")
    p.add_argument("--fake-step", type=float, default=0.02, help="seconds per fake iteration")
    p.add_argument("--edges", nargs="?", const="all", default=None, metavar="FAMILIES",
                   help="run the hostile cases of tools/fault_cases.py instead: all, or a comma-separated list of "
                        + ", ".join(fault_cases.FAMILIES))
    opts = p.parse_args(argv)
    if opts.edges:
        return run_edges(opts, p)
    if not set(opts.kill_modes.split(",")) <= {"train", "save", "none"}:
        p.error(f"--kill-modes: choose from train, save, none; got {opts.kill_modes!r}")
    if opts.memory is None:
        opts.memory = tempfile.mkdtemp(prefix="gmem-fault-") + "/mem"
    t0 = time.monotonic()
    run = Run(opts)
    run.setup()
    try:
        for k in range(1, opts.rounds + 1):
            run.round(k)
    except KeyboardInterrupt:
        print(f"fault_inject: stopped during round {run.n['rounds']} (its checks did not run)", flush=True)
    line = run.summary() + f"; {time.monotonic() - t0:.0f} s"
    print(line, flush=True)
    print(json.dumps(run.n))
    return 1 if run.problems else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stopped run still prints its figures
    sys.exit(main())
