"""The training loop around a :class:`~gmem.training.step.GANStep`: resume, time limit, progress,
sample grids, atomic checkpoints, a loss log, metrics and callbacks.

Under torchrun every rank runs the loop; rank 0 alone writes the checkpoint, samples and the log and
shows progress. Every rank reads the checkpoint to resume (``out_dir`` must be visible to all of
them), the time limit is one decision for all ranks, and :meth:`TrainLoop.run` returns on every rank
only once the last checkpoint is written."""
from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .. import distributed as dist
from ..images import save_grid
from ..models import CheckpointError
from .progress import Progress
from .resume import check_fingerprint
from .step import GANStep

__all__ = ["TrainLoop", "CHECKPOINT_NAME", "request_stop", "stop_on_sigterm"]

CHECKPOINT_NAME = "checkpoint.pt"
_STOP = threading.Event()  # set by a signal handler: the running loop stops after its current iteration


def request_stop() -> None:
    """Ask the running :class:`TrainLoop` to stop after the current iteration, saving a checkpoint first
    (it then raises KeyboardInterrupt). Safe to call from a signal handler."""
    _STOP.set()


@contextlib.contextmanager
def stop_on_sigterm():
    """Inside the block SIGTERM stops training like Ctrl-C, but at an iteration's end with a checkpoint
    (:func:`request_stop`), so the same command resumes it. Main thread only; a no-op elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, lambda *_: request_stop())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        _STOP.clear()


class TrainLoop:
    """Run ``step`` until ``iterations`` (counted from 0, including resumed ones).

    ``out_dir`` (optional) receives ``checkpoint.pt`` (every ``checkpoint_every`` iterations, at the
    end and when stopped by ``max_seconds``; written atomically), ``samples/it_XXXXXXX.png`` grids of
    ``sample_fn()`` (``[N, C, H, W]`` in [-1, 1]) every ``sample_every`` (and ``samples/latest.png``
    with ``latest_sample``), and with ``log_every`` a ``log.jsonl`` of the losses.

    The checkpoint is ``state_fn()`` plus the run's ``fingerprint`` and the loop's elapsed time;
    an existing one is resumed through ``load_fn(checkpoint)`` only if its fingerprint equals this
    run's (else :class:`~gmem.training.resume.ResumeMismatch`); ``restart=True`` discards it instead,
    ``resume=False`` ignores it (it is overwritten at the next checkpoint).
    ``callbacks``: ``cb(iteration, losses)`` after every step (on every rank under torchrun).
    """

    def __init__(self, step: GANStep, iterations: int, *, out_dir=None, state_fn: Optional[Callable[[], dict]] = None,
                 load_fn: Optional[Callable[[dict], None]] = None, fingerprint: Optional[dict] = None,
                 checkpoint_every: Optional[int] = None, sample_every: Optional[int] = None,
                 sample_fn: Optional[Callable[[], torch.Tensor]] = None, latest_sample: bool = False,
                 max_seconds: Optional[float] = None, progress: bool = True, desc: str = "train",
                 callbacks: Sequence[Callable[[int, dict], None]] = (), log_every: Optional[int] = None,
                 resume: bool = True, restart: bool = False, resume_hint: str = ""):
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
        for name, value in (("checkpoint_every", checkpoint_every), ("sample_every", sample_every),
                            ("log_every", log_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if max_seconds is not None and not max_seconds >= 0:
            raise ValueError(f"max_seconds must be >= 0, got {max_seconds!r}")
        self.step, self.iterations = step, iterations
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.state_fn = state_fn or (lambda: step.state_dict())
        self.load_fn = load_fn or (lambda ck: step.load_state_dict(ck))
        self.fingerprint = fingerprint or {}
        self.checkpoint_every = checkpoint_every or max(50, iterations // 10)
        self.sample_every = sample_every or max(100, iterations // 10)
        self.sample_fn, self.latest_sample = sample_fn, latest_sample
        self.max_seconds, self.progress, self.desc = max_seconds, progress, desc
        self.callbacks, self.log_every = list(callbacks), log_every
        self.resume, self.restart = resume, restart
        self.resume_hint = resume_hint or "Use another output directory, or restart=True to discard it."
        self.elapsed = 0.0
        self._discard = False

    @property
    def checkpoint_path(self) -> Optional[Path]:
        return None if self.out_dir is None else self.out_dir / CHECKPOINT_NAME

    # ------------------------------------------------------------------ pieces
    def _maybe_resume(self) -> None:
        self._discard = False
        path = self.checkpoint_path
        if path is None or not path.is_file() or not self.resume:
            return
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for damaged files
            raise CheckpointError(f"{path}: cannot read the training checkpoint: {e}") from None
        try:
            check_fingerprint(path, ck.get("fingerprint") if isinstance(ck, dict) else None, self.fingerprint,
                              self.resume_hint)
        except CheckpointError:
            if not self.restart:
                raise
            self._discard = True  # unlinked once every rank is past reading it (run())
            return
        self.load_fn(ck)
        self.elapsed = float(ck.get("loop", {}).get("elapsed", 0.0))

    def save_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint atomically; it holds no per-rank state (any world size resumes it)."""
        if dist.is_main():
            state = dict(self.state_fn(), fingerprint=self.fingerprint, loop={"elapsed": self.elapsed})
            dist.save_on_main(state, self.checkpoint_path)

    def _write_samples(self) -> None:
        images = self.sample_fn()
        save_grid(images, self.out_dir / "samples" / f"it_{self.step.iteration:07d}.png", nrow=8, scale=2)
        if self.latest_sample:
            save_grid(images, self.out_dir / "samples" / "latest.png", nrow=8, scale=2)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """Train; returns ``iterations_done``, ``train_seconds`` (all runs of this checkpoint),
        ``it_per_s``, ``stopped_early`` and ``final_losses``."""
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._maybe_resume()
        step, out = self.step, self.out_dir
        if not dist.same_on_all_ranks(step.iteration):
            raise RuntimeError(f"rank {dist.rank()} resumed at iteration {step.iteration} but another rank did not: "
                               f"every rank must see the same checkpoint in {out} (a directory all of them share)")
        main = dist.is_main()
        if self._discard and main:
            self.checkpoint_path.unlink(missing_ok=True)
        modes = [(m, m.training) for m in step.parts.modules]
        bar = Progress(self.iterations, step.iteration, self.desc, enabled=self.progress and main)
        log = open(out / "log.jsonl", "a") if (out is not None and self.log_every and main) else None
        t_start, losses, stopped_early = time.time(), {}, False
        try:
            while step.iteration < self.iterations:
                t0 = time.time()
                losses = step.step()
                self.elapsed += time.time() - t0
                it = step.iteration
                bar.update(losses)
                done = it == self.iterations
                if log is not None and (it % self.log_every == 0 or done):
                    log.write(json.dumps({"it": it, **losses, "time": round(self.elapsed, 2)}) + "\n")
                    log.flush()
                out_of_time = (self.max_seconds is not None  # one decision for all ranks
                               and dist.any_rank(time.time() - t_start > self.max_seconds))
                write_samples = out is not None and self.sample_fn is not None and main
                if write_samples and (it % self.sample_every == 0 or done or out_of_time):
                    self._write_samples()
                if out is not None and (it % self.checkpoint_every == 0 or done or out_of_time):
                    self.save_checkpoint()
                for cb in self.callbacks:
                    cb(it, losses)
                if dist.any_rank(_STOP.is_set()) and not done:  # SIGTERM: stop here with a checkpoint
                    _STOP.clear()
                    if out is not None and it % self.checkpoint_every != 0 and not out_of_time:
                        self.save_checkpoint()
                    raise KeyboardInterrupt(f"stopped by a signal at iteration {it}")
                if out_of_time and not done:
                    stopped_early = True
                    if main:
                        bar.write(f"{self.desc}: stopping at iteration {it} of {self.iterations}: time limit of "
                                  f"{self.max_seconds:.0f} s reached"
                                  + (" (checkpoint saved)" if out is not None else ""))
                    break
        finally:
            bar.close()
            if log is not None:
                log.close()
            for m, mode in modes:
                m.train(mode)
        dist.barrier()  # the other ranks return once rank 0's last checkpoint is in place
        it = step.iteration
        return {"iterations_done": it, "train_seconds": round(self.elapsed, 2),
                "it_per_s": round(it / self.elapsed, 3) if self.elapsed > 0 else None,
                "stopped_early": stopped_early, "final_losses": losses}
