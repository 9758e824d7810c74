"""Training the unconverted base GP-GAN (``gmem train-base``): networks + the shared GP-GAN step.

The step and the loop are :mod:`gmem.training` (the same code :meth:`gmem.GANMemory.learn` runs);
this module only builds the base networks and writes checkpoints in the public GAN_stability layout
(``generator``, ``generator_test`` = the EMA generator, ``discriminator``) plus the training state,
so :func:`gmem.models.load_gan_stability` reads them too. Defaults follow GAN_stability's
``train.py``: the discriminator update first (fresh fakes under ``no_grad``), then the generator
update, R1 ``10 * E||grad||^2`` on reals, Adam (1e-4, betas (0, 0.99)), EMA 0.999, horizontal flips
and ``U[0, 1/128)`` dequantisation noise.

Under torchrun (``torchrun --nproc_per_node N -m gmem.cli train-base ...``) every rank trains its
share of each global batch (``batch_size``) and averages the gradients of G and D; rank 0 writes the
checkpoints, samples, log and the export (see :mod:`gmem.distributed`).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from . import distributed as dist
from .data import as_dataset
from .models import Discriminator, Generator, load_base, load_gan_stability, save_base
from .models.base import base_config
from .models.checkpoint import read_checkpoint
from .seeding import generator, seeded
from .training import CHECKPOINT_NAME, GANParts, GANStep, RealBatches, StepConfig, TrainLoop, data_fingerprint

__all__ = ["BaseTrainer", "train_base", "export_base", "CHECKPOINT_NAME"]

_ARCHITECTURE = ("batch_size", "size", "nf", "z_dim", "embed_size", "nlabels", "channels", "seed")


class BaseTrainer:
    """One base-GAN training run: ``G``, ``D``, ``G_ema`` and a :class:`~gmem.training.GANStep`.

    ``step()`` does one GP-GAN iteration and returns the losses; ``state_dict()`` /
    ``load_state_dict()`` capture everything for exact resumption. Extra ``StepConfig`` fields
    (``order``, ``r1_every``, ``noise``, ...) pass through ``step_options``.
    """

    def __init__(self, dataset, *, size: int = 32, nf: int = 32, z_dim: int = 128, embed_size: int = 64,
                 nlabels: int = 1, channels: int = 3, batch_size: int = 64, lr: float = 1e-4,
                 betas=(0.0, 0.99), r1_gamma: float = 10.0, ema_decay: float = 0.999, seed: int = 0,
                 device="cpu", plugins=(), **step_options):
        step_config = StepConfig(lr=lr, betas=tuple(betas), r1_gamma=r1_gamma, ema_decay=ema_decay, **step_options)
        self.dataset = dataset
        self.config = dict(size=size, nf=nf, z_dim=z_dim, embed_size=embed_size, nlabels=nlabels,
                           channels=channels, batch_size=batch_size, lr=lr, betas=list(betas),
                           r1_gamma=r1_gamma, ema_decay=ema_decay, seed=seed, step=step_config.to_dict())
        self.device = torch.device(device)
        with seeded(seed):  # weight initialisation, without touching the caller's global RNG
            self.G = Generator(size, nf, z_dim, embed_size, nlabels, channels).to(self.device)
            self.D = Discriminator(size, nf, nlabels, channels).to(self.device)
        self.G_ema = copy.deepcopy(self.G).eval()
        self.G_ema.requires_grad_(False)
        self.labels = getattr(dataset, "labels", None) if nlabels > 1 else None
        if nlabels > 1 and self.labels is None:
            raise ValueError(f"nlabels={nlabels} needs a dataset with labels (a folder of class "
                             "sub-directories or an .npz with a 'labels' array)")
        parts = GANParts(generate=lambda z, y: self.G(z, y), discriminate=lambda x, y: self.D(x, y),
                         g_params=list(self.G.parameters()), d_params=list(self.D.parameters()), z_dim=z_dim,
                         modules=(self.G, self.D))
        self.trainer = GANStep(parts, RealBatches(dataset, batch_size, seed, self.labels), step_config, seed,
                               device=self.device, plugins=plugins, ema_shadow=list(self.G_ema.parameters()))

    @property
    def iteration(self) -> int:
        return self.trainer.iteration

    def step(self) -> dict:
        """One iteration; returns ``{'g_loss', 'd_real', 'd_fake', 'r1'}`` (floats)."""
        return self.trainer.step()

    def state_dict(self) -> dict:
        """Public GAN_stability layout (``generator``, ``generator_test``, ``discriminator``) + training state."""
        return {"generator": self.G.state_dict(), "generator_test": self.G_ema.state_dict(),
                "discriminator": self.D.state_dict(), **self.trainer.state_dict(include_params=False),
                "config": copy.deepcopy(self.config)}

    def load_state_dict(self, state: dict) -> None:
        for key in _ARCHITECTURE:
            if state["config"].get(key) != self.config[key]:
                raise ValueError(f"checkpoint was trained with {key}={state['config'].get(key)!r}, "
                                 f"this run asks for {self.config[key]!r}")
        self.G.load_state_dict(state["generator"])
        self.G_ema.load_state_dict(state["generator_test"])
        self.D.load_state_dict(state["discriminator"])
        self.trainer.load_state_dict(state)

    def init_from_base(self, directory) -> dict:
        """Start from the weights of a saved base (``base.json`` + ``base.safetensors``): ``G`` and
        ``G_ema`` from its EMA generator, ``D`` from its discriminator; the optimisers start fresh.
        The architecture must be the one this trainer was built with. Returns the base's ``base.json``."""

        config = base_config(directory)
        built = {k: self.config[k] for k in ("size", "nf", "z_dim", "embed_size", "nlabels", "channels")}
        theirs = {k: config["generator"].get(k) for k in built}
        if theirs != built:
            diff = ", ".join(f"{k}={theirs[k]!r} (this run: {built[k]!r})" for k in built if theirs[k] != built[k])
            raise ValueError(f"--init base {directory} has another architecture: {diff}")
        G, D = load_base(directory)
        with torch.no_grad():
            for target, source in ((self.G, G), (self.G_ema, G), (self.D, D)):
                target.load_state_dict(source.state_dict())
        return config


