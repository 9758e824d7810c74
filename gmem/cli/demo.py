"""``gmem demo``: the embedded demo tasks in sequence (``make demo``), see :mod:`gmem.demo`.
"""
from __future__ import annotations

import argparse

HELP = ("learn the embedded demo tasks in sequence, show samples, interpolations and no forgetting "
        "(`make demo`; outputs in runs/demo)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--iterations", type=int, default=None,
                   help="iterations per task (default 400; --long: 3000); capped by --time-budget")
    p.add_argument("--long", action="store_true", help="train longer for better quality (3000 iterations per "
                                                       "task, no time cap unless --time-budget is given)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of training shared by all tasks (default 360, keeping `make demo` under 10 "
                        "minutes on 2 CPU cores); each task stops early when its share is used")
    p.add_argument("--tasks", default=None, help="comma-separated embedded demo sets (default emoji,oxygen_icons,"
                                                 "fashion_mnist; fashion_mnist is learned as a conditional task)")
    p.add_argument("--base", default=None, metavar="DIR", help="use this base (from `gmem train-base --export`) "
                                                                "instead of the embedded one")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="Adam learning rate (default 1e-4: the paper's, and the best of a sweep on emoji)")
    p.add_argument("--fid-samples", type=int, default=50,
                   help="N of the standard FID per task in the summary (default 50, ~1 CPU minute per task; "
                        "0 skips it)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1: robust on a busy machine; README \"Threads\")")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from ..demo import run_demo

    iterations = args.iterations or (3000 if args.long else 400)
    budget = args.time_budget if args.time_budget is not None else (1e9 if args.long else 360.0)
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    return run_demo(args.out, tasks=tasks, iterations=iterations, time_budget=budget, lr=args.lr, seed=args.seed,
                    threads=args.threads, base=args.base, device=args.device, fid_samples=args.fid_samples,
                    progress=not args.no_progress)
