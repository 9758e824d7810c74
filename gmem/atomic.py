"""Atomic file writes: a file users keep is either the old one or the complete new one, never half.

Each write goes to a temporary file with a unique name in the same directory (so two writers never
share one), is flushed to disk, and then replaces the target with ``os.replace``; on any error the
temporary file is removed and the target is left as it was.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_torch_save"]


def atomic_write(path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary binary file, fsync it, then move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj, path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (read it back with ``torch.load(weights_only=True)``)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))
