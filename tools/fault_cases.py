"""The hostile cases of the fault-injection harness (``tools/fault_inject.py --edges``), run in one process.

Four families, each against copies of one small memory (a task ``t1`` on the embedded base, and a
second memory with its own base under ``base/``), each case checking that nothing outside the memory
changed, no task file of an undamaged task was touched, and no command printed a traceback:

* :func:`edge_cases`: issue 24's first-user cases (symbolic links out of the memory, a lost or damaged
  manifest and the advice given, the ``--restart`` hint, a one-image folder, bad input bounds).
* :func:`damage_cases`: 26 kinds of file damage (deleted, truncated, bits flipped, garbage added,
  replaced by a directory, a FIFO, a link, another file; crafted manifests with wrong types, paths
  out of the memory, huge class counts, deep nesting; crafted base and task files whose hashes match)
  on the task file, the manifest and the base. ``gmem verify``, ``info``, ``sample`` and ``learn`` must
  each end in a report or one line ``gmem <command>: error: ...``, and the undamaged task must still
  draw the same images.
* :func:`hostile_names`: task names that look like paths, options, reserved words or control codes;
  each is learned, sampled and removed, or refused in one line.
* :func:`full_disk`: a memory on a small tmpfs filled to 13 levels (root only: skipped with a
  reason otherwise); ``gmem learn`` must fail in one line or succeed, and after space is freed the
  memory must verify and the same command must finish the task.

Every function returns ``[(case, problem)]`` for the cases that failed (empty: all passed) and
appends one line per case to ``log`` if given.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import traceback
from pathlib import Path
from typing import Callable, Optional

QUICK = ("--iterations", "1", "--batch-size", "2", "--no-progress", "--no-score")
Problem = Optional[str]


class _Timeout(Exception):
    pass


def gmem(*argv, timeout: int = 900) -> tuple[int, str, str]:
    """``gmem ARGV`` in this process: ``(exit code, stdout, stderr)``; a traceback is exit code -1 and a
    command still running after ``timeout`` seconds (e.g. blocked reading a FIFO) exit code -2."""
    from gmem.cli import main as cli_main

    def alarm(signum, frame):
        raise _Timeout()

    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli_main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except _Timeout:
            print(f"still running after {timeout} s", file=err)
            rc = -2
        except Exception:  # noqa: BLE001 - a traceback is what the cases look for
            traceback.print_exc()
            rc = -1
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    return rc, out.getvalue(), err.getvalue()


def tree(folder: Path) -> dict:
    """``{relative path: bytes (None for folders and links)}`` of everything below ``folder``."""
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(folder.rglob("*"))}


def one_line(rc: int, err: str, must: str = "") -> Problem:
    """None when a command failed as a user error should: exit 1, one line ``gmem X: error: ...``."""
    lines = err.strip().splitlines()
    if rc != 1 or len(lines) != 1 or ": error: " not in lines[0] or must not in lines[0]:
        return f"rc {rc}, expected one line with {must!r}: {err.strip()[-300:]}"
    return None


def clean(rc: int, out: str, err: str, ok=(0, 1)) -> Problem:
    """None when a command ended in a report (exit 0/1) without a traceback, and a failure in one line."""
    if rc not in ok or "Traceback" in out + err:
        return f"rc {rc}: {(out + err).strip()[-400:]}"
    if rc == 1 and err.strip() and len(err.strip().splitlines()) != 1:
        lines = [ln for ln in err.strip().splitlines() if ": error: " in ln]
        if len(lines) != 1:
            return f"not one error line: {err.strip()[-400:]}"
    return None


class Cases:
    """A runner: each case gets a fresh copy of a seed memory and an ``outside`` folder to guard."""

    def __init__(self, work: Path, seed: Path, log: Optional[Callable[[str], None]] = None):
        self.work, self.seed, self.log = work, seed, log
        self.failed: list[tuple[str, str]] = []

    def run(self, name: str, fn, keep_tasks: bool = True) -> None:
        m = self.work / name
        shutil.copytree(self.seed, m, ignore=shutil.ignore_patterns("runs", ".lock"), symlinks=True)
        outside = self.work / f"{name}-outside"
        outside.mkdir()
        (outside / "v").write_text("precious")
        before = {"outside": tree(outside)}
        tasks = tree(m / "tasks")

        def mark():  # a case that moved files outside (to link to them) takes the snapshot again
            before["outside"] = tree(outside)

        try:
            problem = fn(m, outside, mark)
        except Exception as e:  # noqa: BLE001
            problem = f"{type(e).__name__}: {e}"
        if problem is None and tree(outside) != before["outside"]:
            problem = "a file outside the memory changed"
        if problem is None and keep_tasks and not set(tasks) <= set(tree(m / "tasks")):
            problem = "a task file was deleted"
        if problem:
            self.failed.append((name, problem))
        if self.log:
            self.log(f"  {name}: {'FAILED ' + problem if problem else 'ok'}")


def make_seed(work: Path, own_base: bool = False) -> tuple[Optional[Path], Problem]:
    """A memory with one task ``t1`` (on the embedded base, or on a copy of it stored in the memory)."""
    seed = work / ("seed-base" if own_base else "seed")
    extra = []
    if own_base:
        base = work / "base-copy"
        shutil.copytree(Path(__file__).resolve().parents[1] / "gmem" / "assets" / "base", base)
        extra = ["--base", base]
    rc, _, err = gmem("learn", seed, "t1", "emoji", *QUICK, *extra)
    return (seed, None) if rc == 0 else (None, f"setup: {err.strip()[-300:]}")


def edge_cases(work: Path, log=None) -> list[tuple[str, str]]:
    """Issue 24's first-user cases; see the module docstring."""
    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    seed, problem = make_seed(work)
    if problem:
        return [("setup", problem)]
    np.save(work / "one.npy", np.zeros((1, 32, 32, 3), np.uint8))
    (work / "bad.npz").write_bytes(b"PK\x03\x04 not a zip" * 8)
    cases = Cases(work, seed, log)

    def link_runs(m, outside, mark):
        (m / "runs").symlink_to(outside)
        return one_line(*gmem("learn", m, "b", "emoji", *QUICK)[::2], "symbolic link")

    def link_lock(m, outside, mark):
        (m / ".lock").unlink(missing_ok=True)
        (m / ".lock").symlink_to(outside / "v")
        return one_line(*gmem("learn", m, "c", "emoji", *QUICK)[::2], "symbolic link")

    def link_manifest(m, outside, mark):
        shutil.move(m / "manifest.json", outside / "manifest.json")
        (m / "manifest.json").symlink_to(outside / "manifest.json")
        mark()
        return one_line(*gmem("info", m)[::2], "symbolic link")

    def link_tasks(m, outside, mark):
        shutil.move(m / "tasks", outside / "tasks")
        (m / "tasks").symlink_to(outside / "tasks")
        mark()
        rc, out, _ = gmem("verify", m)
        return None if rc == 1 and "symbolic link" in out else f"verify: rc {rc}: {out[-300:]}"

    def manifest_lost_or_damaged(damage):
        def fn(m, outside, mark):
            if damage:
                (m / "manifest.json").write_bytes(b"\x00garbage")
            else:
                (m / "manifest.json").unlink()
            rc, out, err = gmem("verify", m)
            if rc != 1 or "--repair" not in out + err or "gmem learn" in out + err:
                return f"verify advice: rc {rc}: {(out + err)[-300:]}"
            problem = one_line(*gmem("learn", m, "z", "emoji", *QUICK)[::2], "--repair")
            if problem:
                return "learn: " + problem
            rc, out, err = gmem("verify", m, "--repair")
            if rc != 0 or "t1" not in json.loads(gmem("info", m, "--json")[1])["tasks"][0]["name"]:
                return f"repair: rc {rc}: {(out + err)[-300:]}"
            return None
        return fn

    def restart_hint(m, outside, mark):
        if gmem("learn", m, "r", "emoji", *QUICK)[0] != 0 or gmem("remove", m, "r")[0] != 0:
            return "setup of the resume case failed"
        rc, _, err = gmem("learn", m, "r", "fashion_mnist", *QUICK)
        if one_line(rc, err, "--restart"):
            return one_line(rc, err, "--restart")
        rc, _, err = gmem("learn", m, "r", "fashion_mnist", *QUICK, "--restart")
        return None if rc == 0 else f"--restart: rc {rc}: {err[-300:]}"

    def one_image(m, outside, mark):
        rc, _, err = gmem("learn", m, "solo", work / "one.npy", "--iterations", "1", "--batch-size", "1",
                          "--no-progress")
        return None if rc == 0 and "Traceback" not in err else f"rc {rc}: {err[-300:]}"

    for name, fn in [
        ("link-runs", link_runs), ("link-lock", link_lock), ("link-manifest", link_manifest),
        ("link-tasks", link_tasks), ("manifest-lost", manifest_lost_or_damaged(False)),
        ("manifest-damaged", manifest_lost_or_damaged(True)), ("restart-hint", restart_hint),
        ("one-image", one_image),
        ("npz-not-zip", lambda m, o, mark: one_line(*gmem("learn", m, "n", work / "bad.npz", *QUICK)[::2],
                                                    "bad.npz")),
        ("train-base-nf-0", lambda m, o, mark: one_line(*gmem("train-base", "--out", work / "tb", "--nf",
                                                              "0")[::2], "--nf")),
        ("sample-scale", lambda m, o, mark: one_line(*gmem("sample", m, "t1", "--scale", "1000", "--out",
                                                           work / "s.png")[::2], "--scale")),
        ("sample-seed", lambda m, o, mark: one_line(*gmem("sample", m, "t1", "--seed", 2**70, "--out",
                                                          work / "s.png")[::2], "--seed")),
    ]:
        cases.run(name, fn, keep_tasks=name != "link-tasks")
    return cases.failed


