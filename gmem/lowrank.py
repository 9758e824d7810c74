"""Low-rank style matrices: the training-time parameterisation of a compressed style matrix and its prior.

Tensor math below :mod:`gmem.nn` (whose low-rank bank entries hold :class:`LowRankStyle` objects) and
:mod:`gmem.compress` (the knowledge bases, the task life cycle, the settings) alike; it imports only
:mod:`gmem.ops`.

While task ``t`` is learned, one style matrix (``Gamma`` or ``B`` of one conv, ``[O, I]``) is

    G_t = L diag(lam_t) R^T + E_t

with the knowledge base ``L [O, K]``, ``R [I, K]`` frozen, ``lam_t [K]`` and the residual ``E_t [O, I]``
trainable. ``E_t`` is pulled towards low rank by the weighted nuclear norm
``r * sum_j eta_j s_j(E_t)``, ``eta_j = 0.1 + sigmoid(10 j / J)`` (``j = 0..J-1`` over the ``J``
singular values in descending order, so trailing directions cost more than leading ones), ``r = 0.01``.
The released training code adds it to the generator loss on every iteration that is a multiple of 10
(:data:`gmem.compress.knowledge.PRIOR_EVERY`), at full weight, for every compressed ``Gamma`` and ``B``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .ops import LowRank

__all__ = ["nuclear_prior", "prior_weights", "LowRankStyle", "PRIOR_WEIGHT"]

#: Weight ``r`` of the nuclear-norm prior.
PRIOR_WEIGHT = 0.01


def prior_weights(n: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """``eta [n]``: ``eta_j = 0.1 + sigmoid(10 j / n)`` for ``j = 0..n-1`` (increasing in ``j``)."""
    j = torch.arange(n, dtype=dtype, device=device)
    return 0.1 + torch.sigmoid(10.0 * j / max(n, 1))


def nuclear_prior(matrix: Tensor, weighted: bool = True, weight: float = PRIOR_WEIGHT) -> Tensor:
    """The low-rank prior of one residual: ``weight * sum_j eta_j * s_j(matrix)`` as a scalar.

    ``matrix [O, I]`` or a stack ``[..., O, I]`` (the stack's priors are summed). ``weighted=False``
    gives the plain nuclear norm ``weight * sum_j s_j`` (the design's choice for the first task; the
    released code uses the weighted form for every task). Differentiable in ``matrix``; at repeated or
    zero singular values the gradient is a valid subgradient (finite). NaN/Inf raise ValueError.
    """
    if not isinstance(matrix, Tensor) or matrix.ndim < 2 or not matrix.is_floating_point():
        raise ValueError(f"nuclear_prior: expected a float matrix [..., O, I], got "
                         f"{getattr(matrix, 'dtype', type(matrix).__name__)} {tuple(getattr(matrix, 'shape', ()))}")
    if not bool(torch.isfinite(matrix.detach()).all()):
        raise ValueError(f"nuclear_prior: the matrix {tuple(matrix.shape)} contains NaN or Inf")
    s = torch.linalg.svdvals(matrix)
    if weighted:
        s = s * prior_weights(s.shape[-1], s.dtype, s.device)
    return weight * s.sum()


class LowRankStyle(nn.Module):
    """One style matrix during training: ``G = L diag(lam) R^T + E``.

    ``L [O, K]`` and ``R [I, K]`` are the frozen knowledge base (buffers, ``K`` may be 0 for the first
    task); ``lam [K]`` and ``residual [O, I]`` are parameters. ``lam`` defaults to ones (the caller
    passes :meth:`KnowledgeBase.next_coefficients`, the previous task's coefficients, for later tasks),
    ``residual`` to zeros. Inputs are copied; the dtype is the base's (or the residual's when K = 0).
    """

    def __init__(self, L: Tensor, R: Tensor, lam: Optional[Tensor] = None, residual: Optional[Tensor] = None):
        super().__init__()
        for name, t in (("L", L), ("R", R)):
            if not isinstance(t, Tensor) or t.ndim != 2 or not t.is_floating_point():
                raise ValueError(f"LowRankStyle: {name} must be a float matrix, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if L.shape[1] != R.shape[1]:
            raise ValueError(f"LowRankStyle: L {tuple(L.shape)} and R {tuple(R.shape)} have different column counts")
        o, i, k = L.shape[0], R.shape[0], L.shape[1]
        dtype = residual.dtype if (k == 0 and isinstance(residual, Tensor)) else L.dtype
        if lam is None:
            lam = torch.ones(k, dtype=dtype, device=L.device)
        if residual is None:
            residual = torch.zeros(o, i, dtype=dtype, device=L.device)
        if not isinstance(lam, Tensor) or lam.shape != (k,):
            raise ValueError(f"LowRankStyle: lam must be [K] = [{k}], got {tuple(getattr(lam, 'shape', ()))}")
        if not isinstance(residual, Tensor) or residual.shape != (o, i):
            raise ValueError(f"LowRankStyle: residual must be [O, I] = [{o}, {i}], "
                             f"got {tuple(getattr(residual, 'shape', ()))}")
        self.register_buffer("L", L.detach().to(dtype).clone())
        self.register_buffer("R", R.detach().to(dtype).clone())
        self.lam = nn.Parameter(lam.detach().to(dtype).clone())
        self.residual = nn.Parameter(residual.detach().to(dtype).clone())

    @classmethod
    def from_base(cls, base, residual: Optional[Tensor] = None) -> "LowRankStyle":
        """The parameterisation of the next task on a :class:`KnowledgeBase` (``lam`` from the last task)."""
        L, R = base.columns()
        return cls(L, R, base.next_coefficients(), residual)

    @property
    def shape(self) -> torch.Size:
        return self.residual.shape

    def base_part(self) -> LowRank:
        """``L diag(lam) R^T`` as factors ``(L [O, K], lam [K], R [I, K])``, differentiable in ``lam``."""
        return LowRank(self.L, self.lam, self.R)

    def dense(self) -> Tensor:
        """``G [O, I] = L diag(lam) R^T + E``, differentiable in ``lam`` and ``E``."""
        return (self.L * self.lam) @ self.R.T + self.residual

    def prior(self, first_task: bool = False, weight: float = PRIOR_WEIGHT) -> Tensor:
        """:func:`nuclear_prior` of the residual (plain sum for the first task)."""
        return nuclear_prior(self.residual, weighted=not first_task, weight=weight)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, base_rank={self.L.shape[1]}"
