"""The interface of a memory's store: what :mod:`gmem.memory` and :mod:`gmem.cli` call.

:class:`gmem.store.Store` (a directory on a local file system) is the implementation; a second backend
(an object store, a database) implements the same methods with the same guarantees: task files are
immutable and content addressed (the caller gives the bytes, :func:`gmem.store.files.task_bytes`),
:meth:`commit` merges one writer's changes into the manifest atomically and refuses conflicting ones
(:class:`gmem.store.TaskConflictError`), readers never see a half-written state, and nothing read
from a manifest reaches outside the store.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Optional, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["StoreBackend"]


@runtime_checkable
class StoreBackend(Protocol):
    """A memory's persistent state: a manifest (base, conversion, ordered task entries) and task files."""

    def prepare(self) -> "StoreBackend":
        """Make the store ready for writing (create it if it does not exist)."""

    def read_manifest(self) -> dict:
        """The validated manifest (FileNotFoundError when the store holds no memory)."""

    def commit(self, base: dict, conversion: dict, put: Iterable[dict], *, refresh: Iterable[dict] = (),
               removed: Iterable[str] = (), known: Optional[dict] = None,
               before_write: Optional[Callable[[], None]] = None, version: str = "",
               timeout: Optional[float] = None, knowledge=(), known_knowledge=None) -> dict:
        """Merge one writer's task entries into the manifest atomically; the new manifest."""

    def write_task(self, name: str, data: bytes) -> tuple[str, str]:
        """Store a task file's bytes; ``(file, sha256)`` for its manifest entry."""

    def read_task(self, name: str, entry: dict) -> dict[str, Tensor]:
        """The tensors of a task file, checked against its entry (TaskFileError naming it)."""

    def read_task_bytes(self, name: str, entry: dict) -> bytes:
        """The checked bytes of a task file (copying a task to another store)."""

    def entry_path(self, entry: dict) -> Path:
        """Where an entry's task file is (named in error messages)."""

    def read_knowledge(self, entry: dict) -> dict:
        """The knowledge-base layout of the compressed tasks."""

    def write_knowledge(self, data: bytes) -> tuple[str, str]:
        """Store a knowledge-base layout; ``(file, sha256)``."""

    def inside(self, rel, field: str = "path") -> Path:
        """A location read from the manifest, refused if it leaves the store."""

    def folder(self, rel, field: str = "path") -> Path:
        """A folder read from the manifest (e.g. the base), refused if it or anything in it leaves the store."""

    def lock(self, timeout: Optional[float] = None) -> contextlib.AbstractContextManager:
        """The writers' lock around a manifest update."""

    def claim(self, name: str) -> contextlib.AbstractContextManager:
        """This process's claim on learning task ``name`` (TaskConflictError if another holds it)."""

    def verify_files(self) -> dict[str, Optional[str]]:
        """``{task: None or what is wrong}`` for every task of the manifest."""

    def remove_tasks(self, names: Iterable[str], *, timeout: Optional[float] = None) -> list[str]:
        """Drop tasks from the manifest; those dropped."""

    def repair(self, *, also: Optional[dict] = None, timeout: Optional[float] = None) -> dict[str, str]:
        """Drop every task whose file cannot be read; ``{task: problem}``."""

    def collect_garbage(self, *, manifest: Optional[dict] = None, grace: float = ...) -> list:
        """Delete what the manifest no longer needs."""
