"""``gmem compress MEMORY [TASK...]``, and the storage table of ``gmem info`` (naive vs stored values).
"""
from __future__ import annotations

import argparse

from . import checks as cli_checks

HELP = "compress naive tasks of a memory into its shared knowledge base (post-hoc, paper Sec. 4.3)"


def storage_lines(tasks: list[dict]) -> list[str]:
    """The paper's Table 1 layout: per task the naive generator style values, what is stored, the ratio."""
    lines = ["storage (generator style values, as in the paper's Table 1):",
             f"    {'task':<18}{'naive':>11}{'stored':>11}{'stored/naive':>14}  mode"]
    naive_total = stored_total = 0
    for t in tasks:  # no index column: the task table above has it (and scripts parse it)
        naive, stored = t["generator_style"], t["generator_stored"]
        naive_total, stored_total = naive_total + naive, stored_total + stored
        dense = (t.get("compression") or {}).get("dense_layers")
        lines.append(f"    {t['name']:<18}{naive:>11,}{stored:>11,}{100 * stored / naive:>13.1f}%  "
                     f"{'compressed' if t.get('compressed') else 'naive'}"
                     + (f" (stored dense, factors would cost more: {', '.join(dense)})" if dense else ""))
    lines.append(f"    {'all tasks':<18}{naive_total:>11,}{stored_total:>11,}"
                 f"{100 * stored_total / max(naive_total, 1):>13.1f}%")
    return lines


def compress_layers(layers, fc: bool):
    """The layer selection of ``--layers GLOB...`` / ``--compress-fc`` (None: the defaults, B0-B3 and the fc)."""
    from ..compress.knowledge import DEFAULT_LAYERS, FC_LAYER

    if not fc:
        return layers
    layers = list(layers or DEFAULT_LAYERS)
    return layers if FC_LAYER in layers else layers + [FC_LAYER]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("memory", help="memory directory")
    p.add_argument("tasks", nargs="*", help="naive task(s) to compress (default: every naive task, in order)")
    p.add_argument("--keep", type=float, default=None,
                   help="energy fraction kept by the released energy rule (default: the residual rule, "
                        "gmem.compress.ResidualEnergyRule)")
    p.add_argument("--layers", nargs="+", default=None, metavar="GLOB",
                   help="generator layers to compress (default: blocks B0-B3, resnet_0_0 .. resnet_3_0, and fc)")
    p.add_argument("--compress-fc", action="store_true",
                   help="with --layers: also compress the generator fc's mFiLM gamma/beta, viewed as (16 nf) x (s0*s0) "
                        "matrices (the default layers include it)")


def run(args) -> int:
    from ..memory.compression import is_compressed

    if args.keep is not None:
        cli_checks.check_number(args.keep, "--keep", 0, 1)
    mem = cli_checks.open_memory(args.memory)
    names = args.tasks or [t for t in mem.tasks if not is_compressed(mem, t)]
    for name in names:
        mem.task_name(name)  # unknown names fail before anything changes
        if is_compressed(mem, name):
            raise ValueError(f"task {name!r} is compressed already")
    if not names:
        print(f"{args.memory}: no naive task to compress")
        return 0
    layers = compress_layers(args.layers, args.compress_fc)
    for name in names:
        rec = mem.compress(name, keep=args.keep, layers=layers)
        c = mem.parameter_counts(name)
        dense = rec.get("dense_layers") or []
        print(f"compressed {name!r}: generator stores {c['generator_stored']:,} of {c['generator_style']:,} values "
              f"({100 * c['generator_stored'] / c['generator_style']:.1f}%), max relative error "
              f"{rec['max_rel_error']:.3g}" + (f"; stored dense (factors would cost more): {', '.join(dense)}"
                                               if dense else ""))
    mem.save(args.memory)
    print(f"memory saved to {args.memory}")
    return 0
