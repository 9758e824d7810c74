"""Progress output that suits where it goes: a redrawn tqdm bar in a terminal, a few lines in a log.

Without a terminal (output redirected to a file, CI logs) a bar would write one line per redraw;
there :class:`Progress` prints one line at the start, after every ``1/lines`` of the run (with the rate,
the time so far and an estimate of the time left), and at the end.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress"]


def _fmt(losses: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in losses.items())


def _duration(seconds: float) -> str:
    """``seconds`` as ``1h02m``, ``3m05s`` or ``12s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """``update(losses)`` once per iteration, ``write(message)`` for notes, ``close()`` at the end."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool = True,
                 stream: Optional[TextIO] = None, lines: int = 4):
        self.total, self.n, self.desc = total, initial, desc
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(enabled)
        self.bar = None
        self._t0, self._n0 = time.time(), initial
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        if self.enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True,
                            file=self.stream, leave=True)
        self.every = max(1, -(-total // max(1, lines)))  # ceil(total / lines)
        if self.enabled and not self.tty and initial < total:
            self._line(f"iteration {initial}/{total}" + (" (resumed)" if initial else ""))

    def _line(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=self.stream, flush=True)

    def update(self, losses: Optional[dict] = None) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if losses and (self.n % 5 == 0 or self.n == self.total):
                self.bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()}, refresh=False)
        elif self.n % self.every == 0 or self.n == self.total:
            elapsed = time.time() - self._t0
            rate = (self.n - self._n0) / max(elapsed, 1e-9)
            timing = f"{rate:.2f} it/s, {_duration(elapsed)} elapsed"
            if self.n < self.total:
                timing += f", ETA {_duration((self.total - self.n) / max(rate, 1e-9))}"
            self._line(f"iteration {self.n}/{self.total} ({timing})" + (f": {_fmt(losses)}" if losses else ""))

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
