"""Low-rank task entries of a modulated conv's bank (the paper's compression, Section 4.3).

A conv's (or a compressed linear layer's) bank entry for one task is one of three kinds (:func:`entry_kind`):

- ``"dense"``: :class:`gmem.nn.layers.ConvStyle`, ``gamma, beta [O, I]`` stored as they are;
- ``"lowrank-training"``: :class:`TrainingLowRankStyle`, while a compressed task learns:
  ``gamma = L_g diag(lam_g) R_g^T + E_g`` (and the same for ``beta``) with the knowledge base frozen,
  ``lam`` and ``E`` trainable (:class:`gmem.lowrank.LowRankStyle`); ``gamma``/``beta`` read as dense,
  differentiable tensors;
- ``"lowrank"``: :class:`CompressedStyle`, a stored compressed task: ``gamma``/``beta`` read as
  :class:`gmem.ops.LowRank` factors from the layer's two :class:`gmem.compress.KnowledgeBase` objects
  (``KnowledgeBase.express``), never densified by the entry; the op rebuilds them (per weight build or
  tile, depending on the backend).

Every kind exposes ``gamma``, ``beta``, ``bias`` (so :meth:`ModulatedLayer.style` is unchanged),
:meth:`state` (what a task file stores) and :meth:`targets` (the tensors a stored state is copied into).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor, nn

from ..lowrank import LowRankStyle
from ..ops import LowRank

__all__ = ["TrainingLowRankStyle", "CompressedStyle", "entry_kind", "stack_styles", "LOWRANK_FIELDS"]

#: Per compressed matrix, the task file keys ``<layer>.lowrank.<gamma|beta>.<field>``.
LOWRANK_FIELDS = ("lam", "u", "s", "v")


class TrainingLowRankStyle(nn.Module):
    """A compressed layer's style set while its task trains: ``gamma_style``, ``beta_style``
    (:class:`~gmem.lowrank.LowRankStyle`, each ``[O, I]``) and ``bias`` (``[O]`` of a conv).

    ``flat``: the layer is linear (mFiLM); ``gamma``/``beta`` read as the vectors ``[rows * cols]``
    (the row-major flattening of the ``[rows, cols]`` matrices), the bias is the layer's as it is.
    """

    kind = "lowrank-training"

    def __init__(self, gamma_style: LowRankStyle, beta_style: LowRankStyle, bias: Tensor, flat: bool = False):
        super().__init__()
        if gamma_style.shape != beta_style.shape:
            raise ValueError(f"TrainingLowRankStyle: gamma {tuple(gamma_style.shape)} and beta "
                             f"{tuple(beta_style.shape)} differ")
        self.gamma_style, self.beta_style = gamma_style, beta_style
        self.flat = bool(flat)
        self.bias = nn.Parameter(bias.detach().clone())

    @property
    def gamma(self) -> Tensor:
        g = self.gamma_style.dense()
        return g.reshape(-1) if self.flat else g

    @property
    def beta(self) -> Tensor:
        b = self.beta_style.dense()
        return b.reshape(-1) if self.flat else b

    def state(self) -> dict[str, Tensor]:
        return {"gamma": self.gamma.detach().clone(), "beta": self.beta.detach().clone(),
                "bias": self.bias.detach().clone()}

    def targets(self) -> dict[str, Tensor]:
        return {"bias": self.bias}

    def priors(self) -> list[LowRankStyle]:
        return [self.gamma_style, self.beta_style]


class CompressedStyle(nn.Module):
    """A stored compressed task of a layer: its name in the layer's knowledge bases and its bias.

    ``bases = (gamma_base, beta_base)``: the layer's :class:`~gmem.compress.KnowledgeBase` objects
    (shared by every compressed task of the layer; held by reference, not as submodules, so the
    module's ``state_dict`` holds only the bias). A conv reads ``gamma``/``beta`` as LowRank factors
    (the op rebuilds them). ``flat`` (a linear layer): they read as dense vectors ``[rows * cols]``,
    rebuilt from the factors on every read (``KnowledgeBase.dense`` flattened: the layer's natural
    size, and exactly the densified value).
    """

    kind = "lowrank"

    def __init__(self, bases, task: str, bias: Tensor, flat: bool = False):
        super().__init__()
        self.flat = bool(flat)
        gamma_base, beta_base = bases
        for what, base in (("gamma", gamma_base), ("beta", beta_base)):
            if task not in base:
                raise KeyError(f"CompressedStyle: task {task!r} is not in the {what} knowledge base")
        self._bases = (gamma_base, beta_base)
        self.task = task
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def gamma(self) -> Union[LowRank, Tensor]:
        return self._bases[0].dense(self.task).reshape(-1) if self.flat else self._bases[0].express(self.task)

    @property
    def beta(self) -> Union[LowRank, Tensor]:
        return self._bases[1].dense(self.task).reshape(-1) if self.flat else self._bases[1].express(self.task)

    def state(self) -> dict[str, Tensor]:
        out = {"bias": self.bias.detach().clone()}
        for group, base in zip(("gamma", "beta"), self._bases):
            sd = base.state_dict()
            for field in LOWRANK_FIELDS:
                out[f"lowrank.{group}.{field}"] = sd[f"tasks.{self.task}.{field}"]
        return out

    def targets(self) -> dict[str, Tensor]:
        return {"bias": self.bias}

    def stored_values(self) -> int:
        """Values this task stores in the layer: its coefficients and new columns (both matrices) and the bias."""
        return sum(b.stored_values(self.task) for b in self._bases) + self.bias.numel()

    def extra_repr(self) -> str:
        return f"task={self.task!r}, ranks={[b.express(self.task).rank for b in self._bases]}"


def entry_kind(entry: nn.Module) -> str:
    """``"dense"``, ``"lowrank-training"`` or ``"lowrank"``."""
    return getattr(entry, "kind", "dense")


def _pad(value: LowRank, rank: int) -> LowRank:
    extra = rank - value.rank
    if extra == 0:
        return value
    u, s, v = value.u, value.s, value.v
    return LowRank(torch.cat([u, u.new_zeros(u.shape[0], extra)], 1), torch.cat([s, s.new_zeros(extra)]),
                   torch.cat([v, v.new_zeros(v.shape[0], extra)], 1))


def stack_styles(values: Sequence[Union[Tensor, LowRank]]) -> Union[Tensor, LowRank]:
    """Stack one style matrix of several tasks: ``[T, O, I]`` dense, or a LowRank ``[T, ...]``.

    All LowRank: the factors are zero-padded to the largest rank and stacked (a zero column adds
    nothing), so the op keeps its factored path. Mixed dense and LowRank (e.g. the source or a naive
    task next to compressed ones): the LowRank ones present in this batch are densified and stacked
    with the others (only the tasks the batch uses, never the whole bank).
    """
    if all(isinstance(v, Tensor) for v in values):
        return torch.stack(list(values))
    if all(isinstance(v, LowRank) for v in values):
        rank = max(v.rank for v in values)
        padded = [_pad(v, rank) for v in values]
        return LowRank(torch.stack([p.u for p in padded]), torch.stack([p.s for p in padded]),
                       torch.stack([p.v for p in padded]))
    return torch.stack([v.dense() if isinstance(v, LowRank) else v for v in values])
