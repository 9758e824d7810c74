"""Saving and loading a base GAN as ``base.json`` (architecture + provenance) + ``base.safetensors``.

The embedded default base lives in ``gmem/assets/base/`` (see its README.md for data, licence,
command, iterations and quality). Tensors are stored under ``G.<name>`` and ``D.<name>``; they may be
stored in float16 to keep the package small and are returned as float32 modules.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write_bytes, atomic_write_path
from .checkpoint import CheckpointError, _load_strict
from .resnet import Discriminator, Generator

DEFAULT_BASE_DIR = Path(__file__).resolve().parent.parent / "assets" / "base"
CONFIG_NAME, WEIGHTS_NAME = "base.json", "base.safetensors"


def save_base(G: Generator, D: Discriminator, directory, *, dtype=torch.float16, info: dict | None = None) -> Path:
    """Write ``G``/``D`` weights (as ``dtype``) and their config to ``directory``, atomically per file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"G.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in G.state_dict().items()}
    tensors.update({f"D.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in D.state_dict().items()})
    metadata = {"format": "gmem-base-v1"}
    atomic_write_path(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    config = {"format": "gmem-base-v1", "generator": G.config(), "discriminator": D.config(),
              "dtype": str(dtype).replace("torch.", ""),
              "sha256": hashlib.sha256((directory / WEIGHTS_NAME).read_bytes()).hexdigest(),
              "info": info or {}}
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    return directory


def base_config(directory) -> dict:
    """The parsed ``base.json`` of a base directory."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"base config not found: {path}")
    try:
        config = json.loads(path.read_text())
        config["generator"], config["discriminator"]
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{path}: damaged base config ({type(e).__name__}: {e})") from None
    check_base_config(config, path)
    return config


# Bounds on a base description, checked before anything is allocated (a crafted base.json must not
# make the process build a huge model): the public 256px GP-GAN has about 5e7 parameters.
BASE_LIMITS = {"size": (8, 1024), "nf": (1, 1024), "z_dim": (1, 4096), "embed_size": (1, 4096),
               "nlabels": (1, 100_000), "channels": (1, 4)}
MAX_BASE_PARAMETERS = 500_000_000


def check_base_config(config: dict, path="base.json") -> None:
    """CheckpointError naming the field unless ``config`` describes a base within :data:`BASE_LIMITS`."""
    for part, keys in (("generator", ("size", "nf", "z_dim", "embed_size", "nlabels", "channels")),
                       ("discriminator", ("size", "nf", "nlabels", "channels"))):
        cfg = config[part]
        if not isinstance(cfg, dict) or set(cfg) - set(keys):
            raise CheckpointError(f"{path}: field {part!r} must be an object with keys among {list(keys)}")
        for key, value in cfg.items():
            low, high = BASE_LIMITS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise CheckpointError(f"{path}: field {part}.{key} must be an int in {low}..{high}, got {value!r}")
    try:
        with torch.device("meta"):  # count parameters without allocating them
            n = sum(p.numel() for m in (Generator(**config["generator"]), Discriminator(**config["discriminator"]))
                    for p in m.parameters())
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid base description: {e}") from None
    if n > MAX_BASE_PARAMETERS:
        raise CheckpointError(f"{path}: the base it describes has {n:,} parameters, more than the "
                              f"{MAX_BASE_PARAMETERS:,} allowed")


def load_base(directory, *, verify: bool = True) -> tuple[Generator, Discriminator]:
    """Rebuild ``(G, D)`` (float32, eval mode, CPU) from a directory written by :func:`save_base`.

    With ``verify`` the weights file must match the SHA-256 recorded in ``base.json``.
    """
    directory = Path(directory)
    config = base_config(directory)
    wpath = directory / WEIGHTS_NAME
    if not wpath.is_file():
        raise FileNotFoundError(f"base weights not found: {wpath}")
    if verify and config.get("sha256"):
        digest = hashlib.sha256(wpath.read_bytes()).hexdigest()
        if digest != config["sha256"]:
            raise CheckpointError(f"{wpath}: damaged base weights (sha256 {digest[:12]}... does not match "
                                  f"{config['sha256'][:12]}... recorded in {CONFIG_NAME})")
    try:
        tensors = load_file(str(wpath))
    except Exception as e:  # safetensors raises its own (rust) error type for damaged files
        raise CheckpointError(f"{wpath}: cannot read base weights: {e}") from None
    G, D = Generator(**config["generator"]), Discriminator(**config["discriminator"])
    for prefix, module, what in (("G.", G, "generator"), ("D.", D, "discriminator")):
        state = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        _load_strict(module, state, what, str(wpath))
    return G.eval(), D.eval()


def default_base_info() -> dict:
    """Config and provenance of the embedded default base (``gmem/assets/base/base.json``)."""
    return base_config(DEFAULT_BASE_DIR)


def load_default_base() -> tuple[Generator, Discriminator]:
    """The small pretrained GP-GAN shipped with gmem (32x32 colour; see ``gmem/assets/base/README.md``)."""
    if not (DEFAULT_BASE_DIR / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"the embedded base is missing from this installation: "
                                f"{DEFAULT_BASE_DIR / WEIGHTS_NAME} "
                                "(reinstall gmem, or train one with `gmem train-base` and load it with load_base)")
    return load_base(DEFAULT_BASE_DIR)
