"""Image grids: the one place that turns image tensors into PNG files (CLI, demo, training loop)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .atomic import atomic_write

__all__ = ["image_grid", "grid_image", "save_grid"]


def image_grid(images: torch.Tensor, nrow: Optional[int] = None, pad: int = 2) -> torch.Tensor:
    """Tile images ``[N, C, H, W]`` into one image ``[C, rows*(H+pad)+pad, nrow*(W+pad)+pad]``.

    ``nrow`` images per row (default: a square-ish grid); the padding is black (-1).
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a tensor [N, C, H, W], got {getattr(images, 'shape', type(images))}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("no images to put in a grid")
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    rows = int(math.ceil(n / nrow))
    grid = images.new_full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), -1.0)
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def grid_image(images: torch.Tensor, nrow: Optional[int] = None, scale: int = 1,
               row_labels: Optional[Sequence[str]] = None):
    """Images ``[N, C, H, W]`` in [-1, 1] as one ``PIL.Image`` grid, upscaled by ``scale``.

    ``row_labels``: one text per grid row (e.g. the task of each row), written in a margin on the left.
    """
    from PIL import Image, ImageDraw, ImageFont

    images = images.detach().float().cpu()
    grid = image_grid(images, nrow)
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if row_labels is None:
        return img
    pad, h = 2, images.shape[2]
    nrow = nrow or int(math.ceil(math.sqrt(images.shape[0])))
    rows = int(math.ceil(images.shape[0] / nrow))
    if len(row_labels) != rows:
        raise ValueError(f"row_labels has {len(row_labels)} texts for {rows} grid rows")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(img)
    texts = [str(t) for t in row_labels]
    margin = 8 + max(int(measure.textlength(t, font=font)) for t in texts)
    labelled = Image.new(img.mode, (img.width + margin, img.height), 0)
    labelled.paste(img, (margin, 0))
    draw = ImageDraw.Draw(labelled)
    white = 255 if img.mode == "L" else (255, 255, 255)
    for r, text in enumerate(texts):
        middle = (pad + r * (h + pad) + h // 2) * scale
        draw.text((4, middle), text, fill=white, font=font, anchor="lm")
    return labelled


def save_grid(images: torch.Tensor, path, nrow: Optional[int] = None, scale: int = 1, format: str = "PNG",
              row_labels: Optional[Sequence[str]] = None) -> None:
    """Write :func:`grid_image` of ``images`` to ``path`` (atomically).

    ``format``: a Pillow format name (``"PNG"`` by default; lossy formats are written at quality 95).
    """
    img = grid_image(images, nrow, scale, row_labels)
    options = {"quality": 95} if format in ("JPEG", "WEBP") else {}
    atomic_write(path, lambda f: img.save(f, format=format, **options))
