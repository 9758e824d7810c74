"""Collectives over the task's trainable tensors: gradient averaging, parameter broadcast, agreement."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as tdist

from .group import _collective, _info, rank, world_size

__all__ = ["all_reduce_gradients", "any_rank", "average_scalars", "broadcast_parameters", "same_on_all_ranks"]


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




def _extremes(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """``(min over ranks, max over ranks)`` of each value, in one collective."""
    t = torch.tensor([float(v) for v in values] + [-float(v) for v in values], dtype=torch.float64,
                     device=_info().device)
    _collective("comparison of the ranks' states", tdist.all_reduce, t, op=tdist.ReduceOp.MAX)
    n = len(values)
    return [-v for v in t[n:].tolist()], t[:n].tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (a common decision, e.g. to stop)."""
    if world_size() == 1:
        return bool(flag)
    return _extremes([float(bool(flag))])[1][0] > 0


def same_on_all_ranks(value: int) -> bool:
    """True on every rank when every rank passed the same ``value`` (e.g. the iteration it resumed at)."""
    if world_size() == 1:
        return True
    lo, hi = _extremes([value])
    return lo[0] == hi[0]
