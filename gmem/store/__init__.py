"""The on-disk store of a GAN memory: manifest, task files, locking, verification, confinement, GC.

A memory directory holds::

    manifest.json                        the list of tasks (name, file, sha256, settings, metrics)
    tasks/<stem>-<sha16>.safetensors     one immutable file per task, named by the SHA-256 of its bytes
    base/                                the base of a memory on a custom base (gmem.models.save_base)
    .lock                                locked (flock) by writers while they update the manifest
    runs/<stem>-<hash8>/                 progress files of ``gmem learn`` (samples, checkpoint, .lock: the
                                         learner's claim on the task name)
    knowledge/knowledge-<sha16>.json     with compressed tasks: the knowledge bases' layout (which task
                                         added which basis columns of which matrix, in order), named
                                         by the manifest's ``knowledge`` entry (file + sha256); the
                                         columns and coefficients are in the tasks' own files

The rules, after git's object store:

- Task files are content addressed: the bytes of a task are deterministic (safetensors with sorted
  keys, see :func:`gmem.store.files.task_bytes`), the file name carries their hash, and a file already present is
  never rewritten. Every write goes to a unique temporary name and is renamed into place.
- Writers hold an exclusive ``fcntl.flock`` on ``.lock`` only while they read, merge and replace the
  manifest (:meth:`Store.commit`); training runs unlocked. The merge keeps what other processes added
  meanwhile: a save adds or updates its own tasks and removes only the tasks it removed itself.
  Two processes writing different contents under one task name: the second is refused
  (:class:`TaskConflictError`) and the first one's task stays.
- Readers take no lock: the manifest is replaced atomically, and a task file leaves the directory
  only after it has been unreferenced for :data:`GC_GRACE_SECONDS` (:mod:`gmem.store.gc`), so a
  reader finds every file of the manifest it listed (unless it waits longer than that to read it).
- Names never become paths: a task name is validated (:func:`gmem.store.files.validate_task_name`) and only a
  sanitised stem of it appears in file names; every path read from a manifest must resolve inside
  the memory directory, symlinks included (:func:`gmem.store.files.inside`); a task entry without a SHA-256 cannot
  be read.

- Garbage collection (:mod:`gmem.store.gc`, run by every manifest update) also tidies ``runs/``:
  stale temporary files, and the run folders of tasks that are not in the manifest and that nobody
  is learning (the learner's claim is a lock in the folder).

``flock`` needs a local file system (or NFSv4 with working locks).

The package: :mod:`.backend` (:class:`StoreBackend`, the interface the memory uses: a second backend,
e.g. an object store, implements it), :mod:`.directory` (:class:`Store`, the directory backend: the
manifest, the lock, merging, verification, repair), :mod:`.files` (names, paths, the bytes of task
and knowledge files, the errors), :mod:`.gc` (garbage collection).
"""
from __future__ import annotations

from .backend import StoreBackend
from .directory import FORMAT, Store
from .files import (
    MANIFEST,
    TASK_FORMAT,
    KnowledgeFileError,
    LockTimeoutError,
    ManifestError,
    TaskConflictError,
    TaskFileError,
    task_bytes,
    validate_task_name,
)

__all__ = ["Store", "StoreBackend", "FORMAT", "MANIFEST", "TASK_FORMAT", "TaskFileError", "KnowledgeFileError",
           "ManifestError", "LockTimeoutError", "TaskConflictError", "task_bytes", "validate_task_name"]
