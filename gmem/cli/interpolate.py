"""``gmem interpolate MEMORY A B``: style interpolation between two tasks for fixed latents.
"""
from __future__ import annotations

import argparse

from .checks import MAX_SAMPLES, MAX_SCALE, check_grid, check_int, check_seed, image_format, open_memory, write_grid

HELP = "interpolate between two tasks' styles (all or some groups/layers) for fixed latents"


def _floats(text: str) -> list[float]:
    import math

    try:
        values = [float(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("memory", help="memory directory")
    p.add_argument("task_a", help="start task ('source' allowed)")
    p.add_argument("task_b", help="end task")
    p.add_argument("--steps", type=int, default=8, help="lambda values from 0 to 1 (default 8)")
    p.add_argument("--lam", type=_floats, default=None, help="explicit lambda values, comma-separated")
    p.add_argument("-n", "--n", type=int, default=4, help="latents, one row each (default 4)")
    p.add_argument("--seed", type=int, default=0, help="latent seed (default 0)")
    p.add_argument("--groups", default="gamma,beta,bias",
                   help="parameter groups that mix: gamma/scale, beta/shift, bias (default all)")
    p.add_argument("--layers", default=None,
                   help="comma-separated globs of generator layers that mix, e.g. 'fc,resnet_0_0.*' "
                        "(per-block swap; default all; see `gmem info --layers`)")
    p.add_argument("--out", default="interpolation.png",
                   help="image grid to write; the suffix names the format (default interpolation.png)")
    p.add_argument("--scale", type=int, default=2, help="integer upscaling of the PNG (default 2)")


def run(args) -> int:
    import torch

    if args.lam is None:
        check_int(args.steps, "--steps", 2, MAX_SAMPLES)
    check_int(args.n, "-n", 1, MAX_SAMPLES)
    check_int(args.scale, "--scale", 1, MAX_SCALE)
    check_seed(args.seed)
    image_format(args.out)
    mem = open_memory(args.memory)
    lams = args.lam or torch.linspace(0, 1, args.steps).tolist()
    check_grid(len(lams) * args.n, len(lams), mem.size, args.scale, option="-n or --steps")
    groups = [g for g in args.groups.split(",") if g]
    layers = [g for g in args.layers.split(",") if g] if args.layers else None
    if layers:
        import fnmatch

        names = mem.layer_names()
        unmatched = [g for g in layers if not any(fnmatch.fnmatchcase(n, g) or fnmatch.fnmatchcase(n.split(".")[0], g)
                                                  for n in names)]
        if unmatched:
            raise ValueError(f"--layers {unmatched} match no modulated generator layer; layers: {names}")
    strip = mem.interpolate(args.task_a, args.task_b, lams, args.n, seed=args.seed, groups=groups, layers=layers)
    write_grid(strip.transpose(0, 1).reshape(-1, *strip.shape[2:]), args.out, nrow=len(lams), scale=args.scale)
    print(f"wrote {args.task_a} -> {args.task_b} at lambda {[round(v, 3) for v in lams]} to {args.out}")
    return 0