# ------------------------------------------------------------------------------------------- damage
def _flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:]


def _safetensors(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


#: byte-level damage of any file: ``kind -> f(path, other file)``
BYTE_DAMAGE: dict[str, Callable[[Path, Path], None]] = {
    "deleted": lambda p, o: p.unlink(),
    "empty": lambda p, o: p.write_bytes(b""),
    "truncated-half": lambda p, o: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "truncated-1": lambda p, o: p.write_bytes(p.read_bytes()[:-1]),
    "bit-in-header": lambda p, o: p.write_bytes(_flip(p.read_bytes(), 9)),
    "bit-in-middle": lambda p, o: p.write_bytes(_flip(p.read_bytes(), len(p.read_bytes()) // 2)),
    "bit-at-end": lambda p, o: p.write_bytes(_flip(p.read_bytes(), len(p.read_bytes()) - 1)),
    "garbage-appended": lambda p, o: p.write_bytes(p.read_bytes() + b"\xff" * 100),
    "garbage-prepended": lambda p, o: p.write_bytes(b"\xff" * 100 + p.read_bytes()),
    "random-bytes": lambda p, o: p.write_bytes(os.urandom(len(p.read_bytes()))),
    "other-file": lambda p, o: shutil.copyfile(o, p),
    "directory": lambda p, o: (p.unlink(), p.mkdir()),
    "fifo": lambda p, o: (p.unlink(), os.mkfifo(p)),
    "link-outside": lambda p, o: (p.unlink(), p.symlink_to(o)),
    "link-loop": lambda p, o: (p.unlink(), p.symlink_to(p.name)),
    "huge-header-length": lambda p, o: p.write_bytes(struct.pack("<Q", 2**62) + p.read_bytes()[8:]),
}


def _manifest_edit(edit: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    def damage(path: Path, other: Path) -> None:
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))
    return damage


def _set(d: dict, key, value):
    d[key] = value


#: crafted manifests: well-formed JSON that lies
MANIFEST_DAMAGE: dict[str, Callable[[Path, Path], None]] = {
    "tasks-not-a-list": _manifest_edit(lambda m: _set(m, "tasks", "t1")),
    "file-outside": _manifest_edit(lambda m: _set(m["tasks"][0], "file", "../outside/v")),
    "file-absolute": _manifest_edit(lambda m: _set(m["tasks"][0], "file", "/etc/passwd")),
    "wrong-sha256": _manifest_edit(lambda m: _set(m["tasks"][0], "sha256", "0" * 64)),
    "duplicate-task": _manifest_edit(lambda m: m["tasks"].append(dict(m["tasks"][0]))),
    "num-classes-huge": _manifest_edit(lambda m: _set(m["tasks"][0], "num_classes", 100000)),
    "base-size-huge": _manifest_edit(lambda m: _set(m["base"]["generator"], "nf", 10**9)),
    "deep-nesting": lambda p, o: p.write_text("[" * 100000 + "]" * 100000),
    "nan-values": lambda p, o: p.write_text(p.read_text().replace('"nlabels": 1', '"nlabels": NaN', 1)),
    "format-unknown": _manifest_edit(lambda m: _set(m, "format", "gmem-memory-v99")),
}


def _crafted_task(path: Path, manifest: Path) -> None:
    """A task file with the right name form and a matching hash in the manifest, but wrong tensors."""
    import hashlib

    data = _safetensors({"__metadata__": {"name": "t1"}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                        b"\x00" * 8)
    digest = hashlib.sha256(data).hexdigest()
    new = path.with_name(f"t1-{digest[:16]}.safetensors")
    path.unlink()
    new.write_bytes(data)
    m = json.loads(manifest.read_text())
    m["tasks"][0]["file"], m["tasks"][0]["sha256"] = f"tasks/{new.name}", digest
    manifest.write_text(json.dumps(m))


def _crafted_base(path: Path, manifest: Path) -> None:
    """A base file whose hash the manifest agrees with, holding tensors of the wrong shapes."""
    import hashlib

    data = _safetensors({"fc.weight": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 36]}}, b"\x00" * 36)
    path.write_bytes(data)
    m = json.loads(manifest.read_text())
    m["base"]["file_sha256"] = hashlib.sha256(data).hexdigest()
    manifest.write_text(json.dumps(m))


def damage_cases(work: Path, log=None, kinds: Optional[list[str]] = None) -> list[tuple[str, str]]:
    """File damage on the task file, the manifest and a stored base; see the module docstring.

    ``kinds``: only these (``target:kind`` names, e.g. ``task:fifo``); default all."""
    work.mkdir(parents=True, exist_ok=True)
    seed, problem = make_seed(work)
    seed_base, problem_base = make_seed(work, own_base=True)
    if problem or problem_base:
        return [("setup", problem or problem_base)]
    rc, _, err = gmem("learn", seed, "t2", "fashion_mnist", *QUICK)
    if rc != 0:
        return [("setup", err[-300:])]
    reference = work / "t2-before.png"
    gmem("sample", seed, "t2", "-n", "4", "--out", reference)
    table: list[tuple[str, Path, Callable]] = []
    for kind, fn in BYTE_DAMAGE.items():
        table.append((f"task:{kind}", seed, fn))
    for kind, fn in {**BYTE_DAMAGE, **MANIFEST_DAMAGE}.items():
        if kind not in ("other-file", "huge-header-length"):
            table.append((f"manifest:{kind}", seed, fn))
    for kind in ("truncated-half", "bit-in-middle", "random-bytes", "link-outside", "fifo", "deleted"):
        table.append((f"base:{kind}", seed_base, BYTE_DAMAGE[kind]))
    table += [("task:crafted-matching-hash", seed, _crafted_task), ("base:crafted-matching-hash", seed_base,
                                                                     _crafted_base)]
    failed: list[tuple[str, str]] = []
    for label, seed_dir, fn in table:
        if kinds is not None and label not in kinds:
            continue
        target = label.split(":")[0]
        runner = Cases(work, seed_dir, log)

        def case(m, outside, mark, target=target, fn=fn):
            manifest = m / "manifest.json"
            entries = {e["name"]: e for e in json.loads(manifest.read_text())["tasks"]}
            if target == "task":
                path, other = m / entries["t1"]["file"], outside / "v"
            elif target == "manifest":
                path, other = manifest, outside / "v"
            else:
                path, other = m / "base" / "base.safetensors", outside / "v"
            if fn in (_crafted_task, _crafted_base):
                fn(path, manifest)
            else:
                fn(path, other)
            problems = []
            for argv in (("verify", m), ("info", m), ("sample", m, "t1", "-n", "2", "--out", work / "d.png"),
                         ("learn", m, "t3", "emoji", *QUICK)):
                p = clean(*gmem(*argv, timeout=300))
                if p:
                    problems.append(f"gmem {argv[0]}: {p}")
            if "t2" in entries and target == "task":  # the undamaged task: still readable, same images
                after = work / "t2-after.png"
                rc, _, err = gmem("sample", m, "t2", "-n", "4", "--out", after)
                if rc != 0 or after.read_bytes() != reference.read_bytes():
                    problems.append(f"undamaged t2 changed or unreadable: rc {rc} {err[-200:]}")
            return "; ".join(problems) or None

        runner.run(label.replace(":", "-"), case, keep_tasks=False)
        failed += runner.failed
    return failed


# -------------------------------------------------------------------------------------------- names
HOSTILE_NAMES = ("../evil", "a/b", "/abs", "a\\b", ".hidden", "..", ".", "", " ", "a\nb", "a\tb", "-x",
                 "x" * 129, "x" * 128, "名前", "emoji😀", "CON", "source", "manifest.json", "tasks", "runs",
                 "~", "$HOME", "*", "a:b", "\u202eevil", "a\u2028b")


def hostile_names(work: Path, log=None, names=HOSTILE_NAMES) -> list[tuple[str, str]]:
    """Task names that look like paths, options, reserved words or control codes (module docstring)."""
    work.mkdir(parents=True, exist_ok=True)
    seed, problem = make_seed(work)
    if problem:
        return [("setup", problem)]
    runner = Cases(work, seed, log)
    for i, name in enumerate(names):
        def case(m, outside, mark, name=name):
            before = set(os.listdir(work))
            rc, out, err = gmem("learn", *QUICK, m, "--", name, "emoji")
            if set(os.listdir(work)) - before:
                return f"learn wrote next to the memory: {sorted(set(os.listdir(work)) - before)}"
            if rc == 1:
                return one_line(rc, err)
            if rc != 0:
                return f"learn: rc {rc}: {err[-300:]}"
            info = json.loads(gmem("info", m, "--json")[1])
            if name not in [t["name"] for t in info["tasks"]]:
                return f"learned {name!r} but info lists {[t['name'] for t in info['tasks']]}"
            for argv in (("sample", "-n", "2", "--out", work / "n.png", m, "--", name), ("remove", m, "--", name)):
                p = clean(*gmem(*argv), ok=(0,))
                if p:
                    return f"gmem {argv[0]}: {p}"
            return None
        runner.run(f"name-{i:02d}", case)
    return runner.failed


# ---------------------------------------------------------------------------------------- full disk
def full_disk(work: Path, log=None, levels: int = 13) -> list[tuple[str, str]]:
    """``gmem learn`` on a tmpfs filled to ``levels`` levels of free space (root only), see docstring."""
    work.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return [("full-disk", "skipped: mounting a small tmpfs needs root")]
    seed, problem = make_seed(work)
    if problem:
        return [("setup", problem)]
    # how much one learn writes: a checkpoint, a task file, sample grids, the manifest
    probe = work / "probe"
    shutil.copytree(seed, probe, ignore=shutil.ignore_patterns("runs", ".lock"))
    used0 = sum(f.stat().st_size for f in probe.rglob("*") if f.is_file())
    learn = ("learn", None, "t2", "fashion_mnist", "--iterations", "2", "--batch-size", "2", "--no-progress",
             "--no-score", "--checkpoint-every", "1")
    rc, _, err = gmem(*[probe if a is None else a for a in learn])
    if rc != 0:
        return [("setup", err[-300:])]
    need = sum(f.stat().st_size for f in probe.rglob("*") if f.is_file()) - used0
    failed: list[tuple[str, str]] = []
    size = used0 + 3 * need + (8 << 20)
    coarse = max(levels - 5, 2)
    outcomes: dict[int, int] = {}
    # coarse levels from 0 to what one learn needs at its peak (two checkpoints) and more, then five
    # levels between the last that failed and the first that passed: the save window (task file, manifest)
    frees = [int(need * 2.2 * k / (coarse - 1)) for k in range(coarse)]
    k = 0
    while k < levels:
        if k == coarse:
            failing = [f for f, rc in outcomes.items() if rc != 0]
            passing = [f for f, rc in outcomes.items() if rc == 0]
            lo, hi = (max(failing, default=0), min(passing, default=frees[-1]))
            frees += [lo + (hi - lo) * (j + 1) // (levels - coarse + 1) for j in range(levels - coarse)]
        free = frees[k]
        k += 1
        mnt = work / f"disk{k}"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)]).returncode != 0:
            return [("full-disk", "skipped: mount -t tmpfs failed")]
        try:
            m = mnt / "mem"
            shutil.copytree(seed, m, ignore=shutil.ignore_patterns("runs", ".lock"))
            t1 = (m / "manifest.json").read_bytes(), tree(m / "tasks")
            filler = mnt / "filler"
            st = os.statvfs(mnt)
            avail = st.f_bavail * st.f_frsize
            with open(filler, "wb") as f:
                f.truncate(0)
                remaining = max(avail - free, 0)
                while remaining > 0:
                    n = min(remaining, 1 << 20)
                    try:
                        f.write(b"\0" * n)
                        f.flush()
                    except OSError:
                        break
                    remaining -= n
            rc, out, err = gmem(*[m if a is None else a for a in learn])
            problem = None
            if rc == 1:
                problem = one_line(rc, err)
            elif rc != 0:
                problem = f"learn: rc {rc}: {err[-300:]}"
            filler.unlink()
            if problem is None:
                rc_v, out_v, err_v = gmem("verify", m)
                if rc_v != 0:
                    problem = f"verify after freeing space: rc {rc_v}: {(out_v + err_v)[-300:]}"
            if problem is None and not set(t1[1]) <= set(tree(m / "tasks")):
                problem = "t1's task file was deleted"
            if problem is None and rc == 1:  # the same command finishes the task once there is space
                rc2, _, err2 = gmem(*[m if a is None else a for a in learn])
                if rc2 != 0:
                    problem = f"rerun after freeing space: rc {rc2}: {err2[-300:]}"
            if log:
                log(f"  full-disk free={free}: learn rc {rc}: {'FAILED ' + problem if problem else 'ok'}"
                    + (f" ({err.strip()[:120]})" if rc == 1 else ""))
            outcomes[free] = rc
            if problem:
                failed.append((f"full-disk-{free}", problem))
        finally:
            subprocess.run(["umount", "-l", str(mnt)])
    return failed


FAMILIES = {"edges": edge_cases, "damage": damage_cases, "names": hostile_names, "full-disk": full_disk}
