"""``gmem learn MEMORY NAME DATA``: learn a new task into a memory directory.

The memory is created on the embedded base (or ``--base DIR``) when it does not exist yet, after
checking everything that can be checked before training (:mod:`gmem.cli.checks`). The task name is
claimed in the store while it trains (:meth:`gmem.store.Store.claim`); the memory is saved at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import os

from ..store import MANIFEST, Store, validate_task_name
from ..store.files import run_dir_name
from ..store.gc import RUNS_DIR
from . import checks as cli_checks

HELP = "learn a new task into a GAN memory directory (created on the embedded base if missing)"


def _learn_preflight(args):
    """Everything ``learn`` can check before training; returns ``(memory dir, GANMemory, device)``."""
    from ..memory import GANMemory
    from ..models import load_base

    validate_task_name(args.name)
    if isinstance(args.iterations, bool) or args.iterations < 0:
        raise ValueError(f"--iterations must be >= 0, got {args.iterations}")
    cli_checks.check_seed(args.seed)
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
        cli_checks.check_number(args.keep, "--keep", 0, 1)
    if getattr(args, "no_compress_fc", False) and not getattr(args, "compress", False):
        raise ValueError("--no-compress-fc applies with --compress only")
    if args.background is not None:
        from ..data import _background

        _background(args.background)
    device = cli_checks.check_device(args.device)
    memory = cli_checks.check_writable_directory(args.memory)
    if (memory / MANIFEST).is_file() or (memory / MANIFEST).is_symlink():
        if args.base:
            raise ValueError(f"--base applies to a new memory only; {memory} exists already")
        mem = cli_checks.open_memory(memory)
        if args.name in mem.tasks:
            raise ValueError(f"task {args.name!r} exists already in {memory} (tasks: {mem.tasks})")
        for task, problem in Store(memory).verify_files().items():
            if problem:
                raise ValueError(f"{problem}; drop it with `gmem remove {memory} {task}` or repair the memory "
                                 f"with `gmem verify {memory} --repair`, then learn again")
    elif cli_checks.has_task_files(memory):  # a lost manifest: learning would start a new memory over them
        raise ValueError(f"{memory} has task files but no {MANIFEST}; rebuild it from them with "
                         f"`gmem verify {memory} --repair`, then learn again")
    else:
        mem = GANMemory.from_base(*load_base(args.base)) if args.base else GANMemory.default()
    cli_checks.check_batch_size(mem, args.batch_size, device)
    return memory, mem, device


def _learn_train(args, memory, mem, dataset, run_dir) -> int:
    import torch

    from .. import distributed as dist
    from ..compress.knowledge import DEFAULT_LAYERS, RELEASED_LAYERS
    from ..data import batch
    from ..eval import pixel_fid

    layers = RELEASED_LAYERS if getattr(args, "no_compress_fc", False) else DEFAULT_LAYERS
    try:
        mem.learn(args.name, dataset, iterations=args.iterations, batch_size=args.batch_size, seed=args.seed,
                  labels=True if args.conditional else None, lr=args.lr, r1_gamma=args.r1_gamma,
                  ema_decay=args.ema, out_dir=run_dir, sample_every=args.sample_every,
                  checkpoint_every=args.checkpoint_every,
                  max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
                  progress=not args.no_progress, restart=args.restart,
                  compress={"keep": getattr(args, "keep", None), "layers": layers}
                  if getattr(args, "compress", False) else False)
    except KeyboardInterrupt:
        import sys

        print(f"gmem learn: interrupted; the memory is unchanged. Run the same command again to resume from "
              f"the last checkpoint in {run_dir}/", file=sys.stderr)
        return 130
    mem.records[args.name]["training"]["data"] = str(args.data)
    if dist.is_main():  # the training is saved first: scoring can only add to it
        mem.save(memory)
    if not args.no_score and dist.is_main():  # under torchrun rank 0 scores and saves, the others wait
        import sys

        if len(dataset) < 2:
            print(f"gmem learn: warning: not scored: pixFID8 needs at least 2 images, the data has "
                  f"{len(dataset)}", file=sys.stderr)
        else:
            try:
                n = min(256, len(dataset))
                real = batch(dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n])
                task_fid = round(pixel_fid(real, mem.sample(args.name, n, seed=0)), 3)
                # the base's score on the same images: what learning the task gained (gmem info shows both)
                source_fid = round(pixel_fid(real, mem.sample("source", n, seed=0)), 3)
            except Exception as e:  # noqa: BLE001 - the task is saved; a score is not worth losing it
                print(f"gmem learn: warning: the task is saved but could not be scored ({type(e).__name__}: "
                      f"{' '.join(str(e).split())})", file=sys.stderr)
            else:
                mem.set_metric(args.name, "pixfid8", task_fid)
                mem.set_metric(args.name, "pixfid8_source", source_fid)
                mem.save(memory)
    dist.barrier()
    m = mem.records[args.name]["metrics"]
    threads = torch.get_num_threads()
    policy = f", OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}" if "OMP_WAIT_POLICY" in os.environ else ""
    print(f"learned task {args.name!r} ({m['iterations_done']} iterations, {m['train_seconds']} s, "
          f"{threads} torch thread{'s' if threads > 1 else ''}{policy}"
          + (f", pixFID8 base {m['pixfid8_source']} -> task {m['pixfid8']}" if "pixfid8" in m else "")
          + f"); memory saved to {memory}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1, or OMP_NUM_THREADS: robust on a busy machine; README "
                        "\"Threads\")")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--background", default=None,
                   help="colour that transparent pixels of image files are composited over: black (the default, "
                        "as the embedded sets), white, a grey level 0..255 or R,G,B")
    p.add_argument("--compress", action="store_true",
                   help="learn with the paper's low-rank prior and shared knowledge base (generator blocks B0-B3 and "
                        "the fc's gamma/beta); "
                        "the task is stored as coefficients plus new basis columns")
    p.add_argument("--keep", type=float, default=None,
                   help="with --compress: energy fraction kept after the task by the released energy rule "
                        "(default: the residual rule, gmem.compress.ResidualEnergyRule)")
    p.add_argument("--no-compress-fc", action="store_true",
                   help="with --compress: compress blocks B0-B3 only, as the released code (the fc's gamma/beta "
                        "stay dense)")
    p.add_argument("--no-score", action="store_true", help="skip the pixFID8 quality score after training")
    p.add_argument("--restart", action="store_true",
                   help="discard a checkpoint of an earlier, different run of this task (other data or settings) "
                        "and train from the start; without it such a checkpoint is refused, and one of the same "
                        "run is resumed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import torch

    from .. import distributed as dist
    from ..data import as_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    from pathlib import Path

    new = not Path(args.memory).exists()
    try:
        return _run(args, dist, as_dataset)
    except BaseException:
        if new:
            _remove_if_empty(Path(args.memory))
        raise


def _remove_if_empty(directory) -> None:
    """Remove the empty folders of a memory directory this command created (a failed first ``learn``
    leaves no empty memory behind); anything holding a file, e.g. another learner's, stays."""
    for root, _, _ in sorted(os.walk(directory), key=lambda w: -len(w[0])):  # deepest first
        with contextlib.suppress(OSError):
            os.rmdir(root)


