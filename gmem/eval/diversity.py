"""A simple diversity figure: the share of near-duplicate pairs in a set of images.

Mode collapse shows as many samples that look alike. :func:`near_duplicate_share` average-pools each
image to ``size x size``, measures the root-mean-square difference of every pair (values in [-1, 1])
and returns the share of pairs closer than ``threshold``. It is a pixel-space figure: compare a
generator's samples (fixed seeds) with the same figure on the real images of the task, never across
datasets or settings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["near_duplicate_share", "nearest_neighbour_ratio", "NEAR_DUPLICATE_THRESHOLD"]

#: RMS pixel difference (images in [-1, 1], pooled) below which two images count as near-duplicates.
NEAR_DUPLICATE_THRESHOLD = 0.1


def near_duplicate_share(images: torch.Tensor, threshold: float = NEAR_DUPLICATE_THRESHOLD, size: int = 16) -> float:
    """Share of the ``n (n - 1) / 2`` pairs of ``images [n, C, H, W]`` (in [-1, 1], n >= 2) whose pooled
    RMS difference is below ``threshold``: 0 for all-distinct images, 1 for n copies of one image."""
    _check_images("near_duplicate_share", images, "images")
    n = images.shape[0]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"near_duplicate_share: threshold must be a number > 0, got {threshold!r}")
    _check_size("near_duplicate_share", size)
    rms = _pair_rms(images, size)
    close = (rms < threshold).triu(diagonal=1).sum()
    return float(close) / (n * (n - 1) / 2)


def _check_images(fn: str, images, what: str) -> None:
    """``images`` must be a float tensor ``[n >= 2, C, H, W]`` (``what``: how ``fn``'s messages name it)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"{fn}: {what} must be a float tensor [n, C, H, W], got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    if images.shape[0] < 2:
        raise ValueError(f"{fn}: need at least 2 {what}, got {images.shape[0]}")


def _check_size(fn: str, size) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{fn}: size must be a positive int, got {size!r}")


def _pair_rms(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[n, n]`` RMS differences of the images average-pooled to ``size x size`` (values in [-1, 1])."""
    x = images.detach().to(torch.float64).clamp(-1, 1)
    x = F.adaptive_avg_pool2d(x, min(size, x.shape[-2], x.shape[-1])).flatten(1)
    return torch.cdist(x, x) / x.shape[1] ** 0.5


def _median_nearest(images: torch.Tensor, size: int) -> float:
    rms = _pair_rms(images, size)
    rms.fill_diagonal_(float("inf"))
    return float(rms.min(dim=1).values.median())


def nearest_neighbour_ratio(samples: torch.Tensor, real: torch.Tensor, size: int = 16) -> float:
    """How spread out ``samples [n, C, H, W]`` are next to ``real [m, C, H, W]`` (same size, in [-1, 1]):
    the median distance of each sample to its nearest other sample, over the same on the real images
    (pooled RMS as :func:`near_duplicate_share`). About 1: as diverse as the data; well below 1: many
    samples sit on top of each other (collapsed modes); no threshold to choose. Compare sets of the
    same size (the nearest neighbour is closer in a larger set)."""
    _check_images("nearest_neighbour_ratio", samples, "samples")
    _check_images("nearest_neighbour_ratio", real, "real images")
    if samples.shape[1:] != real.shape[1:]:
        raise ValueError(f"nearest_neighbour_ratio: samples {tuple(samples.shape[1:])} and real "
                         f"{tuple(real.shape[1:])} images must have the same [C, H, W]")
    _check_size("nearest_neighbour_ratio", size)
    reference = _median_nearest(real, size)
    if reference == 0:
        raise ValueError("nearest_neighbour_ratio: half of the real images have an exact duplicate; "
                         "the ratio is undefined")
    return _median_nearest(samples, size) / reference
