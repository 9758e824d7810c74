"""Lifelong generation: a stream of tasks, GAN memory vs MeRGAN, fine-tuning and joint training.

    python -m gmem.experiments.generation --out DIR [--quick]

Every method starts from the same base and learns the same tasks in the same order with the same
trainer (:class:`gmem.training.GANStep`), batch size, iterations and seeds. After each stage every task
learned so far is scored (metric by name, default ``pixfid8``, a pixel-statistics proxy, NOT FID) on
``--eval-samples`` samples against the task's images; with ``--fid-samples N`` also the standard FID
(:mod:`gmem.eval`'s Inception network, offline) of N samples against all of the task's images, right
after the task is learned and after the last stage, and the share of near-duplicate pairs among the
first 256 evaluation samples right after learning (:func:`gmem.eval.near_duplicate_share`, next to the
same figure on the task's images) and their nearest-neighbour spread next to the task's images
(:func:`gmem.eval.nearest_neighbour_ratio`). Writes to ``DIR``:

- ``fig5_samples.png``: per method, rows = after stage s, columns = samples of each task (fixed z);
- ``fig6_left_quality.png``: per task, the score after each stage, one line per method;
- ``results.json`` / ``results.md``: the scores, whether each task's samples for fixed z stayed
  bit-identical after later stages, the largest and mean pixel change, timings and the settings.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..data import as_dataset, batch
from ..eval import fid_from_features, inception_features, near_duplicate_share, nearest_neighbour_ratio, real_features
from ..seeding import generator
from .common import Timer, load_base_pair, run_record, threads
from .methods import GENERATION_METHODS, LR_BASELINES, LR_MEMORY, get_method, make_learner
from .metrics import get_metric
from .plots import markdown_table, plot_curves, plot_sample_grids, stage_grid, write_json

__all__ = ["run", "main", "DEFAULT_TASKS", "DEFAULT_METHODS", "FULL", "QUICK"]

DEFAULT_TASKS = ("emoji", "oxygen_icons", "fashion_mnist")
DEFAULT_METHODS = GENERATION_METHODS  # any method of gmem.experiments.methods with a generator may be named
# the largest budget that fits in 45 minutes on the 2-core CPU with 1 thread (300 iterations per task
# was estimated at ~60 minutes: experiments/results/TIMING.md); pass --iterations 300 where there is time
# FID of 256 samples: about 100 CPU seconds of Inception per set here; 1000 would take the run past 45 minutes
FULL = dict(iterations=200, batch_size=16, eval_samples=400, fid_samples=256)
QUICK = dict(iterations=2, batch_size=4, eval_samples=24, fid_samples=0, tasks=DEFAULT_TASKS[:2])


def run(out, *, tasks: Sequence[str] = DEFAULT_TASKS, methods: Sequence[str] = DEFAULT_METHODS,
        iterations: int = FULL["iterations"], batch_size: int = FULL["batch_size"],
        eval_samples: int = FULL["eval_samples"], lr_memory: float = LR_MEMORY, lr_baselines: float = LR_BASELINES,
        lambda_ra: float = 1e-3, metric: str = "pixfid8", seed: int = 0, base: Optional[str] = None,
        fid_samples: int = 0, workers: int = 1,
        grid_columns: int = 4, progress: bool = False, argv: Optional[Sequence[str]] = None) -> dict:
    """Run the experiment; returns (and writes to ``out``) the results dict (see the module docstring).

    ``workers > 1`` runs the methods in that many processes at once (each with this process's torch
    thread count); the methods are independent, so the results are those of one process."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for m in methods:
        if get_method(m).make is None:
            raise KeyError(f"method {m!r} has no generator; choose from {list(DEFAULT_METHODS)}")
    score = get_metric(metric)
    G, _ = load_base_pair(base)
    real = [batch(ds, torch.arange(len(ds))) for ds in (as_dataset(t, G.size, G.channels) for t in tasks)]
    if fid_samples:
        for r in real:
            real_features(r)  # into the disk cache once, before the methods (and workers) read it
    job = dict(tasks=list(tasks), iterations=iterations, batch_size=batch_size, eval_samples=eval_samples,
               lr_memory=lr_memory, lr_baselines=lr_baselines, lambda_ra=lambda_ra, metric=metric, seed=seed,
               base=base, fid_samples=fid_samples, grid_columns=grid_columns, progress=progress,
               threads=torch.get_num_threads())
    t_start = time.time()
    jobs = [{**job, "method": m} for m in methods]
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_run_method, jobs)
    else:
        parts = [_run_method(j) for j in jobs]
    per_method = {p["method"]: p for p in parts}
    field = lambda name: {m: per_method[m][name] for m in methods}  # noqa: E731
    near_dup = {"real": {t: round(near_duplicate_share(r[:256]), 4) for t, r in zip(tasks, real)},
                **field("near_duplicates")}
    timer_s, timer_cpu = {}, {}
    for p in parts:
        timer_s.update(p["seconds"])
        timer_cpu.update(p["cpu_seconds"])
    settings = dict(tasks=list(tasks), methods=list(methods), iterations=iterations, batch_size=batch_size,
                    eval_samples=eval_samples, fid_samples=fid_samples, lr_memory=lr_memory, lr_baselines=lr_baselines,
                    lambda_ra=lambda_ra, metric=metric, seed=seed, base=base or "embedded", workers=workers)
    results = {"experiment": "lifelong generation", "metric": {"name": metric, "label": score.label,
                                                               "higher_is_better": score.higher_is_better},
               "scores": _str_keys(field("scores")), "bit_identical_since_learned": _str_keys(field("same")),
               "max_abs_change_since_learned": _str_keys(field("change")),
               "mean_abs_change_since_learned": _str_keys(field("mean_change")), "seconds": timer_s,
               "fid": _str_keys(field("fid")) if fid_samples else None, "fid_samples": fid_samples,
               "near_duplicates": near_dup, "nearest_neighbour_ratio": field("nn_ratio"),
               "cpu_seconds": timer_cpu,
               "wall_seconds": round(time.time() - t_start, 1),
               "run": run_record("gmem.experiments.generation", settings, argv)}
    write_json(results, out / "results.json")
    (out / "results.md").write_text(_markdown(results, tasks, methods))
    plot_sample_grids(field("grid"), tasks, out / "fig5_samples.png",
                      title="samples of every task after each stage (fixed z per task)")
    plot_curves({m: {t: per_method[m]["scores"][t] for t in tasks} for m in methods}, list(tasks),
                out / "fig6_left_quality.png",
                ylabel=score.label + (" (higher is better)" if score.higher_is_better else " (lower is better)"),
                xticks=list(tasks), title="quality of each task along the stream")
    return results


