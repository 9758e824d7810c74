"""Digests of files: streamed (a file never has to fit in memory), optionally remembered per process.

:func:`file_digest` reads the file every time (checking a task file against its manifest hash must
see the bytes as they are now); :func:`cached_file_digest` remembers the digest of a file as long as
its size and modification time stay the same (the FID network, the compiled extension: large files
hashed again and again to build cache keys).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["file_digest", "cached_file_digest"]

_CHUNK = 1 << 20
_CACHE: dict[tuple, str] = {}


def file_digest(path, algorithm: str = "sha256") -> str:
    """The hex digest (``hashlib`` ``algorithm``) of the bytes of ``path``."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_file_digest(path, algorithm: str = "sha256") -> str:
    """:func:`file_digest`, computed once per file version (resolved path, size, mtime) in this process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, algorithm)
    if key not in _CACHE:
        _CACHE[key] = file_digest(path, algorithm)
    return _CACHE[key]
