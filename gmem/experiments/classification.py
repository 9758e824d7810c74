"""Lifelong classification with generative replay: class-incremental Fashion-MNIST in tasks of 2 classes.

    python -m gmem.experiments.classification --out DIR [--quick]

One classifier (10-way head; ``--classifier small``: a small CNN, the default on a CPU, or ``resnet18``:
ResNet-18 adapted to 32x32, see :mod:`gmem.experiments.classifiers`) learns the tasks in order. Methods:

- ``gan_memory``: each task is also learned by a conditional GAN memory (one task of 2 classes per
  stage); while the classifier learns task t, each batch holds the task's real images plus ``n`` replayed
  samples per earlier task, drawn as ONE mixed-task batch (:class:`gmem.memory.replay.ReplayGenerator`, i.e.
  ``GANMemory.sample(list of task names, labels=...)``);
- ``mergan_replay``: the same, replay from a MeRGAN (replay alignment) class-conditional generator
  trained with the same GAN trainer, iterations and batch size;
- ``ewc``: elastic weight consolidation (lambda 1e4, diagonal Fisher), no replay;
- ``finetune``: the current task's real data only; ``joint``: all real data so far (upper bound).

After each task: accuracy on the test images of all classes seen so far (Figure 6 right) and per task
(Figure 12). Writes ``fig6_right_accuracy.png``, ``fig12_per_task.png``, ``replay_samples.png``,
``results.json`` and ``results.md`` to ``DIR``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..baselines import EWC
from ..data import load_demo_dataset
from ..images import save_grid
from ..seeding import generator, seeded
from .classifiers import CLASSIFIERS, SmallCNN, make_classifier, resnet18_source
from .common import Timer, load_base_pair, run_record, threads
from .methods import CLASSIFICATION_METHODS, get_method
from .plots import markdown_table, plot_curves, write_json

__all__ = ["SmallCNN", "split_tasks", "run", "main", "DEFAULT_METHODS", "FULL", "QUICK"]

DEFAULT_METHODS = CLASSIFICATION_METHODS  # any method of gmem.experiments.methods with a classifier mode
# the largest GAN budget whose run fits in 45 minutes on the 2-core CPU with 1 thread (300 iterations,
# the paper-like setting, was estimated at ~51 minutes: experiments/results/TIMING.md); pass
# --gan-iterations 300 where there is time (a GPU)
FULL = dict(num_tasks=5, gan_iterations=200, gan_batch_size=16, steps=300, replay_per_task=16)
QUICK = dict(num_tasks=2, gan_iterations=2, gan_batch_size=4, steps=3, replay_per_task=2)


def split_tasks(labels: Tensor, classes_per_task: int = 2, test_fraction: float = 0.25, seed: int = 0):
    """Train/test indices per task: ``[(classes, train_idx, test_idx), ...]`` over the sorted classes,
    ``test_fraction`` of each class held out (a seeded shuffle)."""
    classes = sorted(set(labels.tolist()))
    if len(classes) % classes_per_task:
        raise ValueError(f"{len(classes)} classes do not split into tasks of {classes_per_task}")
    perm = torch.randperm(len(labels), generator=generator(seed))
    out = []
    for s in range(0, len(classes), classes_per_task):
        cls = classes[s:s + classes_per_task]
        train, test = [], []
        for c in cls:
            idx = perm[labels[perm] == c]
            n_test = max(1, int(round(test_fraction * len(idx))))
            test.append(idx[:n_test])
            train.append(idx[n_test:])
        out.append((cls, torch.cat(train), torch.cat(test)))
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[s:s + 256]).argmax(1) for s in range(0, x.shape[0], 256)])
    return float((pred == y).float().mean())


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, *, steps: int, batch_size: int, lr: float, seed: int,
                     replay=None, penalty=None) -> None:
    """``steps`` Adam updates on batches of ``(x, y)``; ``replay() -> (x_r, y_r)`` is appended to every
    batch; ``penalty()`` (a scalar) is added to the loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = generator(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(x.shape[0], (min(batch_size, x.shape[0]),), generator=rng)
        xb, yb = x[idx], y[idx]
        if replay is not None:
            xr, yr = replay()
            xb, yb = torch.cat([xb, xr]), torch.cat([yb, yr])
        loss = F.cross_entropy(model(xb), yb)
        if penalty is not None:
            loss = loss + penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def run(out, *, methods: Sequence[str] = DEFAULT_METHODS, num_tasks: int = FULL["num_tasks"],
        gan_iterations: int = FULL["gan_iterations"], gan_batch_size: int = FULL["gan_batch_size"],
        steps: int = FULL["steps"], replay_per_task: int = FULL["replay_per_task"], batch_size: int = 32,
        lr: float = 1e-3, lr_memory: float = 1e-3, lr_baselines: float = 1e-4, lambda_ra: float = 1e-3,
        ewc_lambda: float = 1e4, seed: int = 0, base: Optional[str] = None, classifier: str = "small",
        progress: bool = False, argv: Optional[Sequence[str]] = None) -> dict:
    """Run the experiment; returns (and writes to ``out``) the results (see the module docstring)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for m in methods:
        if get_method(m).classifier is None:
            raise KeyError(f"method {m!r} does not train a classifier; choose from {list(DEFAULT_METHODS)}")
    if classifier not in CLASSIFIERS:
        raise KeyError(f"unknown classifier {classifier!r}; choose from {list(CLASSIFIERS)}")
    G, D = load_base_pair(base)
    data = load_demo_dataset("fashion_mnist", G.size, G.channels)
    x_all, y_all = data.images, data.labels
    splits = split_tasks(y_all, 2, seed=seed)[:num_tasks]
    num_classes = int(y_all.max()) + 1
    timer = Timer()
    acc_seen: dict = {m: {} for m in methods}                         # method -> stage -> accuracy
    acc_task: dict = {m: {f"task{t + 1}": {} for t in range(len(splits))} for m in methods}
    t_start = time.time()
    for method in methods:
        with seeded(seed):  # the classifier's initial weights: the same for every method
            model = make_classifier(classifier, G.channels, num_classes)
        spec = get_method(method)
        learner = spec.learner_for_classes(G, D, num_classes, lr=lr_baselines, lr_memory=lr_memory,
                                           lambda_ra=lambda_ra)
        ewc = EWC(model, ewc_lambda) if spec.classifier == "ewc" else None
        seen_train: list[Tensor] = []
        for t, (classes, train_idx, _) in enumerate(splits):
            x, y = x_all[train_idx], y_all[train_idx]
            seen_train.append(train_idx)
            replay = None
            if learner is not None and t > 0:  # samples of every earlier task's classes
                replay = learner.replay([splits[k][0] for k in range(t)], replay_per_task, seed + 50 + t)
                _save_replay(out, method, t, replay)
            if spec.classifier == "joint":
                idx = torch.cat(seen_train)
                x, y = x_all[idx], y_all[idx]
            with timer(f"{method}_classifier"):
                train_classifier(model, x, y, steps=steps, batch_size=batch_size, lr=lr, seed=seed + t, replay=replay,
                                 penalty=None if ewc is None or not ewc.anchors else ewc.penalty)
            # the generators learn the task after the classifier used the replay of the earlier ones
            with timer(f"{method}_gan"):
                if learner is not None:
                    learner.learn(x_all[train_idx].clone(), y_all[train_idx], iterations=gan_iterations,
                                  batch_size=gan_batch_size, seed=seed + t + 1, progress=progress)
            if ewc is not None:
                with timer(f"{method}_fisher"):
                    ewc.consolidate(x_all[train_idx], seed=seed + t)
            stage = t + 1
            seen_test = torch.cat([splits[k][2] for k in range(stage)])
            acc_seen[method][stage] = round(accuracy(model, x_all[seen_test], y_all[seen_test]), 4)
            for k in range(stage):
                test_idx = splits[k][2]
                acc_task[method][f"task{k + 1}"][stage] = round(accuracy(model, x_all[test_idx], y_all[test_idx]), 4)
            print(f"[{method}] after task {stage} {classes}: accuracy on seen classes {acc_seen[method][stage]:.3f}",
                  flush=True)
    settings = dict(methods=list(methods), num_tasks=len(splits), classes=[s[0] for s in splits],
                    train_per_task=[len(s[1]) for s in splits], test_per_task=[len(s[2]) for s in splits],
                    gan_iterations=gan_iterations, gan_batch_size=gan_batch_size, steps=steps,
                    batch_size=batch_size, replay_per_task=replay_per_task, lr=lr, lr_memory=lr_memory,
                    lr_baselines=lr_baselines, lambda_ra=lambda_ra, ewc_lambda=ewc_lambda, seed=seed,
                    base=base or "embedded", classifier=classifier if classifier == "small"
                    else f"{classifier} ({resnet18_source()}, 3x3 stride-1 stem, no max-pool)")
    results = {"experiment": "lifelong classification with replay", "accuracy_seen_classes": acc_seen,
               "accuracy_per_task": acc_task, "seconds": timer.seconds,
               "cpu_seconds": timer.cpu_seconds, "wall_seconds": round(time.time() - t_start, 1),
               "run": run_record("gmem.experiments.classification", settings, argv)}
    write_json(results, out / "results.json")
    (out / "results.md").write_text(_markdown(results, methods, len(splits)))
    ticks = [f"{s[0][0]},{s[0][1]}" for s in splits]
    plot_curves({m: {"all classes seen so far": acc_seen[m]} for m in methods}, ["all classes seen so far"],
                out / "fig6_right_accuracy.png", ylabel="test accuracy", xlabel="after task (classes)", xticks=ticks)
    plot_curves(acc_task, [f"task{t + 1}" for t in range(len(splits))], out / "fig12_per_task.png",
                ylabel="test accuracy of the task's classes", xlabel="after task", xticks=ticks)
    return results


def _save_replay(out: Path, method: str, stage: int, replay) -> None:
    """A grid of one replay batch (rewritten at every stage: the last stage's, with every earlier task)."""
    x, _ = replay()
    save_grid(x, out / f"replay_{method}.png", nrow=max(1, min(16, x.shape[0])), scale=2)


def _markdown(results: dict, methods, num_tasks: int) -> str:
    run = results["run"]
    header = ["method"] + [f"after task {t + 1}" for t in range(num_tasks)]
    rows = [[m] + [results["accuracy_seen_classes"][m].get(t + 1) for t in range(num_tasks)] for m in methods]
    per_task = ["method", "task"] + [f"after task {t + 1}" for t in range(num_tasks)]
    rows2 = [[m, k] + [results["accuracy_per_task"][m][k].get(t + 1) for t in range(num_tasks)]
             for m in methods for k in results["accuracy_per_task"][m]]
    return (f"# Lifelong classification with replay (Fashion-MNIST, tasks of 2 classes)\n\n"
            f"Command: `{run['command']}`  \nSettings: `{run['settings']}`  \n"
            f"Base weights SHA-256: `{run.get('base_sha256')}`  \n"
            f"Wall time: {results['wall_seconds']} s; torch threads {run['threads']}\n\n"
            "## Test accuracy on all classes seen so far (Figure 6 right)\n\n" + markdown_table(header, rows)
            + "\n## Test accuracy per task over time (Figure 12)\n\n" + markdown_table(per_task, rows2))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmem.experiments.classification", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help=f"tiny smoke run: {QUICK}")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    for key in FULL:
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    p.add_argument("--steps-batch-size", dest="batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-memory", type=float, default=1e-3)
    p.add_argument("--lr-baselines", type=float, default=1e-4)
    p.add_argument("--lambda-ra", type=float, default=1e-3)
    p.add_argument("--ewc-lambda", type=float, default=1e4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=None)
    p.add_argument("--classifier", choices=CLASSIFIERS, default="small",
                   help="small: a 3-layer CNN (CPU); resnet18: ResNet-18 for 32x32 inputs (meant for a GPU)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    preset = QUICK if a.quick else FULL
    sizes = {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in preset.items()}
    with threads(a.threads):
        run(a.out, methods=a.methods, batch_size=a.batch_size, lr=a.lr, lr_memory=a.lr_memory,
            lr_baselines=a.lr_baselines, lambda_ra=a.lambda_ra, ewc_lambda=a.ewc_lambda, seed=a.seed, base=a.base,
            classifier=a.classifier, progress=a.progress, argv=sys.argv[1:] if argv is None else list(argv), **sizes)
    print(f"results in {a.out}/ (results.md, fig6_right_accuracy.png, fig12_per_task.png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
