"""The ``gmem`` command line: ``gmem <command> [options]`` (also ``python -m gmem.cli``).

Each subcommand is a pair in ``COMMANDS``: ``name -> (add_arguments(parser), run(args) -> int)``.
Add a command by writing those two functions and registering them.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys


# ---------------------------------------------------------------- train-base
def _train_base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="?", default=None,
                   help="training images: a directory (searched recursively), an .npy/.npz file of uint8 "
                        "images [N, H, W(, C)], or an embedded demo set name (default: the embedded "
                        "source set gmem/assets/source/crawl_tiles.npz the default base was trained on)")
    p.add_argument("--out", default="runs/base", help="output directory: checkpoint.pt, samples/, log.jsonl "
                                                      "(default runs/base); an existing checkpoint is resumed")
    p.add_argument("--iterations", type=int, default=20000, help="total iterations (default 20000)")
    p.add_argument("--size", type=int, default=32, help="resolution, 4*2**k (default 32)")
    p.add_argument("--nf", type=int, default=32, help="base width; 64 at size 256 is the public GP-GAN (default 32)")
    p.add_argument("--z-dim", type=int, default=128, help="latent size (default 128)")
    p.add_argument("--embed-size", type=int, default=64, help="label embedding size (default 64)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate, betas (0, 0.99) (default 1e-4)")
    p.add_argument("--r1-gamma", type=float, default=10.0,
                   help="R1 penalty on real data, added as GAMMA * E||grad D(x)||^2 (the released code's "
                        "convention; the paper's gamma/2 notation) (default 10)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the sampling generator (default 0.999)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--sample-every", type=int, default=500, help="iterations between sample grids (default 500)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="iterations between checkpoints (default 500)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (at a checkpoint) after this much wall time")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/checkpoint.pt exists")
    p.add_argument("--restart", action="store_true",
                   help="if OUT/checkpoint.pt belongs to another run (other data or settings), discard it "
                        "and start over (without this, that is an error saying what differs)")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="after training, write the EMA generator + discriminator as a base "
                        "(base.json + base.safetensors, fp16) to DIR; load with gmem.models.load_base(DIR)")
    p.add_argument("--init", default=None, metavar="BASE_DIR",
                   help="start from the weights of a saved base (e.g. gmem/assets/base) to train it longer; "
                        "Adam starts fresh; the architecture flags must match the base")
    p.add_argument("--export-only", action="store_true",
                   help="do not train: export OUT/checkpoint.pt to the --export directory")


def _train_base_run(args: argparse.Namespace) -> int:
    from .data import SOURCE_DATA
    from .train_base import CHECKPOINT_NAME, export_base, train_base

    if args.export_only:
        if not args.export:
            raise SystemExit("gmem train-base: error: --export-only needs --export DIR")
        export_base(f"{args.out}/{CHECKPOINT_NAME}", args.export)
        print(f"exported {args.out}/{CHECKPOINT_NAME} to {args.export}")
        return 0
    if args.data is None:
        args.data = str(SOURCE_DATA)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # a CLI entry point: the only place that sets global state
    trainer = train_base(args.data, args.out, iterations=args.iterations, size=args.size, nf=args.nf,
                         z_dim=args.z_dim, embed_size=args.embed_size, batch_size=args.batch_size, lr=args.lr,
                         r1_gamma=args.r1_gamma, ema_decay=args.ema, seed=args.seed,
                         sample_every=args.sample_every, checkpoint_every=args.checkpoint_every,
                         max_minutes=args.max_minutes, resume=not args.no_resume, restart=args.restart,
                         device=args.device, init=args.init)
    print(f"trained to iteration {trainer.iteration}; checkpoint in {args.out}/checkpoint.pt")
    if args.export:
        export_base(f"{args.out}/{CHECKPOINT_NAME}", args.export, info={"data": str(args.data)})
        print(f"exported the base to {args.export}")
    return 0


COMMANDS = {
    "train-base": ("train the unconverted base GP-GAN (GP-GAN objective, R1, EMA)",
                   _train_base_args, _train_base_run),
}

# the GAN-memory commands: learn, sample, interpolate, demo in gmem/cli_memory.py, info, verify, remove in
# gmem/cli_info.py (registered through cli_memory), compress in gmem/cli_compress.py
from .cli_compress import COMPRESS_COMMANDS  # noqa: E402
from .cli_memory import MEMORY_COMMANDS  # noqa: E402

COMMANDS.update(MEMORY_COMMANDS)
COMMANDS.update(COMPRESS_COMMANDS)

from . import doctor as _doctor  # noqa: E402

COMMANDS["doctor"] = (_doctor.DESCRIPTION, _doctor.add_arguments, _doctor.run)

from . import cli_serve as _serve  # noqa: E402

COMMANDS["serve"] = (_serve.DESCRIPTION, _serve.add_arguments, _serve.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmem", description="GAN memory with no forgetting")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


DISTRIBUTED_COMMANDS = ("learn", "train-base")


@contextlib.contextmanager
def _distributed(args: argparse.Namespace):
    """Under torchrun: join the process group around the command (gloo for a CPU ``--device``, NCCL for
    ``cuda``, each rank then on ``cuda:LOCAL_RANK``) and print results on rank 0 only. No-op otherwise."""
    from . import distributed as dist

    if not dist.launched_by_torchrun():
        yield
        return
    if args.command not in DISTRIBUTED_COMMANDS and os.environ.get("WORLD_SIZE") != "1":
        raise ValueError(f"only {' and '.join(DISTRIBUTED_COMMANDS)} run under torchrun with several processes; "
                         f"run `gmem {args.command}` as one process")
    cuda = str(getattr(args, "device", "cpu")).startswith("cuda")
    runs = args.out if args.command == "train-base" else os.path.join(args.memory, "runs")  # checkpoints
    with dist.distributed(backend="nccl" if cuda else "gloo", resume_hint=runs) as info, \
            open(os.devnull, "w") as devnull:
        if cuda:
            args.device = str(info.device)
        with contextlib.redirect_stdout(devnull) if info.rank else contextlib.nullcontext():
            yield


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from .data import DataError
    from .distributed import PeerFailure
    from .models import CheckpointError

    try:
        with _distributed(args):  # torchrun --nproc_per_node N -m gmem.cli learn|train-base ...
            return COMMANDS[args.command][2](args) or 0
    except PeerFailure as e:  # another rank stopped: say so in one line, with how to resume
        return _user_error(args.command, str(e))
    except (DataError, CheckpointError, FileNotFoundError) as e:
        return _user_error(args.command, _os_message(e) if getattr(e, "errno", None) is not None else str(e))
    except (KeyError, IndexError, ValueError, TypeError) as e:  # unknown task, class out of range, bad values
        if isinstance(e, TypeError) and not _raised_by_gmem(e):
            raise  # a TypeError from deeper down is a bug: keep its traceback
        return _user_error(args.command, str(e.args[0] if e.args else e))
    except OSError as e:  # the machine said no: read-only or full disk, a file where a directory belongs...
        if e.errno is None:
            raise
        return _user_error(args.command, _os_message(e))


def _user_error(command: str, message: str) -> int:
    """Print the one line ``gmem <command>: error: <message>`` on stderr; returns the exit code 1."""
    print(f"gmem {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


def _os_message(e: OSError) -> str:
    import errno

    hint = {errno.ENOSPC: " (the disk is full; free some space and run the command again)",
            errno.EDQUOT: " (disk quota exceeded)", errno.EROFS: " (the file system is read-only)",
            errno.EACCES: " (no permission)"}.get(e.errno, "")
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or type(e).__name__}{where}{hint}"


def _raised_by_gmem(e: BaseException) -> bool:
    """Whether the innermost frame of ``e``'s traceback is gmem's own code (a check, not a crash)."""
    import os

    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    here = os.path.dirname(os.path.abspath(__file__))
    return tb is not None and here in os.path.abspath(tb.tb_frame.f_code.co_filename)


if __name__ == "__main__":
    sys.exit(main())
