"""The web app of ``gmem serve``: a page to browse a memory and a small JSON/PNG API (Starlette).

Routes (all read-only: nothing here writes the memory):

* ``GET /``: the page (``page.html``, no dependencies).
* ``GET /api/memory``: the base and every task with its record (JSON).
* ``POST /sample`` ``{"task": NAME | "tasks": [NAMES], "n": N, "seed": S, "label": C?}``: a PNG grid of
  ``n`` samples per task (one row per task when several), batched with concurrent requests
  (:mod:`gmem.serve.batcher`): the same bytes alone or amid other requests.
* ``POST /interpolate`` ``{"a": NAME, "b": NAME, "lam": L, "n": N, "seed": S}``: a PNG row of ``n``
  samples between two tasks' styles.

Bad requests get a 4xx whose body is one line of text saying why (404 for an unknown task).
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
from importlib import resources
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..images import grid_image
from .batcher import SampleBatcher, SampleRequest

__all__ = ["make_app", "png_bytes", "BadRequest", "MAX_N", "MAX_TASKS"]

MAX_N = 64          # samples per task and request
MAX_TASKS = 32      # tasks per request
MAX_SEED = 2**63 - 1
MAX_BODY = 64 * 1024


class BadRequest(Exception):
    """A request the server refuses: ``status`` and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def png_bytes(images: torch.Tensor, nrow: int) -> bytes:
    """Images ``[N, C, H, W]`` in [-1, 1] as the bytes of one PNG grid, ``nrow`` images per row."""
    buf = io.BytesIO()
    grid_image(images, nrow).save(buf, format="PNG")
    return buf.getvalue()


def _int(body: dict, key: str, default: Any, low: int, high: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(400, f"{key} must be an integer, got {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise BadRequest(400, f"{key} must be in [{low}, {high}], got {value}")
    return value


class _Api:
    """The request handlers over one memory and its batcher."""

    def __init__(self, memory, batcher: SampleBatcher):
        self.memory, self.batcher = memory, batcher
        self.page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    # ------------------------------------------------------------------ helpers
    async def _body(self, request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise BadRequest(413, f"request body over {MAX_BODY} bytes")
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(400, f"the body is not JSON: {str(e).splitlines()[0]}") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object")
        return body

    def _task(self, name: Any) -> str:
        if not isinstance(name, str):
            raise BadRequest(400, f"a task is named by a string, got {json.dumps(name)[:40]}")
        if name != "source" and name not in self.memory.tasks:
            raise BadRequest(404, f"no task {name!r} in this memory (tasks: {', '.join(self.memory.tasks) or 'none'})")
        return name

    def _label(self, body: dict, tasks: list[str]) -> Any:
        if body.get("label") is None:
            return None
        classes = [self.memory.num_classes(t) for t in tasks if t != "source"]
        if not classes or not all(classes):
            raise BadRequest(400, "label is only for conditional tasks")
        return _int(body, "label", None, 0, min(classes) - 1)

    # ------------------------------------------------------------------ routes
    async def index(self, request: Request) -> Response:
        return HTMLResponse(self.page)

    async def memory_info(self, request: Request) -> Response:
        mem = self.memory
        tasks = []
        for t in mem.tasks:
            record = mem.records.get(t, {})
            counts = mem.parameter_counts(t)
            tasks.append({"name": t, "classes": mem.num_classes(t), "class_names": record.get("classes"),
                          "training": record.get("training", {}), "metrics": record.get("metrics", {}),
                          "learned_at": record.get("metrics", {}).get("learned_at"),
                          "generator_style": counts["generator_style"],
                          "generator_stored": counts["generator_stored"],
                          "compression": record.get("compression")})
        return JSONResponse({"size": mem.size, "channels": mem.channels, "z_dim": mem.z_dim,
                             "base": {**mem.base_source, "sha256": mem.base_hash}, "tasks": tasks,
                             "max_n": MAX_N, "batching": self.batcher.batching,
                             "batching_off_reason": self.batcher.batching_off_reason})

    async def sample(self, request: Request) -> Response:
        body = await self._body(request)
        if ("task" in body) == ("tasks" in body):
            raise BadRequest(400, 'give "task": NAME or "tasks": [NAMES]')
        names = [body["task"]] if "task" in body else body["tasks"]
        if not isinstance(names, list) or not 1 <= len(names) <= MAX_TASKS:
            raise BadRequest(400, f'"tasks" must be a list of 1 to {MAX_TASKS} task names')
        tasks = [self._task(t) for t in names]
        req = SampleRequest(tasks, _int(body, "n", 16, 1, MAX_N), _int(body, "seed", 0, 0, MAX_SEED),
                            self._label(body, tasks))
        images = await self.batcher.sample(req)                   # [tasks, n, C, H, W]
        nrow = req.n if len(tasks) > 1 else min(req.n, 8)
        png = await asyncio.get_running_loop().run_in_executor(None, png_bytes, images.flatten(0, 1), nrow)
        return Response(png, media_type="image/png")

    async def interpolate(self, request: Request) -> Response:
        body = await self._body(request)
        a, b = self._task(body.get("a")), self._task(body.get("b"))
        lam = body.get("lam", 0.5)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or not -1 <= lam <= 2:
            raise BadRequest(400, f"lam must be a number in [-1, 2], got {json.dumps(lam)[:40]}")
        n, seed = _int(body, "n", 8, 1, MAX_N), _int(body, "seed", 0, 0, MAX_SEED)
        z = self.batcher.latents(SampleRequest([a], n, seed))

        def run():
            with self.batcher.lock:
                return png_bytes(self.memory.interpolate(a, b, float(lam), z=z), min(n, 8))

        return Response(await asyncio.get_running_loop().run_in_executor(None, run), media_type="image/png")


def make_app(memory, *, batcher: SampleBatcher | None = None, **batcher_options) -> Starlette:
    """The Starlette app serving ``memory`` (a :class:`gmem.GANMemory`); ``batcher_options`` go to
    :class:`SampleBatcher` (``window_s``, ``batching``, ...)."""
    batcher = batcher or SampleBatcher(memory, **batcher_options)
    api = _Api(memory, batcher)

    def guarded(handler):
        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except BadRequest as e:
                return PlainTextResponse(e.reason + "\n", status_code=e.status)
            except (KeyError, IndexError, ValueError) as e:  # the memory refused the request
                reason = str(e.args[0] if isinstance(e, KeyError) and e.args else e).splitlines()[0]
                return PlainTextResponse(reason + "\n", status_code=400)
        return route

    routes = [Route("/", guarded(api.index)), Route("/api/memory", guarded(api.memory_info)),
              Route("/sample", guarded(api.sample), methods=["POST"]),
              Route("/interpolate", guarded(api.interpolate), methods=["POST"])]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await batcher.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.memory = memory
    return app
