"""Run the benchmark suite: ``python -m benchmarks.run [--quick] [--device cpu|cuda] [--ops ...] [--json FILE]``.

Prints a table per case (median ms, ratio to ``reference`` and to ``plain``, TFLOP/s or GB/s, peak
memory, the targets that apply) and writes JSON: ``{"meta": {...}, "results": [records]}`` with one
record per (case, provider). See ``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import sys
import time
import traceback
from typing import Callable, Optional

import torch

from . import cases as cases_mod
from . import machine, report, timing
from .cases import Case
from .providers import DTYPES, build_providers, compiled_backends, make_inputs


def default_threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", 0) or os.cpu_count() or 1)


def run_case(case: Case, device: str, budget: timing.Budget, compile_mode: Optional[str],
             include: Optional[set[str]], env: dict, skipped: dict, log: Callable[[str], None]) -> list[dict]:
    machine.set_tf32(case.tf32) if device == "cuda" else None
    names, why = compiled_backends(device, DTYPES[case.dtype])
    skipped.update(why)
    inp = make_inputs(case, device)
    records = []
    try:
        providers = build_providers(case, inp, device, names, compile_mode, include)
    except Exception as err:  # one broken provider must not stop the suite: build them one by one
        log(f"  building providers failed ({err!r}); retrying one at a time")
        providers = []
        for name in ["reference", "torch_compile", *names, "grouped_conv", "per_task_plain", "plain"]:
            if include is not None and name not in include:
                continue
            try:
                providers += build_providers(case, inp, device, names, compile_mode, {name})
            except Exception as err2:  # noqa: BLE001
                records.append(_error_record(case, name, env, err2))
    try:
        all_stats = timing.measure_many({p.name: p.fn for p in providers}, device, budget)
    except Exception:  # noqa: BLE001 - one provider failed while timing: time them one by one
        all_stats = {}
        for p in providers:
            try:
                all_stats[p.name] = timing.measure(p.fn, device, budget)
            except Exception as err:  # noqa: BLE001 - record and carry on
                records.append(_error_record(case, p.name, env, err))
    for p in providers:
        if p.name not in all_stats:
            continue
        stats = all_stats[p.name]
        try:
            peak = timing.peak_memory(p.fn, device)
        except Exception:  # noqa: BLE001
            peak = None
        rec = {**case.fields(), "backend": p.name, **stats, "peak_bytes": peak,
               **report.throughput(case, stats["ms"]), **env}
        rec["tf32"] = case.tf32 if device == "cuda" else False
        if p.compile_s is not None:
            rec["compile_s"] = round(p.compile_s, 3)
        if p.note:
            rec["note"] = p.note
        records.append(rec)
    del inp, providers
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return records


def _error_record(case: Case, backend: str, env: dict, err: BaseException) -> dict:
    return {**case.fields(), "backend": backend, "ms": None, **env,
            "error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}


def run_suite(case_list: list[Case], device: str = "cpu", budget: timing.Budget = timing.QUICK,
              threads: Optional[int] = None, providers: Optional[list[str]] = None,
              compile_mode: Optional[str] = "auto", e2e: bool = False, quick: bool = True,
              log: Callable[[str], None] = print, e2e_ops: Optional[list[str]] = None,
              on_case: Optional[Callable[[dict], None]] = None) -> dict:
    """Run ``case_list`` (plus the end-to-end cases if ``e2e``); returns ``{"meta", "results", "errors"}``.

    ``providers`` restricts which providers run (names as in the records); ``compile_mode`` "auto"
    means max-autotune on GPU and the default mode on CPU. ``on_case`` gets the results so far
    (``meta["complete"]`` False) after every case, so that a run cut short keeps what it measured.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("benchmarks: --device cuda asked for, but torch sees no GPU")
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    if compile_mode == "auto":
        compile_mode = "max-autotune" if device == "cuda" else None
    env = machine.environment(device, threads)
    include = set(providers) if providers else None
    skipped: dict[str, str] = {}
    started = time.time()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    records: list[dict] = []

    def summary(complete: bool) -> dict:
        good = [r for r in records if r.get("ms")]
        errors = [r for r in records if not r.get("ms")]
        report.add_ratios(good)
        report.add_targets(good)
        meta = {
            **env,
            "suite": "quick" if quick else "full",
            "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - started, 1),
            "complete": complete,
            "budget": vars(budget),
            "compile_mode": compile_mode or "default",
            "available_backends": __import__("gmem.ops", fromlist=["x"]).available_backends(),
            "skipped_backends": skipped,
            # 1-minute load averages before and after (this run itself adds about `threads`)
            "load_average": [load_start[0], os.getloadavg()[0]] if load_start else None,
            "method": ("median of repeated calls after warm-up; " + (
                "CUDA events, L2 flushed (256 MiB write) before each call"
                if device == "cuda" else
                f"{'wall clock' if budget.clock == 'wall' else 'process CPU time'}, torch.set_num_threads({threads})")
                + "; the providers of a case are timed interleaved, one call each per round"),
        }
        return {"meta": meta, "results": good, "errors": errors}

    for n, case in enumerate(case_list, 1):
        t0 = time.perf_counter()
        try:
            recs = run_case(case, device, budget, compile_mode, include, env, skipped, log)
        except Exception as err:  # noqa: BLE001 - e.g. out of memory making the inputs
            log(traceback.format_exc(limit=2))
            recs = [_error_record(case, "*", env, err)]
        records += recs
        done = ", ".join(f"{r['backend']} {r['ms']:.3f}" if r.get("ms") else f"{r['backend']} ERROR" for r in recs)
        log(f"[{n}/{len(case_list)}] {case.op} {case.name} ({time.perf_counter() - t0:.1f}s): {done}")
        if on_case is not None:
            on_case(summary(complete=False))
    if e2e:
        from . import e2e as e2e_mod

        records += e2e_mod.run(device, quick=quick, budget=budget, env=env, include=include,
                               compile_mode=compile_mode, log=log, ops=e2e_ops)
    return summary(complete=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small cases at small sizes (minutes on a CPU)")
    parser.add_argument("--tiny", action="store_true", help="seconds: the smoke-test cases")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda if available, else cpu")
    parser.add_argument("--ops", nargs="+", choices=cases_mod.OPS, help="only these ops")
    parser.add_argument("--filter", nargs="+", help="only cases whose name contains one of these texts")
    parser.add_argument("--providers", nargs="+", help="only these providers (e.g. reference plain cpu)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: $OMP_NUM_THREADS or all cores)")
    parser.add_argument("--compile-mode", default="auto",
                        help="torch.compile mode for torch_compile (auto: max-autotune on GPU, default on CPU)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training/replay steps")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="CPU timing: wall clock (default) or this process's CPU time (leaves out what other "
                             "processes and the hypervisor take; for a shared machine)")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--save", action="store_true",
                        help="write the records to benchmarks/results/<machine>.json")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        case_list, budget = cases_mod.tiny_cases(), timing.TINY
    elif args.quick:
        case_list, budget = cases_mod.quick_cases(), timing.QUICK
    else:
        case_list, budget = cases_mod.full_cases(device), timing.FULL
    budget = dataclasses.replace(budget, clock=args.clock)
    if args.ops:
        case_list = [c for c in case_list if c.op in args.ops]
    if args.filter:
        case_list = [c for c in case_list if any(text in c.name for text in args.filter)]
        args.no_e2e = True  # a filter names kernel cases
    want_e2e = not args.no_e2e and not args.tiny and (not args.ops or any(o.startswith("e2e") for o in args.ops))
    if args.list:
        for c in case_list:
            print(f"{c.op:18} {c.name}")
        return 0

    paths = [args.json] if args.json else []
    if args.save:
        threads = args.threads or default_threads()
        paths.append(os.path.join(os.path.dirname(__file__), "results", machine.results_filename(device, threads)))

    def checkpoint(partial: dict) -> None:
        # A run cut short (time limit, crash) keeps what it measured in the --json file; the --save
        # file under benchmarks/results/ is only replaced by a complete run.
        report.write_json(args.json, partial)

    result = run_suite(case_list, device, budget, args.threads, args.providers, args.compile_mode,
                       e2e=want_e2e, quick=args.quick or args.tiny,
                       log=lambda s: print(s, file=sys.stderr, flush=True),
                       e2e_ops=[o for o in args.ops if o.startswith("e2e")] if args.ops else None,
                       on_case=checkpoint if args.json else None)
    meta, records = result["meta"], result["results"]
    print(f"# gmem benchmarks: {meta['machine']} ({device}), torch {meta['torch']}, triton {meta['triton']}, "
          f"{meta['threads']} threads, {meta['suite']} suite, {meta['method']}")
    print(f"# available backends: {meta['available_backends']}; skipped: {meta['skipped_backends'] or 'none'}")
    load = meta.get("load_average")
    if device == "cpu" and load and max(load) > meta["threads"] + 0.75:
        print(f"# note: load average up to {max(load):.1f} on {os.cpu_count()} logical CPUs: the machine is shared, "
              "CPU times are noisy (providers are interleaved, so ratios hold up better than absolute times)")
    print(report.format_table(records))
    print(report.target_summary(records))
    if result["errors"]:
        print(f"{len(result['errors'])} provider runs failed:")
        for r in result["errors"]:
            print(f"  {r['backend']} {r['case']}: {r['error']}")
    payload = {"meta": meta, "results": records, "errors": result["errors"]}
    for path in paths:
        report.write_json(path, payload)
        print(f"wrote {len(records)} records to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