def _run_method(job: dict) -> dict:
    """One method through the whole stream (in this process or a worker): its scores, checks and grid."""
    with threads(job["threads"]):
        return _stream(job)


def _stream(job: dict) -> dict:
    method, tasks, seed = job["method"], job["tasks"], job["seed"]
    score = get_metric(job["metric"])
    G, D = load_base_pair(job["base"])
    datasets = [as_dataset(t, G.size, G.channels) for t in tasks]
    real = [batch(ds, torch.arange(len(ds))) for ds in datasets]
    z_eval = [torch.randn(job["eval_samples"], G.z_dim, generator=generator(seed + 100 + j)) for j in range(len(tasks))]
    z_fid = [torch.randn(job["fid_samples"], G.z_dim, generator=generator(seed + 200 + j)) for j in range(len(tasks))]
    fid_samples = job["fid_samples"]
    real_feats: dict[int, torch.Tensor] = {}  # Inception features of each task's images (from the disk cache)
    timer = Timer()
    # task -> stage (1-based) -> score; samples for fixed z unchanged since learned; max / mean |pixel change|
    scores, same, change, mean_change = ({t: {} for t in tasks} for _ in range(4))
    fids = {t: {} for t in tasks}  # task -> stage -> standard FID (learned and last stage)
    near_dup, nn_ratio = {}, {}  # task -> figure of the samples right after learning
    with timer(f"{method}_setup"):
        runner = make_learner(method, G, D, len(tasks), tasks=tasks, lr=job["lr_baselines"],
                              lr_memory=job["lr_memory"], lambda_ra=job["lambda_ra"])
    first: dict[int, torch.Tensor] = {}
    learned_fid: dict[int, torch.Tensor] = {}  # each task's FID samples right after it was learned
    per_stage: dict[int, dict[str, torch.Tensor]] = {}
    for k, ds in enumerate(datasets):
        with timer(method):
            runner.learn(ds, k, iterations=job["iterations"], batch_size=job["batch_size"], seed=seed + k + 1,
                         progress=job["progress"])
        stage = k + 1
        per_stage[stage] = {}
        for j in range(stage):
            with timer(f"{method}_eval"):
                fake = runner.sample(j, z_eval[j])
                if j not in first:
                    first[j] = fake.clone()
                scores[tasks[j]][stage] = round(score(real[j], fake), 4)
            same[tasks[j]][stage] = bool(torch.equal(fake, first[j]))
            change[tasks[j]][stage] = float((fake - first[j]).abs().max())
            mean_change[tasks[j]][stage] = round(float((fake - first[j]).abs().mean()), 5)
            per_stage[stage][tasks[j]] = fake[:job["grid_columns"]]
            if j == k:
                near_dup[tasks[j]] = round(near_duplicate_share(fake[:256]), 4)
                n = min(256, len(fake), len(real[j]))  # sets of one size: the ratio depends on it
                nn_ratio[tasks[j]] = round(nearest_neighbour_ratio(fake[:n], real[j][:n]), 4)
            if fid_samples and (j == k or stage == len(tasks)):
                with timer(f"{method}_fid"):
                    if j not in real_feats:
                        real_feats[j] = real_features(real[j])
                    samples = runner.sample(j, z_fid[j])
                    if j == k:
                        learned_fid[j] = samples
                    elif torch.equal(samples, learned_fid[j]):  # the same images: the same FID, no
                        fids[tasks[j]][stage] = fids[tasks[j]][j + 1]  # second Inception pass
                        continue
                    feats = inception_features(samples)
                    fids[tasks[j]][stage] = round(fid_from_features(real_feats[j], feats), 2)
        print(f"[{method}] after {tasks[k]}: " + ", ".join(
            f"{tasks[j]} {scores[tasks[j]][stage]:.2f}" for j in range(stage)), flush=True)
    return {"method": method, "scores": scores, "same": same, "change": change, "mean_change": mean_change,
            "fid": fids, "near_duplicates": near_dup, "nn_ratio": nn_ratio,
            "grid": stage_grid(per_stage, tasks, job["grid_columns"]),
            "seconds": timer.seconds, "cpu_seconds": timer.cpu_seconds}


