"""Atomic file writes: a file users keep is either the old one or the complete new one, never half.

The one place in the package that writes files atomically (memories, checkpoints, caches, plots).
Each write goes to a temporary file with a unique name in the same directory (pid + random, so two
writers never share one), is flushed to disk, made readable like an ordinary file (0644), and then
replaces the target with ``os.replace``; the directory is synced so the rename survives a crash where
the file system allows it. On any error the temporary file is removed and the target is left as it was.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "atomic_write_path", "atomic_write_bytes", "atomic_torch_save", "temporary_name"]


def temporary_name(path: Path) -> Path:
    """A hidden temporary name next to ``path``, unique per process and call; ends in ``.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def atomic_write_path(path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_name)`` (for libraries that write by file name), then move the file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:  # the data must be on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    with contextlib.suppress(OSError):  # make the rename durable (not every file system allows this)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def atomic_write(path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a new temporary binary file, then move it onto ``path``."""
    def to_file(tmp: str) -> None:
        with open(tmp, "xb") as f:
            write(f)

    return atomic_write_path(path, to_file)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj, path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (read it back with ``torch.load(weights_only=True)``).

    A write that fails inside torch's writer (which reports it as a RuntimeError of its own, e.g.
    ``[enforce fail at inline_container.cc] unexpected pos``) is the OSError of the failed write
    (ENOSPC for a full disk), naming ``path``.
    """
    import torch

    writes = []

    def save(f):
        recorder = _WriteErrors(f)
        writes.append(recorder)
        torch.save(obj, recorder)

    try:
        return atomic_write(path, save)
    except OSError as e:
        if e.filename is not None:
            raise
        error = e
    except RuntimeError as e:
        error = writes[-1].error if writes else None
        if error is None:
            if "write" not in str(e).lower() and "inline_container" not in str(e):
                raise
            full = _free_bytes(Path(path).parent) < 1 << 20
            error = OSError(errno.ENOSPC if full else errno.EIO, "")
    code = error.errno or errno.EIO
    raise OSError(code, f"{os.strerror(code)} while writing a checkpoint", str(path)) from None


class _WriteErrors:
    """A binary file for ``torch.save`` that remembers the OSError of a failed write: torch's writer
    turns it into a RuntimeError without the errno."""

    def __init__(self, f):
        self.file, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def _free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize
