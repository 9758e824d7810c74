"""Loading GP-GAN checkpoints in the public GAN_stability release layout.

A release checkpoint is a ``torch.save`` dict with ``generator`` (raw weights), ``generator_test``
(the EMA generator used for sampling) and ``discriminator`` state dicts whose keys carry the
``module.`` prefix of ``nn.DataParallel``. The architecture (size, start size, nf, z_dim,
embed_size, nlabels) is inferred from the tensor shapes, so 'resnet4' checkpoints of every size
(64, 128, 256, 512; conditional or not) and any model built by :mod:`gmem.models.resnet` load.
The file is read with ``torch.load(weights_only=True)``: nothing in it is executed.
"""
from __future__ import annotations

import math
import os
import pickle
import zipfile

import torch

from .resnet import Discriminator, Generator


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: the message names the file and the problem."""


def strip_prefix(state: dict, prefix: str = "module.") -> dict:
    """Drop ``prefix`` from every key that has it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def _block_count(state: dict) -> int:
    return len({k.split(".")[0] for k in state if k.startswith("resnet_")})


def _start_size(rows: int, nf: int) -> int:
    """``s0`` with ``rows == 16 * nf * s0 * s0``, or 0 if there is none."""
    if nf <= 0 or rows % (16 * nf):
        return 0
    area = rows // (16 * nf)
    s0 = math.isqrt(area)
    return s0 if s0 * s0 == area else 0


def _infer_config(g_state: dict, d_state: dict, path: str) -> tuple[dict, dict]:
    """Generator / discriminator constructor arguments from state-dict shapes.

    The number of residual blocks gives the number of x2 stages, and the fc layers give the start
    size ``s0`` (``fc`` rows ``16 * nf * s0**2``), so ``size = s0 * 2**(blocks - 1)``. This covers
    GAN_stability's 'resnet4' at every size (7 blocks, ``s0 = size // 64``) and gmem's own models.
    """
    try:
        emb = g_state["embedding.weight"]             # [nlabels, embed_size]
        fc_w = g_state["fc.weight"]                   # [16*nf*s0*s0, z_dim + embed_size]
        img_w = g_state["conv_img.weight"]            # [channels, nf, 7, 7]
        d_fc = d_state["fc.weight"]                   # [nlabels, 16*nf_d*s0*s0]
        d_img = d_state["conv_img.weight"]            # [nf_d, channels, 7, 7]
    except KeyError as e:
        raise CheckpointError(f"{path}: not a GP-GAN resnet checkpoint: missing tensor {e.args[0]!r}") from None
    for name, t, dims in (("generator embedding.weight", emb, 2), ("generator fc.weight", fc_w, 2),
                          ("generator conv_img.weight", img_w, 4), ("discriminator fc.weight", d_fc, 2),
                          ("discriminator conv_img.weight", d_img, 4)):
        if t.dim() != dims:
            raise CheckpointError(f"{path}: {name} has shape {tuple(t.shape)}; expected {dims} dimensions")
    nlabels, embed_size = emb.shape
    channels, nf = img_w.shape[:2]
    z_dim = fc_w.shape[1] - embed_size
    n_blocks = _block_count(g_state)
    if n_blocks < 2:
        raise CheckpointError(f"{path}: generator has {n_blocks} residual blocks; expected at least 2")
    if _block_count(d_state) != n_blocks:
        raise CheckpointError(f"{path}: discriminator has {_block_count(d_state)} residual blocks but the "
                              f"generator {n_blocks}")
    s0 = _start_size(fc_w.shape[0], nf)
    if not s0 or z_dim <= 0:
        raise CheckpointError(f"{path}: generator fc weight {tuple(fc_w.shape)} does not fit nf={nf}, "
                              f"embed_size={embed_size} (expected [16 * {nf} * s0 * s0, z_dim + {embed_size}] "
                              "for a start size s0 >= 1 and z_dim >= 1)")
    nf_d = d_img.shape[0]
    if _start_size(d_fc.shape[1], nf_d) != s0:
        raise CheckpointError(f"{path}: discriminator fc weight {tuple(d_fc.shape)} does not fit nf={nf_d} and "
                              f"the generator's start size {s0} (expected [{nlabels}, {16 * nf_d * s0 * s0}])")
    if d_fc.shape[0] != nlabels:
        raise CheckpointError(f"{path}: discriminator has {d_fc.shape[0]} labels but the generator {nlabels}")
    size = s0 * 2 ** (n_blocks - 1)
    g_cfg = dict(size=size, nf=int(nf), z_dim=int(z_dim), embed_size=int(embed_size), nlabels=int(nlabels),
                 channels=int(channels), s0=s0)
    d_cfg = dict(size=size, nf=int(nf_d), nlabels=int(nlabels), channels=int(d_img.shape[1]), s0=s0)
    return g_cfg, d_cfg


def _load_strict(module: torch.nn.Module, state: dict, what: str, path: str) -> None:
    """``load_state_dict`` with an error message that names the file and every mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"wrong shapes {wrong[:5]}{' ...' if len(wrong) > 5 else ''}")
        raise CheckpointError(f"{path}: {what} does not match the GP-GAN architecture: " + "; ".join(parts))
    module.load_state_dict(state)


def read_checkpoint(path) -> dict:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GP-GAN checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path}: cannot read the checkpoint (damaged, truncated, or not a "
                              f"torch.save file of tensors): {type(e).__name__}: {first_line}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict with 'generator', 'generator_test', 'discriminator', "
                              f"got {type(ckpt).__name__}")
    return ckpt


def load_gan_stability(path, use_ema: bool = True) -> tuple[Generator, Discriminator]:
    """Load a public GP-GAN ('resnet4'-style) checkpoint into ``(G, D)`` in eval mode on the CPU.

    ``use_ema=True`` takes the generator from ``generator_test`` (the EMA weights the release samples
    with); ``False`` takes the raw ``generator``. Raises :class:`CheckpointError` (a ValueError) naming
    the file for a damaged file, a missing entry or mismatching tensors; FileNotFoundError if absent.
    """
    path = os.fspath(path)
    ckpt = read_checkpoint(path)
    g_key = "generator_test" if use_ema else "generator"
    for key in (g_key, "discriminator"):
        if key not in ckpt:
            hint = " (use use_ema=False for checkpoints without an EMA generator)" if key == "generator_test" else ""
            raise CheckpointError(f"{path}: missing entry {key!r}{hint}; entries present: {sorted(ckpt)}")
        if not isinstance(ckpt[key], dict) or not all(isinstance(v, torch.Tensor) for v in ckpt[key].values()):
            raise CheckpointError(f"{path}: entry {key!r} is not a state dict of tensors")
    g_state = strip_prefix(ckpt[g_key])
    d_state = strip_prefix(ckpt["discriminator"])
    g_cfg, d_cfg = _infer_config(g_state, d_state, path)
    G, D = Generator(**g_cfg), Discriminator(**d_cfg)
    _load_strict(G, g_state, f"entry {g_key!r}", path)
    _load_strict(D, d_state, "entry 'discriminator'", path)
    return G.eval(), D.eval()