def _str_keys(d):
    return {k: _str_keys(v) for k, v in d.items()} if isinstance(d, dict) else d


def _markdown(results: dict, tasks, methods) -> str:
    label = results["metric"]["label"]
    header = ["method", "task"] + [f"after {t}" for t in tasks] + ["forgetting", "unchanged"]
    rows = []
    for m in methods:
        for j, t in enumerate(tasks):
            s = results["scores"][m][t]
            vals = [s.get(str(k + 1), s.get(k + 1)) for k in range(len(tasks))]
            learned, final = vals[j], vals[-1]
            checks = results["bit_identical_since_learned"][m][t]
            later = len(checks) > 1  # the stage a task is learned in compares it with itself
            rows.append([m, t] + vals + [None if learned is None else round(final - learned, 2),
                                         ("bit-identical" if all(checks.values()) else "changed") if later else "-"])
    run = results["run"]
    return (f"# Lifelong generation ({label}; lower is better)\n\n"
            f"Command: `{run['command']}`  \nSettings: `{run['settings']}`  \n"
            f"Base weights SHA-256: `{run.get('base_sha256')}`  \n"
            f"Wall time: {results['wall_seconds']} s; torch threads {run['threads']}\n\n"
            + markdown_table(header, rows)
            + "\n'forgetting' = score after the last stage minus the score right after the task was learned "
              "(> 0: worse); 'unchanged' = the task's samples for fixed z after every later stage equal those "
              "right after it was learned, bit for bit.\n" + _fid_markdown(results, tasks, methods))


