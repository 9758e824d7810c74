"""``gmem verify MEMORY [--repair]``: read every task file; ``--repair`` drops the unreadable ones.

Files that leave a memory are deleted later by the store's garbage collection (:mod:`gmem.store.gc`,
summarised in ``GC_HELP``).
"""
from __future__ import annotations

import argparse

from .checks import open_memory

HELP = "read and check every task of a memory; --repair drops the unreadable ones"


GC_HELP = ("Garbage collection (run by every save and remove, under the memory's lock): task files that left "
           "the manifest, temporary files of interrupted writes (e.g. runs/TASK/.checkpoint.pt.*.tmp of a killed "
           "learner) and the runs/TASK folders of tasks not in the manifest are deleted once unchanged for 10 "
           "minutes; the folder of a task being learned right now (its learner holds the claim) is kept.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = GC_HELP
    p.add_argument("memory", help="memory directory")
    p.add_argument("--repair", action="store_true",
                   help="drop the tasks that cannot be read from the manifest (under the memory's lock); "
                        "their files are left to garbage collection")


def run(args) -> int:
    from ..store import Store

    mem = open_memory(args.memory)
    problems = {t: e for t, e in mem.verify().items() if e}
    for t in mem.tasks:
        print(f"  {t}: {'DAMAGED: ' + problems[t] if t in problems else 'ok (file, hash and contents checked)'}")
    if not problems:
        print(f"{args.memory}: {len(mem.tasks)} task(s), all readable")
        return 0
    if not args.repair:
        print(f"{args.memory}: {len(problems)} damaged task(s); drop them with `gmem verify {args.memory} --repair` "
              f"or `gmem remove {args.memory} TASK`")
        return 1
    dropped = Store(args.memory).repair(also={t: mem.records[t].get("sha256") for t in problems})
    print(f"{args.memory}: removed {len(dropped)} damaged task(s) from the manifest: {sorted(dropped)}")
    return 0
