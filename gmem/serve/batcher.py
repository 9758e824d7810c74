"""Batched multi-task sampling: concurrent requests gathered into one mixed-task forward.

A request asks for ``n`` samples of one or several tasks from the latents of one seed. The batcher
waits up to ``window_s`` after the first request for others, then runs every gathered request as ONE
forward of the memory's generator with one task per sample (``GANMemory.sample(list of task names)``,
the mixed-task ops), and hands each request its own rows.

Same bits, alone or batched: a sample's image must not depend on what else is in the forward. In a
mixed-task forward each task's segment runs its own convolutions, so a segment computes the same
whatever other segments there are, as long as its own size is the same; the generator's first layer
is one GEMM over all rows, which BLAS computes row by row the same only from some size on (on small
batches it picks other kernels, which round differently, e.g. a few 1e-7 apart on this project's CPU
machine), and the one-task and mixed-task paths of the ops round differently too. So a forward never
holds two requests for the same task (the later one waits for the next forward), and every forward
gets ``min_rows`` latents of a task no request asked for (thrown away): every forward is a mixed-task
one of at least ``min_rows`` rows, whether one request is served or twenty. At construction,
:meth:`SampleBatcher.self_check` verifies on this machine that a request gives the same bits alone as
amid others; if it does not, the batcher serves one request per forward (``batching`` False, the
reason in ``batching_off_reason``) rather than give other bits.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..seeding import generator

__all__ = ["SampleRequest", "SampleBatcher"]


@dataclass
class SampleRequest:
    """``tasks`` (one or several names), ``n`` samples of each from the latents of ``seed`` (the same
    latents for every task, so rows compare like for like), ``label`` a class for conditional tasks
    (None: class ``i % classes`` for sample ``i``)."""

    tasks: list[str]
    n: int
    seed: int
    label: Optional[int] = None
    future: Optional[asyncio.Future] = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return self.n * len(self.tasks)


class SampleBatcher:
    """Runs :class:`SampleRequest` s against ``memory`` (a :class:`gmem.GANMemory`), batching
    concurrent ones. One forward runs at a time, in a worker thread (the event loop stays free).

    ``window_s``: how long to wait for more requests after the first; ``max_rows``: rows per forward;
    ``batching=False``: each request on its own, as plain ``GANMemory.sample`` calls (the baseline of
    ``tools/serve_bench.py``; its bits may differ from the batched mode's in the last place).
    """

    def __init__(self, memory, *, window_s: float = 0.005, max_rows: int = 1024, min_rows: int = 16,
                 batching: bool = True, check: bool = True):
        self.memory = memory
        self.window_s, self.max_rows, self.min_rows = float(window_s), int(max_rows), int(min_rows)
        self.batching = bool(batching)
        self.batching_off_reason = None if batching else "batching off"
        self.forwards = 0      # forwards run so far
        self.requests = 0      # requests answered so far
        self._queue: Optional[asyncio.Queue] = None
        self._worker: Optional[asyncio.Task] = None
        self.lock = threading.Lock()  # one forward at a time, whoever calls (the interpolation too)
        if self.batching and check:
            reason = self.self_check()
            if reason:
                self.batching, self.batching_off_reason = False, reason

    # ------------------------------------------------------------------ the forward
    def latents(self, request: SampleRequest) -> Tensor:
        """``z [n, z_dim]`` of the request: the latents ``GANMemory.sample(task, n, seed=seed)`` uses."""
        return torch.randn(request.n, self.memory.z_dim, generator=generator(request.seed))

    def _labels(self, task: str, request: SampleRequest) -> list[int]:
        classes = self.memory.num_classes(task) if task != "source" else None
        if not classes:
            return [0] * request.n
        if request.label is not None:
            return [request.label] * request.n
        return [i % classes for i in range(request.n)]

    def partner(self, tasks: set) -> Optional[str]:
        """The task whose ``min_rows`` latents are added to a forward of ``tasks`` (None: all are taken)."""
        return next((t for t in ("source", *self.memory.tasks) if t not in tasks), None)

    def fits(self, batch: list[SampleRequest], request: SampleRequest) -> bool:
        """Whether ``request`` may join ``batch``: no task in common, and a task left for the partner."""
        taken = {t for r in batch for t in r.tasks}
        wanted = set(request.tasks)
        return not (taken & wanted) and self.partner(taken | wanted) is not None

    def run(self, requests: list[SampleRequest]) -> list[Tensor]:
        """One forward for all ``requests`` (no task in two of them, see :meth:`fits`); images
        ``[len(tasks), n, C, H, W]`` in [-1, 1] per request."""
        names, zs, labels, owners = [], [], [], []
        for k, req in enumerate(requests):
            z = self.latents(req)
            for j, task in enumerate(req.tasks):
                names += [task] * req.n
                zs.append(z)
                labels += self._labels(task, req)
                owners.append((k, j))
        partner = self.partner(set(names))
        if partner is not None:  # see the module docstring: always a mixed-task forward of >= min_rows rows
            names += [partner] * self.min_rows
            zs.append(torch.zeros(self.min_rows, self.memory.z_dim))
            labels += [0] * self.min_rows
        with self.lock:
            out = self.memory.sample(names, z=torch.cat(zs), labels=torch.tensor(labels), batch_size=len(names))
            self.forwards += 1
        results = [torch.empty(len(r.tasks), r.n, *out.shape[1:]) for r in requests]
        row = 0
        for k, j in owners:
            n = requests[k].n
            results[k][j] = out[row:row + n]
            row += n
        self.requests += len(requests)
        return results

    def run_alone(self, request: SampleRequest) -> Tensor:
        """``request`` by itself, as plain ``GANMemory.sample`` calls (no padding): the unbatched mode."""
        z = self.latents(request)
        with self.lock:
            out = [self.memory.sample(t, z=z, labels=torch.tensor(self._labels(t, request))) for t in request.tasks]
            self.forwards += len(out)
        self.requests += 1
        return torch.stack(out)

    def self_check(self) -> Optional[str]:
        """None if a request gives the same bits alone and amid others here, else the reason."""
        names = self.memory.tasks
        probe = SampleRequest([names[-1] if names else "source"], 3, 12345)
        alone = self.run([probe])[0]
        crowd = [SampleRequest([t], 2 * self.min_rows + 1, 7 + i) for i, t in enumerate(names[:-1][:3])]
        together = self.run([*crowd, probe])[-1]
        self.forwards = self.requests = 0
        if torch.equal(alone, together):
            return None
        return (f"a request's samples differ by up to {float((alone - together).abs().max()):.2e} inside a "
                f"batch on this machine: serving one request per forward")

    # ------------------------------------------------------------------ the asyncio side
    async def sample(self, request: SampleRequest) -> Tensor:
        """Images ``[len(tasks), n, C, H, W]`` of ``request``, batched with concurrent ones."""
        loop = asyncio.get_running_loop()
        if not self.batching:
            return await loop.run_in_executor(None, self.run_alone, request)
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._serve())
        request.future = loop.create_future()
        await self._queue.put(request)
        return await request.future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        waiting: list[SampleRequest] = []  # arrived, but sharing a task with the forward being gathered
        while True:
            batch = [waiting.pop(0) if waiting else await self._queue.get()]
            for req in list(waiting):
                if self.fits(batch, req):
                    waiting.remove(req)
                    batch.append(req)
            rows = sum(r.rows for r in batch)
            deadline = time.monotonic() + self.window_s
            while rows < self.max_rows:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    req = await asyncio.wait_for(self._queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                if self.fits(batch, req):
                    batch.append(req)
                    rows += req.rows
                else:
                    waiting.append(req)
            try:
                results = await loop.run_in_executor(None, self.run, batch)
            except Exception as exc:  # every waiting request learns why
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(exc)
                continue
            for req, images in zip(batch, results):
                if not req.future.done():
                    req.future.set_result(images)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = self._queue = None
