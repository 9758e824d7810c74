"""The benchmark suite runs (tiny sizes, seconds) and writes sound records.

Speed is never asserted here: only that every provider runs and the records are complete and
self-consistent. The real numbers come from ``python -m benchmarks.run`` (see benchmarks/README.md).
"""
from __future__ import annotations

import math
import pathlib
import sys
from collections import Counter, defaultdict

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import cases, e2e, report, run, timing  # noqa: E402
from benchmarks.providers import compiled_backends  # noqa: E402
from gmem import models  # noqa: E402

REQUIRED = ("op", "case", "backend", "ms", "device", "machine", "torch", "triton", "dtype", "tf32",
            "threads", "pass", "batch", "tasks", "ms_min", "reps", "peak_bytes", "ratio_reference",
            "ratio_plain")


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    """The suite sets torch's thread count (it records it): give the other modules theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def suite():
    return run.run_suite(cases.tiny_cases(), "cpu", timing.TINY, threads=1, log=lambda s: None)


def expected_providers(case: cases.Case) -> set[str]:
    names, _ = compiled_backends("cpu", torch.float32)
    wanted = {"reference", "torch_compile", "plain", *names}
    if case.op == "modulated_conv2d" and case.style_tasks:
        wanted |= {"grouped_conv", "per_task_plain"}
    if case.op == "madafm_weight" and case.kind != "lowrank":
        wanted |= {"aten"}  # the per-call yardstick: one ATen op
    return wanted


def test_no_provider_failed(suite):
    assert suite["errors"] == [], [(r["case"], r["backend"], r["error"]) for r in suite["errors"]]


def test_records_have_the_contract_fields(suite):
    records = suite["results"]
    assert records
    for r in records:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, (r["case"], r["backend"], missing)
        assert r["device"] == "cpu" and r["threads"] == 1 and r["torch"] == torch.__version__
        assert r["ms"] > 0 and math.isfinite(r["ms"]) and r["ms_min"] <= r["ms"]
        assert r["peak_bytes"] is None or r["peak_bytes"] >= 0
        assert (r["tflops"] or r["gbps"]) > 0
    assert {r["op"] for r in records} == {"madafm_weight", "modulated_conv2d", "modulated_linear"}
    assert {r["kind"] for r in records} == {"single", "mixed", "lowrank"}


def test_every_available_provider_ran_every_case(suite):
    by_case = defaultdict(set)
    for r in suite["results"]:
        by_case[r["case"]].add(r["backend"])
    assert len(by_case) == len(cases.tiny_cases())
    for case in cases.tiny_cases():
        assert by_case[case.name] == expected_providers(case), case.name
    meta = suite["meta"]
    assert "reference" in meta["available_backends"]
    if "triton" in meta["available_backends"]:  # the CPU interpreter is not timed, and says why
        assert "interpreter" in meta["skipped_backends"]["triton"]


def test_ratios_are_consistent(suite):
    by_case = defaultdict(dict)
    for r in suite["results"]:
        by_case[r["case"]][r["backend"]] = r
    for rows in by_case.values():
        ref, plain = rows["reference"]["ms"], rows["plain"]["ms"]
        for r in rows.values():
            assert r["ratio_reference"] == pytest.approx(r["ms"] / ref)
            assert r["ratio_plain"] == pytest.approx(r["ms"] / plain)
        assert rows["reference"]["ratio_reference"] == 1.0 and rows["plain"]["ratio_plain"] == 1.0
        assert rows["torch_compile"]["compile_s"] > 0


def test_json_round_trip(suite, tmp_path):
    path = tmp_path / "out" / "cpu.json"
    report.write_json(str(path), {"meta": suite["meta"], "results": suite["results"]})
    meta, records = report.load_records(str(path))
    assert records == suite["results"] and meta["device"] == "cpu"
    table = report.format_table(records)
    assert all(r["case"] in table for r in records)
    assert report.markdown_table(records).count("\n") == len({r["case"] for r in records}) + 1


def test_a_run_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    # the --json file is rewritten after every case (meta.complete False); a crash in the third
    # case leaves the first two on disk
    two = [c for c in cases.tiny_cases() if c.op == "madafm_weight"][:2]
    third = cases.tiny_cases()[-1]
    real_run_case = run.run_case

    def run_case(case, *args, **kwargs):
        if case is third:
            raise KeyboardInterrupt  # not an Exception: ends the run like Ctrl-C or a time limit would
        return real_run_case(case, *args, **kwargs)

    monkeypatch.setattr(run, "run_case", run_case)
    monkeypatch.setattr(cases, "tiny_cases", lambda: [*two, third])
    path = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        run.main(["--tiny", "--device", "cpu", "--threads", "1", "--providers", "reference", "plain",
                  "--json", str(path)])
    meta, records = report.load_records(str(path))
    assert meta["complete"] is False
    assert {r["case"] for r in records} == {c.name for c in two}


def test_cpu_time_clock_times_this_process_only(tmp_path):
    """``--clock cpu`` times CPU calls with the process's CPU time: a call that sleeps costs (almost)
    nothing there and its wall time on the wall clock; the records say which clock was used."""
    import time

    with pytest.raises(ValueError, match="clock"):
        timing.Budget(clock="tsc")
    budget = timing.Budget(warmup=1, warmup_s=0.0, min_reps=3, max_reps=3, min_time_s=0.0)
    sleep = lambda: time.sleep(0.02)  # noqa: E731
    wall = timing.measure(sleep, "cpu", budget)["ms"]
    cpu = timing.measure(sleep, "cpu", timing.Budget(**{**vars(budget), "clock": "cpu"}))["ms"]
    assert wall >= 19 and cpu < 10
    path = tmp_path / "r.json"
    assert run.main(["--tiny", "--device", "cpu", "--threads", "1", "--ops", "madafm_weight", "--providers",
                     "reference", "--clock", "cpu", "--json", str(path)]) == 0
    meta, records = report.load_records(str(path))
    assert "process CPU time" in meta["method"] and meta["budget"]["clock"] == "cpu"
    assert records and all(r["ms"] > 0 for r in records)


def test_cli_lists_quick_cases(capsys):
    assert run.main(["--quick", "--device", "cpu", "--list"]) == 0
    out = capsys.readouterr().out
    assert "modulated_conv2d" in out and "madafm_weight" in out and "modulated_linear" in out
    assert "T16-uniform" in out and "r8" in out


def test_task_assignment_mixes():
    for mix in ("uniform", "skewed"):
        for tasks in (1, 2, 8, 32, 64):
            ids = cases.task_assignment(64, tasks, mix)
            counts = Counter(ids)
            assert len(ids) == 64 and set(counts) == set(range(tasks))
    assert max(Counter(cases.task_assignment(64, 8, "uniform")).values()) == 8
    assert Counter(cases.task_assignment(64, 8, "skewed"))[0] > 16
    with pytest.raises(ValueError, match="tasks"):
        cases.task_assignment(4, 5, "uniform")


def test_gpgan256_layers_match_the_real_model():
    g = cases.GPGAN256
    assert (g["fc"].c_in, g["fc"].c_out) == (257, 16384)
    assert (g["b4.conv_0"].c_in, g["b4.conv_0"].size) == (1024, 4)
    assert (g["b256.conv_1"].c_out, g["b256.conv_1"].size) == (64, 256)
    G = models.Generator(size=32, nf=32, z_dim=128, embed_size=64)
    for key, layer in cases.DEMO32.items():
        if key == "fc":
            module = G.fc
        else:
            block = getattr(G, f"resnet_{int(math.log2(layer.size)) - 2}_0")
            module = block.get_submodule(key.split(".")[1])
        assert tuple(module.weight.shape[:2]) == (layer.c_out, layer.c_in), key


def test_targets_are_checked_against_the_right_baselines():
    conv = cases.Layer("gpgan256.G.block4.conv_0", 8, 8, 4)
    env = {"device": "cuda"}
    recs = []
    for kind, tasks, mix, ms in (("single", 1, "-", 1.0), ("mixed", 64, "uniform", 1.2), ("mixed", 1, "uniform", 1.0)):
        case = cases.Case("modulated_conv2d", conv, kind=kind, batch=64, tasks=tasks, mix=mix)
        for backend, t in (("reference", 10.0), ("plain", 1.0), ("torch_compile", 2.0), ("cuda", ms)):
            slower = 1.5 if kind == "mixed" and backend != "cuda" else 1
            recs.append({**case.fields(), "backend": backend, "ms": t * slower, "peak_bytes": 100, **env})
    report.add_ratios(recs)
    report.add_targets(recs)
    single = next(r for r in recs if r["backend"] == "cuda" and r["kind"] == "single")
    by_name = {t["target"]: t for t in single["targets"]}
    assert by_name["single task fwd+bwd <= 1.10x plain"]["met"]
    assert by_name["large weights, small activations: >= 1.5x reference"]["met"]
    mixed = next(r for r in recs if r["backend"] == "cuda" and r["tasks"] == 64)
    by_name = {t["target"]: t for t in mixed["targets"]}
    assert by_name["64 tasks in 64 <= 1.25x single task"]["value"] == pytest.approx(1.2)
    assert by_name["64 tasks in 64 <= 1.25x single task"]["met"]
    assert by_name["memory independent of tasks (<= 1.10x of 1 task)"]["met"]
    assert not any(r.get("targets") for r in recs if r["backend"] != "cuda")


def test_end_to_end_steps_run():
    tiny = e2e.Model("tiny8", size=8, nf=4, z_dim=8, embed_size=4, batch=2, replay_batch=4, replay_tasks=2)
    env = {"device": "cpu", "threads": 1}
    records = e2e.run("cpu", quick=True, budget=timing.TINY, env=env, log=lambda s: None, model=tiny)
    assert {r["op"] for r in records} == {"e2e_train", "e2e_replay"}
    names, _ = compiled_backends("cpu", torch.float32)
    assert {r["backend"] for r in records} == {"reference", "plain", *names}
    for r in records:
        assert r.get("error") is None, r
        assert r["ms"] > 0 and r["images_per_s"] > 0


def test_dropin_steps_run_and_train_what_each_provider_says():
    from benchmarks import dropin

    built = dropin.steps(size=16, batch=2)
    assert {"full", "frozen", "gmem"} <= set(built)
    assert dropin.measure({"frozen": built["frozen"][0]}, reps=1)["frozen"] > 0
    for name, (step, model) in built.items():
        step()
        grads = [p.grad is not None for p in model.parameters()]
        assert all(grads) if name == "full" else not all(grads), name
        assert any(grads) or name == "frozen", name
