"""Which base to ship: candidate bases scored by what GAN memory learns from them.

    python -m gmem.experiments.base_transfer --out DIR --bases embedded runs/base/export OLD_BASE_DIR
        [--tasks emoji oxygen_icons fashion_mnist] [--seeds 0 1] [--iterations 200] [--fid-samples 128] [--workers 2]

A base is only as good as the tasks learned on it, so candidates (base directories in the
:func:`gmem.models.save_base` layout, ``LABEL=DIRECTORY`` to name one, or ``embedded``: the shipped
one) are compared the way users meet
them: each learns each task with GAN memory at the experiments' learning rate
(:data:`gmem.experiments.methods.LR_MEMORY`, also ``gmem learn``'s and the demo's), the experiments'
batch and iterations, and is scored right after learning by the standard FID (:mod:`gmem.eval`'s
Inception network, offline) of ``--fid-samples`` samples against all of the task's images, with the
same latents for every base. The row ``source`` scores each base's own samples against the task
(no training: where learning starts). A base's score is its mean FID over the tasks and seeds after
learning; the lowest wins.

Runs go to worker processes (1 torch thread each, :func:`gmem.experiments.lr_sweep.score_run`); each
finished run is appended to ``DIR/runs.jsonl`` at once, so an interrupted comparison resumes where it
stopped. Writes ``DIR/results.json`` and ``DIR/results.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["run", "main", "DEFAULT_TASKS"]

#: the demo's three tasks (embedded data sets)
DEFAULT_TASKS = ("emoji", "oxygen_icons", "fashion_mnist")
_METHOD = "gan_memory"


def _candidate(base: str) -> tuple[str, Optional[str]]:
    """``(label, directory)`` of a ``--bases`` item: ``embedded``, a directory, or ``LABEL=DIRECTORY``."""
    if base in ("", "embedded"):
        return "embedded", None
    label, sep, path = base.partition("=")
    return (label, path) if sep and label and not os.path.isdir(base) else (base, base)


def _iterations(info: dict) -> Optional[int]:
    """The base's training iterations in all, those of the base it started from (``--init``) included:
    ``train-base --export`` records its own run's count (and the init base's under ``training.init``);
    a base whose ``base.json`` carries its stages' ``history`` (the embedded one) records the total."""
    meta = info.get("info") or {}
    own, init = meta.get("iterations"), (meta.get("training") or {}).get("init") or {}
    if own is None or "history" in meta or init.get("iterations") is None:
        return own
    return own + init["iterations"]


def _key(r: dict) -> tuple:
    return r["base_sha256"], r["task"], r["method"], int(r["seed"])


def _score(job: dict) -> dict:
    from .lr_sweep import score_run

    record = score_run(job)
    return {**record, "base": job["label"], "base_sha256": job["sha256"]}