def _fid_markdown(results: dict, tasks, methods) -> str:
    """The standard FID right after learning and after the last stage, and the near-duplicate shares."""
    dup = results.get("near_duplicates") or {}
    spread = results.get("nearest_neighbour_ratio") or {}
    header = ["method", "task", "FID learned", "FID last stage", "near-dup. learned", "near-dup. real", "NN ratio"]
    rows = []
    for m in methods:
        for j, t in enumerate(tasks):
            f = ((results.get("fid") or {}).get(m) or {}).get(t, {})
            pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
            rows.append([m, t, f.get(str(j + 1), "-"), f.get(str(len(tasks)), "-"),
                         pct(dup.get(m, {}).get(t)), pct(dup.get("real", {}).get(t)), spread.get(m, {}).get(t)])
    n = results.get("fid_samples")
    what = (f"standard FID (Inception, offline), N = {n} samples vs all of the task's images; " if n else
            "standard FID not computed (--fid-samples 0); ")
    return (f"\n## Standard FID and diversity\n\n{what}near-dup. = share of near-duplicate pairs among the "
            "first 256 evaluation samples right after learning, and among the task's images; NN ratio = median "
            "distance of each of those samples to its nearest other sample over the same on 256 of the task's "
            "images (1: as spread out as the data; well below 1: collapsed modes).\n\n"
            + markdown_table(header, rows))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmem.experiments.generation", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help=f"tiny smoke run: {QUICK}")
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--lr-memory", type=float, default=LR_MEMORY,
                   help=f"GAN memory's learning rate (default {LR_MEMORY:g}: the best of lr_sweep)")
    p.add_argument("--lr-baselines", type=float, default=LR_BASELINES,
                   help=f"the baselines' learning rate (default {LR_BASELINES:g}: fine-tuning's best in lr_sweep)")
    p.add_argument("--lambda-ra", type=float, default=1e-3)
    p.add_argument("--fid-samples", type=int, default=None,
                   help=f"N of the standard FID per task (default {FULL['fid_samples']}, --quick 0; 0 skips it)")
    p.add_argument("--metric", default="pixfid8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=None, help="a base directory (default: the embedded base)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--workers", type=int, default=1,
                   help="methods run at once, each in its own process (default 1: one after another)")
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    preset = QUICK if a.quick else FULL
    pick = lambda value, key: value if value is not None else preset[key]
    with threads(a.threads):
        run(a.out, tasks=a.tasks or preset.get("tasks", DEFAULT_TASKS), methods=a.methods,
            iterations=pick(a.iterations, "iterations"), batch_size=pick(a.batch_size, "batch_size"),
            eval_samples=pick(a.eval_samples, "eval_samples"), fid_samples=pick(a.fid_samples, "fid_samples"),
            lr_memory=a.lr_memory, lr_baselines=a.lr_baselines,
            lambda_ra=a.lambda_ra, metric=a.metric, seed=a.seed, base=a.base, progress=a.progress, workers=a.workers,
            argv=sys.argv[1:] if argv is None else list(argv))
    print(f"results in {a.out}/ (results.md, fig5_samples.png, fig6_left_quality.png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
