"""The energy rule: how many singular values to keep.

The energy of a matrix is the sum of its singular values (Nikiforov). "Keep X of the energy" keeps the
fewest leading singular values whose sum reaches X of the total. ``keep = 0`` keeps nothing (rank 0:
an empty sum already reaches 0), ``keep = 1`` keeps every nonzero singular value (the exact matrix up
to rounding), a zero matrix has rank 0 at any ``keep``. Ties need no special case: the count depends on
the values only, and tied values are kept or dropped by position in the sorted list.

After a task, the paper's Algorithm 1 truncates the task's residual ``E_t`` with a fraction that depends
on the layer width (:func:`width_fraction`) and counts the energy already held by the shared knowledge
base towards it (:func:`residual_rank`).

That choice is one implementation, :class:`EnergyRule`, of :class:`RankRule`: the callable a
:class:`gmem.compress.knowledge.CompressionSettings` (``keep``) and :meth:`KnowledgeBase.add_task` take
to decide how many residual directions a task adds to the knowledge base. Another rule (a fixed rank,
a parameter budget) is a class with the same ``__call__``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol, Union, runtime_checkable

import torch
from torch import Tensor

__all__ = ["energy_rank", "truncate_energy", "residual_rank", "width_fraction", "WIDTH_FRACTIONS", "RankRule",
           "EnergyRule", "rank_rule"]

# Relative slack when comparing cumulative sums with the target, so that a cumulative sum that equals
# the target in exact arithmetic is not pushed one value further by the last bits of a float64 sum.
_SLACK = 1e-12

#: Kept energy fraction by layer width (output channels) after a task, as the released GAN memory code
#: chooses them: ``(width, fraction)``, the row of the largest width not above the layer's applies.
WIDTH_FRACTIONS = ((64, 1.0), (128, 1.0), (256, 0.95), (512, 0.9), (1024, 0.8))


def _check_keep(keep: float, what: str = "keep") -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"{what} must be a number in [0, 1], got {type(keep).__name__}")
    if not 0.0 <= keep <= 1.0:  # also rejects NaN
        raise ValueError(f"{what} must lie in [0, 1], got {keep!r}")
    return float(keep)


def _check_values(s: Tensor, what: str) -> Tensor:
    if not isinstance(s, Tensor) or s.ndim != 1 or not s.is_floating_point():
        raise ValueError(f"{what}: expected singular values as a 1-D float tensor, got "
                         f"{getattr(s, 'dtype', type(s).__name__)} {tuple(getattr(s, 'shape', ()))}")
    s = s.detach().to(torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{what}: singular values contain NaN or Inf")
    if bool((s < 0).any()):
        raise ValueError(f"{what}: singular values must be >= 0, got min {float(s.min())}")
    if s.numel() > 1 and bool((s[1:] > s[:-1]).any()):
        raise ValueError(f"{what}: singular values must be sorted in descending order")
    return s


def residual_rank(s: Tensor, keep: float, base_energy: float = 0.0) -> int:
    """The fewest leading values of ``s`` that, added to ``base_energy``, reach ``keep`` of the total.

    ``s [J]``: singular values in descending order; ``base_energy >= 0``: energy already held elsewhere
    (the knowledge base's ``sum |lam_t|``); the total is ``base_energy + sum(s)``. Returns ``r`` in
    ``0..J``: the smallest ``r`` with ``base_energy + s[:r].sum() >= keep * total``, so 0 whenever the
    base alone reaches ``keep``. ``base_energy = 0`` is the plain energy rule (:func:`energy_rank`).
    """
    s = _check_values(s, "residual_rank")
    keep = _check_keep(keep)
    base = float(base_energy)
    if not math.isfinite(base) or base < 0:
        raise ValueError(f"residual_rank: base_energy must be finite and >= 0, got {base_energy!r}")
    if s.numel() == 0:
        return 0
    cum = base + torch.cumsum(s, 0)
    total = float(cum[-1])
    if total == 0.0 or keep == 0.0:
        return 0
    need = keep * total * (1.0 - _SLACK)
    if base >= need:
        return 0
    return min(int((cum < need).sum()) + 1, s.numel())


def energy_rank(s: Tensor, keep: float) -> int:
    """The fewest leading singular values (``s [J]``, descending) whose sum reaches ``keep`` of the total.

    Returns 0 for ``keep = 0`` and for an all-zero ``s``; trailing exact zeros are never counted.
    """
    return residual_rank(s, keep, 0.0)


def _check_matrix(matrix: Tensor, what: str) -> None:
    if not isinstance(matrix, Tensor) or matrix.ndim != 2 or not matrix.is_floating_point():
        raise ValueError(f"{what}: expected a float matrix [m, n], got "
                         f"{getattr(matrix, 'dtype', type(matrix).__name__)} {tuple(getattr(matrix, 'shape', ()))}")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"{what}: the matrix {tuple(matrix.shape)} contains NaN or Inf")


def truncate_energy(matrix: Tensor, keep: float) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD keeping ``keep`` (0..1) of the matrix energy (the sum of singular values).

    ``matrix [m, n]`` -> ``u [m, r]``, ``s [r]`` (descending), ``v [n, r]`` in the matrix's dtype, with
    ``matrix ~= u @ diag(s) @ v.T`` and ``r`` = :func:`energy_rank` of its singular values: the fewest
    leading ones whose sum is at least ``keep`` of the total. ``keep = 0`` and a zero matrix give
    ``r = 0``; ``keep = 1`` keeps every nonzero singular value, so the product is the matrix up to
    rounding. The SVD runs in float64. A matrix with NaN or Inf raises ValueError.
    """
    _check_matrix(matrix, "truncate_energy")
    keep = _check_keep(keep)
    u, s, vh = torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)
    r = energy_rank(s, keep)
    dtype = matrix.dtype
    return u[:, :r].to(dtype), s[:r].to(dtype), vh[:r].transpose(0, 1).to(dtype)


