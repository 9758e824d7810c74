"""Scale-out of one task over many processes: torchrun launch, gradient sync, sharded data, rank 0 I/O.

Launch (one process per GPU; gloo on CPU)::

    torchrun --nproc_per_node N -m gmem.cli learn MEMORY NAME DATA ...

Without torchrun every function here is a no-op for a single process (rank 0 of 1), so the same
trainer code runs in both cases.

What scales. Each of the ``N`` ranks takes ``global_batch / N`` images of every global batch (it must
divide evenly): one step of ``N`` ranks sees exactly the images, latents and noise of one step of a
single process with the same seed, and the averaged gradients give its update up to the order of the
floating-point sum. Keep the learning rate when you keep the global batch; growing the global batch
with ``N`` is a different run (rescale the lr as you would for a larger batch on one process).

Why an explicit all-reduce, not ``DistributedDataParallel``. Only the task's trainable parameters
(style sets, per-task copies such as the discriminator head) are synchronised; the frozen base is the
same on every rank and never enters a bucket. One GP-GAN step backpropagates the generator loss
through a discriminator whose parameters are switched off (``requires_grad_(False)``), then runs two
discriminator forwards and backwards (real with R1, fake) before one optimiser step, and R1 is a
double backward (``autograd.grad(..., create_graph=True)``). DDP's reducer expects one forward and one
backward per step over a fixed set of parameters needing gradients: it would all-reduce twice (or
need ``no_sync``), does not support toggling ``requires_grad`` on the parameters it manages nor
double backward through its hooks, and excluding the base needs a private API. Averaging the
trainable gradients once, after the last backward and before ``optimizer.step()``, is exact for any
number of forwards and backwards. It does not overlap communication with the backward pass: the
cost is one flat all-reduce of the (small) style gradients per network and step.

Failures. Collectives time out after ``timeout_s`` (default ``$GMEM_DIST_TIMEOUT`` or 600 s). A rank
that sees a peer die or go silent raises :class:`PeerFailure` naming itself and what to do (under
torchrun the launcher also stops the other ranks and names the first failure). With NCCL, a timed-out
collective is ended by PyTorch's watchdog, which stops the process with its own message. Checkpoints
hold no per-rank state, so a rerun resumes from the last one with any ``N`` dividing the global batch.

The API a trainer calls::

    from gmem import distributed as dist
    with dist.distributed(resume_hint=str(ckpt_path)) as info:  # torchrun's env; cleanup on exit
        model.to(info.device)                      # cuda:LOCAL_RANK with NCCL, else cpu
        dist.broadcast_parameters(trainable)       # every rank starts from rank 0's values
        sampler = dist.ShardedInfiniteSampler(len(data), dist.local_batch_size(bs), seed)
        bar = dist.progress(total=iterations)      # tqdm, disabled off rank 0
        for step ...:
            z = dist.shard(torch.randn(bs, z_dim, generator=rng))  # draw global, keep own rows
            loss.backward()
            dist.all_reduce_gradients(trainable)   # after the last backward, before opt.step()
            opt.step(); update_ema(...)            # on every rank: states stay identical
            dist.save_on_main(state, ckpt_path)    # rank 0 writes, atomically
            if dist.is_main(): write_samples()

Drawing random tensors at the global batch size on every rank from the same seeded generator, then
keeping :func:`shard`, makes the generator's state independent of ``N``, like the sampler's.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import os
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as tdist

from .data import InfiniteSampler

__all__ = [
    "DistInfo", "PeerFailure", "ShardedInfiniteSampler", "all_reduce_gradients", "average_scalars",
    "barrier", "broadcast_parameters", "distributed", "init", "is_initialized", "is_main",
    "launched_by_torchrun", "local_batch_size", "local_rank", "main_only", "progress", "rank",
    "save_on_main", "shard", "shutdown", "world_size",
]

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


def _buckets(tensors: Sequence[torch.Tensor], cap_bytes: int) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, reduction dtype), each group cut at ``cap_bytes``."""
    groups: dict[tuple, list[list[int]]] = {}
    used: dict[tuple, int] = {}
    for i, t in enumerate(tensors):
        dtype = torch.promote_types(t.dtype, torch.float32)  # half grads are summed in float32
        key, size = (t.device, dtype), t.numel() * dtype.itemsize
        chunks = groups.setdefault(key, [[]])
        if chunks[-1] and used[key] + size > cap_bytes:
            chunks.append([])
            used[key] = 0
        chunks[-1].append(i)
        used[key] = used.get(key, 0) + size
    return [chunk for chunks in groups.values() for chunk in chunks]


