#!/usr/bin/env python3
"""Rebuild gmem's image data from installed Debian packages, so their provenance is reproducible.

    apt-get install crawl-tiles-data fonts-noto-color-emoji oxygen-icon-theme dataset-fashion-mnist
    python tools/make_assets.py --source /work/base_run/crawl_tiles.npz   # base training set (not bundled)
    python tools/make_assets.py --targets gmem/assets/data                # embedded demo target sets

Outputs are uint8 ``.npz`` archives with ``images`` [N, 32, 32, 3] (and ``labels`` where there are
classes). Everything is deterministic: files are read in sorted order, duplicates removed, and the
random subsets drawn with fixed seeds.
"""
from __future__ import annotations

import argparse
import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32
CRAWL_TILES = Path("/usr/share/crawl/dat/tiles")
CRAWL_SHEETS = ("main", "player", "feat", "floor", "wall", "gui", "icons")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
OXYGEN_ICONS = Path("/usr/share/icons/oxygen/base/48x48")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _need(path: Path, package: str) -> Path:
    if not path.exists():
        raise SystemExit(f"{path} not found: install it with `apt-get install {package}`")
    return path


def _over_black(rgba: np.ndarray) -> np.ndarray:
    """uint8 RGBA [..., 4] -> uint8 RGB [..., 3], transparency composited over black."""
    rgb = rgba[..., :3].astype(np.float32) * (rgba[..., 3:].astype(np.float32) / 255.0)
    return np.round(rgb).astype(np.uint8)


def _unique(images: np.ndarray) -> np.ndarray:
    """Drop exact duplicates (np.unique also sorts, which makes the order independent of file order)."""
    flat = images.reshape(images.shape[0], -1)
    return np.unique(flat, axis=0).reshape(-1, *images.shape[1:])


def crawl_tiles(min_coverage: float = 0.15) -> np.ndarray:
    """Dungeon Crawl Stone Soup tiles: each sprite sheet cut on a 32-px grid -> uint8 [N, 32, 32, 3].

    Cells whose opaque area is below ``min_coverage`` are dropped (empty or nearly empty cells).
    """
    tiles = []
    for sheet in CRAWL_SHEETS:
        a = np.asarray(Image.open(_need(CRAWL_TILES / f"{sheet}.png", "crawl-tiles-data")).convert("RGBA"))
        h, w = a.shape[0] // SIZE, a.shape[1] // SIZE
        cells = a[:h * SIZE, :w * SIZE].reshape(h, SIZE, w, SIZE, 4).transpose(0, 2, 1, 3, 4).reshape(-1, SIZE, SIZE, 4)
        cells = cells[(cells[..., 3] > 0).mean(axis=(1, 2)) >= min_coverage]
        tiles.append(_over_black(cells))
    return _unique(np.concatenate(tiles))


def _fit(img: Image.Image) -> np.ndarray:
    """RGBA image -> 32x32 RGB over black: crop to the opaque area, pad to square, area-resize."""
    img = img.convert("RGBA")
    box = img.getchannel("A").getbbox()
    if box is None:
        return None
    img = img.crop(box)
    s = max(img.size)
    square = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    square.paste(img, ((s - img.width) // 2, (s - img.height) // 2))
    square = square.resize((SIZE - 2, SIZE - 2), Image.BOX)  # 1-px margin
    canvas = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    canvas.paste(square, (1, 1))
    return _over_black(np.asarray(canvas))


def noto_emoji() -> np.ndarray:
    """Noto Color Emoji glyphs drawn by Pillow (every code point in the font's emoji ranges)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.truetype(str(_need(EMOJI_FONT, "fonts-noto-color-emoji")), 109)
    ranges = [(0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF),
              (0x1FA70, 0x1FAFF), (0x2600, 0x26FF), (0x2700, 0x27BF)]
    out = []
    for lo, hi in ranges:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            img = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
            ImageDraw.Draw(img).text((8, 8), ch, font=font, embedded_color=True)
            a = np.asarray(img)
            # Missing glyphs render as nothing (or the grey .notdef box): keep only coloured glyphs.
            if a[..., 3].max() == 0:
                continue
            rgb = a[..., :3][a[..., 3] > 0].astype(np.int16)
            if np.abs(rgb - rgb.mean(axis=1, keepdims=True)).mean() < 8:
                continue
            fitted = _fit(img)
            if fitted is not None:
                out.append(fitted)
    return _unique(np.stack(out))


def oxygen_icons() -> np.ndarray:
    """Oxygen icon theme, every 48x48 PNG icon (all categories), 32x32 over black."""
    files = sorted(_need(OXYGEN_ICONS, "oxygen-icon-theme").rglob("*.png"))
    out = [_fit(Image.open(f)) for f in files]
    return _unique(np.stack([o for o in out if o is not None]))


def fashion_mnist(n_per_class: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST test set, ``n_per_class`` per class, 28x28 padded to 32x32, grey in RGB."""
    root = _need(FASHION_MNIST, "dataset-fashion-mnist")
    with gzip.open(root / "t10k-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    rng = np.random.RandomState(seed)
    idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), n_per_class, replace=False) for c in range(10)]))
    x = np.pad(x[idx], ((0, 0), (2, 2), (2, 2)))
    return np.repeat(x[..., None], 3, axis=-1), y[idx].astype(np.int64)


def _subset(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(images) <= n:
        return images
    idx = np.sort(np.random.RandomState(seed).choice(len(images), n, replace=False))
    return images[idx]


def _save(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    print(f"wrote {path}: {arrays['images'].shape} ({path.stat().st_size / 1e6:.2f} MB)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, help="write the base training set (Crawl tiles) to this .npz")
    p.add_argument("--targets", type=Path, help="write the demo target sets into this directory")
    p.add_argument("--n-target", type=int, default=800, help="images per demo target set (default 800)")
    args = p.parse_args(argv)
    if not args.source and not args.targets:
        p.error("nothing to do: pass --source and/or --targets")
    if args.source:
        _save(args.source, images=crawl_tiles())
    if args.targets:
        _save(args.targets / "emoji.npz", images=_subset(noto_emoji(), args.n_target, 1))
        _save(args.targets / "oxygen_icons.npz", images=_subset(oxygen_icons(), args.n_target, 2))
        x, y = fashion_mnist(args.n_target // 10)
        _save(args.targets / "fashion_mnist.npz", images=x, labels=y)


if __name__ == "__main__":
    main()
