"""``gmem remove MEMORY TASK...``: forget tasks (their files go to garbage collection).
"""
from __future__ import annotations

import argparse

from .verify import GC_HELP

HELP = "forget task(s) of a memory (the other tasks are untouched)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = GC_HELP
    p.add_argument("memory", help="memory directory")
    p.add_argument("tasks", nargs="+", help="task name(s) to forget")


def run(args) -> int:
    from ..store import ManifestError, Store
    from .checks import repair_hint, require_manifest

    require_manifest(args.memory)  # before the lock: nothing is created in a directory that holds no memory
    try:
        removed = Store(args.memory).remove_tasks(args.tasks)
    except ManifestError as e:
        raise ManifestError(repair_hint(str(e), args.memory)) from None
    print(f"removed {', '.join(repr(t) for t in removed)} from {args.memory}")
    return 0