def _check_params(params) -> list[torch.Tensor]:
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a tensor or nn.Parameter")
        if not p.is_floating_point():
            raise TypeError(f"params[{i}] has dtype {p.dtype}; only floating-point parameters are synchronised")
        if world_size() > 1 and tdist.get_backend() == "nccl" and p.device.type != "cuda":
            raise ValueError(f"params[{i}] is on {p.device} but NCCL needs CUDA tensors: move the model to "
                             f"{_info().device} first")
    return params


def all_reduce_gradients(params: Iterable[torch.Tensor], *, bucket_mb: float = 32.0) -> None:
    """Average ``p.grad`` over all ranks, in place, for each ``p`` in ``params`` (only those).

    Call after the last backward of a step and before ``optimizer.step()``, with the same list in the
    same order on every rank (the task's trainable parameters; never the frozen base). Gradients are
    flattened into buckets of at most ``bucket_mb`` MiB per device and dtype (half precision is summed
    in float32) and all-reduced once each. A gradient that is None on every rank stays None (Adam
    then skips that parameter, as in one process); None on some ranks only raises RuntimeError.
    Each rank's loss must be a mean over an equal share of the global batch, so that the average of
    the ranks' gradients is the gradient of the global mean. No-op for a single process.
    """
    params = _check_params(params)
    world = world_size()
    if world == 1 or not params:
        return
    grads = [p.grad for p in params]
    layout = [g if g is not None else p for g, p in zip(grads, params)]  # dtype/device per entry
    for chunk in _buckets(layout, int(bucket_mb * 2**20)):
        dtype, device = torch.promote_types(layout[chunk[0]].dtype, torch.float32), layout[chunk[0]].device
        sizes = [params[i].numel() for i in chunk]
        present = torch.tensor([float(grads[i] is not None) for i in chunk], dtype=dtype)
        flat = torch.cat([grads[i].reshape(-1).to(dtype) if grads[i] is not None
                          else torch.zeros(n, dtype=dtype, device=device) for i, n in zip(chunk, sizes)]
                         + [present.to(device)])
        _collective("all-reduce of the gradients", tdist.all_reduce, flat)  # sum over ranks
        counts = flat[-len(chunk):].round().long().tolist()  # how many ranks had each gradient
        parts = flat[:-len(chunk)].div_(world).split(sizes)
        for i, part, count in zip(chunk, parts, counts):
            p = params[i]
            if count not in (0, world):
                raise RuntimeError(
                    f"all_reduce_gradients: parameter {i} (shape {tuple(p.shape)}) has a gradient on {count} of "
                    f"{world} ranks: every rank must run the same computation (no data-dependent branches)")
            if count:  # then this rank has a gradient too
                p.grad.copy_(part.view_as(p.grad))


