"""The process group: joining it from torchrun's environment, who this rank is, failures, barriers."""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as tdist

__all__ = ["DistInfo", "PeerFailure", "barrier", "distributed", "ensure_joined", "init", "is_initialized",
           "is_main", "launched_by_torchrun", "local_rank", "rank", "shutdown", "world_size"]

TIMEOUT_ENV = "GMEM_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_state = {"owned": False, "resume_hint": None}


class PeerFailure(RuntimeError):
    """A collective failed or timed out: another rank died, hung or cannot be reached."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its ``local_rank`` on the node,
    the ``backend`` (``"nccl"``, ``"gloo"`` or ``None`` for a single process) and its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    backend: Optional[str]
    device: torch.device


def launched_by_torchrun() -> bool:
    """True when the environment names this process's rank (torchrun sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(key: str) -> int:
    try:
        return int(os.environ[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={os.environ[key]!r} is not an integer") from None


def _timeout_s(timeout_s: Optional[float]) -> float:
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV)
        try:
            timeout_s = float(raw) if raw is not None else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    return float(timeout_s)


def init(*, backend: Optional[str] = None, timeout_s: Optional[float] = None,
         resume_hint: Optional[str] = None) -> DistInfo:
    """Join the process group described by torchrun's environment; a no-op for a single process.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. ``backend`` defaults to NCCL
    when CUDA is available (each rank then uses ``cuda:LOCAL_RANK``) and gloo otherwise.
    ``timeout_s`` bounds every collective (and the rendezvous). ``resume_hint`` (e.g. the checkpoint
    path) is quoted in :class:`PeerFailure` messages. Calling it again, or after the caller
    initialised ``torch.distributed`` itself, returns the current state without re-initialising.
    """
    if resume_hint is not None:
        _state["resume_hint"] = str(resume_hint)
    if tdist.is_available() and tdist.is_initialized():
        return _info()
    if not launched_by_torchrun():
        if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
            raise ValueError("incomplete torchrun environment: RANK and WORLD_SIZE must both be set "
                             "(launch with torchrun, or unset them to run one process)")
        return _info()
    missing = [k for k in _ENV_KEYS if k not in os.environ and k != "LOCAL_RANK"]
    if missing:
        raise ValueError(f"incomplete torchrun environment: {', '.join(missing)} not set")
    rank_, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"invalid torchrun environment: RANK={rank_} must lie in [0, WORLD_SIZE={world})")
    if not tdist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; it cannot run under torchrun")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    timeout = datetime.timedelta(seconds=_timeout_s(timeout_s))
    kwargs = {}
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA, which is not available; use 'gloo'")
        device = torch.device("cuda", _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0)
        torch.cuda.set_device(device)
        kwargs["device_id"] = device  # binds the communicator to this rank's GPU at once
    try:
        tdist.init_process_group(backend, init_method="env://", rank=rank_, world_size=world,
                                 timeout=timeout, **kwargs)
    except (RuntimeError, ValueError) as e:
        raise PeerFailure(f"gmem.distributed: rank {rank_} of {world} could not join the process group at "
                          f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({e}). Check that every "
                          "rank was started and can reach that address, then launch again.") from e
    _state["owned"] = True
    return _info()


def shutdown() -> None:
    """Destroy the process group if :func:`init` created it (safe to call at any time)."""
    if _state["owned"] and tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    _state["owned"] = False
    _state["resume_hint"] = None


def _rerun_advice() -> str:
    hint = _state["resume_hint"]
    return (f"rerun the same command: training resumes from the last checkpoint{f' ({hint})' if hint else ''}, "
            "with any number of processes that divides the global batch.")


def _on_sigterm(signum, frame):
    raise PeerFailure(f"gmem.distributed: rank {rank()} of {world_size()} was stopped by SIGTERM (torchrun stops "
                      "every rank when one fails and names the first failure in its summary; a scheduler may also "
                      f"have ended the job). Once the cause is fixed, {_rerun_advice()}")


@contextlib.contextmanager
def distributed(*, backend: Optional[str] = None, timeout_s: Optional[float] = None,
                resume_hint: Optional[str] = None) -> Iterator[DistInfo]:
    """``with distributed() as info:`` :func:`init` on entry, :func:`shutdown` on exit (even on errors).

    With several ranks, SIGTERM (sent by torchrun to the other ranks when one fails) raises
    :class:`PeerFailure` inside the block, so the rank unwinds and says how to resume; this handler
    is installed only over the default one, from the main thread, and removed on exit.
    """
    owned_before = _state["owned"] or (tdist.is_available() and tdist.is_initialized())
    info = init(backend=backend, timeout_s=timeout_s, resume_hint=resume_hint)
    previous = None
    if (info.world_size > 1 and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield info
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if not owned_before:
            shutdown()


def is_initialized() -> bool:
    """True when a process group is up (torchrun launch after :func:`init`, or the caller's own)."""
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes in the group (1 without a process group)."""
    return tdist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's index on its node (LOCAL_RANK; 0 without a process group)."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_initialized() else 0


def is_main() -> bool:
    """True on rank 0: the one process that writes files, samples and progress."""
    return rank() == 0


def _info() -> DistInfo:
    if not is_initialized():
        return DistInfo(0, 1, 0, None, torch.device("cpu"))
    backend = str(tdist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistInfo(rank(), world_size(), local_rank(), backend, device)


def _collective(what: str, fn: Callable, *args, **kwargs):
    """Run one collective; a failure (dead or hung peer, lost connection) becomes :class:`PeerFailure`."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # DistBackendError, DistNetworkError, gloo/NCCL errors, timeouts
        cause = (str(e).strip().splitlines() or [""])[0]
        raise PeerFailure(
            f"gmem.distributed: rank {rank()} of {world_size()}: {what} failed because another rank stopped, "
            f"hung or cannot be reached ({type(e).__name__}: {cause}). This rank stops too. Look for the first "
            f"failing rank in the launcher's output (torchrun prints a summary), fix it, then "
            f"{_rerun_advice()}") from e


def barrier() -> None:
    """Wait until every rank gets here (no-op for a single process); bounded by the timeout."""
    if world_size() > 1:
        _collective("barrier", tdist.barrier)




def ensure_joined() -> None:
    """RuntimeError when torchrun started several processes but this one has not joined their group.

    Training code calls it before it starts: without the group every rank would train the whole
    batch on its own and all of them would write the same files.
    """
    if is_initialized() or not launched_by_torchrun():
        return
    if _env_int("WORLD_SIZE") > 1:
        raise RuntimeError(f"launched by torchrun as rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} "
                           "but not joined to the process group: run the training inside "
                           "`with gmem.distributed.distributed():` (the gmem CLI does this itself)")
