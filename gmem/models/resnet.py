"""The GP-GAN ResNet generator and discriminator (Mescheder et al. 2018, 'resnet4' layout).

The generator starts at an ``s0 x s0`` feature map and doubles ``log2(size / s0)`` times, so it has
``log2(size / s0) + 1`` residual blocks. Channel widths, in multiples of ``nf``, run from ``16`` at
the generator's first block down to ``1`` at its last two blocks, halving one step per block; the
discriminator mirrors the generator.

Two families share this code:

- gmem's own models keep ``s0 = 4`` (the default) and drop blocks at small sizes
  (256 -> 7 blocks, 64 -> 5, 32 -> 4); the embedded base is one of them.
- GAN_stability's 'resnet4' always has 7 blocks and starts at ``s0 = size // 64``
  (64 -> 1, 128 -> 2, 256 -> 4, 512 -> 8): ``Generator(size, s0=size // 64)``. At 256 both
  families coincide. Module names and parameter shapes equal the release's, so its checkpoints
  load directly (see :mod:`gmem.models.checkpoint`).

Only plain ``nn.Conv2d`` / ``nn.Linear`` / ``nn.Embedding`` are used so that
:func:`gmem.nn.convert` can swap them for modulated layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

S0 = 4  # spatial size of the generator's first feature map (and the discriminator's last)


def actvn(x: torch.Tensor) -> torch.Tensor:
    """Leaky ReLU with slope 0.2, the activation used everywhere in GP-GAN."""
    return F.leaky_relu(x, 0.2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: ``shortcut(x) + 0.1 * conv_1(act(conv_0(act(x))))``.

    ``conv_0``: ``fin -> fhidden`` (``fhidden = min(fin, fout)``), ``conv_1``: ``fhidden -> fout``,
    both 3x3. When ``fin != fout`` the shortcut is a learned 1x1 conv ``conv_s`` without bias.
    Input/output ``[N, fin, H, W] -> [N, fout, H, W]``.
    """

    def __init__(self, fin: int, fout: int, fhidden: int | None = None):
        super().__init__()
        self.fin, self.fout = fin, fout
        self.fhidden = min(fin, fout) if fhidden is None else fhidden
        self.learned_shortcut = fin != fout
        self.conv_0 = nn.Conv2d(fin, self.fhidden, 3, padding=1)
        self.conv_1 = nn.Conv2d(self.fhidden, fout, 3, padding=1)
        if self.learned_shortcut:
            self.conv_s = nn.Conv2d(fin, fout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_s = self.conv_s(x) if self.learned_shortcut else x
        dx = self.conv_0(actvn(x))
        dx = self.conv_1(actvn(dx))
        return x_s + 0.1 * dx


def num_stages(size: int, s0: int = S0) -> int:
    """Number of x2 resolution changes between ``s0`` and ``size`` (size must be ``s0 * 2**k``, k >= 1)."""
    if isinstance(s0, bool) or not isinstance(s0, int) or s0 < 1:
        raise ValueError(f"s0 (the start size) must be a positive int, got {s0!r}")
    if (isinstance(size, bool) or not isinstance(size, int) or size < 2 * s0 or size % s0
            or (size // s0) & (size // s0 - 1)):
        examples = ", ".join(str(s0 * 2 ** k) for k in range(1, 5))
        raise ValueError(f"size must be s0 * 2**k with k >= 1 (s0={s0}: {examples}, ...), got {size!r}")
    return int(math.log2(size // s0))


def generator_channels(size: int, s0: int = S0) -> list[tuple[int, int]]:
    """``(fin, fout)`` of each generator block, in multiples of ``nf``.

    The last block keeps ``1 -> 1``; going backwards the width doubles per block up to 16
    (7 blocks: 16->16, 16->16, 16->8, 8->4, 4->2, 2->1, 1->1, as in the public release).
    """
    n_blocks = num_stages(size, s0) + 1
    outs = [min(16, 2 ** max(0, n_blocks - 2 - k)) for k in range(n_blocks)]
    ins = [16] + outs[:-1]
    return list(zip(ins, outs))


class Generator(nn.Module):
    """GP-GAN ResNet generator. ``G(z [N, z_dim], y [N] long or None) -> images [N, 3, size, size]`` in [-1, 1].

    ``y`` selects the label embedding concatenated to ``z``; with ``y=None`` every sample uses label 0.
    ``s0`` is the size of the first feature map (``size // 64`` for a GAN_stability 'resnet4').
    """

    def __init__(self, size: int = 256, nf: int = 64, z_dim: int = 256, embed_size: int = 256,
                 nlabels: int = 1, channels: int = 3, s0: int = S0):
        super().__init__()
        self.size, self.nf, self.z_dim, self.embed_size, self.nlabels = size, nf, z_dim, embed_size, nlabels
        self.channels = channels
        self.n_blocks = num_stages(size, s0) + 1
        self.s0 = s0
        self.embedding = nn.Embedding(nlabels, embed_size)
        self.fc = nn.Linear(z_dim + embed_size, 16 * nf * s0 * s0)
        for k, (fin, fout) in enumerate(generator_channels(size, s0)):
            self.add_module(f"resnet_{k}_0", ResnetBlock(fin * nf, fout * nf))
        self.conv_img = nn.Conv2d(nf, channels, 7, padding=3)

    def config(self) -> dict:
        """Constructor arguments, enough to rebuild this architecture.

        ``s0`` appears only when it is not the default 4, so the configs stored by earlier releases
        (``base.json``, memory manifests) stay exactly what this returns for the same model.
        """
        return _with_s0(dict(size=self.size, nf=self.nf, z_dim=self.z_dim, embed_size=self.embed_size,
                             nlabels=self.nlabels, channels=self.channels), self.s0)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"generator expects z of shape [N, {self.z_dim}], got {tuple(z.shape)}")
        y = _labels(y, z.shape[0], self.nlabels, z.device, "z")
        out = self.fc(torch.cat([z, self.embedding(y)], dim=1))
        out = out.view(z.shape[0], 16 * self.nf, self.s0, self.s0)
        for k in range(self.n_blocks):
            if k > 0:
                out = F.interpolate(out, scale_factor=2, mode="nearest")
            out = getattr(self, f"resnet_{k}_0")(out)
        return torch.tanh(self.conv_img(actvn(out)))


class Discriminator(nn.Module):
    """GP-GAN ResNet discriminator. ``D(x [N, 3, size, size], y [N] long or None) -> logits [N]``.

    The final ``fc`` has one output per label; each sample's logit is the one of its label
    (label 0 when ``y`` is None). ``s0`` is the size of the last feature map (as in the generator).
    """

    def __init__(self, size: int = 256, nf: int = 64, nlabels: int = 1, channels: int = 3, s0: int = S0):
        super().__init__()
        self.size, self.nf, self.nlabels, self.channels = size, nf, nlabels, channels
        self.n_blocks = num_stages(size, s0) + 1
        self.s0 = s0
        self.conv_img = nn.Conv2d(channels, nf, 7, padding=3)
        for k, (gin, gout) in enumerate(reversed(generator_channels(size, s0))):
            self.add_module(f"resnet_{k}_0", ResnetBlock(gout * nf, gin * nf))
        self.fc = nn.Linear(16 * nf * s0 * s0, nlabels)

    def config(self) -> dict:
        """Constructor arguments (``s0`` only when not the default, as for the generator)."""
        return _with_s0(dict(size=self.size, nf=self.nf, nlabels=self.nlabels, channels=self.channels), self.s0)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels or x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"discriminator expects images [N, {self.channels}, {self.size}, {self.size}], "
                             f"got {tuple(x.shape)}")
        y = _labels(y, x.shape[0], self.nlabels, x.device, "x")
        out = self.conv_img(x)
        for k in range(self.n_blocks):
            if k > 0:
                out = F.avg_pool2d(out, 3, stride=2, padding=1)
            out = getattr(self, f"resnet_{k}_0")(out)
        out = self.fc(actvn(out.reshape(x.shape[0], -1)))
        return out.gather(1, y.view(-1, 1)).squeeze(1)


def _with_s0(config: dict, s0: int) -> dict:
    return config if s0 == S0 else {**config, "s0": s0}


def _labels(y, n: int, nlabels: int, device, what: str) -> torch.Tensor:
    """Labels ``[n]`` long; zeros when ``y`` is None. Raises for wrong length or out-of-range labels."""
    if y is None:
        return torch.zeros(n, dtype=torch.long, device=device)
    y = torch.as_tensor(y, device=device)
    if y.dim() == 0:
        y = y.expand(n)
    if y.shape != (n,):
        raise ValueError(f"labels y must have shape [{n}] (one per row of {what}), got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"labels y must be an integer tensor, got {y.dtype}")
    y = y.long()
    if n and (int(y.min()) < 0 or int(y.max()) >= nlabels):
        raise IndexError(f"label out of range: the model has {nlabels} label(s), got labels in "
                         f"[{int(y.min())}, {int(y.max())}]")
    return y
