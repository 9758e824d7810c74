"""``gmem serve``: browse a memory in a web page, served with batched multi-task sampling.

:func:`make_app` builds the Starlette app (:mod:`gmem.serve.app`) over a loaded memory;
:class:`SampleBatcher` (:mod:`gmem.serve.batcher`) gathers concurrent sample requests into one
mixed-task forward; :func:`run` serves an app with uvicorn.
"""
from __future__ import annotations

from .app import make_app
from .batcher import SampleBatcher, SampleRequest

__all__ = ["make_app", "run", "SampleBatcher", "SampleRequest"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def run(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning") -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn  # the server is needed only here: importing gmem.serve stays light

    uvicorn.run(app, host=host, port=port, log_level=log_level)
