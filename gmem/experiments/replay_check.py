"""Is the replay of one conditional GAN-memory task useful? A check of the classification experiment's replay.

    python -m gmem.experiments.replay_check --out DIR [--task 1] [--iterations N] [--batch-size B]

Learns task ``--task`` of the class-incremental Fashion-MNIST split (2 classes; the same split, seeds,
learning rate and, by default, GAN iterations and batch size as :mod:`gmem.experiments.classification`)
as a conditional task of a GAN memory, draws its replay exactly as the experiment does
(:class:`gmem.memory.replay.ReplayGenerator` with the global class map) and scores it with a classifier trained
on the real training images of all 10 classes (:func:`gmem.eval.train_classifier`):

- ``accuracy``: the fraction of samples the classifier assigns to the class they were drawn for
  (chance 0.1); ``accuracy_swapped``: the same with the two labels swapped (a label mix-up shows as
  ``accuracy_swapped > accuracy``); ``in_task``: the fraction assigned to either of the task's classes;
  ``two_way``: accuracy among the task's two classes only (chance 0.5);
- the same for the task's real held-out images (the ceiling) and for the untrained memory task
  (iterations 0: the base with a per-class bias, the floor).

Writes ``replay_check.png`` (rows: real images of class a, samples of class a, real of class b,
samples of class b) and ``replay_check.json`` to ``DIR``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..atomic import atomic_write_path
from ..data import load_demo_dataset
from ..eval import train_classifier
from ..images import save_grid
from ..memory import GANMemory
from ..memory.replay import ReplayGenerator
from .classification import FULL, split_tasks
from .common import load_base_pair, run_record, threads

__all__ = ["scores", "run", "main"]


@torch.no_grad()
def scores(classifier, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> dict:
    """Accuracy figures of ``images [N, C, H, W]`` drawn for global ``labels [N]`` from ``classes`` (two ids)."""
    classifier.eval()
    logits = classifier(classifier.prepare(images))                       # [N, 10]
    pred = logits.argmax(1)
    a, b = int(classes[0]), int(classes[1])
    swapped = torch.where(labels == a, torch.full_like(labels, b), torch.full_like(labels, a))
    two = torch.tensor([a, b])[logits[:, [a, b]].argmax(1)]
    return {"accuracy": round(float((pred == labels).float().mean()), 4),
            "accuracy_swapped": round(float((pred == swapped).float().mean()), 4),
            "in_task": round(float(((pred == a) | (pred == b)).float().mean()), 4),
            "two_way": round(float((two == labels).float().mean()), 4), "n": int(labels.numel())}


def run(out, *, task: int = 1, iterations: int = FULL["gan_iterations"], batch_size: int = FULL["gan_batch_size"],
        samples: int = 200, lr: float = 1e-3, seed: int = 0, base: Optional[str] = None, classifier_epochs: int = 10,
        progress: bool = False, argv: Optional[Sequence[str]] = None) -> dict:
    """Run the check; returns (and writes to ``out``) the scores (see the module docstring)."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    G, D = load_base_pair(base)
    data = load_demo_dataset("fashion_mnist", G.size, G.channels)
    x_all, y_all = data.images, data.labels
    splits = split_tasks(y_all, 2, seed=seed)
    if not 1 <= task <= len(splits):
        raise IndexError(f"task must lie in 1..{len(splits)}, got {task}")
    classes, train_idx, test_idx = splits[task - 1]
    t0 = time.time()
    train_all = torch.cat([s[1] for s in splits])
    clf = train_classifier(x_all[train_all], y_all[train_all], int(y_all.max()) + 1, epochs=classifier_epochs,
                           seed=seed)
    t_clf = time.time() - t0
    result = {"classes": list(classes), "real_heldout": scores(clf, x_all[test_idx], y_all[test_idx], classes)}
    memory = GANMemory.from_base(G, D)
    local = torch.tensor([classes.index(int(c)) for c in y_all[train_idx]])
    name = f"task{task}"
    t0 = time.time()
    # the experiment learns task t with seed + t (its loop counts tasks from 0 and adds 1)
    memory.learn(name, x_all[train_idx], iterations=iterations, batch_size=batch_size, seed=seed + task,
                 labels=local, num_classes=2, lr=lr, progress=progress)
    t_learn = time.time() - t0
    gen = ReplayGenerator(memory, class_map={name: classes}, seed=seed + 50)
    x, y, _ = gen.generate_labelled(samples, condition=[name] * samples)
    result["samples"] = scores(clf, x, y, classes)
    floor = GANMemory.from_base(G, D)
    floor.learn(name, x_all[train_idx], iterations=0, batch_size=batch_size, seed=seed + task, labels=local,
                num_classes=2, lr=lr, progress=False)
    xf, yf, _ = ReplayGenerator(floor, class_map={name: classes}, seed=seed + 50).generate_labelled(
        samples, condition=[name] * samples)
    result["untrained"] = scores(clf, xf, yf, classes)
    rows = []
    for c in classes:
        rows += [_pad(x_all[test_idx][y_all[test_idx] == c][:12], 12), _pad(x[y == c][:12], 12)]
    save_grid(torch.cat(rows), out / "replay_check.png", nrow=12, scale=2)
    settings = dict(task=task, classes=list(classes), iterations=iterations, batch_size=batch_size, samples=samples,
                    lr=lr, seed=seed, classifier_epochs=classifier_epochs, base=base or "embedded",
                    train_images=len(train_idx))
    result.update(seconds={"classifier": round(t_clf, 1), "learn": round(t_learn, 1)},
                  run=run_record("gmem.experiments.replay_check", settings, argv))
    atomic_write_path(out / "replay_check.json",
                      lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
    return result


def _pad(images: torch.Tensor, n: int) -> torch.Tensor:
    """``images [k, C, H, W]`` (k <= n) filled up to ``[n, C, H, W]`` with black images (a grid row)."""
    return torch.cat([images, images.new_full((n - len(images), *images.shape[1:]), -1.0)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmem.experiments.replay_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--task", type=int, default=1)
    p.add_argument("--iterations", type=int, default=FULL["gan_iterations"])
    p.add_argument("--batch-size", type=int, default=FULL["gan_batch_size"])
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    with threads(a.threads):
        r = run(a.out, task=a.task, iterations=a.iterations, batch_size=a.batch_size, samples=a.samples, lr=a.lr,
                seed=a.seed, base=a.base, progress=a.progress, argv=sys.argv[1:] if argv is None else list(argv))
    for key in ("real_heldout", "samples", "untrained"):
        print(f"{key:13s} {r[key]}")
    print(f"results in {a.out}/ (replay_check.png, replay_check.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
