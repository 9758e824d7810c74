"""Trust on first use (gmem.ops.selfcheck) and ``gmem doctor``: a wrong backend is caught, named,
kept out of ``backend="auto"``, and the verdict is cached, reused and robust to a damaged cache."""
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import formulas
import pytest
import torch
from selfcheck_double import NAME, WrongBackend

import gmem.ops as ops
from gmem import doctor
from gmem.cli import COMMANDS, main
from gmem.ops import backends, selfcheck

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def auto(dtype=torch.float32):
    return backends.resolve_backend("auto", CPU, dtype, "test")


def fallback() -> str:
    """What "auto" picks on the CPU in float32 when the wrong backend is out."""
    return "cpu" if "cpu" in ops.available_backends() else "reference"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GMEM_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("GMEM_SELFCHECK", "GMEM_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    selfcheck.reset()
    yield tmp_path / "cache"
    selfcheck.reset()


@pytest.fixture
def wrong(cache):
    ops.register_backend(WrongBackend(), priority=50)  # above every real backend: "auto" would take it
    yield
    backends._REGISTRY.pop(NAME, None)
    selfcheck.reset()


def verdict_files(cache, name=NAME, dtype="float32"):
    return sorted((cache / "selfcheck").glob(f"{name}-{dtype}-*.json"))


def forbid_checks(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the self-check ran again instead of using the cached verdict")

    monkeypatch.setattr(selfcheck, "run_cases", refuse)


def test_cases_measure_the_error_of_the_wrong_output(wrong):
    results = {r.case: r for r in selfcheck.run_cases(NAME, CPU, torch.float32)}
    assert set(results) == set(selfcheck.CASES)
    bad = results["conv mixed tasks"]
    # dgamma doubled: |2g - g| / |g| = 1 for the largest entry
    assert bad.errors["d gamma"] == pytest.approx(1.0, rel=1e-4) and not bad.ok
    assert all(e <= bad.tol for k, e in bad.errors.items() if k != "d gamma")
    assert "conv mixed tasks: d gamma error 1.00e+00" in bad.describe()
    assert results["conv single task"].ok and results["linear mixed tasks"].ok


def test_wrong_backend_is_caught_named_and_excluded_from_auto(wrong, cache, monkeypatch):
    with pytest.warns(RuntimeWarning, match=rf"{NAME}.*failed its self-check.*conv mixed tasks: d gamma"):
        assert auto() == fallback()
    files = verdict_files(cache)
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["ok"] is False and data["failed"].startswith("conv mixed tasks: d gamma")
    # warned once: the next resolution is silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert auto() == fallback()
    assert auto(torch.float64) != NAME  # the double does not support float64: never a candidate
    # the values "auto" gives are the right ones
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    wn = ops.normalize_weight(torch.randn(2, 3, 3, 3))[0]
    gamma = torch.randn(3, 2, 3, requires_grad=True)
    beta = torch.randn(3, 2, 3)
    ids = torch.tensor([2, 0, 2, 1])
    y = ops.modulated_conv2d(x, wn, gamma, beta, task_ids=ids, padding=1)
    want = formulas.conv2d(x, wn, gamma, beta, task_ids=ids, padding=(1, 1))
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    (dgamma,) = torch.autograd.grad(y, gamma, g.float())
    (dgamma_want,) = torch.autograd.grad(want, gamma, g)
    torch.testing.assert_close(dgamma, dgamma_want, rtol=1e-5, atol=1e-5)


def test_verdict_is_reused_in_the_same_and_a_second_process(wrong, cache, monkeypatch):
    with pytest.warns(RuntimeWarning, match="failed its self-check"):
        auto()
    selfcheck.reset()
    forbid_checks(monkeypatch)
    with pytest.warns(RuntimeWarning, match="conv mixed tasks"):
        assert auto() == fallback()
    script = (
        "import warnings, torch\n"
        "import gmem.ops as ops\n"
        "from gmem.ops import backends, selfcheck\n"
        "from selfcheck_double import WrongBackend\n"
        "ops.register_backend(WrongBackend(), priority=50)\n"
        "def refuse(*a, **k): raise SystemExit('the self-check ran again')\n"
        "selfcheck.run_cases = refuse\n"
        "print('picked', backends.resolve_backend('auto', torch.device('cpu'), torch.float32, 'x'))\n"
    )
    env = dict(os.environ, GMEM_CACHE_DIR=str(cache), PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"picked {fallback()}" in proc.stdout
    assert "failed its self-check" in proc.stderr and "conv mixed tasks" in proc.stderr


def test_a_passing_verdict_is_cached_and_reused(cache, monkeypatch):
    if "cpu" not in ops.available_backends():
        pytest.skip("needs the compiled cpu backend")
    assert auto(torch.float64) == "cpu"
    (path,) = verdict_files(cache, "cpu", "float64")
    data = json.loads(path.read_text())
    assert data["ok"] is True and data["key"]["backend"] == "cpu"
    assert {r["case"] for r in data["results"]} == set(selfcheck.CASES)
    selfcheck.reset()
    forbid_checks(monkeypatch)
    assert auto(torch.float64) == "cpu"


@pytest.mark.parametrize("damage", ["garbage", "empty object", "truncated", "wrong key"])
def test_a_corrupted_cache_file_is_ignored_with_a_warning(wrong, cache, damage):
    with pytest.warns(RuntimeWarning, match="failed its self-check"):
        auto()
    (path,) = verdict_files(cache)
    good = path.read_text()
    damaged = {
        "garbage": "\x00\x01 not json",
        "empty object": "{}",
        "truncated": good[: len(good) // 2],
        "wrong key": json.dumps({**json.loads(good), "key": {**json.loads(good)["key"], "build": "other"}}),
    }[damage]
    path.write_text(damaged)
    selfcheck.reset()
    with pytest.warns(RuntimeWarning) as caught:
        assert auto() == fallback()
    messages = [str(w.message) for w in caught]
    assert any("corrupted self-check cache" in m and path.name in m for m in messages), messages
    assert any("failed its self-check" in m for m in messages), messages
    assert json.loads(path.read_text())["ok"] is False  # checked again and rewritten


def test_selfcheck_can_be_switched_off(wrong, cache, monkeypatch):
    monkeypatch.setenv("GMEM_SELFCHECK", "0")
    forbid_checks(monkeypatch)
    assert auto() == NAME
    assert not (cache / "selfcheck").exists()


def test_auto_is_remembered_until_backends_or_verdicts_change(cache, monkeypatch):
    # "auto" is resolved on every op call: its answer is remembered (a tenth of a small op's call
    # otherwise), and forgotten when what it was built on changes
    calls = []
    resolve = backends._resolve

    def counting(*args):
        if args[0] == "auto":  # (the self-check's own op calls name their backends)
            calls.append(args)
        return resolve(*args)

    monkeypatch.setattr(backends, "_resolve", counting)
    first = auto()
    assert auto() == first and auto() == first and len(calls) == 1
    auto(torch.float64)
    assert len(calls) == 2  # another dtype is another question
    selfcheck.reset()
    assert auto() == first and len(calls) == 3
    monkeypatch.setenv("GMEM_SELFCHECK", "0")
    assert auto() == first and len(calls) == 4
    # a better backend registers: "auto" sees it at once (it passes the check: GMEM_SELFCHECK=0)
    ops.register_backend(WrongBackend(), priority=50)
    try:
        assert auto() == NAME
    finally:
        backends._REGISTRY.pop(NAME, None)  # leaves without register_backend: the memo must not name it
    assert auto() == first


def test_auto_resolution_inside_torch_compile_runs_the_check(wrong, cache):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 5, 5)
    wn = ops.normalize_weight(torch.randn(2, 3, 3, 3))[0]
    gamma, beta = torch.randn(2, 2, 3), torch.randn(2, 2, 3)
    ids = torch.tensor([1, 0, 1])
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, g, b: ops.modulated_conv2d(x, wn, g, b, task_ids=ids, padding=1),
                             backend="eager", fullgraph=True)
    with pytest.warns(RuntimeWarning, match="failed its self-check"):
        y = compiled(x, gamma, beta)
    torch._dynamo.reset()
    torch.testing.assert_close(y.double(), formulas.conv2d(x, wn, gamma, beta, task_ids=ids, padding=(1, 1)),
                               rtol=1e-5, atol=1e-5)
    assert len(verdict_files(cache)) == 1


def test_concurrent_writers_never_expose_a_partial_file(cache):
    key = {"format": selfcheck.FORMAT, "backend": "x", "dtype": "float32"}
    path = selfcheck.verdict_path(key)
    verdict = selfcheck.Verdict("x", "cpu", "float32", True, None, key, [{"case": "c" * 5000}])
    errors, stop = [], threading.Event()

    def writer():
        while not stop.is_set():
            selfcheck._write(path, verdict)

    def reader():
        for _ in range(200):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                try:
                    got = selfcheck._read(path, key)
                except Exception as err:  # a warning (corrupted) or anything else: a partial file was seen
                    errors.append(err)
                    continue
            if got is not None and got.ok is not True:
                errors.append(got)

    threads = [threading.Thread(target=writer) for _ in range(2)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads[2:]:
        t.join()
    stop.set()
    for t in threads[:2]:
        t.join()
    assert errors == []
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_doctor_reports_a_failing_backend_and_exits_nonzero(wrong, capsys):
    assert doctor.main(["--no-timing", "--backend", NAME, "reference"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.split()[:4] == [NAME, "cpu", "float32", "FAIL"] for line in lines), out
    assert any(line.split()[:4] == ["reference", "cpu", "float32", "PASS"] for line in lines), out
    failing = [line for line in lines if line.strip().startswith("FAIL ")]
    assert {line.split("FAIL", 1)[1].split("  ")[0].strip() for line in failing} >= {"conv mixed tasks"}
    assert "verdict: FAIL" in out and f"{NAME} cpu float32: conv mixed tasks: d gamma" in out


def test_doctor_json_and_the_cli_command(cache, capsys):
    assert "doctor" in COMMANDS
    assert main(["doctor", "--json", "--no-timing", "--backend", "reference"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ok"] is True and {c["backend"] for c in info["self_test"]} == {"reference"}
    assert info["versions"]["torch"] == torch.__version__
    names = {row["name"] for row in info["backends"]}
    assert {"reference", "cpu", "cuda", "triton"} <= names
    for row in info["backends"]:
        assert row["available"] or row["reason"], row
    assert main(["doctor", "--backend", "nope"]) == 1
    assert "unknown backend" in capsys.readouterr().err


def test_doctor_runs_as_a_module_with_the_triton_interpreter(tmp_path):
    """A fresh process, as a user runs it: versions, build, the cpu backend, Triton's interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1", GMEM_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "gmem.doctor", "--no-timing"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    lines = [line.split() for line in out.splitlines()]
    assert f"torch {torch.__version__}" in out and "extension (csrc/)" in out
    assert "verdict: every available backend passes" in out
    has_triton = __import__("importlib").util.find_spec("triton") is not None
    expected = [["reference", "cpu", "float32", "PASS"]]
    if "cpu" in ops.available_backends():
        expected += [["cpu", "cpu", "float32", "PASS"], ["cpu", "cpu", "float64", "PASS"]]
    if has_triton:
        expected.append(["triton", "cpu", "float32", "PASS"])
        assert ["triton", "available", "cpu:", "float32;", "auto", "on", "never"] in [line[:7] for line in lines], out
    for want in expected:
        assert want in [line[:4] for line in lines], (want, out)
    cached = {p.name.split("-")[0] for p in (tmp_path / "cache" / "selfcheck").glob("*.json")}
    assert cached == {e[0] for e in expected}  # the doctor leaves its verdicts for "auto"


def test_doctor_timing_line(cache):
    rows = [row for row in doctor.backends() if row["name"] in ("reference", "cpu") and row["available"]]
    lines = doctor.timing(rows, reps=2)
    assert {line["backend"] for line in lines} == {row["name"] for row in rows}
    assert all(line["ms"] > 0 and "fwd+bwd" in line["shape"] for line in lines), lines
