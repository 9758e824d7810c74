"""The GP-GAN objective: non-saturating losses, the R1 penalty, and the real-image augmentation.

R1 convention. The GP-GAN paper (Mescheder et al. 2018) writes the penalty as
``gamma/2 * E||grad_x D(x)||^2``; the released code (GAN_stability, and the GAN memory code built on
it) adds ``reg_param * E||grad_x D(x)||^2`` with ``reg_param = 10``. gmem follows the released code:
:func:`r1_penalty` returns ``gamma * E||grad||^2`` and the discriminator loss adds it as it is, so the
default ``gamma = 10`` is the released strength (the paper's notation would call it gamma = 20).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["r1_penalty", "generator_loss", "discriminator_losses", "augment", "DEQUANTIZE_NOISE"]

# GAN_stability's input pipeline adds uniform noise of this width to images normalised to [-1, 1]
DEQUANTIZE_NOISE = 1.0 / 128.0


def r1_penalty(d_real: Tensor, x_real: Tensor, gamma: float = 10.0) -> Tensor:
    """``gamma * mean_i ||d(sum d_real)/d x_i||^2``: the R1 term the discriminator loss adds as is.

    ``d_real``: logits ``[N]`` (or ``[N, 1]``) computed from ``x_real`` ``[N, ...]``, which must
    require grad. Differentiable (the gradient is taken with ``create_graph=True``), so backpropagating
    the result trains the discriminator. ``gamma`` follows the released code's convention (see the
    module docstring): ``gamma = 10`` is the paper's ``gamma/2 = 10``.
    """
    if not isinstance(x_real, Tensor) or not x_real.requires_grad:
        raise ValueError("r1_penalty: x_real must be a tensor that requires grad (the logits are differentiated "
                         "with respect to it)")
    if d_real.numel() != x_real.shape[0]:
        raise ValueError(f"r1_penalty: expected one logit per image ({x_real.shape[0]}), got d_real of shape "
                         f"{tuple(d_real.shape)}")
    (grad,) = torch.autograd.grad(d_real.sum(), x_real, create_graph=True)
    return gamma * grad.pow(2).reshape(grad.shape[0], -1).sum(1).mean()


def generator_loss(d_fake: Tensor) -> Tensor:
    """Non-saturating generator loss ``E softplus(-D(G(z)))`` (= BCE with target 1), logits ``[N]``."""
    return F.softplus(-d_fake).mean()


def discriminator_losses(d_real: Tensor, d_fake: Tensor) -> tuple[Tensor, Tensor]:
    """``(E softplus(-D(x)), E softplus(D(G(z))))``: BCE with targets 1 on reals and 0 on fakes."""
    return F.softplus(-d_real).mean(), F.softplus(d_fake).mean()


def augment(x: Tensor, gen: torch.Generator, flip: bool = True, noise: float = DEQUANTIZE_NOISE,
            clamp: bool = False, part: tuple[int, int] = (0, 1)) -> Tensor:
    """The released code's real-image augmentation on ``x`` ``[N, C, H, W]`` in [-1, 1].

    Random horizontal flips (probability 1/2 per image) and dequantisation noise ``U[0, noise)``
    added to every value (GAN_stability adds ``U[0, 1/128)`` after normalising to [-1, 1], about one
    uint8 step, one-sided and not clipped). ``clamp`` clips the result to [-1, 1]. Random numbers come
    from ``gen`` (a CPU generator) so that a resumed run draws the same ones.

    ``part=(r, k)``: ``x`` is block ``r`` of ``k`` equal blocks of a global batch ``[k * N, ...]`` (rank
    ``r`` of ``k`` processes). The random numbers are drawn for the whole global batch and block ``r``
    of them is used, so the ranks together augment exactly as one process would, and ``gen`` advances
    by the same amount whatever ``k`` is (a checkpoint resumes with another number of processes).
    """
    r, k = part
    n = x.shape[0]
    rows = slice(r * n, (r + 1) * n)
    if flip:
        mask = torch.rand(k * n, generator=gen)[rows] < 0.5
        x = torch.where(mask.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    if noise:
        x = x + noise * torch.rand((k * n, *x.shape[1:]), generator=gen)[rows].to(x.device, x.dtype)
    return x.clamp(-1.0, 1.0) if clamp else x
