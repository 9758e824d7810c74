"""A learning-rate sweep on one task: each method's best learning rate at the experiments' settings.

    python -m gmem.experiments.lr_sweep --out DIR [--task emoji] [--methods gan_memory finetune]
        [--lrs gan_memory=1e-4,3e-4,1e-3 finetune=3e-5,1e-4,3e-4] [--seeds 0 1 2] [--workers 2]

Every run starts from the same base, learns the one task with the lifelong experiments' trainer,
iterations and batch size (:mod:`gmem.experiments.generation`), and is scored right after learning by
the standard FID (:mod:`gmem.eval`'s Inception network, offline) of ``--fid-samples`` samples against
all of the task's images, the pixel proxy pixFID8, and two diversity figures of the first 256 samples
(:func:`gmem.eval.near_duplicate_share` and :func:`gmem.eval.nearest_neighbour_ratio`). A method's
best learning rate is the one with the lowest mean FID over the seeds. The row ``source`` scores the
base itself (no training) on the same latents: where every method starts.

Runs go to worker processes (1 torch thread each); each finished run is appended to
``DIR/runs.jsonl`` at once, so an interrupted sweep resumes where it stopped (runs already there are
not repeated). Writes ``DIR/results.json`` and ``DIR/results.md`` (per method and learning rate: mean
and spread over seeds; the best learning rate per method).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["run", "main", "score_run", "DEFAULT_LRS", "SOURCE"]

#: each method's grid: around the rates the experiments used before (GAN memory 1e-3, baselines 1e-4)
DEFAULT_LRS = {"gan_memory": (3e-5, 1e-4, 3e-4, 1e-3), "finetune": (1e-5, 3e-5, 1e-4, 3e-4)}
#: the pseudo-method of the base's own samples (no training; its one "rate" is 0): the starting point
SOURCE = "source"


def score_run(job: dict) -> dict:
    """Train ``job['method']`` at ``job['lr']`` on ``job['task']`` from ``job['base']`` (a base directory, or
    None: the embedded one) for ``job['iterations']`` x ``job['batch_size']`` (seed ``job['seed']``), and score
    it right after learning on ``job['fid_samples']`` samples (1 torch thread). Method :data:`SOURCE` scores
    the base itself. Returns the run's record (FID, pixFID8, near-duplicate share, NN ratio, CPU time)."""
    from .common import threads

    with threads(1):
        return _train_and_score(job)


def _train_and_score(job: dict) -> dict:
    from ..data import as_dataset, batch
    from ..eval import (
        fid_from_features,
        inception_features,
        near_duplicate_share,
        nearest_neighbour_ratio,
        real_features,
    )
    from ..eval.frechet import pixel_fid
    from ..memory import GANMemory
    from ..seeding import generator
    from .common import load_base_pair
    from .methods import make_learner

    G, D = load_base_pair(job["base"])
    dataset = as_dataset(job["task"], G.size, G.channels)
    real = batch(dataset, torch.arange(len(dataset)))
    reference = real_features(real, progress=False)  # from the disk cache (run() filled it)
    c0, t0 = time.process_time(), time.time()
    z = torch.randn(job["fid_samples"], G.z_dim, generator=generator(1000 + job["seed"]))
    if job["method"] == SOURCE:  # the base before learning: where every method starts
        fake = GANMemory.from_base(G, D).sample("source", z=z)
    else:
        learner = make_learner(job["method"], G, D, 1, tasks=[job["task"]], lr=job["lr"], lr_memory=job["lr"])
        learner.learn(dataset, 0, iterations=job["iterations"], batch_size=job["batch_size"], seed=job["seed"] + 1)
        fake = learner.sample(0, z)
    train_cpu = time.process_time() - c0
    fid = fid_from_features(reference, inception_features(fake, progress=False))
    return {**{k: job[k] for k in ("method", "lr", "seed", "task")},
            "fid": round(fid, 2), "pixfid8": round(pixel_fid(real[: len(fake)], fake), 3),
            "near_duplicates": round(near_duplicate_share(fake[:256]), 4),
            "nn_ratio": round(nearest_neighbour_ratio(fake[:256], real[:256]), 4),
            "train_cpu_s": round(train_cpu, 1), "wall_s": round(time.time() - t0, 1)}


def _key(r: dict) -> tuple:
    return r["method"], float(r["lr"]), int(r["seed"])


def _summary(runs: list[dict], lrs: dict, real: dict) -> dict:
    table = {}
    for method, grid in lrs.items():
        table[method] = {}
        for lr in grid:
            rows = [r for r in runs if r["method"] == method and float(r["lr"]) == float(lr)]
            if not rows:
                continue
            stats = {}
            for field in ("fid", "pixfid8", "near_duplicates", "nn_ratio"):
                values = [r[field] for r in rows]
                mean = sum(values) / len(values)
                spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
                stats[field] = {"mean": round(mean, 4), "sd": round(spread, 4), "values": values}
            table[method][repr(float(lr))] = {"seeds": [r["seed"] for r in rows], **stats}
    best = {m: min(v, key=lambda lr: v[lr]["fid"]["mean"]) for m, v in table.items() if v and m != SOURCE}
    return {"table": table, "best_lr": {m: float(lr) for m, lr in best.items()}, "real": real}


