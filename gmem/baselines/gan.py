"""Generation baselines on the shared GP-GAN step: fine-tuning, MeRGAN (replay alignment / replay), joint.

Each learner owns a conditional copy of a base ``(G, D)`` (:func:`conditional_copy`) and learns one task
at a time with :class:`gmem.training.GANStep` and :class:`~gmem.training.TrainLoop`, with the settings
:meth:`gmem.GANMemory.learn` uses (the generator update first and the discriminator trained on the same
fakes, R1 on reals, Adam, EMA with warm-up kept as the model). What differs between the methods is a
:class:`~gmem.training.Plugin` (:class:`ReplayAlignment`, :class:`ReplayMix`) or the data
(:class:`Joint`), never the loop.

A task is a dataset plus integer *conditions* ``[N]`` (labels of the conditional generator): the task's
index for task-incremental generation, or class ids when tasks are groups of classes.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..data import TensorImages, batch, label_vector
from ..models import Discriminator, Generator
from ..seeding import generator, seeded
from ..training import LEARN_DEFAULTS, GANParts, GANStep, Plugin, RealBatches, StepConfig, StepContext, TrainLoop

__all__ = ["conditional_copy", "GANLearner", "FineTune", "MeRGAN", "Joint", "ReplayAlignment", "ReplayMix"]


def conditional_copy(G: Generator, D: Discriminator, num_labels: int) -> tuple[Generator, Discriminator]:
    """Copies of ``(G, D)`` with ``num_labels`` conditions, trainable, on the CPU.

    Every weight is the base's; each new label-embedding row and each new row of the discriminator's
    ``fc`` starts as the base's row 0 (so every condition starts out as the unconditional base).
    ``G``/``D`` are left as they are.
    """
    if not isinstance(G, Generator) or not isinstance(D, Discriminator):
        raise TypeError(f"conditional_copy needs a gmem.models Generator and Discriminator, got "
                        f"{type(G).__name__}, {type(D).__name__}")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    with seeded(0):  # the constructors draw initial weights from the global RNG; all are overwritten below
        G2 = Generator(**{**G.config(), "nlabels": num_labels})
        D2 = Discriminator(**{**D.config(), "nlabels": num_labels})
    g_state = {k: v.detach().cpu().clone() for k, v in G.state_dict().items()}
    d_state = {k: v.detach().cpu().clone() for k, v in D.state_dict().items()}
    g_state["embedding.weight"] = _rows(g_state["embedding.weight"], num_labels)
    d_state["fc.weight"] = _rows(d_state["fc.weight"], num_labels)
    d_state["fc.bias"] = _rows(d_state["fc.bias"], num_labels)
    G2.load_state_dict(g_state)
    D2.load_state_dict(d_state)
    return G2.requires_grad_(True), D2.requires_grad_(True)


def _rows(t: Tensor, n: int) -> Tensor:
    """``t [m, ...]`` -> ``[n, ...]``: the first ``min(m, n)`` rows kept, further rows copies of row 0."""
    if t.shape[0] >= n:
        return t[:n].clone()
    return torch.cat([t, t[:1].expand(n - t.shape[0], *t.shape[1:])]).clone()


def _conditions(labels, n: int, num_labels: int) -> Tensor:
    labels = label_vector(labels, n, "conditions", "image")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise IndexError(f"conditions must lie in [0, {num_labels}), got [{int(labels.min())}, {int(labels.max())}]")
    return labels.clone()


class ReplayAlignment(Plugin):
    """MeRGAN's replay alignment: ``weight * mean_n ||G(z_n, c_n) - G_prev(z_n, c_n)||^2`` on the G loss.

    ``previous``: the frozen generator after the last task; ``conditions``: the earlier conditions
    (``c_n`` drawn uniformly from them); ``z_n`` and ``c_n`` come from a generator seeded with ``seed``.
    The squared norm is over all pixels of an image (the paper's ``||.||^2``), averaged over the batch.
    """

    name = "replay_alignment"

    def __init__(self, previous: nn.Module, conditions: Sequence[int], *, weight: float = 1e-3, batch_size: int = 16,
                 seed: int = 0):
        if not len(conditions):
            raise ValueError("replay alignment needs at least one earlier condition")
        self.previous, self.weight, self.batch_size = previous, float(weight), int(batch_size)
        self.conditions = torch.as_tensor(list(conditions), dtype=torch.long)
        self.rng = generator(seed)

    def draw(self, device) -> tuple[Tensor, Tensor]:
        """``(z [B, z_dim], c [B])`` for one alignment batch."""
        z = torch.randn(self.batch_size, self.previous.z_dim, generator=self.rng)
        c = self.conditions[torch.randint(len(self.conditions), (self.batch_size,), generator=self.rng)]
        return z.to(device), c.to(device)

    def g_loss_extra(self, ctx: StepContext) -> Tensor:
        z, c = self.draw(ctx.x_real.device)
        with torch.no_grad():
            target = self.previous(z, c)
        out = ctx.step.parts.generate(z, c)
        loss = self.weight * (out - target).pow(2).flatten(1).sum(1).mean()
        ctx.extra[self.name] = float(loss.detach())
        return loss

    def after_step(self, ctx, losses):
        losses[self.name] = ctx.extra.get(self.name, 0.0)

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])


class ReplayMix(Plugin):
    """MeRGAN's joint training with replay: the first ``round(B * old / (old + new))`` rows of each real
    batch become samples of the earlier conditions from the frozen ``previous`` generator (labelled with
    their condition), so every condition, old or new, has about the same share of the batch."""

    name = "replay_mix"

    def __init__(self, previous: nn.Module, old: Sequence[int], num_new: int, *, seed: int = 0):
        if not len(old):
            raise ValueError("replay needs at least one earlier condition")
        self.previous = previous
        self.old = torch.as_tensor(list(old), dtype=torch.long)
        self.fraction = len(self.old) / (len(self.old) + max(1, int(num_new)))
        self.rng = generator(seed)

    def real_batch(self, ctx: StepContext):
        x, y = ctx.x_real, ctx.y_real
        n = int(round(x.shape[0] * self.fraction))
        if n == 0:
            return x, y
        z = torch.randn(n, self.previous.z_dim, generator=self.rng).to(x.device)
        c = self.old[torch.randint(len(self.old), (n,), generator=self.rng)].to(x.device)
        with torch.no_grad():
            replay = self.previous(z, c)
        return torch.cat([replay, x[n:]]), torch.cat([c, y[n:]])

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])


class GANLearner:
    """Sequential fine-tuning of a conditional GAN (the base class of the other baselines).

    ``learn(dataset, conditions, ...)`` trains the whole ``G`` and ``D`` on one task; the kept generator
    is the EMA (as in :meth:`gmem.GANMemory.learn`). Step settings default to GAN memory's
    (``lr``, ``betas``, ``r1_gamma``, ``ema_decay``, ``ema_warmup``; other :class:`StepConfig` fields
    through ``step_options``). :attr:`seen`: conditions learned so far, in order.
    """

    name = "finetune"

    def __init__(self, G: Generator, D: Discriminator, num_labels: int, *, lr: float = 1e-4, betas=(0.0, 0.99),
                 r1_gamma: float = 10.0, ema_decay: float = 0.999, ema_warmup: bool = True, device="cpu",
                 **step_options):
        self.G, self.D = conditional_copy(G, D, num_labels)
        self.device = torch.device(device)
        self.G.to(self.device)
        self.D.to(self.device)
        self.num_labels = num_labels
        self.step_config = StepConfig(**{**LEARN_DEFAULTS, "lr": lr, "betas": tuple(betas), "r1_gamma": r1_gamma,
                                         "ema_decay": ema_decay, "ema_warmup": ema_warmup, **step_options})
        self.seen: list[int] = []
        self.previous: Optional[Generator] = None

    # ------------------------------------------------------------------ what the methods change
    def plugins(self, new: list[int], batch_size: int, seed: int) -> list[Plugin]:
        """Plug-ins of the step for a task with conditions ``new`` (none for fine-tuning)."""
        return []

    def training_data(self, dataset, conditions: Tensor):
        """``(dataset, conditions)`` the step draws real batches from (the task's own for fine-tuning)."""
        return dataset, conditions

    # ------------------------------------------------------------------ learning and sampling
    def learn(self, dataset, conditions, *, iterations: int, batch_size: int = 16, seed: int = 0,
              progress: bool = False, max_seconds: Optional[float] = None, plugins: Sequence[Plugin] = ()) -> dict:
        """Learn one task: ``dataset`` of ``[C, H, W]`` images in [-1, 1] with ``conditions [N]`` (or one
        int for all; a float tensor ``[N, C, H, W]`` is taken as the images). Returns the loop's metrics
        (``iterations_done``, ``train_seconds``, ...)."""
        if isinstance(dataset, Tensor):
            dataset = TensorImages(dataset, dataset.shape[-1], dataset.shape[1])
        conditions = _conditions(conditions, len(dataset), self.num_labels)
        new = [c for c in sorted(set(conditions.tolist())) if c not in self.seen]
        # the generator as it was after the last task: MeRGAN's frozen replay source
        self.previous = copy.deepcopy(self.G).eval().requires_grad_(False)
        data, labels = self.training_data(dataset, conditions)
        parts = GANParts(generate=lambda z, y: self.G(z, y), discriminate=lambda x, y: self.D(x, y),
                         g_params=list(self.G.parameters()), d_params=list(self.D.parameters()),
                         z_dim=self.G.z_dim, modules=(self.G, self.D))
        step = GANStep(parts, RealBatches(data, batch_size, seed, labels), self.step_config, seed, device=self.device,
                       plugins=self.plugins(new, batch_size, seed) + list(plugins))
        metrics = TrainLoop(step, iterations, progress=progress, desc=f"{self.name} {new}",
                            max_seconds=max_seconds).run()
        step.ema.copy_to_live()
        self.seen.extend(new)
        return metrics

    @torch.no_grad()
    def sample(self, conditions, z: Tensor, batch_size: int = 64) -> Tensor:
        """Images ``[N, C, H, W]`` (CPU) of the current generator for ``z [N, z_dim]`` and ``conditions [N]``."""
        conditions = _conditions(conditions, z.shape[0], self.num_labels)
        was = self.G.training
        self.G.eval()
        try:
            out = [self.G(z[s:s + batch_size].to(self.device), conditions[s:s + batch_size].to(self.device)).cpu()
                   for s in range(0, z.shape[0], batch_size)]
            return torch.cat(out) if out else z.new_zeros(0, self.G.channels, self.G.size, self.G.size)
        finally:
            self.G.train(was)

    def replay(self, tasks: Sequence[Sequence[int]], n_per_task: int, seed: int):
        """A replay source over the classes of ``tasks``: each call draws ``n_per_task * len(tasks)`` samples
        of uniformly drawn earlier classes (one generator, seeded ``seed``, for classes and latents)."""
        old = torch.tensor([c for classes in tasks for c in classes])
        rng = generator(seed)
        n = n_per_task * len(tasks)

        def draw():
            c = old[torch.randint(len(old), (n,), generator=rng)]
            return self.sample(c, torch.randn(n, self.G.z_dim, generator=rng)), c

        return draw

    def state_dict(self) -> dict:
        """The conditional ``G`` and ``D`` (``G.*``, ``D.*``) and the conditions seen so far."""
        return {**{f"G.{k}": v for k, v in self.G.state_dict().items()},
                **{f"D.{k}": v for k, v in self.D.state_dict().items()}, "seen": list(self.seen)}


class FineTune(GANLearner):
    """The whole GAN fine-tuned on each new task's data alone (forgets the earlier tasks)."""

    name = "finetune"


class MeRGAN(GANLearner):
    """MeRGAN (Wu et al., NeurIPS 2018): ``mode="ra"`` replay alignment (``lambda_ra``, default 1e-3) or
    ``mode="replay"`` joint training with replayed samples of the earlier conditions."""

    def __init__(self, G, D, num_labels, *, mode: str = "ra", lambda_ra: float = 1e-3, **kwargs):
        if mode not in ("ra", "replay"):
            raise ValueError(f"MeRGAN mode must be 'ra' or 'replay', got {mode!r}")
        super().__init__(G, D, num_labels, **kwargs)
        self.mode, self.lambda_ra = mode, float(lambda_ra)
        self.name = f"mergan_{mode}"

    def plugins(self, new, batch_size, seed):
        old = [c for c in self.seen if c not in new]
        if not old:
            return []
        if self.mode == "ra":
            return [ReplayAlignment(self.previous, old, weight=self.lambda_ra, batch_size=batch_size, seed=seed + 7)]
        return [ReplayMix(self.previous, old, len(new), seed=seed + 7)]


class Joint(GANLearner):
    """Trained on all the real data seen so far (continuing from the previous stage): the upper bound."""

    name = "joint"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._images: list[Tensor] = []
        self._labels: list[Tensor] = []

    def training_data(self, dataset, conditions):
        self._images.append(batch(dataset, torch.arange(len(dataset))))
        self._labels.append(conditions)
        images = torch.cat(self._images)
        return TensorImages(images, images.shape[-1], images.shape[1], name="joint"), torch.cat(self._labels)
