"""Low-rank style sets: ``Gamma = u diag(s) v^T``, optionally one per task."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LowRank", "lowrank_dense", "lowrank_factor_grads"]


def lowrank_dense(u: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """``u diag(s) v^T``: ``u [*, O, r], s [*, r], v [*, I, r]`` -> ``[*, O, I]``, differentiable."""
    return (u * s.unsqueeze(-2)) @ v.transpose(-1, -2)


def lowrank_factor_grads(dense_grad: Tensor, u: Tensor, s: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(du, ds, dv)`` of ``G = u diag(s) v^T`` from ``dG [*, O, I]`` (docs/design.md, section 4;
    differentiable), shaped like ``u, s, v``."""
    dg_v = dense_grad @ v  # [*, O, r]
    du = dg_v * s.unsqueeze(-2)
    dv = (dense_grad.transpose(-1, -2) @ u) * s.unsqueeze(-2)
    ds = (dg_v * u).sum(-2)
    return du, ds, dv


class LowRank:
    """A matrix (or a stack of matrices) kept as factors: dense value ``u @ diag(s) @ v.T``.

    Shapes: ``u [*lead, O, r]``, ``s [*lead, r]``, ``v [*lead, I, r]``, dense ``[*lead, O, I]``; the
    optional leading dimension is the task. Gradients flow to the factors. A shared knowledge base
    ``L diag(lam) R^T`` plus a task's own ``U diag(s) V^T`` is one LowRank of rank ``r_L + r_U``:
    ``LowRank.concat(base, own)`` (see docs/design.md, section 4).
    """

    __slots__ = ("u", "s", "v")

    def __init__(self, u: Tensor, s: Tensor, v: Tensor):
        for name, t in (("u", u), ("s", s), ("v", v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"LowRank: {name} must be a Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"LowRank: {name} must be floating point, got {t.dtype}")
        if u.ndim not in (2, 3) or v.ndim != u.ndim or s.ndim != u.ndim - 1:
            raise ValueError(
                "LowRank: expected u [*lead, O, r], s [*lead, r], v [*lead, I, r] with at most one "
                f"leading (task) dimension, got u {tuple(u.shape)}, s {tuple(s.shape)}, v {tuple(v.shape)}"
            )
        r = u.shape[-1]
        if s.shape[-1] != r or v.shape[-1] != r or u.shape[:-2] != v.shape[:-2] or s.shape[:-1] != u.shape[:-2]:
            raise ValueError(
                f"LowRank: factor shapes disagree (rank or task count): u {tuple(u.shape)}, "
                f"s {tuple(s.shape)}, v {tuple(v.shape)}"
            )
        if not (u.dtype == s.dtype == v.dtype):
            raise TypeError(f"LowRank: factors must share a dtype, got {u.dtype}, {s.dtype}, {v.dtype}")
        if not (u.device == s.device == v.device):
            raise ValueError(f"LowRank: factors must share a device, got {u.device}, {s.device}, {v.device}")
        self.u, self.s, self.v = u, s, v

    @property
    def rank(self) -> int:
        return self.u.shape[-1]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.u.shape[:-1], self.v.shape[-2]))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.u.dtype

    @property
    def device(self) -> torch.device:
        return self.u.device

    def dense(self) -> Tensor:
        """The dense value ``u diag(s) v^T``, differentiable in the factors."""
        return lowrank_dense(self.u, self.s, self.v)

    @staticmethod
    def concat(*parts: "LowRank") -> "LowRank":
        """The sum of several low-rank terms as one LowRank (factors concatenated along the rank).

        Shared terms without a task dimension are broadcast to the others' task count.
        """
        if not parts:
            raise ValueError("LowRank.concat: need at least one term")
        lead = max((p.u.shape[:-2] for p in parts), key=len)
        us, ss, vs = [], [], []
        for p in parts:
            us.append(p.u.expand(*lead, *p.u.shape[-2:]))
            ss.append(p.s.expand(*lead, p.s.shape[-1]))
            vs.append(p.v.expand(*lead, *p.v.shape[-2:]))
        return LowRank(torch.cat(us, -1), torch.cat(ss, -1), torch.cat(vs, -1))

    def __repr__(self) -> str:
        return f"LowRank(shape={tuple(self.shape)}, rank={self.rank}, dtype={self.dtype})"
