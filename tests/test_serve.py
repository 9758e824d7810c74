"""``gmem serve``: the page, the JSON/PNG API, batched sampling with the same bytes, read-only serving.

A small memory (three tasks, one conditional) is learned once per module. The app is driven in
process through Starlette's TestClient and, for concurrency, through an httpx AsyncClient on the ASGI
app (the batcher gathers requests that arrive within its window); one test starts the real
``gmem serve`` command on a free loopback port.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette's TestClient announces a successor of httpx at import
    from starlette.testclient import TestClient

from served import ROOT, serving, small_memory

from gmem import GANMemory
from gmem.serve import SampleBatcher, SampleRequest, make_app
from gmem.serve.app import MAX_N


@pytest.fixture(scope="module")
def memory_dir(tmp_path_factory):
    return small_memory(tmp_path_factory.mktemp("served") / "memory")


@pytest.fixture(scope="module")
def memory(memory_dir):
    return GANMemory.load(memory_dir)


@pytest.fixture(scope="module")
def client(memory):
    with TestClient(make_app(memory)) as c:
        yield c


def _png(content: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(content))
    img.load()
    return img


def _tree(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_page_and_memory_info(client, memory):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/sample" in page.text and "/interpolate" in page.text and "<script" in page.text
    info = client.get("/api/memory").json()
    assert [t["name"] for t in info["tasks"]] == memory.tasks == ["shirts", "faces", "classes"]
    by_name = {t["name"]: t for t in info["tasks"]}
    assert by_name["classes"]["classes"] == 10 and by_name["shirts"]["classes"] is None
    assert by_name["shirts"]["training"]["iterations"] == 1
    assert by_name["shirts"]["learned_at"].endswith(" UTC") and by_name["shirts"]["learned_at"][:2] == "20"
    assert by_name["shirts"]["generator_style"] > 0 and info["base"]["sha256"] == memory.base_hash


def test_sample_png_matches_the_memory(client, memory):
    r = client.post("/sample", json={"task": "faces", "n": 4, "seed": 7})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = _png(r.content)
    size, pad = memory.size, 2
    assert img.size == (4 * (size + pad) + pad, size + 2 * pad)
    # the grid holds the memory's own samples for that seed (8-bit rounding apart)
    ref = memory.sample("faces", 4, seed=7)
    first = torch.from_numpy(np.array(img.crop((pad, pad, pad + size, pad + size)))).float().reshape(-1, 3)
    expect = ((ref[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).reshape(-1, 3)
    assert (first - expect).abs().max() <= 1
    assert client.post("/sample", json={"task": "faces", "n": 4, "seed": 7}).content == r.content
    assert client.post("/sample", json={"task": "faces", "n": 4, "seed": 8}).content != r.content


def test_several_tasks_one_row_each_and_classes(client, memory):
    r = client.post("/sample", json={"tasks": ["source", "shirts", "faces"], "n": 3, "seed": 1})
    img = _png(r.content)
    assert img.size == (3 * (memory.size + 2) + 2, 3 * (memory.size + 2) + 2)
    one = client.post("/sample", json={"task": "classes", "n": 2, "seed": 1, "label": 3}).content
    other = client.post("/sample", json={"task": "classes", "n": 2, "seed": 1, "label": 4}).content
    assert one != other


@pytest.mark.parametrize("body, status, words", [
    ({"task": "nope", "n": 2}, 404, "no task 'nope'"),
    ({"task": "faces", "n": MAX_N + 1}, 400, "n must be in"),
    ({"task": "faces", "n": 0}, 400, "n must be in"),
    ({"task": "faces", "n": "4"}, 400, "n must be an integer"),
    ({"task": "faces", "seed": -1}, 400, "seed must be in"),
    ({"task": "faces", "seed": 2**70}, 400, "seed must be in"),
    ({"task": "faces", "seed": 1.5}, 400, "seed must be an integer"),
    ({"task": "faces", "label": 1}, 400, "only for conditional"),
    ({"task": "classes", "label": 10}, 400, "label must be in"),
    ({"n": 2}, 400, '"task"'),
    ({"task": "faces", "tasks": ["faces"]}, 400, '"task"'),
    ({"tasks": []}, 400, "list of 1 to"),
    ({"tasks": "faces"}, 400, "list of 1 to"),
    ({"task": ["faces"]}, 400, "named by a string"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_sample_requests_get_one_line(client, body, status, words):
    r = client.post("/sample", json=body)
    assert r.status_code == status, r.text
    assert words in r.text and r.text.count("\n") == 1 and "Traceback" not in r.text


def test_bad_bodies_and_interpolation(client):
    r = client.post("/sample", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.text and r.text.count("\n") == 1
    assert client.post("/sample", content=b"x" * 70_000).status_code == 413
    a = client.post("/interpolate", json={"a": "shirts", "b": "faces", "lam": 0.0, "n": 3, "seed": 2})
    b = client.post("/interpolate", json={"a": "shirts", "b": "faces", "lam": 1.0, "n": 3, "seed": 2})
    c = client.post("/interpolate", json={"a": "faces", "b": "shirts", "lam": 0.0, "n": 3, "seed": 2})
    assert a.status_code == b.status_code == 200 and a.content != b.content and b.content == c.content
    assert client.post("/interpolate", json={"a": "shirts", "b": "zzz"}).status_code == 404
    assert client.post("/interpolate", json={"a": "shirts", "b": "faces", "lam": "x"}).status_code == 400
    assert client.get("/sample").status_code == 405


def test_concurrent_requests_batched_with_the_same_bytes(memory):
    """Requests for different tasks arriving together run as few forwards, each answered with exactly
    the bytes it gets alone."""
    batcher = SampleBatcher(memory, window_s=0.2)
    assert batcher.batching, batcher.batching_off_reason
    app = make_app(memory, batcher=batcher)
    bodies = [{"task": t, "n": n, "seed": s} for t, n, s in
              [("shirts", 3, 0), ("faces", 5, 1), ("classes", 2, 2), ("source", 4, 3), ("faces", 1, 4),
               ("shirts", 3, 0)]] + [{"tasks": ["faces", "classes"], "n": 2, "seed": 9}]

    async def together():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gmem") as c:
            return await asyncio.gather(*(c.post("/sample", json=b) for b in bodies))

    crowd = asyncio.run(together())
    assert batcher.requests == len(bodies) and batcher.forwards < len(bodies)
    with TestClient(make_app(memory, window_s=0.0)) as alone:  # one request at a time, each its own forward
        for body, r in zip(bodies, crowd):
            assert r.status_code == 200
            assert alone.post("/sample", json=body).content == r.content, body
        assert alone.app.state.batcher.forwards == len(bodies)


@pytest.mark.parametrize("crowd", [["shirts"], ["classes"], ["source", "classes"], ["shirts", "classes"]])
def test_batcher_same_bits_in_any_crowd(memory, crowd):
    batcher = SampleBatcher(memory, check=False)
    alone = batcher.run([SampleRequest(["faces"], 2, 5)])[0]
    others = [SampleRequest([t], n, i) for i, t in enumerate(crowd) for n in (1, 40)][::2]
    together = batcher.run([*others, SampleRequest(["faces"], 2, 5)])[-1]
    assert torch.equal(alone, together)
    assert not batcher.fits(others, SampleRequest(["faces", crowd[0]], 1, 0)), "no task twice in a forward"
    assert alone.shape == (1, 2, memory.channels, memory.size, memory.size)
    plain = batcher.run_alone(SampleRequest(["faces"], 2, 5))  # unbatched: the memory's own sample()
    assert torch.equal(plain[0], memory.sample("faces", 2, seed=5))
    assert (plain - alone).abs().max() < 1e-4


def test_serving_never_writes_the_memory(memory_dir, tmp_path):
    before = _tree(memory_dir)
    mem = GANMemory.load(memory_dir)
    with TestClient(make_app(mem)) as c:
        for t in ("shirts", "faces", "classes", "source"):
            assert c.post("/sample", json={"task": t, "n": 2}).status_code == 200
        c.post("/interpolate", json={"a": "shirts", "b": "classes"})
        c.get("/api/memory")
    assert _tree(memory_dir) == before


def test_gmem_serve_command(memory_dir):
    with serving(memory_dir) as served:
        r = httpx.get(served.url + "api/memory", timeout=5)
        assert [t["name"] for t in r.json()["tasks"]] == ["shirts", "faces", "classes"]
        png = httpx.post(served.url + "sample", json={"task": "faces", "n": 2, "seed": 0}, timeout=60)
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert "Traceback" not in served.output, served.output


@pytest.mark.parametrize("args, words", [
    (["--port", "70000"], "port"),
    (["--host", "0.0.0.0", "--port", "-1"], "port"),
])
def test_gmem_serve_bad_arguments(memory_dir, args, words):
    r = subprocess.run([sys.executable, "-m", "gmem.cli", "serve", str(memory_dir), *args], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr


def test_gmem_serve_missing_memory(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gmem.cli", "serve", str(tmp_path / "none")], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("gmem serve: error:") and "Traceback" not in r.stderr
