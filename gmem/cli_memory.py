"""The GAN-memory commands of the ``gmem`` CLI: ``learn``, ``sample``, ``interpolate``, ``demo``, and
``info``, ``verify``, ``remove`` from :mod:`gmem.cli_info`.

Registered into :data:`gmem.cli.COMMANDS` (as :data:`MEMORY_COMMANDS`, in this order). A memory lives
in a directory (see :meth:`gmem.GANMemory.save`); ``learn`` creates it on the embedded base (or
``--base DIR``) when it does not exist yet, after checking everything it can before training
(:mod:`gmem.cli_checks`). Exit codes: 0 success, 1 an error (message on stderr), 2 bad usage, 3 the
demo found forgetting.
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from .cli_checks import open_memory
from .cli_info import INFO_COMMANDS


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    import math

    try:
        values = [float(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


# ---------------------------------------------------------------- learn
def _learn_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("memory", help="memory directory (created on the embedded base if it does not exist)")
    p.add_argument("name", help="name of the new task")
    p.add_argument("data", help="training images: a directory (recursively; resized), an .npy/.npz file of uint8 "
                                "images, or an embedded demo set (emoji, oxygen_icons, fashion_mnist)")
    p.add_argument("--iterations", type=int, default=2000, help="training iterations (default 2000)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate, betas (0, 0.99) (default 1e-4)")
    p.add_argument("--r1-gamma", type=float, default=10.0, help="R1 penalty weight (default 10)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the sampling style set (default 0.999)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--conditional", action="store_true",
                   help="learn a conditional task from the data's labels (class sub-folders / .npz 'labels')")
    p.add_argument("--base", default=None, metavar="DIR",
                   help="base for a NEW memory: a directory written by `gmem train-base --export` "
                        "(default: the embedded base)")
    p.add_argument("--sample-every", type=int, default=None, help="iterations between sample grids")
    p.add_argument("--checkpoint-every", type=int, default=None, help="iterations between checkpoints")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early after this much training time")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--background", default=None,
                   help="colour that transparent pixels of image files are composited over: black (the default, "
                        "as the embedded sets), white, a grey level 0..255 or R,G,B")
    p.add_argument("--compress", action="store_true",
                   help="learn with the paper's low-rank prior and shared knowledge base (generator blocks B0-B3); "
                        "the task is stored as coefficients plus new basis columns")
    p.add_argument("--keep", type=float, default=None,
                   help="with --compress: energy fraction kept after the task (default: by layer width, "
                        "1.0 below 256 channels, as the released code)")
    p.add_argument("--compress-fc", action="store_true",
                   help="with --compress: also compress the fc's mFiLM gamma/beta ((16 nf) x (s0*s0) matrices)")
    p.add_argument("--no-score", action="store_true", help="skip the pixFID8 quality score after training")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _learn_preflight(args):
    """Everything ``learn`` can check before training; returns ``(memory dir, GANMemory, device)``."""
    from . import cli_checks, store
    from .memory import MANIFEST, GANMemory
    from .models import load_base

    store.validate_task_name(args.name)
    if isinstance(args.iterations, bool) or args.iterations < 0:
        raise ValueError(f"--iterations must be >= 0, got {args.iterations}")
    cli_checks.check_number(args.lr, "--lr", 0, 1e3, low_open=True)
    cli_checks.check_number(args.r1_gamma, "--r1-gamma", 0, 1e9)
    cli_checks.check_number(args.ema, "--ema", 0, 1)
    if args.max_minutes is not None:
        cli_checks.check_number(args.max_minutes, "--max-minutes", 0, 1e9, low_open=True)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if getattr(args, "keep", None) is not None:
        if not getattr(args, "compress", False):
            raise ValueError("--keep applies with --compress only")
    if getattr(args, "compress_fc", False) and not getattr(args, "compress", False):
        raise ValueError("--compress-fc applies with --compress only")
        cli_checks.check_number(args.keep, "--keep", 0, 1)
    if args.background is not None:
        from .data import _background

        _background(args.background)
    device = cli_checks.check_device(args.device)
    memory = cli_checks.check_writable_directory(args.memory)
    if (memory / MANIFEST).is_file():
        if args.base:
            raise ValueError(f"--base applies to a new memory only; {memory} exists already")
        mem = GANMemory.load(memory)
        if args.name in mem.tasks:
            raise ValueError(f"task {args.name!r} exists already in {memory} (tasks: {mem.tasks})")
        for task, problem in store.verify_files(memory).items():
            if problem:
                raise ValueError(f"{problem}; drop it with `gmem remove {memory} {task}` or repair the memory "
                                 f"with `gmem verify {memory} --repair`, then learn again")
    else:
        mem = GANMemory.from_base(*load_base(args.base)) if args.base else GANMemory.default()
    cli_checks.check_batch_size(mem, args.batch_size, device)
    return memory, mem, device


def _learn_run(args) -> int:
    import torch

    from . import distributed as dist
    from . import store
    from .data import as_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    memory, mem, device = _learn_preflight(args)
    dataset = as_dataset(args.data, mem.size, mem.channels, background=args.background)
    mem.to(device)
    # under torchrun rank 0 claims the name for every rank (the claim is one process's exclusive lock)
    claim = (store.claim(memory, args.name) if dist.is_main()
             else contextlib.nullcontext(memory / "runs" / store.run_dir_name(args.name)))
    with claim as run_dir:
        try:  # another process may have finished learning this name since the preflight read the memory
            if args.name in {e["name"] for e in store.read_manifest(memory)["tasks"]}:
                raise ValueError(f"task {args.name!r} was just added to {memory} by another process")
        except FileNotFoundError:
            pass
        return _learn_train(args, memory, mem, dataset, run_dir)


def _learn_train(args, memory, mem, dataset, run_dir) -> int:
    import torch

    from . import distributed as dist
    from .compress.knowledge import DEFAULT_LAYERS, WITH_FC
    from .data import batch
    from .eval import pixel_fid

    layers = WITH_FC if getattr(args, "compress_fc", False) else DEFAULT_LAYERS
    try:
        mem.learn(args.name, dataset, iterations=args.iterations, batch_size=args.batch_size, seed=args.seed,
                  labels=True if args.conditional else None, lr=args.lr, r1_gamma=args.r1_gamma,
                  ema_decay=args.ema, out_dir=run_dir, sample_every=args.sample_every,
                  checkpoint_every=args.checkpoint_every,
                  max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
                  progress=not args.no_progress,
                  compress={"keep": getattr(args, "keep", None), "layers": layers}
                  if getattr(args, "compress", False) else False)
    except KeyboardInterrupt:
        import sys

        print(f"gmem learn: interrupted; the memory is unchanged. Run the same command again to resume from "
              f"the last checkpoint in {run_dir}/", file=sys.stderr)
        return 130
    mem.records[args.name]["training"]["data"] = str(args.data)
    if not args.no_score and dist.is_main():  # under torchrun rank 0 scores and saves, the others wait
        n = min(256, len(dataset))
        real = batch(dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n])
        mem.set_metric(args.name, "pixfid8", round(pixel_fid(real, mem.sample(args.name, n, seed=0)), 3))
    if dist.is_main():
        mem.save(memory)
    dist.barrier()
    m = mem.records[args.name]["metrics"]
    print(f"learned task {args.name!r} ({m['iterations_done']} iterations, {m['train_seconds']} s"
          + (f", pixFID8 {m['pixfid8']}" if "pixfid8" in m else "") + f"); memory saved to {memory}")
    return 0


# ---------------------------------------------------------------- sample
def _sample_args(p: argparse.ArgumentParser) -> None:
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


def _sample_run(args) -> int:
    import torch

    from .cli_checks import image_format, write_grid

    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    image_format(args.out)
    if args.tensor and Path(args.tensor).is_dir():
        raise ValueError(f"--tensor {args.tensor} is a directory; give a file name such as "
                         f"{args.tensor}/samples.safetensors")
    mem = open_memory(args.memory)
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
    write_grid(images, args.out, nrow=args.n, scale=args.scale)
    if args.tensor:
        from safetensors.torch import save_file

        save_file({"images": images.contiguous()}, args.tensor)
    print(f"wrote {images.shape[0]} samples of {args.tasks} to {args.out}")
    return 0


# ---------------------------------------------------------------- interpolate
def _interp_args(p: argparse.ArgumentParser) -> None:
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


def _interp_run(args) -> int:
    import torch

    from .cli_checks import image_format, write_grid

    if args.steps < 2 and args.lam is None:
        raise ValueError("--steps must be >= 2")
    image_format(args.out)
    mem = open_memory(args.memory)
    lams = args.lam or torch.linspace(0, 1, args.steps).tolist()
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


# ---------------------------------------------------------------- demo
def _demo_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate (default 1e-3: 10x the paper's 1e-4, sized to the short demo runs)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1: robust on a busy machine)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _demo_run(args) -> int:
    from .demo import run_demo

    iterations = args.iterations or (3000 if args.long else 400)
    budget = args.time_budget if args.time_budget is not None else (1e9 if args.long else 360.0)
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    return run_demo(args.out, tasks=tasks, iterations=iterations, time_budget=budget, lr=args.lr, seed=args.seed,
                    threads=args.threads, base=args.base, device=args.device,
                    progress=not args.no_progress)


MEMORY_COMMANDS = {
    "learn": ("learn a new task into a GAN memory directory (created on the embedded base if missing)",
              _learn_args, _learn_run),
    "sample": ("draw samples of one or more tasks of a GAN memory as a PNG grid", _sample_args, _sample_run),
    "interpolate": ("interpolate between two tasks' styles (all or some groups/layers) for fixed latents",
                    _interp_args, _interp_run),
    **INFO_COMMANDS,  # info, verify, remove (gmem/cli_info.py)
    "demo": ("learn the embedded demo tasks in sequence, show samples, interpolations and no forgetting "
             "(`make demo`; outputs in runs/demo)", _demo_args, _demo_run),
}