def _markdown(results: dict) -> str:
    s = results["settings"]
    tasks = s["tasks"]
    lines = [f"# Candidate bases scored by transfer (standard FID, N={s['fid_samples']}; lower is better)", "",
             f"Command: `{results['command']}`  ",
             f"Settings: GAN memory at lr {s['lr']:g}, {s['iterations']} iterations x batch {s['batch_size']} per "
             f"task, seeds {s['seeds']} (each cell: the mean over them), 1 torch thread per run, {s['workers']} runs "
             "at a time  ",
             f"Machine load average at the end: {results['load_average']}; wall {results['wall_seconds']} s", "",
             "| base (weights SHA-256) | iterations | " + " | ".join(f"{t}: source -> learned" for t in tasks)
             + " | mean learned |",
             "|---|---|" + "---|" * len(tasks) + "---|"]
    for b in results["bases"]:
        mark = " **best**" if b["sha256"] == results["best"]["sha256"] else ""
        cells = [f"{b['source'][t]:.1f} -> {b['learned'][t]:.1f}" if t in b["learned"] and t in b["source"] else "-"
                 for t in tasks]
        mean = f"{b['mean_learned']:.1f}" if b["mean_learned"] is not None else "-"
        lines.append(f"| `{b['sha256'][:12]}` ({b['label']}){mark} | {b['iterations'] or '?'} | "
                     + " | ".join(cells) + f" | {mean} |")
    lines += ["", "source: the base's own samples against the task's images (no training); learned: GAN memory "
              "right after learning the task from that base.", "", "Per seed (learned FID):", "",
              "| base | seed | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for b in results["bases"]:
        for seed, row in sorted(b["per_seed"].items()):
            lines.append(f"| `{b['sha256'][:12]}` | {seed} | " + " | ".join(
                f"{row[t]:.1f}" if t in row else "-" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def run(out, bases: Sequence[str], *, tasks: Sequence[str] = DEFAULT_TASKS, iterations: int = 200,
        batch_size: int = 16, fid_samples: int = 128, seeds: Sequence[int] = (0,), workers: int = 1,
        argv: Optional[Sequence[str]] = None) -> dict:
    """Score (or resume scoring) every base in ``bases``; returns (and writes to ``out``) the results."""
    import torch

    from ..data import as_dataset, batch
    from ..eval import real_features
    from ..models.base import base_config, default_base_info
    from .common import load_base_pair, read_runs, run_jobs
    from .lr_sweep import SOURCE
    from .methods import LR_MEMORY
    from .plots import write_json

    if not bases:
        raise ValueError("base_transfer: give at least one base (a directory, or 'embedded')")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    candidates = []
    for base in bases:
        label, path = _candidate(base)
        info = default_base_info() if path is None else base_config(path)  # raises for a non-base
        candidates.append({"label": label, "path": path, "sha256": info["sha256"], "iterations": _iterations(info)})
    log = out / "runs.jsonl"
    done = read_runs(log, _key)
    jobs = [dict(method=m, lr=0.0 if m == SOURCE else LR_MEMORY, seed=seed, task=t, iterations=iterations,
                 batch_size=batch_size, fid_samples=fid_samples, base=c["path"], label=c["label"],
                 sha256=c["sha256"])
            for seed in seeds for c in candidates for t in tasks for m in (SOURCE, _METHOD)
            if (c["sha256"], t, m, seed) not in done]
    t0 = time.time()
    G, _ = load_base_pair(candidates[0]["path"])
    for task in tasks:  # the real images' features into the disk cache once, before the workers read them
        dataset = as_dataset(task, G.size, G.channels)
        real_features(batch(dataset, torch.arange(len(dataset))), progress=False)
    run_jobs(jobs, _score, log, _key, done, workers=workers, describe=lambda r: (
        f"[base_transfer] {r['base']} ({r['base_sha256'][:12]}) {r['task']} {r['method']}: "
        f"FID {r['fid']:.1f} ({r['wall_s']:.0f} s)"))
    summary = []
    for c in candidates:
        runs = [r for k, r in done.items() if k[0] == c["sha256"] and k[1] in tasks and k[3] in seeds]

        def mean_fid(task, method, runs=runs):  # over the seeds that have it
            values = [r["fid"] for r in runs if r["task"] == task and r["method"] == method]
            return round(sum(values) / len(values), 2) if values else None

        learned = {t: mean_fid(t, _METHOD) for t in tasks if mean_fid(t, _METHOD) is not None}
        source = {t: mean_fid(t, SOURCE) for t in tasks if mean_fid(t, SOURCE) is not None}
        per_seed = {str(seed): {r["task"]: r["fid"] for r in runs if r["seed"] == seed and r["method"] == _METHOD}
                    for seed in seeds}
        complete = all(len(row) == len(tasks) for row in per_seed.values())
        mean = round(sum(learned.values()) / len(learned), 2) if complete else None
        summary.append({**c, "learned": learned, "source": source, "per_seed": per_seed, "mean_learned": mean})
    scored = [b for b in summary if b["mean_learned"] is not None]
    best = min(scored, key=lambda b: b["mean_learned"]) if scored else None
    results = {"experiment": "base transfer", "bases": summary, "best": best,
               "runs": [done[k] for k in sorted(done)],
               "settings": dict(tasks=list(tasks), lr=LR_MEMORY, iterations=iterations, batch_size=batch_size,
                                fid_samples=fid_samples, seeds=list(seeds), workers=workers),
               "command": None if argv is None else " ".join(["python -m gmem.experiments.base_transfer", *argv]),
               "wall_seconds": round(time.time() - t0, 1),
               "load_average": [round(v, 2) for v in os.getloadavg()]}
    write_json(results, out / "results.json")
    (out / "results.md").write_text(_markdown(results))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m gmem.experiments.base_transfer", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--bases", nargs="+", required=True,
                   help="base directories (LABEL=DIRECTORY names one), or 'embedded' (the shipped base)")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--fid-samples", type=int, default=128)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--workers", type=int, default=1, help="runs at a time (1 torch thread each)")
    a = p.parse_args(argv)
    run(a.out, a.bases, tasks=a.tasks, iterations=a.iterations, batch_size=a.batch_size,
        fid_samples=a.fid_samples, seeds=a.seeds, workers=a.workers, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
