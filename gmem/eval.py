"""Sample quality: the Fréchet distance, a cheap CPU score for demos, and Inception FID from local weights.

- :func:`frechet_distance`: ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`` between two
  Gaussians, computed in float64 with symmetric eigen-decompositions (no complex ``sqrtm`` detour;
  negative eigenvalues from rounding are clipped to 0).
- :func:`pixel_fid`: the Fréchet distance between Gaussian fits of *down-sampled pixels*
  (``8 x 8`` average-pooled images, 192 values per colour image). It is NOT the Inception FID of the
  literature: it only compares coarse colour layout statistics, is cheap on a CPU, and is comparable
  only with itself (same resolution, same number of samples). The demo reports it as "pixFID8".
- :func:`inception_fid`: the standard FID (pytorch-fid's Inception, 2048-d pool features). The weights
  cannot be downloaded here: they are read from ``$TORCH_HOME/hub/checkpoints/`` (file name
  :data:`INCEPTION_FILE`), and a clear error says so when they are missing.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["frechet_distance", "gaussian_stats", "pixel_features", "pixel_fid", "inception_fid",
           "inception_weights_path", "INCEPTION_FILE"]

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues below 0 clipped)."""
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (means ``[d]``, covariances ``[d, d]``).

    ``tr(sqrt(S1 S2)) = tr(sqrt(S1^1/2 S2 S1^1/2))``, and the latter matrix is symmetric PSD, so
    everything is done with ``eigh`` in float64: stable for singular covariances (few samples).
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(torch.as_tensor(m).double().cpu(), dtype=np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(torch.as_tensor(s).double().cpu(), dtype=np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: expected means [d] and covariances [d, d], got {mu1.shape}, "
                         f"{s1.shape}, {mu2.shape}, {s2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"frechet_distance: {name} contains NaN or inf")
    r1 = _sqrt_psd(s1)
    middle = r1 @ s2 @ r1
    w = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    tr_covmean = float(np.sqrt(np.clip(w, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """``features [N, d]`` -> ``(mean [d], covariance [d, d])`` in float64 (N >= 2)."""
    f = np.asarray(torch.as_tensor(features).double().cpu(), dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"gaussian_stats: need features [N >= 2, d], got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def pixel_features(images: torch.Tensor, size: int = 8) -> torch.Tensor:
    """``images [N, C, H, W]`` in [-1, 1] -> ``[N, C * size * size]``: average-pooled to ``size x size``."""
    if images.ndim != 4:
        raise ValueError(f"pixel_features: expected images [N, C, H, W], got {tuple(images.shape)}")
    return F.adaptive_avg_pool2d(images.float(), size).flatten(1)


def pixel_fid(real: torch.Tensor, fake: torch.Tensor, size: int = 8) -> float:
    """"pixFID": Fréchet distance of Gaussian fits of ``size x size`` pooled pixels (cheap, NOT Inception FID)."""
    return frechet_distance(*gaussian_stats(pixel_features(real, size)), *gaussian_stats(pixel_features(fake, size)))


def inception_weights_path() -> Path:
    """Where the FID Inception weights must lie: ``$TORCH_HOME/hub/checkpoints/<INCEPTION_FILE>``."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(torch_home) / "hub" / "checkpoints" / INCEPTION_FILE


@torch.no_grad()
def inception_fid(real: torch.Tensor, fake: torch.Tensor, batch_size: int = 50, device="cpu") -> float:
    """The standard FID between image sets ``[N, C, H, W]`` in [-1, 1] (pytorch-fid's Inception, pool3).

    Needs the weights file locally (no download): see :func:`inception_weights_path`. Slow on a CPU
    (a few images per second); use thousands of images for numbers comparable with papers.
    """
    path = inception_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception FID needs the weights file {path} (it cannot be downloaded here). Put "
            f"{INCEPTION_FILE} there, or set $TORCH_HOME to a directory holding hub/checkpoints/{INCEPTION_FILE}")
    from pytorch_fid.inception import InceptionV3

    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()

    def feats(images):
        out = []
        for s in range(0, images.shape[0], batch_size):
            x = images[s:s + batch_size].float().to(device)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            out.append(model((x.clamp(-1, 1) + 1) / 2)[0].flatten(1).cpu())
        return torch.cat(out)

    return frechet_distance(*gaussian_stats(feats(real)), *gaussian_stats(feats(fake)))
