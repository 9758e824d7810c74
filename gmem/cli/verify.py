"""``gmem verify MEMORY [--repair]``: read every task file; ``--repair`` drops the unreadable ones and
rebuilds a lost or damaged manifest from the task files (and the knowledge-base file).

Files that leave a memory are deleted later by the store's garbage collection (:mod:`gmem.store.gc`,
summarised in ``GC_HELP``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..store import MANIFEST
from .checks import has_task_files, open_memory

HELP = ("read and check every task of a memory; --repair drops the unreadable ones and rebuilds a lost or "
        "damaged manifest from the task files")


GC_HELP = ("Garbage collection (run by every save and remove, under the memory's lock): task files that left "
           "the manifest, temporary files of interrupted writes (e.g. runs/TASK/.checkpoint.pt.*.tmp of a killed "
           "learner) and the runs/TASK folders of tasks not in the manifest are deleted once unchanged for 10 "
           "minutes; the folder of a task being learned right now (its learner holds the claim) is kept, and so is "
           "one holding a checkpoint.pt (an interrupted learner: the same `gmem learn` command resumes it) until "
           "its task is removed or learned again.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = GC_HELP
    p.add_argument("memory", help="memory directory")
    p.add_argument("--repair", action="store_true",
                   help="drop the tasks that cannot be read from the manifest (under the memory's lock; "
                        "their files are left to garbage collection); a lost or damaged manifest is rebuilt "
                        "from the task files first")


def run(args) -> int:
    from ..memory import GANMemory
    from ..store import Store

    state = Store(args.memory).manifest_state() if Path(args.memory).is_dir() else "ok"
    if state != "ok" and args.repair and has_task_files(args.memory):
        report = GANMemory.rebuild_manifest(args.memory)
        print(f"{args.memory}: rebuilt {MANIFEST} from the task files: {len(report['tasks'])} task(s) "
              f"{report['tasks']}" + ("" if not report["skipped"] else
                                      f"; left out {len(report['skipped'])}: "
                                      + "; ".join(f"{k}: {v}" for k, v in sorted(report["skipped"].items()))))
    mem = open_memory(args.memory)
    problems = {t: e for t, e in mem.verify().items() if e}
    for t in mem.tasks:
        print(f"  {t}: {'DAMAGED: ' + problems[t] if t in problems else 'ok (file, hash and contents checked)'}")
    if not problems:
        print(f"{args.memory}: {len(mem.tasks)} task(s), all readable")
        return 0
    if not args.repair:
        import shlex

        names = " ".join(shlex.quote(t) for t in problems)
        print(f"{args.memory}: {len(problems)} damaged task(s); drop them with `gmem verify {args.memory} --repair` "
              f"or `gmem remove {shlex.quote(str(args.memory))} {names}`")
        return 1
    dropped = Store(args.memory).repair(also={t: mem.records[t].get("sha256") for t in problems})
    print(f"{args.memory}: removed {len(dropped)} damaged task(s) from the manifest: {sorted(dropped)}")
    return 0
