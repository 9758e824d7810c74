"""Image datasets for training: folders of images, array files, tensors, and the embedded demo data.

Every dataset here is a ``torch.utils.data.Dataset`` whose items are float tensors ``[C, size, size]``
in [-1, 1] (``C = 3`` for the GP-GAN; grey sources are repeated to RGB, colour is converted to grey
for ``channels=1``). :func:`as_dataset` turns whatever a user passes (a directory, an ``.npy``/``.npz``
file, a uint8 array, a float tensor, or a Dataset) into one, with clear errors for missing/empty data.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEMO_DATA_DIR = ASSETS_DIR / "data"
SOURCE_DATA = ASSETS_DIR / "source" / "crawl_tiles.npz"  # what the embedded base was trained on
# Transparent pixels are composited over this colour (uint8 RGB) unless a background is given: black,
# as the embedded demo sets were made. Icon sets drawn for light backgrounds want (255, 255, 255).
DEFAULT_BACKGROUND = (0, 0, 0)
# Images with more pixels than this are refused before they are decoded (decompression bombs).
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


def label_vector(labels, n: int, what: str = "labels", per: str = "sample") -> Tensor:
    """``labels`` (a number, a sequence or a tensor) as a LongTensor ``[n]`` (a number repeats); ValueError
    naming ``what`` unless they are integers, one per ``per``. The range is the caller's to check."""
    labels = torch.as_tensor(labels)
    if labels.ndim == 0:
        labels = labels.expand(n)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != (n,):
        raise ValueError(f"{what} must be integers, one per {per} [{n}], got {labels.dtype} {tuple(labels.shape)}")
    return labels.long()


