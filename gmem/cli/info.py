"""``gmem info [MEMORY]``: the memory's base, a task table (scripts parse it: keep its columns) and
the storage table of :func:`gmem.cli.compress.storage_lines`.
"""
from __future__ import annotations

import argparse
import json

from .checks import open_memory
from .compress import storage_lines

HELP = "show a memory's base, tasks, classes, parameter counts and metrics"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("memory", nargs="?", default=None,
                   help="memory directory (default: describe the embedded base with no tasks)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--layers", action="store_true", help="also list the modulated generator layers")
    p.add_argument("--verify", action="store_true",
                   help="read and hash-check every task file (exit code 1 if any is missing or damaged)")


def run(args) -> int:
    from ..memory import GANMemory
    from ..models import CheckpointError

    mem = open_memory(args.memory) if args.memory else GANMemory.default()
    base = mem.parameter_counts()
    info = {"memory": args.memory, "size": mem.size, "channels": mem.channels, "nf": mem.generator.nf,
            "z_dim": mem.z_dim, "base": {**mem.base_source, "sha256": mem.base_hash},
            "generator_weights": base["generator_base"], "discriminator_weights": base["discriminator_base"],
            "conversion": mem.conversion, "tasks": []}
    unreadable = {}
    for t in mem.tasks:
        r = mem.records[t]
        try:
            c = mem.parameter_counts(t)
        except CheckpointError as e:  # a damaged task file or knowledge base: listed, like any damaged task
            unreadable[t] = str(e)
            c = {"generator_style": None, "generator_stored": None, "generator_style_ratio": 0.0,
                 "discriminator_style": None, "discriminator_fc": 0}
        info["tasks"].append({"name": t, "classes": mem.num_classes(t), "class_names": r.get("classes"),
                              "generator_style": c["generator_style"], "generator_stored": c["generator_stored"],
                              "compressed": "compression" in r, "compression": r.get("compression"),
                              "generator_style_ratio": round(c["generator_style_ratio"], 4),
                              "discriminator_style": None if c["discriminator_style"] is None
                              else c["discriminator_style"] + c["discriminator_fc"],
                              "file": r.get("file"), "training": r.get("training", {}),
                              "metrics": r.get("metrics", {})})
    if args.layers:
        info["layers"] = mem.layer_names()
    problems = {}
    if args.verify:
        problems = {t: e for t, e in mem.verify().items() if e}
        problems.update({t: e for t, e in unreadable.items() if t not in problems})
        info["damaged"] = problems
    elif unreadable:
        info["damaged"] = unreadable
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
            extra = ", ".join(f"{k}={v}" for k, v in m.items() if k == "stopped_early" or k.startswith("fid"))
            if "pixfid8" in m:  # the task's score next to the base's on the same images
                score = f"pixfid8: base {m.get('pixfid8_source', '?')} -> task {m['pixfid8']}"
                extra = f"{score}, {extra}" if extra else score
            if t["name"] in unreadable:
                print(f"{i:>3} {t['name']:<18}{str(t['classes'] or '-'):>8}  DAMAGED: {unreadable[t['name']]}")
                continue
            print(f"{i:>3} {t['name']:<18}{str(t['classes'] or '-'):>8}{t['generator_style']:>11,}"
                  f"{100 * t['generator_style_ratio']:>7.1f}%{t['discriminator_style']:>10,}"
                  f"{m.get('iterations_done', '-')!s:>7}{m.get('train_seconds', '-')!s:>9}  {extra}")
    readable = [t for t in info["tasks"] if t["name"] not in unreadable]
    if readable:
        print("\n".join(storage_lines(readable)))
    if args.layers:
        print("modulated generator layers:", ", ".join(info["layers"]))
    if args.verify:
        for t in mem.tasks:
            print(f"  {t}: {'DAMAGED: ' + problems[t] if t in problems else 'ok (hash checked)'}")
    return 1 if problems else 0
