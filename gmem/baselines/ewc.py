"""Elastic weight consolidation (Kirkpatrick et al., PNAS 2017) with a diagonal Fisher.

After task ``t`` the classifier's parameters ``theta*_t`` and the diagonal Fisher ``F_t`` of its
predictive distribution on that task's data are kept; learning later tasks adds

    penalty(theta) = lambda / 2 * sum_t sum_i F_t,i * (theta_i - theta*_t,i)^2

whose gradient is ``lambda * sum_t F_t * (theta - theta*_t)``. The default ``lambda`` is 1e4.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..seeding import generator

__all__ = ["fisher_diagonal", "EWC"]


def fisher_diagonal(model: nn.Module, x: Tensor, y: Optional[Tensor] = None, *, seed: int = 0) -> dict[str, Tensor]:
    """Diagonal Fisher ``E_x E_{y ~ p(y|x)} [(d log p(y|x) / d theta)^2]`` per trainable parameter.

    ``x [N, ...]``: inputs; ``y [N]``: labels for the *empirical* Fisher (true labels); if None, each
    ``y`` is drawn from the model's own prediction (the Fisher proper) with a generator seeded by ``seed``.
    Squared gradients are taken per sample (one backward pass each: meant for small classifiers).
    Returns ``{name: tensor shaped like the parameter}``; the model's train/eval mode is restored.
    """
    if x.shape[0] == 0:
        raise ValueError("fisher_diagonal needs at least one input")
    if y is not None and y.shape != (x.shape[0],):
        raise ValueError(f"y must have one label per input [{x.shape[0]}], got {tuple(y.shape)}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    rng = generator(seed)
    was = model.training
    model.eval()
    try:
        for s in range(x.shape[0]):
            logits = model(x[s:s + 1])
            logp = F.log_softmax(logits, dim=1)
            if y is None:
                target = torch.multinomial(logp.detach().exp().cpu(), 1, generator=rng).squeeze(1).to(logits.device)
            else:
                target = y[s:s + 1].to(logits.device)
            nll = F.nll_loss(logp, target, reduction="sum")
            grads = torch.autograd.grad(nll, list(params.values()))
            for (n, _), g in zip(params.items(), grads):
                fisher[n] += g.detach() ** 2
    finally:
        model.train(was)
    return {n: f / x.shape[0] for n, f in fisher.items()}


class EWC:
    """The EWC penalty of ``model`` over the tasks consolidated so far (``lam``: the strength, 1e4)."""

    def __init__(self, model: nn.Module, lam: float = 1e4):
        if not lam >= 0:
            raise ValueError(f"EWC lambda must be >= 0, got {lam!r}")
        self.model, self.lam = model, float(lam)
        self.anchors: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []  # (theta*, Fisher) per task

    def consolidate(self, x: Tensor, y: Optional[Tensor] = None, **fisher_options) -> None:
        """Keep the current parameters and their Fisher on ``x`` (see :func:`fisher_diagonal`)."""
        fisher = fisher_diagonal(self.model, x, y, **fisher_options)
        theta = {n: p.detach().clone() for n, p in self.model.named_parameters() if n in fisher}
        self.anchors.append((theta, fisher))

    def add(self, theta: dict[str, Tensor], fisher: dict[str, Tensor]) -> None:
        """Add an anchor directly (``theta*`` and ``F`` keyed by parameter name)."""
        self.anchors.append(({n: t.detach().clone() for n, t in theta.items()},
                             {n: f.detach().clone() for n, f in fisher.items()}))

    def penalty(self) -> Tensor:
        """``lam / 2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2`` (a scalar with gradients)."""
        params = dict(self.model.named_parameters())
        total = None
        for theta, fisher in self.anchors:
            for n, f in fisher.items():
                term = (f * (params[n] - theta[n]) ** 2).sum()
                total = term if total is None else total + term
        if total is None:
            return torch.zeros((), device=next(self.model.parameters()).device)
        return 0.5 * self.lam * total
