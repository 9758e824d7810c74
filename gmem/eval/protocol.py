"""FID between image sets, and the paper's protocol with cached real statistics.

The paper (and GAN_stability's evaluation) computes FID from N = min(data size, 10,000) real images
and as many generated ones. Real statistics depend only on the data and the network, so
:func:`real_statistics` keeps them in ``<cache_dir>/fid_stats/<key>.npz``, the key being a SHA-256 of
the exact real images used (values and shapes), N, the network's identity (file hash) and the
preprocessing. A changed dataset, subset or network never reuses an entry; a damaged entry is
recomputed. Statistics follow pytorch-fid: mean and covariance (``np.cov``, N - 1) of the float32
pool features, here accumulated in float64.
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable

import numpy as np
import torch

from ..atomic import atomic_write_path
from .cache import cache_dir, fingerprint
from .frechet import fid_from_features, frechet_distance, gaussian_stats
from .inception import PREPROCESS, _images_batches, inception_features, load_inception

__all__ = ["PAPER_MAX_SAMPLES", "protocol_sample_count", "real_statistics", "real_features", "inception_fid",
           "protocol_fid"]

PAPER_MAX_SAMPLES = 10_000
_SUBSET_SEED = 0  # which real images are used when the data set is larger than N: fixed, so cacheable


def protocol_sample_count(data_size: int, cap: int = PAPER_MAX_SAMPLES) -> int:
    """The paper's N: ``min(data_size, cap)``; at least 2 images are needed for a covariance."""
    if data_size < 2 or cap < 2:
        raise ValueError(f"FID needs at least 2 images (data size {data_size}, cap {cap})")
    return min(int(data_size), int(cap))


def _subset(size: int, n: int) -> torch.Tensor:
    """Sorted indices of ``n`` of ``size`` items, the same for every call (a fixed-seed permutation)."""
    if n >= size:
        return torch.arange(size)
    g = torch.Generator().manual_seed(_SUBSET_SEED)
    return torch.randperm(size, generator=g)[:n].sort().values


def _cache_key(real, indices, n: int, net, kind: str = "") -> str:
    """The cache key of a result of ``net`` on the ``n`` images ``real[indices]`` (None: all): a hash of
    their values and shapes, the network's identity and the preprocessing; ``kind`` tells results apart."""
    data_fp = fingerprint(_images_batches(real, 256, indices), f"n={n}")
    return hashlib.sha256(f"{data_fp}|{net.name}|{PREPROCESS}{kind}".encode()).hexdigest()[:40]


def _stats_file(key: str):
    return cache_dir() / "fid_stats" / f"{key}.npz"


