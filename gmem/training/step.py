"""One GP-GAN training step, shared by ``gmem train-base``, :meth:`GANMemory.learn` and the benchmarks.

A step draws a real batch, augments it (flips, dequantisation noise), and makes one discriminator
update (non-saturating loss + R1 on reals) and one generator update (non-saturating loss), then
updates the EMA of the generator's trainable parameters. What differs between uses plugs in:

- :class:`GANParts`: how to run G and D (a task's style set, a per-task head, labels) and which
  parameters train;
- :class:`StepConfig`: optimiser, R1 strength and period, EMA, update order, fake-batch reuse;
- :class:`Plugin` objects: extra loss terms (a prior every k iterations), a different real batch
  (replay), work after each step.

Update order (``StepConfig.order``), as the released code does it:

- ``"d_first"`` (GAN_stability ``train.py``, the default for base training): the D update draws a
  fresh z and makes its fakes under ``no_grad``; then the G update draws another z.
- ``"g_first"`` with ``reuse_fake=True`` (the GAN memory scripts, the default for learning a task):
  the G update draws z, and the D update trains on that same fake batch (detached).

Both use the real batch's labels for the fakes (conditional models), as the released code does.

Several processes (``torchrun``, :mod:`gmem.distributed`): when a process group is up, each of the
``N`` ranks takes block ``rank`` of every global batch (``RealBatches``' batch size is the global one,
``N`` must divide it), draws every random tensor (z, flips, noise) at the global batch size and keeps
its block, and averages the gradients of ``g_params`` / ``d_params`` over the ranks after each
update's backward, before the optimiser step. Each rank's losses (R1 included) are means over its
block, so the averaged gradient is the one-process gradient of the global batch up to the order of the
float sums; the EMA is then updated identically on every rank. The losses a step returns are averaged
over the ranks. Without a process group nothing of this runs (one process is unchanged).
Plugins run on every rank: one that draws random numbers or changes the real batch must do so
identically on every rank (or shard like the step).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import distributed as dist
from ..data import InfiniteSampler, batch
from .ema import EMA
from .losses import DEQUANTIZE_NOISE, augment, discriminator_losses, generator_loss, r1_penalty

__all__ = ["StepConfig", "GANParts", "RealBatches", "Plugin", "LossTerm", "StepContext", "GANStep"]

ORDERS = ("d_first", "g_first")


# the released GAN memory scripts: G update first, D trains on the same fakes (GAN memory and the
# baselines compared with it train with these)
LEARN_DEFAULTS = {"order": "g_first", "reuse_fake": True}


@dataclass
class StepConfig:
    """Settings of one GP-GAN step (all recorded with a run, and compared when it resumes)."""

    lr: float = 1e-4
    betas: tuple = (0.0, 0.99)
    eps: float = 1e-8
    r1_gamma: float = 10.0       # added as gamma * E||grad||^2 (released code), see gmem.training.losses
    r1_every: int = 1            # R1 on every k-th iteration
    ema_decay: float = 0.999
    ema_warmup: bool = False
    order: str = "d_first"
    reuse_fake: bool = False     # D trains on the G update's fake batch (order "g_first" only)
    flip: bool = True
    noise: float = DEQUANTIZE_NOISE

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        checks = [(math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr!r}"),
                  (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                   f"betas must be two values in [0, 1), got {self.betas}"),
                  (math.isfinite(self.r1_gamma) and self.r1_gamma >= 0,
                   f"r1_gamma must be >= 0, got {self.r1_gamma!r}"),
                  (isinstance(self.r1_every, int) and self.r1_every >= 1,
                   f"r1_every must be an int >= 1, got {self.r1_every!r}"),
                  (0.0 <= self.ema_decay <= 1.0, f"ema_decay must lie in [0, 1], got {self.ema_decay!r}"),
                  (self.order in ORDERS, f"order must be one of {ORDERS}, got {self.order!r}"),
                  (not self.reuse_fake or self.order == "g_first",
                   "reuse_fake needs order='g_first' (the fakes come from the G update)"),
                  (math.isfinite(self.noise) and self.noise >= 0, f"noise must be >= 0, got {self.noise!r}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class GANParts:
    """What the step trains. ``generate(z [N, z_dim], y [N] or None) -> [N, C, H, W]``;
    ``discriminate(x, y) -> logits [N]``; ``g_params``/``d_params``: the parameters the updates change;
    ``modules``: put in train mode during a step."""

    generate: Callable[[Tensor, Optional[Tensor]], Tensor]
    discriminate: Callable[[Tensor, Optional[Tensor]], Tensor]
    g_params: list
    d_params: list
    z_dim: int
    modules: Sequence[nn.Module] = ()


class RealBatches:
    """Endless seeded batches ``(x [B, C, H, W] on the CPU, y [B] long or None)`` from a dataset.

    ``batch_size`` is the global batch: with a process group of ``N`` ranks each rank gets its block of
    ``B = batch_size / N`` images (:class:`gmem.distributed.ShardedInfiniteSampler`; ValueError when
    ``N`` does not divide it), and the sampler's state is that of the global stream.
    """

    def __init__(self, dataset, batch_size: int, seed: int, labels: Optional[Tensor] = None):
        if labels is not None and len(labels) != len(dataset):
            raise ValueError(f"labels has {len(labels)} entries for {len(dataset)} images")
        self.dataset, self.labels = dataset, labels
        if dist.world_size() > 1:
            self.sampler = dist.ShardedInfiniteSampler(len(dataset), dist.local_batch_size(batch_size), seed)
        else:
            self.sampler = InfiniteSampler(len(dataset), batch_size, seed)

    def next(self) -> tuple[Tensor, Optional[Tensor]]:
        idx = self.sampler.next_indices()
        return batch(self.dataset, idx), None if self.labels is None else self.labels[idx]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


@dataclass
class StepContext:
    """What a plugin sees during one step (tensors on the training device)."""

    step: "GANStep"
    iteration: int
    x_real: Tensor
    y_real: Optional[Tensor]
    z: Optional[Tensor] = None
    x_fake: Optional[Tensor] = None
    extra: dict = field(default_factory=dict)


class Plugin:
    """A variation of the step. Override what you need; every hook is optional.

    - ``real_batch(ctx) -> (x, y)``: replace/extend the real batch (e.g. replay samples);
    - ``g_loss_extra(ctx)`` / ``d_loss_extra(ctx)``: a scalar added to that update's loss, or None;
    - ``after_step(ctx, losses)``: called after both updates (losses: floats, may be extended);
    - ``state_dict()`` / ``load_state_dict(state)``: saved in checkpoints.
    """

    name = "plugin"

    def real_batch(self, ctx: StepContext):
        return ctx.x_real, ctx.y_real

    def g_loss_extra(self, ctx: StepContext) -> Optional[Tensor]:
        return None

    def d_loss_extra(self, ctx: StepContext) -> Optional[Tensor]:
        return None

    def after_step(self, ctx: StepContext, losses: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossTerm(Plugin):
    """``weight * fn(ctx)`` added to the generator (``on="g"``) or discriminator loss every ``every`` iterations.

    E.g. a low-rank prior on the style parameters every 10 iterations:
    ``LossTerm(lambda ctx: nuclear_norms(style_params), on="g", every=10, weight=1e-2, name="lowrank")``.
    """

    def __init__(self, fn: Callable[[StepContext], Tensor], *, on: str = "g", every: int = 1, weight: float = 1.0,
                 name: str = "extra"):
        if on not in ("g", "d"):
            raise ValueError(f"LossTerm: on must be 'g' or 'd', got {on!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"LossTerm: every must be an int >= 1, got {every!r}")
        self.fn, self.on, self.every, self.weight, self.name = fn, on, every, float(weight), name

    def _term(self, ctx: StepContext, which: str) -> Optional[Tensor]:
        if which != self.on or ctx.iteration % self.every:
            return None
        value = self.weight * self.fn(ctx)
        ctx.extra[self.name] = float(value.detach())
        return value

    def g_loss_extra(self, ctx):
        return self._term(ctx, "g")

    def d_loss_extra(self, ctx):
        return self._term(ctx, "d")

    def after_step(self, ctx, losses):
        if self.name in ctx.extra:
            losses[self.name] = ctx.extra[self.name]


@contextlib.contextmanager
def _frozen(params, keep=()):
    """``params`` do not require gradients inside the block (except those in ``keep``), restored after.

    The generator update backpropagates through D only to reach G: with D's parameters frozen while D
    runs, no layer computes their weight gradients (custom autograd Functions, e.g. the modulated
    convs, decide from ``requires_grad`` what to compute, not from ``backward(inputs=...)``).
    """
    keep_ids = {id(q) for q in keep}
    changed = [q for q in params if q.requires_grad and id(q) not in keep_ids]
    for q in changed:
        q.requires_grad_(False)
    try:
        yield
    finally:
        for q in changed:
            q.requires_grad_(True)


class GANStep:
    """Optimisers, EMA, randomness and one :meth:`step` of GP-GAN training of ``parts``.

    Everything random (batches, z, flips, noise) comes from generators seeded by ``seed`` whose
    states are in :meth:`state_dict`, so a run resumed from a checkpoint equals an uninterrupted one
    (same machine and thread count). ``ema_shadow``: where the EMA lives (default: copies).
    Under torchrun (a process group is up) the ranks start from rank 0's parameters and EMA and
    train as one process would on the global batch (see the module docstring).
    """

    def __init__(self, parts: GANParts, data: RealBatches, config: StepConfig, seed: int, *, device="cpu",
                 plugins: Sequence[Plugin] = (), ema_shadow: Optional[Sequence[Tensor]] = None):
        self.parts, self.data, self.config = parts, data, config
        self.device = torch.device(device)
        self.plugins = list(plugins)
        c = config
        self.opt_g = torch.optim.Adam(parts.g_params, lr=c.lr, betas=c.betas, eps=c.eps)
        self.opt_d = torch.optim.Adam(parts.d_params, lr=c.lr, betas=c.betas, eps=c.eps)
        self.ema = EMA(parts.g_params, c.ema_decay, c.ema_warmup, shadow=ema_shadow)
        self.rng = torch.Generator().manual_seed(int(seed) + 1)  # z, flips, dequantisation noise
        self.iteration = 0
        dist.ensure_joined()
        self.rank, self.world = dist.rank(), dist.world_size()
        if self.world > 1:  # identical starting points, whatever each rank's initialisation did
            dist.broadcast_parameters(list(parts.g_params) + list(parts.d_params) + self.ema.shadow)

    # ------------------------------------------------------------------ the step
    def _z(self, n: int) -> Tensor:
        """``[n, z_dim]`` latents: this rank's block of ``n * world`` drawn as one process would."""
        z = torch.randn(n * self.world, self.parts.z_dim, generator=self.rng)
        return (z if self.world == 1 else z[self.rank * n:(self.rank + 1) * n]).to(self.device)

    def _sync(self, params) -> None:
        """Average the gradients over the ranks (after the backward, before the optimiser step)."""
        if self.world > 1:
            dist.all_reduce_gradients(params)

    @staticmethod
    def _extras(values) -> Optional[Tensor]:
        values = [v for v in values if v is not None]
        return sum(values) if values else None

    def _g_update(self, ctx: StepContext, losses: dict) -> None:
        p = self.parts
        ctx.z = self._z(ctx.x_real.shape[0])
        fake = p.generate(ctx.z, ctx.y_real)
        with _frozen(p.d_params, p.g_params):
            d_fake = p.discriminate(fake, ctx.y_real)
        loss = generator_loss(d_fake)
        losses["g_loss"] = loss.detach()
        extra = self._extras(pl.g_loss_extra(ctx) for pl in self.plugins)
        self.opt_g.zero_grad(set_to_none=True)
        (loss if extra is None else loss + extra).backward(inputs=p.g_params)
        self._sync(p.g_params)
        self.opt_g.step()
        self.ema.update(ctx.iteration)
        ctx.x_fake = fake.detach()

    def _d_update(self, ctx: StepContext, losses: dict) -> None:
        p, c = self.parts, self.config
        if c.reuse_fake and ctx.x_fake is not None:
            fake = ctx.x_fake
        else:
            with torch.no_grad():
                fake = p.generate(self._z(ctx.x_real.shape[0]), ctx.y_real)
        x = ctx.x_real.detach().requires_grad_(True)
        d_real = p.discriminate(x, ctx.y_real)
        if c.r1_gamma > 0 and ctx.iteration % c.r1_every == 0:
            r1 = r1_penalty(d_real, x, c.r1_gamma)
        else:
            r1 = torch.zeros((), device=x.device)
        loss_real, loss_fake = discriminator_losses(d_real, p.discriminate(fake, ctx.y_real))
        loss = loss_real + loss_fake + r1
        extra = self._extras(pl.d_loss_extra(ctx) for pl in self.plugins)
        self.opt_d.zero_grad(set_to_none=True)
        (loss if extra is None else loss + extra).backward(inputs=p.d_params)
        self._sync(p.d_params)
        self.opt_d.step()
        losses.update(d_real=loss_real.detach(), d_fake=loss_fake.detach(), r1=r1.detach())

    def step(self) -> dict:
        """One iteration; returns ``{'g_loss', 'd_real', 'd_fake', 'r1', ...}`` (floats)."""
        c = self.config
        x, y = self.data.next()
        x = augment(x, self.rng, flip=c.flip, noise=c.noise, part=(self.rank, self.world))
        ctx = StepContext(self, self.iteration, x.to(self.device), None if y is None else y.to(self.device))
        for plugin in self.plugins:
            ctx.x_real, ctx.y_real = plugin.real_batch(ctx)
        for m in self.parts.modules:
            m.train()
        losses: dict = {}
        updates = (self._d_update, self._g_update) if c.order == "d_first" else (self._g_update, self._d_update)
        for update in updates:
            update(ctx, losses)
        losses = {k: float(v) for k, v in losses.items()}
        if self.world > 1:  # the global batch's losses; every rank sees the same (and the same non-finite check)
            mean = dist.average_scalars(losses)
            losses = {k: mean[k] for k in losses}
        self.iteration += 1
        for plugin in self.plugins:
            plugin.after_step(ctx, losses)
        if not all(math.isfinite(v) for v in losses.values()):
            raise FloatingPointError(f"non-finite loss at iteration {self.iteration}: {losses}")
        return losses

    # ------------------------------------------------------------------ state
    def state_dict(self, include_params: bool = True) -> dict:
        """Training state (optimisers, data position, RNG, iteration, plugins); with ``include_params``
        also the trained parameters and the EMA (for owners that do not save their modules)."""
        state = {"iteration": self.iteration, "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                 "sampler": self.data.state_dict(), "rng": self.rng.get_state(),
                 "plugins": [pl.state_dict() for pl in self.plugins]}
        if include_params:
            state.update(g_live=[p.detach().clone() for p in self.parts.g_params], g_ema=self.ema.state_dict(),
                         d_live=[p.detach().clone() for p in self.parts.d_params])
        return state

    def load_state_dict(self, state: dict) -> None:
        if "g_live" in state:
            with torch.no_grad():
                for params, key in ((self.parts.g_params, "g_live"), (self.parts.d_params, "d_live")):
                    if len(state[key]) != len(params):
                        raise ValueError(f"checkpoint has {len(state[key])} tensors in {key}, expected {len(params)}")
                    for p, v in zip(params, state[key]):
                        p.copy_(v)
            self.ema.load_state_dict(state["g_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.data.load_state_dict(state["sampler"])
        self.rng.set_state(state["rng"])
        self.iteration = int(state["iteration"])
        for plugin, s in zip(self.plugins, state.get("plugins", [])):
            plugin.load_state_dict(s)
