"""The inspection and upkeep commands of the ``gmem`` CLI: ``info``, ``verify``, ``remove``.

Registered into :data:`gmem.cli.COMMANDS` through :data:`gmem.cli_memory.MEMORY_COMMANDS`. ``info``
prints the memory's base, a task table (scripts parse it: keep its columns) and the storage table of
:func:`gmem.cli_compress.storage_lines`; ``verify`` reads every task file and, with ``--repair``,
drops the unreadable ones; ``remove`` forgets tasks. Files that leave a memory are deleted later by
the store's garbage collection (:mod:`gmem.store_gc`, summarised in ``GC_HELP``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_checks import open_memory


# ---------------------------------------------------------------- info
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("memory", nargs="?", default=None,
                   help="memory directory (default: describe the embedded base with no tasks)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--layers", action="store_true", help="also list the modulated generator layers")
    p.add_argument("--verify", action="store_true",
                   help="read and hash-check every task file (exit code 1 if any is missing or damaged)")


def _info_run(args) -> int:
    from .memory import GANMemory

    mem = open_memory(args.memory) if args.memory else GANMemory.default()
    base = mem.parameter_counts()
    info = {"memory": args.memory, "size": mem.size, "channels": mem.channels, "nf": mem.generator.nf,
            "z_dim": mem.z_dim, "base": {**mem.base_source, "sha256": mem.base_hash},
            "generator_weights": base["generator_base"], "discriminator_weights": base["discriminator_base"],
            "conversion": mem.conversion, "tasks": []}
    for t in mem.tasks:
        c = mem.parameter_counts(t)
        r = mem.records[t]
        info["tasks"].append({"name": t, "classes": mem.num_classes(t), "class_names": r.get("classes"),
                              "generator_style": c["generator_style"], "generator_stored": c["generator_stored"],
                              "compressed": "compression" in r, "compression": r.get("compression"),
                              "generator_style_ratio": round(c["generator_style_ratio"], 4),
                              "discriminator_style": c["discriminator_style"] + c["discriminator_fc"],
                              "file": r.get("file"), "training": r.get("training", {}),
                              "metrics": r.get("metrics", {})})
    if args.layers:
        info["layers"] = mem.layer_names()
    problems = {}
    if args.verify:
        problems = {t: e for t, e in mem.verify().items() if e}
        info["damaged"] = problems
    if args.json:
        print(json.dumps(info, indent=2))
        return 1 if problems else 0
    print(f"GAN memory {args.memory or '(embedded base, no tasks)'}: {mem.size}x{mem.size}x{mem.channels}, "
          f"nf={mem.generator.nf}, z={mem.z_dim}; base {mem.base_source.get('kind')} sha256 {mem.base_hash[:16]}...")
    print(f"frozen base: generator {base['generator_base']:,} weights, discriminator {base['discriminator_base']:,}; "
          f"one task adds {base['generator_style']:,} generator style values "
          f"({100 * base['generator_style_ratio']:.1f}% of the generator)")
    if not mem.tasks:
        print("no tasks yet")
    else:
        print(f"{'#':>3} {'task':<18}{'classes':>8}{'G style':>11}{'% of G':>8}{'D style':>10}{'iters':>7}"
              f"{'train s':>9}  metrics")
        for i, t in enumerate(info["tasks"], start=1):
            m = dict(t["metrics"])
            extra = ", ".join(f"{k}={v}" for k, v in m.items()
                              if k in ("pixfid8", "pixfid8_source", "stopped_early") or k.startswith("fid"))
            print(f"{i:>3} {t['name']:<18}{str(t['classes'] or '-'):>8}{t['generator_style']:>11,}"
                  f"{100 * t['generator_style_ratio']:>7.1f}%{t['discriminator_style']:>10,}"
                  f"{m.get('iterations_done', '-')!s:>7}{m.get('train_seconds', '-')!s:>9}  {extra}")
    if mem.tasks:
        from .cli_compress import storage_lines

        print("\n".join(storage_lines(info["tasks"])))
    if args.layers:
        print("modulated generator layers:", ", ".join(info["layers"]))
    if args.verify:
        for t in mem.tasks:
            print(f"  {t}: {'DAMAGED: ' + problems[t] if t in problems else 'ok (hash checked)'}")
    return 1 if problems else 0


# ---------------------------------------------------------------- verify, remove
GC_HELP = ("Garbage collection (run by every save and remove, under the memory's lock): task files that left "
           "the manifest, temporary files of interrupted writes (e.g. runs/TASK/.checkpoint.pt.*.tmp of a killed "
           "learner) and the runs/TASK folders of tasks not in the manifest are deleted once unchanged for 10 "
           "minutes; the folder of a task being learned right now (its learner holds the claim) is kept.")


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.epilog = GC_HELP
    p.add_argument("memory", help="memory directory")
    p.add_argument("--repair", action="store_true",
                   help="drop the tasks that cannot be read from the manifest (under the memory's lock); "
                        "their files are left to garbage collection")


def _verify_run(args) -> int:
    from . import store

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
    dropped = store.repair(args.memory, also={t: mem.records[t].get("sha256") for t in problems})
    print(f"{args.memory}: removed {len(dropped)} damaged task(s) from the manifest: {sorted(dropped)}")
    return 0


def _remove_args(p: argparse.ArgumentParser) -> None:
    p.epilog = GC_HELP
    p.add_argument("memory", help="memory directory")
    p.add_argument("tasks", nargs="+", help="task name(s) to forget")


def _remove_run(args) -> int:
    from . import store

    if Path(args.memory).exists() and not Path(args.memory).is_dir():
        raise ValueError(f"{args.memory} is a file, not a memory directory")
    removed = store.remove_tasks(args.memory, args.tasks)
    print(f"removed {', '.join(repr(t) for t in removed)} from {args.memory}")
    return 0


INFO_COMMANDS = {
    "info": ("show a memory's base, tasks, classes, parameter counts and metrics", _info_args, _info_run),
    "verify": ("read and check every task of a memory; --repair drops the unreadable ones", _verify_args, _verify_run),
    "remove": ("forget task(s) of a memory (the other tasks are untouched)", _remove_args, _remove_run),
}