class DataError(ValueError):
    """Missing, empty or malformed training data; the message names what and where."""


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``[N, c, H, W] -> [N, channels, H, W]``: grey repeated to RGB, RGB averaged to grey (ITU-R 601 luma)."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1 and c in (3, 4):
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x[:, :3] * w).sum(1, keepdim=True)
    if c == 4 and channels == 3:
        return x[:, :3]
    raise DataError(f"cannot convert images with {c} channels to {channels}")


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float ``[N, C, H, W]`` to ``size x size`` (area for shrinking, bilinear for growing)."""
    if x.shape[-2:] == (size, size):
        return x
    if x.shape[-2] != x.shape[-1]:  # centre-crop to a square first so nothing is distorted
        s = min(x.shape[-2:])
        top, left = (x.shape[-2] - s) // 2, (x.shape[-1] - s) // 2
        x = x[..., top:top + s, left:left + s]
    if x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)


def uint8_to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W]``, ``[N, H, W, C]`` (channels last) -> float ``[N, C, H, W]`` in [-1, 1]."""
    t = torch.as_tensor(np.asarray(images))
    if t.dtype != torch.uint8:
        raise DataError(f"expected uint8 images, got {t.dtype}")
    if t.dim() == 3:
        t = t.unsqueeze(-1)
    if t.dim() != 4 or t.shape[-1] not in (1, 3, 4):
        raise DataError(f"expected uint8 images [N, H, W] or [N, H, W, C] with C in 1/3/4, got {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class TensorImages(Dataset):
    """Images held in memory: float ``[N, C, H, W]`` in [-1, 1], converted to ``[channels, size, size]``.

    Conversion (resize, channels) happens once at construction, in chunks, so items are cheap.
    """

    def __init__(self, images: torch.Tensor, size: int, channels: int = 3, name: str = "tensor"):
        if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4:
            raise DataError(f"{name}: expected a float tensor [N, C, H, W] in [-1, 1], got "
                            f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
        if images.shape[0] == 0:
            raise DataError(f"{name}: no images (tensor has 0 rows)")
        if not torch.isfinite(images).all():
            raise DataError(f"{name}: images contain NaN or inf")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
            raise DataError(f"{name}: images must lie in [-1, 1], found values in [{lo:.3g}, {hi:.3g}]")
        chunks = [_resize(_to_channels(images[i:i + 1024].float(), channels), size)
                  for i in range(0, images.shape[0], 1024)]
        self.images = torch.cat(chunks).clamp_(-1, 1).contiguous()
        self.size, self.channels, self.name = size, channels, name

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class ArrayImages(TensorImages):
    """uint8 images from a ``.npy`` file or an ``.npz`` archive (key ``images``, ``x``, or its only array).

    Accepted layouts: ``[N, H, W]`` (grey), ``[N, H, W, C]`` (C = 1, 3, 4), or ``[N, C, H, W]``.
    ``.npz`` files with a ``labels`` array expose it as ``self.labels`` (LongTensor ``[N]``).
    """

    def __init__(self, path, size: int, channels: int = 3, key: str | None = None):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        self.labels = None
        try:
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.ndarray):  # .npy
                arr = loaded
            else:  # .npz archive
                with loaded as f:
                    keys = list(f.keys())
                    key = key or next((k for k in ("images", "x", "x_train", "arr_0") if k in keys),
                                      keys[0] if len(keys) == 1 else None)
                    if key is None or key not in keys:
                        raise DataError(f"{path}: cannot tell which array holds the images; arrays: {keys} "
                                        "(name it 'images' or pass key=...)")
                    arr = f[key]
                    if "labels" in keys:
                        self.labels = _integer_labels(f["labels"], path)
        except DataError:
            raise
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:  # an .npz that is no zip
            raise DataError(f"{path}: cannot read array file ({type(e).__name__}: {e})") from None
        if arr.dtype != np.uint8:
            raise DataError(f"{path}: expected uint8 images, got dtype {arr.dtype}")
        if arr.ndim == 4 and arr.shape[1] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(0, 2, 3, 1)  # [N, C, H, W] -> channels last
        if arr.shape[0] == 0:
            raise DataError(f"{path}: no images (array has 0 rows)")
        super().__init__(uint8_to_float(arr), size, channels, name=str(path))


def _integer_labels(labels: np.ndarray, path) -> torch.Tensor:
    """Class labels as a LongTensor ``[N]``; floats are accepted only when they hold whole numbers."""
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or not np.array_equal(labels, np.round(labels)):
            raise DataError(f"{path}: 'labels' are floats that are not whole numbers (class ids must be integers)")
    elif labels.dtype.kind not in "iu":
        raise DataError(f"{path}: 'labels' must be integers, got dtype {labels.dtype}")
    return torch.as_tensor(labels.astype(np.int64))


def _background(background) -> tuple[int, int, int]:
    """``None`` (the default), a grey level 0..255, an ``(r, g, b)`` triple, or ``"black"``/``"white"``."""
    named = {"black": (0, 0, 0), "white": (255, 255, 255)}
    if background is None:
        return DEFAULT_BACKGROUND
    if isinstance(background, str):
        if background.lower() in named:
            return named[background.lower()]
        parts = background.replace(",", " ").split()
        try:
            background = [int(p) for p in parts] if len(parts) == 3 else int(background)
        except ValueError:
            raise ValueError(f"background must be 'black', 'white', a grey level or 'R,G,B', "
                             f"got {background!r}") from None
    values = [background] * 3 if isinstance(background, int) else list(background)
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values):
        raise ValueError(f"background must be a grey level or an (r, g, b) triple of ints in 0..255, "
                         f"got {background!r}")
    return tuple(values)


