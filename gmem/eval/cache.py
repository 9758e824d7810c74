"""Where evaluation results that are costly to recompute are kept, and how their keys are made.

Real-data FID statistics and the accuracy classifier are keyed by a fingerprint of the exact data
they come from plus the identity of whatever computed them, so a changed dataset, subset or network
can never reuse a stale entry. Files are written through :mod:`gmem.atomic`: a reader sees the old
file or the new one, never half of one.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import torch

__all__ = ["cache_dir", "fingerprint"]


def cache_dir() -> Path:
    """The user's gmem cache: ``$GMEM_CACHE_DIR`` if set, else ``~/.cache/gmem`` (not created here)."""
    env = os.environ.get("GMEM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gmem"


def fingerprint(batches: Iterable[torch.Tensor], *extra: str) -> str:
    """SHA-256 (hex) of a stream of tensors, canonicalised to contiguous float32 on the CPU.

    Each tensor's shape goes into the hash with its values, so the same values split into different
    batches give different fingerprints only if the batch shapes differ; callers fix the batching.
    ``extra`` strings (sizes, versions, ...) are hashed first.
    """
    h = hashlib.sha256()
    for e in extra:
        h.update(e.encode() + b"\0")
    for b in batches:
        t = torch.as_tensor(b).detach().to("cpu", torch.float32).contiguous()
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


