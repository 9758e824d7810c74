"""The suite's cases through pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Not part of ``make test`` (which runs ``tests/``). Environment variables choose what runs:
``GMEM_BENCH_DEVICE`` (cpu | cuda; default cuda when available), ``GMEM_BENCH_SUITE``
(quick | full | tiny; default quick). Each test is one (case, provider) pair; the case's fields go
into ``extra_info`` so ``--benchmark-json`` output carries them. Compile time of ``torch_compile``
happens before pytest-benchmark starts timing.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks import cases as cases_mod
from benchmarks import e2e, machine
from benchmarks.providers import DTYPES, build_providers, compiled_backends, make_inputs

DEVICE = os.environ.get("GMEM_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
SUITE = os.environ.get("GMEM_BENCH_SUITE", "quick")
CASES = {"quick": cases_mod.quick_cases, "tiny": cases_mod.tiny_cases,
         "full": lambda: cases_mod.full_cases(DEVICE)}[SUITE]()
COMPILE_MODE = "max-autotune" if DEVICE == "cuda" else None


def _providers(case: cases_mod.Case) -> list[str]:
    names, _ = compiled_backends(DEVICE, DTYPES[case.dtype])
    out = ["reference", "torch_compile", *names]
    if case.op == "modulated_conv2d" and case.style_tasks:
        out += ["grouped_conv", "per_task_plain"]
    return out + ["plain"]


PARAMS = [pytest.param(case, p, id=f"{case.op}|{case.name}|{p}") for case in CASES for p in _providers(case)]


def _synced(fn):
    if DEVICE != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("case,provider", PARAMS)
def test_kernel_case(benchmark, case, provider):
    if DEVICE == "cuda":
        machine.set_tf32(case.tf32)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0) or os.cpu_count()))
    inp = make_inputs(case, DEVICE)
    names, _ = compiled_backends(DEVICE, DTYPES[case.dtype])
    (prov,) = build_providers(case, inp, DEVICE, names, COMPILE_MODE, include={provider})
    benchmark.extra_info.update({**case.fields(), "backend": provider,
                                 **machine.environment(DEVICE, torch.get_num_threads())})
    if prov.compile_s is not None:
        benchmark.extra_info["compile_s"] = prov.compile_s
    benchmark(_synced(prov.fn))


E2E_MODEL = e2e.QUICK_MODEL if SUITE != "full" else (e2e.GPGAN_MODEL if DEVICE == "cuda" else e2e.DEMO_MODEL)
E2E_PROVIDERS = ["reference", *compiled_backends(DEVICE, torch.float32)[0], "plain"]


@pytest.mark.parametrize("step", ["train", "replay"])
@pytest.mark.parametrize("provider", E2E_PROVIDERS)
def test_end_to_end(benchmark, step, provider):
    pytest.importorskip("gmem.nn")
    pytest.importorskip("gmem.models")
    make = e2e.train_step_fn if step == "train" else e2e.replay_step_fn
    fn = make(E2E_MODEL, DEVICE, None if provider == "plain" else provider)
    batch = E2E_MODEL.batch if step == "train" else E2E_MODEL.replay_batch
    benchmark.extra_info.update({"op": f"e2e_{step}", "model": E2E_MODEL.name, "nf": E2E_MODEL.nf,
                                 "batch": batch, "backend": provider})
    benchmark.pedantic(_synced(fn), warmup_rounds=1, rounds=5, iterations=1)
