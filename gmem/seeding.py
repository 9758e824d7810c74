"""Seeding helpers, in one place: seeded generators and scoped global seeding.

Library code never seeds the global RNGs: randomness that must be reproducible comes from a
``torch.Generator`` (:func:`generator`), and code that has to use the global RNG (module
constructors initialise weights from it) runs inside :func:`seeded`, which restores the global
state afterwards. Only CLI entry points may seed globally.
"""
from __future__ import annotations

import contextlib
import secrets
from typing import Iterator, Optional

import torch

__all__ = ["generator", "seeded", "random_seed"]


def generator(seed: int, device="cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(int(seed))


def random_seed() -> int:
    """A fresh seed in ``[0, 2**31)`` from the OS (for runs that record the seed they drew)."""
    return secrets.randbelow(2**31)


@contextlib.contextmanager
def seeded(seed: Optional[int]) -> Iterator[None]:
    """Run the block with the global CPU RNG seeded to ``seed``; the previous state is restored after.

    ``seed=None`` leaves the global RNG alone (the block draws from it as usual).
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield
