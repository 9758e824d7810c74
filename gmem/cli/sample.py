"""``gmem sample MEMORY TASK...``: samples of one or more tasks as an image grid.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .checks import MAX_SAMPLES, MAX_SCALE, check_grid, check_int, check_seed, image_format, open_memory, write_grid

HELP = "draw samples of one or more tasks of a GAN memory as a PNG grid"


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("memory", help="memory directory")
    p.add_argument("tasks", nargs="+", help="task name(s); 'source' is the base. Several tasks: one row each, "
                                            "all drawn in one mixed-task forward")
    p.add_argument("-n", "--n", type=int, default=8, help="samples per task (default 8)")
    p.add_argument("--seed", type=int, default=0, help="latent seed: the same seed gives the same images (default 0)")
    p.add_argument("--labels", type=_ints, default=None,
                   help="classes for a conditional task, comma-separated, one per sample (default 0,1,2,...)")
    p.add_argument("--out", default="samples.png",
                   help="image grid to write; the suffix names the format "
                        "(.png, .jpg, .webp, ...; default samples.png)")
    p.add_argument("--tensor", default=None, metavar="FILE",
                   help="also write the images as a safetensors file (key 'images', [N, C, H, W] in [-1, 1])")
    p.add_argument("--scale", type=int, default=2, help="integer upscaling of the PNG (default 2)")


def run(args) -> int:
    import torch

    check_int(args.n, "-n", 1, MAX_SAMPLES)
    check_int(args.scale, "--scale", 1, MAX_SCALE)
    check_seed(args.seed)
    check_int(args.n * len(args.tasks), "-n times the number of tasks", 1, MAX_SAMPLES)
    image_format(args.out)
    if args.tensor and Path(args.tensor).is_dir():
        raise ValueError(f"--tensor {args.tensor} is a directory; give a file name such as "
                         f"{args.tensor}/samples.safetensors")
    mem = open_memory(args.memory)
    check_grid(args.n * len(args.tasks), args.n, mem.size, args.scale)
    z = mem.latents(args.n, seed=args.seed)
    if args.labels is not None and len(args.labels) not in (1, args.n):
        raise ValueError(f"--labels needs 1 or n={args.n} values, got {len(args.labels)}")
    labels = None if args.labels is None else torch.tensor(args.labels * (args.n if len(args.labels) == 1 else 1))
    if len(args.tasks) == 1:
        images = mem.sample(args.tasks[0], z=z, labels=labels)
    else:
        per_task = [t for t in args.tasks for _ in range(args.n)]
        lab = None
        if labels is not None:
            lab = torch.cat([labels if mem.num_classes(t) else torch.zeros_like(labels) for t in args.tasks])
        images = mem.sample(per_task, z=z.repeat(len(args.tasks), 1), labels=lab)
    write_grid(images, args.out, nrow=args.n, scale=args.scale, row_labels=args.tasks if len(args.tasks) > 1 else None)
    if args.tensor:
        from safetensors.torch import save_file

        save_file({"images": images.contiguous()}, args.tensor)
    print(f"wrote {images.shape[0]} samples of {args.tasks} to {args.out}")
    return 0