def scan_images(directory) -> tuple[list[Path], list[Path]]:
    """``(image files, other files)`` under ``directory`` (recursively, hidden entries left out), sorted:
    the files whose suffix is not an image format's are the ones a data set of the folder skips."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"image directory not found: {directory}")
    images, others = [], []
    for p in sorted(directory.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts):
            (images if p.suffix.lower() in IMAGE_EXTENSIONS else others).append(p)
    return images, others


def find_images(directory) -> list[Path]:
    """Image files under ``directory`` (recursively, hidden entries skipped), sorted for reproducibility."""
    directory = Path(directory)
    files = scan_images(directory)[0]
    if not files:
        raise DataError(f"no images found in {directory} (looked recursively for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def _load_image(path: Path, channels: int, background=None, size: int | None = None) -> tuple[torch.Tensor, bool]:
    """One image file -> (float ``[channels, H, W]`` in [-1, 1], whether it had transparency).

    16-bit (and 32-bit integer) greyscale is scaled from 0..65535, float images from 0..1;
    transparency is composited over ``background`` (default :data:`DEFAULT_BACKGROUND`, black).
    Images over :data:`MAX_IMAGE_PIXELS` pixels are refused before decoding. With ``size`` (the
    training resolution) an image more than 4x larger per side is decoded at reduced size (JPEG
    ``draft``, else an integer box ``reduce``) before it becomes float: memory in proportion to the
    training size, not the photo's.
    """
    from PIL import Image, UnidentifiedImageError

    bg = np.asarray(_background(background), dtype=np.float32)
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise DataError(f"image {path} is {im.width}x{im.height} pixels, more than the {MAX_IMAGE_PIXELS:,} "
                                "allowed (a decompression bomb or a very large image: shrink it first)")
            factor = 0 if size is None else min(im.width, im.height) // (4 * size)
            if factor >= 2 and im.format == "JPEG":
                im.draft(im.mode, (im.width // factor, im.height // factor))  # decode at 1/2, 1/4 or 1/8
            im.load()
            factor = 0 if size is None else min(im.width, im.height) // (4 * size)
            if factor >= 2 and im.mode in ("L", "LA", "RGB", "RGBA", "I", "F", "I;16"):
                im = im.reduce(factor)
            alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)
            if im.mode.startswith("I"):  # 16/32-bit integer grey: PIL's convert("RGB") would clip to white
                grey = np.asarray(im, dtype=np.float32) * (255.0 / 65535.0)
                rgb = np.repeat(np.clip(grey, 0, 255)[..., None], 3, axis=-1)
            elif im.mode == "F":
                grey = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0) * 255.0
                rgb = np.repeat(grey[..., None], 3, axis=-1)
            elif alpha:
                rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
                a = rgba[..., 3:] / 255.0
                rgb = rgba[..., :3] * a + bg * (1.0 - a)
            else:
                rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1.0
    return _to_channels(t, channels)[0], alpha


class ImageFolder(TensorImages):
    """Every image under a directory (recursively), centre-cropped to square and resized to ``size``.

    Sub-directory names become class labels (``self.classes``, ``self.labels``) when images sit in
    more than one sub-directory; otherwise ``self.labels`` is None. Images are decoded once.
    ``self.skipped`` lists the files that are not images (by suffix). Transparent pixels are composited
    over ``background`` (default :data:`DEFAULT_BACKGROUND`, black;
    ``"white"``, a grey level or an ``(r, g, b)`` triple); without an explicit background a warning
    says how many images had transparency.
    """

    def __init__(self, directory, size: int, channels: int = 3, background=None):
        files = find_images(directory)
        self.skipped = scan_images(directory)[1]  # files that are not images by their suffix
        loaded, bad = [], []
        for p in files:  # resized one by one: a folder costs memory in proportion to the training size
            try:
                x, alpha = _load_image(p, channels, background, size)
            except DataError as e:
                bad.append((p, e))
                continue
            loaded.append((_resize(x.unsqueeze(0), size)[0], alpha))
        if len(bad) == 1:
            raise bad[0][1]
        if bad:  # every unreadable image is named (the first few, then a count)
            shown = "; ".join(str(e) for _, e in bad[:3])
            more = f"; and {len(bad) - 3} more: {', '.join(p.name for p, _ in bad[3:8])}" if len(bad) > 3 else ""
            raise DataError(f"{len(bad)} of {len(files)} images in {directory} cannot be read: {shown}{more}"
                            + (" ..." if len(bad) > 8 else ""))
        images = torch.stack([x for x, _ in loaded])
        transparent = sum(a for _, a in loaded)
        if transparent and background is None:
            warnings.warn(f"{directory}: {transparent} of {len(files)} images have transparency, composited over "
                          f"{DEFAULT_BACKGROUND} (black); pass background='white' (CLI: --background white) "
                          "for icons drawn for light backgrounds", stacklevel=2)
        groups = [p.relative_to(directory).parts[0] if len(p.relative_to(directory).parts) > 1 else ""
                  for p in files]
        self.label_problem = None  # why the folder's labels cannot be used (learning with labels refuses)
        if "" in groups and len(set(groups)) > 1:  # images beside the class folders belong to no class
            top = [p.name for p, g in zip(files, groups) if not g]
            self.label_problem = (f"{directory}: {len(top)} images sit beside the class sub-folders and belong to "
                                  f"no class ({', '.join(top[:3])}{' ...' if len(top) > 3 else ''}); move them into "
                                  "a class sub-folder and run again")
        self.classes = sorted(set(groups)) if len(set(groups)) > 1 else []
        self.files = files
        super().__init__(images, size, channels, name=str(directory))
        self.labels = (torch.tensor([self.classes.index(g) for g in groups]) if self.classes else None)


class DatasetAdapter(Dataset):
    """Wraps a user Dataset: items (a tensor, or a tuple whose first entry is one) converted per item."""

    def __init__(self, dataset: Dataset, size: int, channels: int = 3):
        if len(dataset) == 0:
            raise DataError("the dataset is empty")
        self.dataset, self.size, self.channels = dataset, size, channels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.dataset[i]
        if isinstance(x, (tuple, list)):
            x = x[0]
        x = torch.as_tensor(x)
        if x.dtype == torch.uint8:
            x = x.float().div(127.5).sub(1.0)
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3:
            raise DataError(f"dataset item {i}: expected an image [C, H, W], got shape {tuple(x.shape)}")
        return _resize(_to_channels(x.unsqueeze(0).float(), self.channels), self.size)[0].clamp(-1, 1)


def as_dataset(data, size: int, channels: int = 3, background=None) -> Dataset:
    """Whatever a user passes -> a Dataset of float ``[channels, size, size]`` images in [-1, 1].

    ``data``: a directory of images; a ``.npy``/``.npz`` file of uint8 images; the name of an embedded
    demo set (see :func:`demo_datasets`); a uint8 numpy array / tensor ``[N, H, W(, C)]``; a float tensor
    ``[N, C, H, W]`` in [-1, 1]; or a ``torch.utils.data.Dataset`` (items converted on access).
    ``background``: what transparent pixels of image files are composited over (see :class:`ImageFolder`).
    """
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir():
            return ImageFolder(path, size, channels, background=background)
        if path.is_file():
            if path.suffix.lower() in (".npy", ".npz"):
                return ArrayImages(path, size, channels)
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                raise DataError(f"{path} is a single image; pass the directory that holds the training images")
            raise DataError(f"{path}: unsupported data file (use a directory of images, .npy or .npz)")
        if isinstance(data, str) and data in demo_datasets():
            return load_demo_dataset(data, size, channels)
        raise DataError(f"data not found: {path} (not a directory, a file, or an embedded demo set "
                        f"{sorted(demo_datasets())})")
    if isinstance(data, np.ndarray) or (isinstance(data, torch.Tensor) and data.dtype == torch.uint8):
        return TensorImages(uint8_to_float(data), size, channels, name="array")
    if isinstance(data, torch.Tensor):
        return TensorImages(data, size, channels)
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        if isinstance(data, TensorImages) and data.size == size and data.channels == channels:
            return data
        return DatasetAdapter(data, size, channels)
    raise DataError(f"unsupported data type {type(data).__name__}: pass a directory, an .npy/.npz file, "
                    "a uint8 array, a float tensor [N, C, H, W] in [-1, 1], or a Dataset")


def demo_datasets() -> dict[str, Path]:
    """Embedded demo target sets, ``name -> .npz path`` (see ``gmem/assets/data/README.md``)."""
    if not DEMO_DATA_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(DEMO_DATA_DIR.glob("*.npz"))}


def load_demo_dataset(name: str, size: int = 32, channels: int = 3) -> ArrayImages:
    """One embedded demo set as a dataset of ``[channels, size, size]`` images in [-1, 1]."""
    sets = demo_datasets()
    if name not in sets:
        raise DataError(f"unknown demo dataset {name!r}; available: {sorted(sets)}")
    return ArrayImages(sets[name], size, channels)


class InfiniteSampler:
    """Endless stream of batches (indices reshuffled every epoch) from a seeded generator.

    Its state is ``(epoch, position, seed)`` so a resumed run draws exactly the same batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n <= 0:
            raise DataError("cannot sample batches from an empty dataset")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def next_indices(self) -> torch.Tensor:
        out = []
        need = self.batch_size
        while need:
            take = min(need, self.n - self.pos)
            out.append(self._perm[self.pos:self.pos + take])
            self.pos += take
            need -= take
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.pos = int(state["seed"]), int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()


def batch(dataset: Dataset, indices: torch.Tensor) -> torch.Tensor:
    """Stack ``dataset[i]`` for ``i`` in ``indices`` -> ``[B, C, H, W]`` (fast path for in-memory data)."""
    if isinstance(dataset, TensorImages):
        return dataset.images[indices]
    return torch.stack([dataset[int(i)] for i in indices])