def _read_stats(path, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = f["mu"], f["sigma"]
    except (OSError, KeyError, ValueError):  # missing or damaged: recompute
        return None
    if mu.shape != (dim,) or sigma.shape != (dim, dim) or not np.isfinite(sigma).all():
        return None
    return mu.astype(np.float64), sigma.astype(np.float64)


def real_statistics(real, n: int | None = None, *, batch_size: int = 50, device="cpu", progress=None,
                    cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Inception statistics ``(mu [2048], sigma [2048, 2048])`` (float64) of the paper's real sample.

    ``real``: a tensor ``[M, C, H, W]`` or a Dataset of ``[C, H, W]`` items, in [-1, 1]. ``n``: how
    many images (default :func:`protocol_sample_count` of ``M``); when ``n < M`` a fixed subset is
    used. With ``cache`` the result is read from / written to the cache (see the module docstring).
    """
    n = protocol_sample_count(len(real)) if n is None else protocol_sample_count(len(real), n)
    idx = _subset(len(real), n)
    net = load_inception(device)
    path = None
    if cache:
        path = _stats_file(_cache_key(real, idx, n, net))
        hit = _read_stats(path, net.dim)
        if hit is not None:
            return hit
    feats = inception_features(real, batch_size, device, progress, indices=idx, extractor=net)
    mu, sigma = gaussian_stats(feats)
    if path is not None:
        meta = json.dumps({"n": n, "network": net.name, "preprocess": PREPROCESS})

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, mu=mu, sigma=sigma, meta=np.array(meta))
        atomic_write_path(path, write)
    return mu, sigma


def real_features(real, *, batch_size: int = 50, device="cpu", progress=None, cache: bool = True) -> torch.Tensor:
    """Inception pool features ``[M, 2048]`` of all the images of ``real`` (a tensor ``[M, C, H, W]`` or a
    Dataset, in [-1, 1]), kept in ``<cache_dir>/fid_features/<key>.npy`` like :func:`real_statistics`
    (keyed by the exact images, the network and the preprocessing): for FIDs of few samples, where
    :func:`gmem.eval.fid_from_features` is exact from the features and statistics alone are not."""
    net = load_inception(device)
    path = None
    if cache:
        path = cache_dir() / "fid_features" / f"{_cache_key(real, None, len(real), net, '|features')}.npy"
        try:
            hit = np.load(path, allow_pickle=False)
            if hit.shape == (len(real), net.dim) and np.isfinite(hit).all():
                return torch.from_numpy(hit)
        except (OSError, ValueError, EOFError):  # missing or damaged: recompute
            pass
    feats = inception_features(real, batch_size, device, progress, extractor=net)
    if path is not None:
        def write(tmp):
            with open(tmp, "wb") as f:
                np.save(f, feats.numpy())
        atomic_write_path(path, write)
    return feats


def inception_fid(real, fake, batch_size: int = 50, device="cpu", progress=None) -> float:
    """The standard FID between two image sets, all images of each used (no caching).

    ``real``, ``fake``: tensors ``[N, C, H, W]`` (or Datasets of ``[C, H, W]``) in [-1, 1], C = 1 or 3,
    any size, N >= 2. The network and statistics are pytorch-fid's (see :mod:`gmem.eval.inception`).
    Slow on a CPU (a few images per second); papers use 10,000 images (:func:`protocol_fid`).
    """
    for name, x in (("real", real), ("fake", fake)):
        if len(x) < 2:
            raise ValueError(f"inception_fid: {name} needs at least 2 images, got {len(x)}")
    net = load_inception(device)
    fr = inception_features(real, batch_size, device, progress, extractor=net)
    ff = inception_features(fake, batch_size, device, progress, extractor=net)
    return fid_from_features(fr, ff)


def protocol_fid(real, fake: torch.Tensor | Callable[[int], torch.Tensor], n: int | None = None, *,
                 batch_size: int = 50, device="cpu", progress=None, cache: bool = True) -> float:
    """FID by the paper's protocol: N = min(len(real), 10,000) real images (statistics cached) and N fakes.

    ``fake``: a tensor ``[M, C, H, W]`` with ``M >= N`` (its first N are used) or a sampler
    ``fake(k) -> [k, C, H, W]`` called for batches of at most ``batch_size``; values in [-1, 1].
    ``n`` overrides N (e.g. fewer images on a CPU; then the number is not the paper's).
    """
    mu_r, sig_r = real_statistics(real, n, batch_size=batch_size, device=device, progress=progress, cache=cache)
    n = protocol_sample_count(len(real)) if n is None else protocol_sample_count(len(real), n)
    net = load_inception(device)
    if callable(fake) and not isinstance(fake, torch.Tensor):
        from tqdm import tqdm

        parts = []
        with tqdm(total=n, unit="img", desc="Inception features (samples)", leave=False,
                  disable=None if progress is None else not progress) as bar:
            for s in range(0, n, batch_size):
                k = min(batch_size, n - s)
                b = fake(k)
                if not isinstance(b, torch.Tensor) or b.ndim != 4 or b.shape[0] != k:
                    raise ValueError(f"protocol_fid: the sampler must return a tensor [{k}, C, H, W], got "
                                     f"{type(b).__name__} {tuple(getattr(b, 'shape', ()))}")
                parts.append(inception_features(b.detach(), batch_size, device, False, extractor=net))
                bar.update(k)
        ff = torch.cat(parts)
    else:
        if len(fake) < n:
            raise ValueError(f"protocol_fid: needs {n} generated images, got {len(fake)}")
        ff = inception_features(fake, batch_size, device, progress, indices=torch.arange(n), extractor=net)
    return frechet_distance(mu_r, sig_r, *gaussian_stats(ff))
