"""``gmem serve MEMORY``: browse a memory in a web page (:mod:`gmem.serve`)."""
from __future__ import annotations

import argparse
import sys

from .checks import open_memory

HELP = "serve a web page to browse a memory: samples, classes, interpolation (read-only)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("memory", help="memory directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; another address exposes "
                        "the memory's samples to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--window-ms", type=float, default=5.0,
                   help="how long a sample request waits for concurrent ones to share its forward (default 5)")
    p.add_argument("--batching", choices=("auto", "on", "off"), default="auto",
                   help="gather concurrent sample requests into one mixed-task forward: on, off (one forward per "
                        "request), auto (default: on a GPU only; on a CPU the generator is compute-bound and "
                        "batching measured slower, see the README)")


def run(args: argparse.Namespace) -> int:
    # the web stack (Starlette, uvicorn) is imported only by this command
    from ..serve import LOOPBACK, make_app
    from ..serve import run as serve

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if not 0 <= args.window_ms <= 1000:
        raise ValueError(f"--window-ms must be in [0, 1000], got {args.window_ms}")
    memory = open_memory(args.memory)
    batching = args.batching == "on" or (args.batching == "auto" and memory.device.type == "cuda")
    app = make_app(memory, window_s=args.window_ms / 1000, batching=batching)
    if args.host not in LOOPBACK:
        print(f"gmem serve: warning: listening on {args.host}: anyone who can reach this address can browse "
              f"the memory's samples", file=sys.stderr)
    print(f"gmem serve: {args.memory} ({len(memory.tasks)} tasks) on http://{args.host}:{args.port}/ "
          f"(Ctrl-C stops)", flush=True)
    serve(app, host=args.host, port=args.port)
    return 0
