"""The Fréchet distance between Gaussian fits of features, and the cheap pixel-space proxy "pixFID8".

- :func:`frechet_distance`: ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`` between two
  Gaussians, computed in float64 with symmetric eigen-decompositions (no complex ``sqrtm`` detour;
  negative eigenvalues from rounding are clipped to 0). Equal to pytorch-fid's
  ``calculate_frechet_distance`` (tests compare them, singular covariances included).
- :func:`pixel_fid`: the Fréchet distance between Gaussian fits of *down-sampled pixels*
  (``8 x 8`` average-pooled images, 192 values per colour image). It is a PROXY, not the Inception FID
  of the literature: it only compares coarse colour layout statistics, is cheap on a CPU, and is
  comparable only with itself (same resolution, same number of samples). Reports call it "pixFID8".
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["frechet_distance", "gaussian_stats", "fid_from_features", "pixel_features", "pixel_fid"]


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


def _as_f64(features, name: str) -> np.ndarray:
    f = np.asarray(torch.as_tensor(features).double().cpu(), dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"{name}: need features [N >= 2, d], got {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return f


def fid_from_features(f1, f2) -> float:
    """``frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))`` for features ``f1 [N1, d]``, ``f2 [N2, d]``.

    When both sets are no larger than ``d`` (few images, 2048-d Inception features) the ``d x d``
    eigen-problems are replaced by an exact ``N1 x N2`` one: with centred features ``A_i`` and
    ``S_i = A_i^T A_i / (N_i - 1)``, the non-zero eigenvalues of ``S1^1/2 S2 S1^1/2`` are those of
    ``S1 S2``, i.e. the squared singular values of ``A1 A2^T / sqrt((N1 - 1)(N2 - 1))``. Faster, and it
    does not sum square roots of the ~d rounding-noise eigenvalues of a rank-deficient product.
    """
    a, b = _as_f64(f1, "fid_from_features"), _as_f64(f2, "fid_from_features")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"fid_from_features: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    d = a.shape[1]
    if max(a.shape[0], b.shape[0]) > d:
        return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    mu1, mu2 = a.mean(0), b.mean(0)
    a1, a2 = a - mu1, b - mu2
    c1, c2 = a.shape[0] - 1, b.shape[0] - 1
    tr_covmean = float(np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()) / np.sqrt(c1 * c2)
    diff = mu1 - mu2
    return float(diff @ diff + (a1 * a1).sum() / c1 + (a2 * a2).sum() / c2 - 2.0 * tr_covmean)


def pixel_features(images: torch.Tensor, size: int = 8) -> torch.Tensor:
    """``images [N, C, H, W]`` in [-1, 1] -> ``[N, C * size * size]``: average-pooled to ``size x size``."""
    if images.ndim != 4:
        raise ValueError(f"pixel_features: expected images [N, C, H, W], got {tuple(images.shape)}")
    return F.adaptive_avg_pool2d(images.float(), size).flatten(1)


def pixel_fid(real: torch.Tensor, fake: torch.Tensor, size: int = 8) -> float:
    """pixFID (a proxy, NOT the Inception FID): Fréchet distance of ``size x size`` pooled pixels.

    ``real [N, C, H, W]``, ``fake [M, C, H, W]`` in [-1, 1] with the same ``C``; N, M >= 2.
    """
    return fid_from_features(pixel_features(real, size), pixel_features(fake, size))