def train_base(data, out_dir, *, iterations: int = 10000, size: int = 32, nf: int = 32, z_dim: int = 128,
               embed_size: int = 64, nlabels: int = 1, batch_size: int = 64, lr: float = 1e-4,
               r1_gamma: float = 10.0, ema_decay: float = 0.999, seed: int = 0, sample_every: int = 500,
               checkpoint_every: int = 500, max_minutes: float | None = None, resume: bool = True,
               restart: bool = False, progress: bool = True, device="cpu", plugins=(), init=None,
               **step_options) -> BaseTrainer:
    """Train a base GP-GAN on ``data`` (anything :func:`gmem.data.as_dataset` takes) into ``out_dir``.

    Writes ``out_dir/checkpoint.pt`` every ``checkpoint_every`` iterations and at the end (atomically),
    sample grids of the EMA generator (fixed z) to ``out_dir/samples/`` every ``sample_every``, and
    losses to ``out_dir/log.jsonl``. With ``resume`` an existing checkpoint of the same run (same
    data, settings and architecture) is continued exactly; a checkpoint of another run is an error
    naming what differs, unless ``restart`` (discard it) or ``resume=False`` (overwrite it).
    ``max_minutes`` stops early (at a checkpoint) once that much wall time has passed in this call.
    ``init`` (a base directory) starts the networks from that base instead of a fresh initialisation
    (training a base longer: its optimiser state is not kept in a base, so Adam starts fresh); the
    base's SHA-256 is part of the run's fingerprint, so resuming checks it is the same base.
    Returns the trainer (``.G``, ``.G_ema``, ``.D``, ``.iteration``).
    """
    out_dir = Path(out_dir)
    dataset = as_dataset(data, size, 3)
    trainer = BaseTrainer(dataset, size=size, nf=nf, z_dim=z_dim, embed_size=embed_size, nlabels=nlabels,
                          batch_size=batch_size, lr=lr, r1_gamma=r1_gamma, ema_decay=ema_decay, seed=seed,
                          device=device, plugins=plugins, **step_options)
    fixed_z = torch.randn(64, z_dim, generator=generator(seed + 12345)).to(device)
    fixed_y = (torch.arange(64) % nlabels).to(device)

    def samples():
        with torch.no_grad():
            return trainer.G_ema(fixed_z, fixed_y).cpu()

    if init is not None:  # the loop's resume (if any) then overwrites these weights with the checkpoint's
        init_config = trainer.init_from_base(init)
        trainer.config["init"] = {"base": str(init), "sha256": init_config.get("sha256"),
                                  "iterations": init_config.get("info", {}).get("iterations")}
    # the config (with the init base's sha256, if any) identifies the run: resuming another base is refused
    fingerprint = {"kind": "train-base", "config": trainer.config, "data": data_fingerprint(dataset, trainer.labels)}
    loop = TrainLoop(trainer.trainer, iterations, out_dir=out_dir, state_fn=trainer.state_dict,
                     load_fn=trainer.load_state_dict, fingerprint=fingerprint, checkpoint_every=checkpoint_every,
                     sample_every=sample_every, sample_fn=samples, latest_sample=True,
                     max_seconds=None if max_minutes is None else 60.0 * max_minutes, progress=progress,
                     desc="train-base", log_every=10, resume=resume, restart=restart,
                     resume_hint="Use another --out, or --restart to discard it.")
    loop.run()
    return trainer


def export_base(checkpoint_path, directory, info: dict | None = None, dtype=torch.float16):
    """Write the EMA generator + discriminator of a train-base checkpoint as a base directory
    (``base.json`` + ``base.safetensors``, loadable with :func:`gmem.models.load_base`)."""

    if dist.is_main():  # under torchrun rank 0 writes; the others wait until the base is in place
        G, D = load_gan_stability(checkpoint_path, use_ema=True)
        ckpt = read_checkpoint(checkpoint_path)
        meta = {"iterations": int(ckpt.get("iteration", -1)), "training": ckpt.get("config", {}), **(info or {})}
        save_base(G, D, directory, dtype=dtype, info=meta)
    dist.barrier()
    return Path(directory)
