"""Garbage collection of a memory directory (:mod:`gmem.store`): what no manifest needs any more.

Run by every manifest update (:meth:`gmem.store.Store.commit`, :meth:`~gmem.store.Store.remove_tasks`) under the
memory's lock, or on its own. Retention rules, each sparing anything younger than
:data:`GC_GRACE_SECONDS` (10 minutes: a reader may still read a file that left the manifest a moment
ago, a writer may be about to reference a file it just wrote, a learner may be writing right now):

- ``tasks/*.safetensors`` and ``knowledge/knowledge-*.json`` that the manifest does not reference
  are deleted once older than the grace period (a file that leaves the manifest has its
  modification time refreshed then, so its grace period starts when it leaves);
- temporary files of interrupted atomic writes (``.<name>.<pid>-<hex>.tmp``, :mod:`gmem.atomic`) in
  the directory, ``tasks/``, ``knowledge/`` and every ``runs/<task>/`` folder (e.g.
  ``runs/<task>/.checkpoint.pt.<pid>-<hex>.tmp`` of a learner that was killed) are deleted once
  older than the grace period;
- a ``runs/<task>/`` folder (``gmem learn``'s samples and checkpoint) whose task is not in the
  manifest is deleted with everything in it once nothing in it has changed for the grace period and
  no process holds its claim, unless it holds a ``checkpoint.pt`` (a learner that was killed or
  interrupted before saving: the same ``gmem learn`` command resumes it, at any later time); the
  folder of a task removed by this update (``removed``: asked for) goes with its checkpoint (the ``.lock`` a
  learner keeps locked while it trains, :meth:`gmem.store.Store.claim`). A task being learned right now is
  therefore kept: its learner holds the claim, and its checkpoint is young. The run folder of a task
  in the manifest is kept (its samples and final checkpoint), only its stale temporary files go.
  Only folders named like a run folder (``<stem>-<8 hex digits>``) are considered; symbolic links
  are never followed.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
from pathlib import Path

from .files import KNOWLEDGE_DIR, LOCK_NAME, TASKS_DIR, ManifestError, inside, run_dir_name

__all__ = ["GC_GRACE_SECONDS", "RUNS_DIR", "collect_garbage"]

GC_GRACE_SECONDS = 600.0     # unreferenced files younger than this are kept (a reader may still need them)
RUNS_DIR = "runs"
CHECKPOINT = "checkpoint.pt"  # gmem.training.loop.CHECKPOINT_NAME: a run that can be resumed
_RUN_FOLDER = re.compile(r"[A-Za-z0-9_-]{1,40}-[0-9a-f]{8}")  # gmem.store.files.run_dir_name


def collect_garbage(directory, *, manifest: dict, grace: float = GC_GRACE_SECONDS,
                    removed=()) -> list[Path]:
    """Delete what the manifest no longer needs and is older than ``grace`` seconds (the module's rules).

    Call it under the store's lock with the manifest just written (:meth:`gmem.store.Store.commit`
    does). Young files are spared: another writer
    may be about to reference them, a reader may still read a file that left the manifest a moment
    ago, a learner may be writing its run folder. Returns the deleted paths (files, and run folders).
    """
    directory = Path(directory)
    try:
        tasks_dir = inside(directory, TASKS_DIR, "tasks directory")
    except ManifestError:
        return []
    referenced = set()
    for e in manifest["tasks"] + ([manifest["knowledge"]] if manifest.get("knowledge") else []):
        with contextlib.suppress(ManifestError):
            referenced.add(inside(directory, e.get("file"), "file"))
    now, deleted = time.time(), []
    candidates = list(tasks_dir.glob("*.safetensors")) + list(tasks_dir.glob(".*.tmp")) + list(directory.glob(".*.tmp"))
    with contextlib.suppress(ManifestError):
        kb_dir = inside(directory, KNOWLEDGE_DIR, "knowledge directory")
        candidates += list(kb_dir.glob("knowledge-*.json")) + list(kb_dir.glob(".*.tmp"))
    for path in candidates:
        try:
            if path.is_symlink() or path in referenced or not path.is_file() or now - path.stat().st_mtime < grace:
                continue
            path.unlink()
            deleted.append(path)
        except OSError:
            continue
    return deleted + _collect_runs(directory, manifest, now, grace, {run_dir_name(n) for n in removed})


def _collect_runs(directory: Path, manifest: dict, now: float, grace: float, removed: set) -> list[Path]:
    """The ``runs/`` rules: abandoned run folders of tasks not in the manifest, stale temporary files."""
    try:
        runs = inside(directory, RUNS_DIR, "runs directory")
    except ManifestError:
        return []
    if not runs.is_dir():
        return []
    in_manifest = {run_dir_name(e["name"]) for e in manifest["tasks"]}
    deleted = []
    for run in sorted(runs.iterdir()):
        if run.is_symlink() or not run.is_dir() or not _RUN_FOLDER.fullmatch(run.name):
            continue
        resumable = (run / CHECKPOINT).is_file() and run.name not in removed
        if run.name not in in_manifest and not resumable and _remove_abandoned(run, now, grace):
            deleted.append(run)
            continue
        for root, _, files in os.walk(run):  # does not follow symbolic links
            for name in files:
                path = Path(root) / name
                if not (name.startswith(".") and name.endswith(".tmp")):
                    continue
                with contextlib.suppress(OSError):
                    st = path.lstat()
                    if path.is_file() and not path.is_symlink() and now - st.st_mtime >= grace:
                        path.unlink()
                        deleted.append(path)
    return deleted


def _newest_change(run: Path) -> float:
    """The latest modification time of the folder ``run`` and anything in it (links not followed)."""
    newest = run.lstat().st_mtime
    for root, dirs, files in os.walk(run):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                newest = max(newest, (Path(root) / name).lstat().st_mtime)
    return newest


def _remove_abandoned(run: Path, now: float, grace: float) -> bool:
    """Delete the run folder ``run`` if nothing in it changed for ``grace`` seconds and nobody holds its
    claim (the claim is taken here while deleting, so a learner cannot start in it meanwhile)."""
    try:
        if now - _newest_change(run) < grace:
            return False
        fd = os.open(run / LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        fd = None  # never claimed (a learner of the Python API): its age decides
    except OSError:
        return False
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        shutil.rmtree(run)
        return True
    except OSError:  # BlockingIOError: a live learner holds the claim
        return False
    finally:
        if fd is not None:
            os.close(fd)
