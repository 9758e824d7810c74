"""Training the unconverted base GP-GAN (``gmem train-base``).

The GP-GAN objective of Mescheder et al. 2018: non-saturating loss, R1 penalty on real data
(``gamma/2 * E||grad_x D(x)||^2``), Adam (lr 1e-4, betas (0, 0.99)), an EMA (0.999) copy of the
generator for sampling, horizontal flips and uniform dequantisation noise on real images.

Everything random (batches, z, flips, noise) comes from seeded generators whose states are saved in
the checkpoint, so a run stopped at a checkpoint and resumed gives the same weights as an
uninterrupted one (on the same machine and thread count). Checkpoints are written atomically
(tmp file + ``os.replace``) in the public GAN_stability layout plus the training state, so
:func:`gmem.models.load_gan_stability` reads them too.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import InfiniteSampler, as_dataset, batch
from .models import Discriminator, Generator

CHECKPOINT_NAME = "checkpoint.pt"


def r1_penalty(d_real: torch.Tensor, x_real: torch.Tensor) -> torch.Tensor:
    """``E_x ||grad_x D(x)||^2`` for real images ``x_real`` ``[N, C, H, W]`` (requires_grad) and logits ``[N]``."""
    (grad,) = torch.autograd.grad(d_real.sum(), x_real, create_graph=True)
    return grad.pow(2).reshape(grad.shape[0], -1).sum(1).mean()


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers copied."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and uniform dequantisation noise (one uint8 step, 2/255) on ``[N, C, H, W]``."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    noise = (torch.rand(x.shape, generator=gen) - 0.5) * (2.0 / 255.0)
    return (x + noise).clamp(-1.0, 1.0)


def save_grid(images: torch.Tensor, path, nrow: int | None = None, scale: int = 1) -> None:
    """Write images ``[N, C, H, W]`` in [-1, 1] as one PNG grid (atomically)."""
    from PIL import Image

    n, c, h, w = images.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / nrow))
    grid = torch.full((c, rows * (h + 2) + 2, nrow * (w + 2) + 2), -1.0)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = images[i]
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def atomic_torch_save(obj, path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class BaseTrainer:
    """State of one base-GAN training run: G, D, EMA G, optimisers, samplers and RNGs.

    ``step()`` does one GP-GAN iteration (a generator update, then a discriminator update with R1)
    and returns the losses. ``state_dict()``/``load_state_dict()`` capture everything for exact resumption.
    """

    def __init__(self, dataset, *, size: int = 32, nf: int = 32, z_dim: int = 128, embed_size: int = 64,
                 nlabels: int = 1, channels: int = 3, batch_size: int = 64, lr: float = 1e-4,
                 betas=(0.0, 0.99), r1_gamma: float = 10.0, ema_decay: float = 0.999, seed: int = 0,
                 device="cpu"):
        self.dataset = dataset
        self.config = dict(size=size, nf=nf, z_dim=z_dim, embed_size=embed_size, nlabels=nlabels,
                           channels=channels, batch_size=batch_size, lr=lr, betas=list(betas),
                           r1_gamma=r1_gamma, ema_decay=ema_decay, seed=seed)
        self.device = torch.device(device)
        torch.manual_seed(seed)  # weight initialisation
        self.G = Generator(size, nf, z_dim, embed_size, nlabels, channels).to(self.device)
        self.D = Discriminator(size, nf, nlabels, channels).to(self.device)
        self.G_ema = copy.deepcopy(self.G).eval()
        for p in self.G_ema.parameters():
            p.requires_grad_(False)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=lr, betas=tuple(betas), eps=1e-8)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=lr, betas=tuple(betas), eps=1e-8)
        self.sampler = InfiniteSampler(len(dataset), batch_size, seed)
        self.rng = torch.Generator().manual_seed(seed + 1)  # z, flips, dequantisation noise
        self.labels = getattr(dataset, "labels", None) if nlabels > 1 else None
        if nlabels > 1 and self.labels is None:
            raise ValueError(f"nlabels={nlabels} needs a dataset with labels (a folder of class "
                             "sub-directories or an .npz with a 'labels' array)")
        self.iteration = 0

    def _labels(self, idx: torch.Tensor | None, n: int) -> torch.Tensor:
        if self.labels is None:
            return torch.zeros(n, dtype=torch.long)
        if idx is None:  # generator labels: uniform over classes
            return torch.randint(self.config["nlabels"], (n,), generator=self.rng)
        return self.labels[idx]

    def step(self) -> dict:
        """One iteration; returns ``{'g_loss', 'd_real', 'd_fake', 'r1'}`` (floats)."""
        bs, dev, gamma = self.config["batch_size"], self.device, self.config["r1_gamma"]
        z_dim = self.config["z_dim"]
        self.G.train(), self.D.train()

        # Generator update: non-saturating loss softplus(-D(G(z))).
        self.D.requires_grad_(False)
        self.G.requires_grad_(True)
        z = torch.randn(bs, z_dim, generator=self.rng).to(dev)
        y = self._labels(None, bs).to(dev)
        g_loss = F.softplus(-self.D(self.G(z, y), y)).mean()
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        update_ema(self.G_ema, self.G, self.config["ema_decay"])

        # Discriminator update: softplus(-D(x)) + gamma/2 * R1 on reals, softplus(D(G(z))) on fakes.
        self.D.requires_grad_(True)
        self.G.requires_grad_(False)
        idx = self.sampler.next_indices()
        x_real = augment(batch(self.dataset, idx), self.rng).to(dev).requires_grad_(True)
        y_real = self._labels(idx, bs).to(dev)
        d_real = self.D(x_real, y_real)
        r1 = r1_penalty(d_real, x_real)
        loss_real = F.softplus(-d_real).mean() + 0.5 * gamma * r1
        self.opt_d.zero_grad(set_to_none=True)
        loss_real.backward()
        z = torch.randn(bs, z_dim, generator=self.rng).to(dev)
        y = self._labels(None, bs).to(dev)
        with torch.no_grad():
            x_fake = self.G(z, y)
        loss_fake = F.softplus(self.D(x_fake, y)).mean()
        loss_fake.backward()
        self.opt_d.step()
        self.G.requires_grad_(True)

        self.iteration += 1
        return {"g_loss": float(g_loss.detach()), "d_real": float(F.softplus(-d_real.detach()).mean()),
                "d_fake": float(loss_fake.detach()), "r1": float(r1.detach())}

    def state_dict(self) -> dict:
        """Public GAN_stability layout (``generator``, ``generator_test``, ``discriminator``) + training state."""
        return {"generator": self.G.state_dict(), "generator_test": self.G_ema.state_dict(),
                "discriminator": self.D.state_dict(), "opt_g": self.opt_g.state_dict(),
                "opt_d": self.opt_d.state_dict(), "sampler": self.sampler.state_dict(),
                "rng": self.rng.get_state(), "iteration": self.iteration, "config": dict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("batch_size", "size", "nf", "z_dim", "embed_size", "nlabels", "channels", "seed"):
            if state["config"].get(key) != self.config[key]:
                raise ValueError(f"checkpoint was trained with {key}={state['config'].get(key)!r}, "
                                 f"this run asks for {self.config[key]!r}")
        self.G.load_state_dict(state["generator"])
        self.G_ema.load_state_dict(state["generator_test"])
        self.D.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sampler.load_state_dict(state["sampler"])
        self.rng.set_state(state["rng"])
        self.iteration = int(state["iteration"])


def train_base(data, out_dir, *, iterations: int = 10000, size: int = 32, nf: int = 32, z_dim: int = 128,
               embed_size: int = 64, nlabels: int = 1, batch_size: int = 64, lr: float = 1e-4,
               r1_gamma: float = 10.0, ema_decay: float = 0.999, seed: int = 0, sample_every: int = 500,
               checkpoint_every: int = 500, max_minutes: float | None = None, threads: int | None = None,
               resume: bool = True, progress: bool = True, device="cpu") -> BaseTrainer:
    """Train a base GP-GAN on ``data`` (anything :func:`gmem.data.as_dataset` takes) into ``out_dir``.

    Writes ``out_dir/checkpoint.pt`` every ``checkpoint_every`` iterations and at the end (atomically),
    sample grids of the EMA generator (fixed z) to ``out_dir/samples/`` every ``sample_every``, and
    losses to ``out_dir/log.jsonl``. With ``resume`` an existing checkpoint is continued exactly.
    ``max_minutes`` stops early (at a checkpoint) once that much wall time has passed in this call.
    Returns the trainer (``.G``, ``.G_ema``, ``.D``, ``.iteration``).
    """
    from tqdm import tqdm

    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = as_dataset(data, size, 3)
    trainer = BaseTrainer(dataset, size=size, nf=nf, z_dim=z_dim, embed_size=embed_size, nlabels=nlabels,
                          batch_size=batch_size, lr=lr, r1_gamma=r1_gamma, ema_decay=ema_decay, seed=seed,
                          device=device)
    ckpt_path = out_dir / CHECKPOINT_NAME
    if resume and ckpt_path.is_file():
        trainer.load_state_dict(torch.load(ckpt_path, map_location=device, weights_only=True))
    fixed_z = torch.randn(64, z_dim, generator=torch.Generator().manual_seed(seed + 12345)).to(device)
    fixed_y = (torch.arange(64) % nlabels).to(device)

    def checkpoint():
        atomic_torch_save(trainer.state_dict(), ckpt_path)

    def samples():
        with torch.no_grad():
            imgs = trainer.G_ema(fixed_z, fixed_y).cpu()
        save_grid(imgs, out_dir / "samples" / f"it_{trainer.iteration:07d}.png", nrow=8, scale=2)
        save_grid(imgs, out_dir / "samples" / "latest.png", nrow=8, scale=2)

    start, t_run = time.time(), 0.0
    bar = tqdm(total=iterations, initial=trainer.iteration, disable=not progress, dynamic_ncols=True,
               desc="train-base", unit="it")
    with open(out_dir / "log.jsonl", "a") as log:
        while trainer.iteration < iterations:
            t0 = time.time()
            losses = trainer.step()
            t_run += time.time() - t0
            bar.update(1)
            it = trainer.iteration
            if it % 10 == 0 or it == iterations:
                bar.set_postfix(g=f"{losses['g_loss']:.3f}", d_real=f"{losses['d_real']:.3f}",
                                d_fake=f"{losses['d_fake']:.3f}", r1=f"{losses['r1']:.2e}")
                log.write(json.dumps({"it": it, **losses, "time": round(time.time() - start, 2)}) + "\n")
                log.flush()
            if not all(np.isfinite(list(losses.values()))):
                raise FloatingPointError(f"non-finite loss at iteration {it}: {losses}")
            out_of_time = max_minutes is not None and (time.time() - start) > 60 * max_minutes
            if it % sample_every == 0 or it == iterations or out_of_time:
                samples()
            if it % checkpoint_every == 0 or it == iterations or out_of_time:
                checkpoint()
            if out_of_time:
                bar.write(f"stopping at iteration {it}: time limit of {max_minutes} min reached "
                          f"(checkpoint saved; run again to continue)")
                break
    bar.close()
    return trainer


def export_base(checkpoint_path, directory, info: dict | None = None, dtype=torch.float16):
    """Write the EMA generator + discriminator of a train-base checkpoint as a base directory
    (``base.json`` + ``base.safetensors``, loadable with :func:`gmem.models.load_base`)."""
    from .models import load_gan_stability, save_base
    from .models.checkpoint import read_checkpoint

    G, D = load_gan_stability(checkpoint_path, use_ema=True)
    ckpt = read_checkpoint(checkpoint_path)
    meta = {"iterations": int(ckpt.get("iteration", -1)), "training": ckpt.get("config", {}), **(info or {})}
    return save_base(G, D, directory, dtype=dtype, info=meta)
