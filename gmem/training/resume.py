"""Honest resume: a checkpoint continues a run only if it is the same run.

A run's *fingerprint* is a JSON-like dict: what is being trained (a task name, a base hash), the
settings, and the identity of the data (:func:`data_fingerprint`, a hash of the training tensors).
It is stored in every checkpoint; :func:`check_fingerprint` compares it with the current run and
raises :class:`ResumeMismatch` naming every entry that differs.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

from ..models import CheckpointError

__all__ = ["ResumeMismatch", "data_fingerprint", "check_fingerprint"]


class ResumeMismatch(CheckpointError):
    """A checkpoint that belongs to another run (other data, settings or base); the message says what differs."""


def _update(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)};".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def data_fingerprint(dataset, labels: Optional[torch.Tensor] = None) -> str:
    """SHA-256 of the training images as the trainer sees them (after resizing) and their labels.

    In-memory datasets (folders, array files, tensors: :class:`gmem.data.TensorImages`) hash their
    tensor at once; other datasets are read item by item.
    """
    h = hashlib.sha256()
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor):
        _update(h, images)
    else:
        h.update(f"items{len(dataset)};".encode())
        for i in range(len(dataset)):
            item = dataset[i]
            _update(h, torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item))
    if labels is not None:
        h.update(b"labels;")
        _update(h, torch.as_tensor(labels).long())
    return h.hexdigest()


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(v) -> str:
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12] + "..."  # a hash
    return repr(v)


def check_fingerprint(path, stored: Optional[dict], current: dict, hint: str) -> None:
    """Raise :class:`ResumeMismatch` unless ``stored == current`` (every differing entry is named)."""
    if stored is None:
        raise ResumeMismatch(f"{path} was written by an older gmem (no run fingerprint, other training "
                             f"semantics); it cannot be resumed. {hint}")
    a, b = _flatten(stored), _flatten(current)
    diffs = [f"{k}={_show(a.get(k))} in the checkpoint, {k}={_show(b.get(k))} now"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
        raise ResumeMismatch(f"{path} belongs to another run ({'; '.join(diffs)}). {hint}")