def _markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# Learning-rate sweep on {s['task']} (standard FID, N={s['fid_samples']}; lower is better)", "",
             f"Command: `{results['command']}`  ",
             f"Settings: {s['iterations']} iterations, batch {s['batch_size']}, seeds {s['seeds']}, "
             f"1 torch thread per run, {s['workers']} runs at a time; base SHA-256 `{results['base_sha256']}`  ",
             f"Machine load average at the end: {results['load_average']}; wall {results['wall_seconds']} s", "",
             "| method | lr | FID mean (sd) | FID per seed | pixFID8 mean | near-dup share | NN ratio |",
             "|---|---|---|---|---|---|---|"]
    for method, rows in results["table"].items():
        for lr, r in rows.items():
            mark = " **best**" if float(lr) == results["best_lr"].get(method) else ""
            rate = "(base, no training)" if method == SOURCE else f"{float(lr):g}{mark}"
            lines.append(f"| {method} | {rate} | {r['fid']['mean']:.1f} ({r['fid']['sd']:.1f}) | "
                         f"{', '.join(f'{v:.1f}' for v in r['fid']['values'])} | {r['pixfid8']['mean']:.1f} | "
                         f"{r['near_duplicates']['mean']:.3f} | {r['nn_ratio']['mean']:.2f} |")
    real = results["real"]
    lines += ["", f"Real images of the task: near-duplicate share {real['near_duplicates']:.3f} (256 images); NN ratio "
              "1.00 by definition.", "",
              "NN ratio = median distance of each sample to its nearest other sample / the same on 256 real images "
              "(pooled 16x16 RMS): 1 is as diverse as the data, well below 1 means collapsed modes."]
    return "\n".join(lines) + "\n"


def run(out, *, task: str = "emoji", lrs: Optional[dict] = None, seeds: Sequence[int] = (0, 1),
        iterations: int = 200, batch_size: int = 16, fid_samples: int = 256, workers: int = 1,
        base: Optional[str] = None, argv: Optional[Sequence[str]] = None) -> dict:
    """Run (or resume) the sweep; returns (and writes to ``out``) the results dict."""
    from ..data import as_dataset, batch
    from ..eval import near_duplicate_share, real_features
    from .common import base_sha256, load_base_pair, read_runs, run_jobs
    from .plots import write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lrs = {m: tuple(float(v) for v in g) for m, g in (lrs or DEFAULT_LRS).items()}
    log = out / "runs.jsonl"
    done = read_runs(log, _key)
    lrs = {SOURCE: (0.0,), **lrs}
    jobs = [dict(method=m, lr=lr, seed=s, task=task, iterations=iterations, batch_size=batch_size,
                 fid_samples=fid_samples, base=base, out=str(out))
            for s in seeds for m, grid in lrs.items() for lr in grid if (m, lr, s) not in done]
    t0 = time.time()
    G, _ = load_base_pair(base)
    dataset = as_dataset(task, G.size, G.channels)
    real = batch(dataset, torch.arange(len(dataset)))
    if jobs:
        real_features(real)  # into the disk cache once, before the workers read it
        run_jobs(jobs, score_run, log, _key, done, workers=workers, describe=lambda r: (
            f"[lr_sweep] {r['method']} lr {r['lr']:g} seed {r['seed']}: FID {r['fid']:.1f}, "
            f"pixFID8 {r['pixfid8']:.1f}, near-dup {r['near_duplicates']:.3f}, NN ratio {r['nn_ratio']:.2f} "
            f"({r['wall_s']:.0f} s)"))
    runs = [done[k] for k in sorted(done) if k[0] in lrs and k[1] in lrs[k[0]] and k[2] in seeds]
    results = {"experiment": "learning-rate sweep", **_summary(runs, lrs, {
                   "near_duplicates": round(near_duplicate_share(real[:256]), 4)}),
               "runs": runs,
               "settings": dict(task=task, lrs={m: list(g) for m, g in lrs.items()}, seeds=list(seeds),
                                iterations=iterations, batch_size=batch_size, fid_samples=fid_samples,
                                workers=workers, base=base or "embedded"),
               "command": None if argv is None else " ".join(["python -m gmem.experiments.lr_sweep", *argv]),
               "base_sha256": base_sha256(base), "wall_seconds": round(time.time() - t0, 1),
               "load_average": [round(v, 2) for v in os.getloadavg()]}
    write_json(results, out / "results.json")
    (out / "results.md").write_text(_markdown(results))
    return results


def _lr_grid(values: Sequence[str]) -> dict:
    grid = {}
    for item in values:
        method, _, rates = item.partition("=")
        if not rates:
            raise argparse.ArgumentTypeError(f"--lrs: expected METHOD=LR[,LR...], got {item!r}")
        grid[method] = tuple(float(v) for v in rates.split(","))
    return grid


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m gmem.experiments.lr_sweep", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--task", default="emoji")
    p.add_argument("--lrs", nargs="+", default=None, metavar="METHOD=LR,LR",
                   help=f"each method's grid (default {DEFAULT_LRS})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--fid-samples", type=int, default=256)
    p.add_argument("--workers", type=int, default=1, help="runs at a time (1 torch thread each)")
    p.add_argument("--base", default=None)
    a = p.parse_args(argv)
    run(a.out, task=a.task, lrs=_lr_grid(a.lrs) if a.lrs else None, seeds=a.seeds, iterations=a.iterations,
        batch_size=a.batch_size, fid_samples=a.fid_samples, workers=a.workers, base=a.base, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
