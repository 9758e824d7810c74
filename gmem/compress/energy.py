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

The default rule is :class:`ResidualEnergyRule`: it looks at the residual alone (what the stored basis
does not explain, after the task's coefficients are refitted by least squares), keeps ``keep`` of *its*
energy unless the whole residual is negligible next to the task's matrix, and never lets a task's new
columns cost more than ``budget`` of the dense matrix. The released rule counts the base's energy
towards the target instead, so a later task whose matrix is mostly explained by the base keeps none of
what it learned outside it; and its width table keeps every singular value of layers below 256
channels, which then cost more as factors than dense.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol, Union, runtime_checkable

import torch
from torch import Tensor

__all__ = ["energy_rank", "truncate_energy", "residual_rank", "width_fraction", "WIDTH_FRACTIONS", "RankRule",
           "EnergyRule", "ResidualEnergyRule", "rank_rule", "budget_rank"]

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
    the energy the base already holds for the task (``sum |lam_t|``); ``rows``, ``cols``: the matrix's
    shape ``[O, I]`` (``rows`` is the layer's width). Returns ``r`` in ``0..J``. :meth:`describe` is what
    the task's record stores (JSON: a number, a string or a dict that :func:`rank_rule` reads back).
    """

    def __call__(self, s: Tensor, base_energy: float, rows: int, cols: int) -> int: ...

    def describe(self) -> Union[float, str, dict, None]: ...


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

    def __call__(self, s: Tensor, base_energy: float, rows: int, cols: int = 0) -> int:
        return residual_rank(s, self.fraction(rows), base_energy)

    def describe(self) -> Union[float, str]:
        return "width" if self.keep is None else self.keep


def budget_rank(rows: int, cols: int, budget: float) -> int:
    """The most new columns whose values ``r (rows + cols + 1)`` stay within ``budget`` of ``rows * cols``."""
    return max(0, int(math.floor(budget * rows * cols / (rows + cols + 1))))


@dataclass(frozen=True)
class ResidualEnergyRule:
    """The default rule: a task's new columns come from the energy of what the stored basis does not explain.

    ``s [J]`` are the singular values of the task's residual ``E_t`` (with its coefficients refitted on
    the basis by least squares first: ``project``), ``b`` the base's energy for the task. The rule drops
    the trailing residual energy ``sum(s[r:])`` up to ``max((1 - keep) sum(s), tolerance (b + sum(s)))``:
    ``keep`` of the residual's own energy, unless the residual is within ``tolerance`` of the task's whole
    energy (then the base already explains the task and the task adds nothing, or little). So a later
    task adds columns exactly where it learned something new, and the error of the stored matrix is at
    most the dropped energy (``||E - E_r||_F <= sum(s[r:])``).

    A budget bounds the new columns' values, ``r (O + I + 1) <= budget O I`` (:func:`budget_rank`):
    ``budget`` for the first task of a base (``b = 0``: it has no basis to lean on), ``later_budget``
    for every later one. So a task never stores more than naive on any base; a task whose residual
    needs more is cut at the budget, and :meth:`KnowledgeBase.add_task` reports it (``"capped": True``).
    """

    keep: float = 0.9
    tolerance: float = 0.02
    budget: float = 0.33
    later_budget: float = 0.06
    project = True  # refit the coefficients on the basis before the residual is measured

    def __post_init__(self):
        for what in ("keep", "tolerance", "budget", "later_budget"):
            object.__setattr__(self, what, _check_keep(getattr(self, what), f"ResidualEnergyRule {what}"))

    def allowed_loss(self, s: Tensor, base_energy: float) -> float:
        """The residual energy the rule may drop for singular values ``s [J]`` and the base's energy."""
        residual = float(s.sum())
        return max((1.0 - self.keep) * residual, self.tolerance * (float(base_energy) + residual))

    def energy_rank(self, s: Tensor, base_energy: float) -> int:
        """The fewest leading values whose trailing sum is within :meth:`allowed_loss` (no budget)."""
        s = _check_values(s, "ResidualEnergyRule")
        if s.numel() == 0:
            return 0
        allowed = self.allowed_loss(s, base_energy) * (1.0 + _SLACK)
        trailing = torch.flip(torch.cumsum(torch.flip(s, (0,)), 0), (0,))  # trailing[r] = sum(s[r:])
        return int((trailing > allowed).sum())  # trailing is non-increasing: the first ones exceed it

    def max_rank(self, rows: int, cols: int, base_energy: float) -> int:
        """The budget's bound on the new columns (first task of a base when ``base_energy`` is 0)."""
        return budget_rank(rows, cols, self.budget if float(base_energy) == 0.0 else self.later_budget)

    def __call__(self, s: Tensor, base_energy: float, rows: int, cols: int) -> int:
        return min(self.energy_rank(s, base_energy), self.max_rank(rows, cols, base_energy))

    def describe(self) -> dict:
        return {"rule": "residual", "keep": self.keep, "tolerance": self.tolerance, "budget": self.budget,
                "later_budget": self.later_budget}


def rank_rule(keep: Union[None, float, str, dict, RankRule]) -> RankRule:
    """``keep`` as a rule: a :class:`RankRule` as it is; None: the default :class:`ResidualEnergyRule`;
    a fraction: the released :class:`EnergyRule` at that fraction; ``"width"``: the released width rule;
    a dict from :meth:`ResidualEnergyRule.describe`: that rule again."""
    if isinstance(keep, RankRule):
        return keep
    if keep is None:
        return ResidualEnergyRule()
    if isinstance(keep, str):
        if keep != "width":
            raise ValueError(f"keep: the only rule named by a string is 'width' (the released width rule), "
                             f"got {keep!r}")
        return EnergyRule(None)
    if isinstance(keep, dict):
        fields = dict(keep)
        if fields.pop("rule", None) != "residual" or not set(fields) <= {"keep", "tolerance", "budget", "later_budget"}:
            raise ValueError(f"keep: a dict must describe a residual rule ({{'rule': 'residual', 'keep', "
                             f"'tolerance', 'budget', 'later_budget'}}), got {keep!r}")
        return ResidualEnergyRule(**fields)
    if callable(keep):
        raise TypeError(f"keep: a rank rule needs __call__(s, base_energy, rows, cols) and describe(), got {keep!r}")
    return EnergyRule(keep)