@torch.no_grad()
def broadcast_parameters(params: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy the values of ``params`` on rank ``src`` to every rank (in place; no-op for one process).

    First checks that every rank passed the same number of tensors with the same total size, so a
    mismatch fails with a message instead of a hang or a silent misalignment.
    """
    params = _check_params(params)
    if world_size() == 1:
        return
    count, numel = len(params), sum(p.numel() for p in params)
    device = params[0].device if params else _info().device
    probe = torch.tensor([count, numel, -count, -numel], dtype=torch.float64, device=device)
    _collective("check of the parameter lists", tdist.all_reduce, probe, op=tdist.ReduceOp.MAX)
    hi_count, hi_numel, lo_count, lo_numel = (int(v) for v in probe.tolist())
    if (hi_count, hi_numel) != (-lo_count, -lo_numel):
        raise RuntimeError(f"broadcast_parameters: ranks hold different parameter lists (between {-lo_count} "
                           f"and {hi_count} tensors, {-lo_numel} to {hi_numel} values; rank {rank()} has "
                           f"{count}, {numel}): every rank must build the same model and task")
    for chunk in _buckets(params, 64 * 2**20):
        flat = torch.cat([params[i].detach().reshape(-1).to(torch.promote_types(params[i].dtype, torch.float32))
                          for i in chunk])
        _collective("broadcast of the parameters", tdist.broadcast, flat, src=src)
        for i, part in zip(chunk, flat.split([params[i].numel() for i in chunk])):
            params[i].copy_(part.view_as(params[i]))


def average_scalars(values: dict[str, float]) -> dict[str, float]:
    """Mean of each scalar over the ranks (for logging global losses); the same keys on every rank."""
    if world_size() == 1 or not values:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_info().device)
    _collective("average of the logged values", tdist.all_reduce, t)
    return {k: v / world_size() for k, v in zip(keys, t.tolist())}


def local_batch_size(global_batch_size: int) -> int:
    """``global_batch_size / world_size()``; ValueError when it does not divide evenly."""
    world = world_size()
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global batch size must be a positive int, got {global_batch_size!r}")
    if global_batch_size % world:
        raise ValueError(f"global batch size {global_batch_size} does not divide over {world} processes; "
                         f"use a multiple of {world} or another --nproc_per_node")
    return global_batch_size // world


def shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch ``[B, ...] -> [B / world, ...]`` (contiguous block ``rank``)."""
    b = local_batch_size(int(x.shape[0]))
    return x[rank() * b:(rank() + 1) * b]


class ShardedInfiniteSampler:
    """This rank's share of the :class:`gmem.data.InfiniteSampler` stream of global batches.

    Every rank runs the same global stream (``n`` items, global batch
    ``batch_size_per_rank * world``, ``seed``) and keeps block ``rank`` of each global batch, so the
    ranks' batches are disjoint and together are exactly the single-process batch of that seed.
    The state (``epoch``, ``pos``, ``seed``) counts positions of the global stream only, so it is the
    same on every rank, loads into any world size (and from or into a plain ``InfiniteSampler``), and
    a resumed run continues the same sequence of images.
    """

    def __init__(self, n: int, batch_size_per_rank: int, seed: int, rank: Optional[int] = None,
                 world: Optional[int] = None):
        here = _info()
        rank = here.rank if rank is None else rank
        world = here.world_size if world is None else world
        for name, v, lo in (("n", n, 1), ("batch_size_per_rank", batch_size_per_rank, 1), ("world", world, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"ShardedInfiniteSampler: {name} must be an int >= {lo}, got {v!r}")
        if not isinstance(rank, int) or not 0 <= rank < world:
            raise ValueError(f"ShardedInfiniteSampler: rank must be an int in [0, {world}), got {rank!r}")
        self.rank, self.world, self.batch_size = rank, world, batch_size_per_rank
        self._global = InfiniteSampler(n, batch_size_per_rank * world, seed)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world

    def next_indices(self) -> torch.Tensor:
        """LongTensor ``[batch_size_per_rank]``: this rank's indices of the next global batch."""
        idx = self._global.next_indices()
        return idx[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return self._global.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._global.load_state_dict(state)


def main_only(fn: Callable) -> Callable:
    """Decorator: run ``fn`` on rank 0 only; other ranks return None without calling it."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main() else None
    return wrapper


def progress(*args, **kwargs):
    """A ``tqdm`` bar shown on rank 0 only (``disable=True`` elsewhere); arguments go to tqdm."""
    from tqdm import tqdm

    if not is_main():
        kwargs["disable"] = True
    return tqdm(*args, **kwargs)


def save_on_main(obj, path, *, wait: bool = False) -> None:
    """Rank 0 writes ``torch.save(obj)`` to ``path`` atomically (temporary file, fsync, ``os.replace``).

    Other ranks write nothing. With ``wait=True`` every rank returns only once the file is in place
    (a barrier), for code that reads it next.
    """
    if is_main():
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    if wait:
        barrier()