def _run(args, dist, as_dataset) -> int:
    memory, mem, device = _learn_preflight(args)
    dataset = as_dataset(args.data, mem.size, mem.channels, background=args.background)
    mem.to(device)
    # under torchrun rank 0 claims the name for every rank (the claim is one process's exclusive lock)
    store = Store(memory)
    claim = (store.claim(args.name) if dist.is_main()
             else contextlib.nullcontext(memory / RUNS_DIR / run_dir_name(args.name)))
    with claim as run_dir:
        try:  # another process may have finished learning this name since the preflight read the memory
            if args.name in {e["name"] for e in store.read_manifest()["tasks"]}:
                raise ValueError(f"task {args.name!r} was just added to {memory} by another process")
        except FileNotFoundError:
            pass
        print(_data_summary(args.data, dataset, run_dir), flush=True)
        from ..training.loop import stop_on_sigterm

        with stop_on_sigterm():  # `kill PID` stops like Ctrl-C, with a checkpoint to resume from
            return _learn_train(args, memory, mem, dataset, run_dir)


def _data_summary(data, dataset, run_dir, shown: int = 5) -> str:
    """What ``learn`` trains on and where its training output goes, for the first lines of its output."""
    text = f"gmem learn: {len(dataset)} images from {data}"
    skipped = getattr(dataset, "skipped", None) or []  # an image folder lists the files it left out
    if skipped:
        names = ", ".join(str(p.name) for p in skipped[:shown])
        more = f" and {len(skipped) - shown} more" if len(skipped) > shown else ""
        text += f" (skipped {len(skipped)} files that are not images: {names}{more})"
    return text + f"; sample grids and checkpoints in {run_dir}/"
