"""Exponential moving average of a generator's trainable parameters (the weights used for sampling)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["EMA"]


class EMA:
    """``shadow = decay * shadow + (1 - decay) * live`` after every generator update.

    ``live``: the trained parameters; ``shadow``: tensors of the same shapes that hold the average
    (default: copies of ``live``; pass e.g. ``list(G_ema.parameters())`` to average into a module).
    ``warmup``: the decay at update ``t`` is ``min(decay, (1 + t) / (10 + t))``, so that a short run is
    not dominated by the initial weights (the released code uses a constant decay).
    """

    def __init__(self, live: Sequence[Tensor], decay: float = 0.999, warmup: bool = False,
                 shadow: Optional[Sequence[Tensor]] = None):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay!r}")
        self.live = list(live)
        if shadow is None:
            shadow = [p.detach().clone() for p in self.live]
        self.shadow = list(shadow)
        if [s.shape for s in self.shadow] != [p.shape for p in self.live]:
            raise ValueError("EMA: shadow tensors do not match the live parameters")
        self.decay, self.warmup = float(decay), bool(warmup)

    def decay_at(self, t: int) -> float:
        return min(self.decay, (1.0 + t) / (10.0 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, t: int) -> None:
        weight = 1.0 - self.decay_at(t)
        for s, p in zip(self.shadow, self.live):
            s.lerp_(p.detach(), weight)

    @torch.no_grad()
    def copy_to_live(self) -> None:
        """Make the live parameters the averaged ones (the end of training)."""
        for s, p in zip(self.shadow, self.live):
            p.copy_(s)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the live parameters hold the averaged values (e.g. to draw samples)."""
        saved = [p.detach().clone() for p in self.live]
        self.copy_to_live()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.live, saved):
                    p.copy_(v)

    def state_dict(self) -> list[Tensor]:
        return [s.detach().clone() for s in self.shadow]

    @torch.no_grad()
    def load_state_dict(self, state: Sequence[Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state)} tensors, expected {len(self.shadow)}")
        for s, v in zip(self.shadow, state):
            s.copy_(v)
