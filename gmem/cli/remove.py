"""``gmem remove MEMORY TASK...``: forget tasks (their files go to garbage collection).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .verify import GC_HELP

HELP = "forget task(s) of a memory (the other tasks are untouched)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = GC_HELP
    p.add_argument("memory", help="memory directory")
    p.add_argument("tasks", nargs="+", help="task name(s) to forget")


def run(args) -> int:
    from ..store import Store

    if Path(args.memory).exists() and not Path(args.memory).is_dir():
        raise ValueError(f"{args.memory} is a file, not a memory directory")
    removed = Store(args.memory).remove_tasks(args.tasks)
    print(f"removed {', '.join(repr(t) for t in removed)} from {args.memory}")
    return 0