def width_fraction(width: int) -> float:
    """The energy fraction kept after a task for a layer with ``width`` output channels.

    1.0 / 1.0 / 0.95 / 0.9 / 0.8 for 64 / 128 / 256 / 512 / >= 1024 channels (the released code's
    table). The released code defines only those five widths; here a width in between takes the row of
    the largest listed width not above it (e.g. 384 -> 0.95), and widths below 64 keep everything (1.0).
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width_fraction: width must be a positive int, got {width!r}")
    frac = 1.0
    for w, f in WIDTH_FRACTIONS:
        if width >= w:
            frac = f
    return frac


@runtime_checkable
class RankRule(Protocol):
    """How many residual directions a task adds to a knowledge base.

    ``s [J]``: the singular values of the task's residual ``E_t`` (descending, float64); ``base_energy``:
    the energy the base already holds for the task (``sum |lam_t|``); ``rows``: the matrix's rows (the
    layer's width). Returns ``r`` in ``0..J``. :meth:`describe` is what the task's record stores.
    """

    def __call__(self, s: Tensor, base_energy: float, rows: int) -> int: ...

    def describe(self) -> Union[float, str, None]: ...


@dataclass(frozen=True)
class EnergyRule:
    """The released code's rule: keep ``keep`` of the energy, the base's counting towards it
    (:func:`residual_rank`); ``keep=None``: :func:`width_fraction` of the layer's width."""

    keep: Optional[float] = None

    def __post_init__(self):
        if self.keep is not None:
            object.__setattr__(self, "keep", _check_keep(self.keep, "compression keep"))

    def fraction(self, rows: int) -> float:
        return width_fraction(rows) if self.keep is None else self.keep

    def __call__(self, s: Tensor, base_energy: float, rows: int) -> int:
        return residual_rank(s, self.fraction(rows), base_energy)

    def describe(self) -> Optional[float]:
        return self.keep


def rank_rule(keep: Union[None, float, RankRule]) -> RankRule:
    """``keep`` as a rule: a :class:`RankRule` as it is, a fraction or None as an :class:`EnergyRule`."""
    if isinstance(keep, RankRule):
        return keep
    if callable(keep):
        raise TypeError(f"keep: a rank rule needs __call__(s, base_energy, rows) and describe(), got {keep!r}")
    return EnergyRule(keep)
