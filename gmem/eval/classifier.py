"""Classifier accuracy of class-conditional samples (the paper's score for conditional generation).

A small CNN is trained on the real labelled images (seconds on a CPU at 32x32); the score of generated
images is the fraction the classifier assigns to the class they were generated for. Real held-out
images give the ceiling, labels drawn at random give ~1 / classes. The trained classifier is cached in
``<cache_dir>/classifiers/<key>.safetensors``, the key being a SHA-256 of the training images, labels
and settings, and is loaded with safetensors (no pickle).
"""
from __future__ import annotations

import hashlib
import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..atomic import atomic_write_path
from .cache import cache_dir, fingerprint

__all__ = ["SmallClassifier", "train_classifier", "classifier_accuracy"]

_VERSION = "1"  # bump when the architecture or training recipe changes: old cache entries are not reused


class SmallClassifier(nn.Module):
    """Three conv blocks (conv 3x3, batch norm, ReLU, 2x2 max-pool), a 4x4 pool of the map, one linear layer.

    ``[N, channels, size, size]`` in [-1, 1] -> logits ``[N, num_classes]``. Construction leaves the
    global RNG as it was; :func:`train_classifier` sets the weights from its own generator.
    """

    def __init__(self, channels: int = 3, num_classes: int = 10, size: int = 32, width: int = 16):
        super().__init__()
        if channels < 1 or num_classes < 2 or size < 8 or width < 1:
            raise ValueError(f"SmallClassifier: bad settings channels={channels}, num_classes={num_classes}, "
                             f"size={size}, width={width}")
        self.config = {"channels": channels, "num_classes": num_classes, "size": size, "width": width}
        w = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

        with torch.random.fork_rng(devices=[]):  # torch's default init draws from the global RNG
            # the 4x4 map keeps where things are (a global average would not): it matters for garments
            self.features = nn.Sequential(*block(channels, w), *block(w, 2 * w), *block(2 * w, 2 * w),
                                          nn.AdaptiveAvgPool2d(4), nn.Flatten())
            self.head = nn.Linear(2 * w * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Any ``[N, C, H, W]`` in [-1, 1] -> ``[N, channels, size, size]`` float (grey <-> RGB, resized)."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"expected images [N, C, H, W], got {tuple(getattr(images, 'shape', ()))}")
        x, c = images.float(), self.config["channels"]
        if x.shape[1] != c:
            if x.shape[1] == 1:
                x = x.expand(-1, c, -1, -1)
            elif c == 1 and x.shape[1] == 3:
                x = x.mean(1, keepdim=True)
            else:
                raise ValueError(f"classifier takes {c}-channel images, got {x.shape[1]} channels")
        s = self.config["size"]
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="area" if x.shape[-1] > s else "bilinear")
        return x.clamp(-1, 1)


def _check_labels(labels, n: int, num_classes: int | None = None) -> torch.Tensor:
    y = torch.as_tensor(labels)
    if y.dtype.is_floating_point or y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must be integers [{n}], got {y.dtype} {tuple(y.shape)}")
    y = y.long()
    if n and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    return y


def _init(net: nn.Module, g: torch.Generator) -> None:
    """Deterministic initialisation from ``g`` (the global RNG is never touched)."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, a=5 ** 0.5, generator=g)
            if m.bias is not None:
                bound = 1 / m.weight[0].numel() ** 0.5
                nn.init.uniform_(m.bias, -bound, bound, generator=g)


def train_classifier(images: torch.Tensor, labels, num_classes: int | None = None, *, size: int = 32,
                     width: int = 16, epochs: int = 10, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                     cache: bool = True, progress=None) -> SmallClassifier:
    """A :class:`SmallClassifier` (eval mode) trained on real ``images [N, C, H, W]`` in [-1, 1] and
    integer ``labels [N]`` (classes ``0 .. num_classes-1``; default ``max(labels) + 1``).

    Adam, cross-entropy, no augmentation (it cost accuracy at this size); deterministic for a given
    ``seed`` and thread count. With ``cache`` a classifier trained before on the same data and settings is loaded.
    """
    from tqdm import tqdm

    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"train_classifier: expected images [N >= 2, C, H, W], got "
                         f"{tuple(getattr(images, 'shape', ()))}")
    y = _check_labels(labels, images.shape[0], num_classes)
    num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    net = SmallClassifier(images.shape[1], num_classes, size, width)
    settings = dict(net.config, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, version=_VERSION)
    path = None
    if cache:
        fp = fingerprint([images, y.float()], json.dumps(settings, sort_keys=True))
        path = cache_dir() / "classifiers" / f"{hashlib.sha256(fp.encode()).hexdigest()[:40]}.safetensors"
        loaded = _load(path, net)
        if loaded is not None:
            return loaded
    g = torch.Generator().manual_seed(seed)
    _init(net, g)
    x = net.prepare(images)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    with tqdm(total=steps, desc="classifier", disable=None if progress is None else not progress, leave=False) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for s in range(0, len(x), batch_size):
                i = perm[s:s + batch_size]
                if len(i) < 2:  # batch norm needs two samples
                    continue
                loss = F.cross_entropy(net(x[i]), y[i])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
    net.eval()
    if path is not None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        atomic_write_path(path, lambda tmp: save_file(state, tmp, metadata={"config": json.dumps(net.config)}))
    return net


def _load(path, net: SmallClassifier) -> SmallClassifier | None:
    """The cached weights into ``net`` (eval mode), or None when missing, damaged or of another shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        net.load_state_dict(load_file(path))
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return None
    return net.eval()


@torch.no_grad()
def classifier_accuracy(images: torch.Tensor, labels, classifier: SmallClassifier, batch_size: int = 256) -> float:
    """Fraction of ``images [N, C, H, W]`` (in [-1, 1]) that ``classifier`` assigns to ``labels [N]``,
    the class each was generated for. ``classifier``: from :func:`train_classifier` on the real data.
    """
    if not isinstance(classifier, SmallClassifier):
        raise TypeError(f"classifier_accuracy: classifier must be a SmallClassifier (train_classifier), "
                        f"got {type(classifier).__name__}")
    x = classifier.prepare(images)
    y = _check_labels(labels, x.shape[0], classifier.config["num_classes"])
    if len(x) == 0:
        raise ValueError("classifier_accuracy: no images")
    was_training = classifier.training
    classifier.eval()
    correct = 0
    for s in range(0, len(x), batch_size):
        correct += int((classifier(x[s:s + batch_size]).argmax(1) == y[s:s + batch_size]).sum())
    classifier.train(was_training)
    return correct / len(x)
