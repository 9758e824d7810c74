"""The ``gmem`` command line: ``gmem <command> [options]`` (also ``python -m gmem.cli``).

One module per command (``gmem/cli/<command>.py``: ``HELP``, ``add_arguments(parser)``,
``run(args) -> int``) and one table, :data:`COMMANDS`. Add a command by writing such a module and
adding it to the table. :mod:`gmem.cli.checks` holds the checks commands share before they work.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys

from .. import doctor
from . import compress, demo, info, interpolate, learn, remove, sample, serve, train_base, verify

#: ``gmem <name>`` -> ``(help, add_arguments(parser), run(args) -> int)``, in the order ``--help`` lists them
COMMANDS = {name: (module.HELP, module.add_arguments, module.run) for name, module in {
    "train-base": train_base,
    "learn": learn,
    "sample": sample,
    "interpolate": interpolate,
    "info": info,
    "verify": verify,
    "remove": remove,
    "demo": demo,
    "compress": compress,
    "serve": serve,
}.items()}
COMMANDS["doctor"] = (doctor.DESCRIPTION, doctor.add_arguments, doctor.run)


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
    from .. import distributed as dist

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
    import warnings

    # a warning is one line for the user, not a source line of gmem
    old_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *_a, **_k: f"gmem {args.command}: warning: {message}\n"
    try:
        return _run(args)
    finally:
        warnings.formatwarning = old_format


#: commands that choose their own threads (the demo: 1; doctor times the ops as the machine is)
OWN_THREADS = ("demo", "doctor")


def default_threads(args: argparse.Namespace) -> None:
    """One torch CPU thread unless ``--threads N`` or ``OMP_NUM_THREADS`` says otherwise (README "Threads"):
    on a busy shared machine two spinning OpenMP threads were 2x-100x slower than one, and one was never
    more than 1.5x slower than the best setting measured."""
    if args.command in OWN_THREADS or getattr(args, "threads", None) or os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    torch.set_num_threads(1)


def _run(args) -> int:
    default_threads(args)
    from ..data import DataError
    from ..distributed import PeerFailure
    from ..models import CheckpointError

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
    hint = {errno.ENOSPC: " (the disk is full; free some space and run the command again)",
            errno.EDQUOT: " (disk quota exceeded)", errno.EROFS: " (the file system is read-only)",
            errno.EACCES: " (no permission)"}.get(e.errno, "")
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or type(e).__name__}{where}{hint}"


def _raised_by_gmem(e: BaseException) -> bool:
    """Whether the innermost frame of ``e``'s traceback is gmem's own code (a check, not a crash)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # gmem/
    return tb is not None and here in os.path.abspath(tb.tb_frame.f_code.co_filename)
