"""Work that rank 0 alone does: files, progress bars, anything wrapped in :func:`main_only`."""
from __future__ import annotations

import functools
from typing import Callable

from ..atomic import atomic_torch_save
from . import group as _group

__all__ = ["main_only", "progress", "save_on_main"]


def main_only(fn: Callable) -> Callable:
    """Decorator: run ``fn`` on rank 0 only; other ranks return None without calling it."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if _group.is_main() else None
    return wrapper


def progress(*args, **kwargs):
    """A ``tqdm`` bar shown on rank 0 only (``disable=True`` elsewhere); arguments go to tqdm."""
    from tqdm import tqdm

    if not _group.is_main():
        kwargs["disable"] = True
    return tqdm(*args, **kwargs)


def save_on_main(obj, path, *, wait: bool = False) -> None:
    """Rank 0 writes ``torch.save(obj)`` to ``path`` atomically (:func:`gmem.atomic.atomic_torch_save`).

    Other ranks write nothing. With ``wait=True`` every rank returns only once the file is in place
    (a barrier), for code that reads it next.
    """
    if _group.is_main():
        atomic_torch_save(obj, path)
    if wait:
        _group.barrier()
