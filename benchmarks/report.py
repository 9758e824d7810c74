"""Records, ratios, targets, the printed table, JSON output and the plot.

Run as a script to summarise results files (markdown for the README, and the plot)::

    python -m benchmarks.report benchmarks/results/*.json --plot benchmarks/results/ratio_to_plain.png
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections import defaultdict
from typing import Iterable, Optional

from .cases import PER_CALL, Case

BASELINES = {"reference", "torch_compile", "plain", "aten", "grouped_conv", "per_task_plain"}


def is_compiled(backend: str) -> bool:
    """A gmem kernel backend (cpu, cuda, triton, ...), as opposed to a baseline provider."""
    return backend not in BASELINES


# ---------------------------------------------------------------------------------------------
# work done by one case (for TFLOP/s and GB/s)
# ---------------------------------------------------------------------------------------------
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


def work(case: Case) -> tuple[str, float]:
    """``("TFLOP/s", flops)`` for convs and linears, ``("GB/s", bytes)`` for the weight build.

    The count is the useful work of the plain op (the weight build of a modulated conv is not
    counted), so every provider of a case is rated against the same number.
    """
    layer, bwd = case.layer, case.pass_ == "fwd+bwd"
    if case.op == "madafm_weight":
        t = max(case.style_tasks, 1)
        kk = layer.kernel**2
        weight, style = layer.c_out * layer.c_in * kk, layer.c_out * layer.c_in
        moved = weight + 2 * t * style + t * weight  # read Wn, gamma, beta; write the weights
        if bwd:
            moved += t * weight + weight + 2 * t * style  # read dW, Wn; write dgamma, dbeta
        return "GB/s", moved * ELEMENT_BYTES[case.dtype]
    if layer.is_linear:
        flops = 2.0 * case.batch * layer.c_in * layer.c_out
    else:
        flops = 2.0 * case.batch * layer.c_out * layer.c_in * layer.kernel**2 * layer.size**2
    return "TFLOP/s", flops * (3 if bwd else 1)


def throughput(case: Case, ms: float) -> dict:
    unit, amount = work(case)
    if unit == "GB/s":
        return {"gbps": amount / (ms * 1e-3) / 1e9, "tflops": None}
    return {"tflops": amount / (ms * 1e-3) / 1e12, "gbps": None}


# ---------------------------------------------------------------------------------------------
# ratios and targets
# ---------------------------------------------------------------------------------------------
def add_ratios(records: list[dict]) -> None:
    """``ratio_reference = ms / ms(reference)`` and ``ratio_plain = ms / ms(plain)`` within each case."""
    by_case = defaultdict(dict)
    for r in records:
        by_case[r["case"]][r["backend"]] = r
    for r in records:
        peers = by_case[r["case"]]
        for key, base in (("ratio_reference", "reference"), ("ratio_plain", "plain")):
            other = peers.get(base)
            r[key] = r["ms"] / other["ms"] if other and other.get("ms") else None


def _target(text: str, value: Optional[float], bound: float, higher_is_better: bool) -> Optional[dict]:
    if value is None or not math.isfinite(value):
        return None
    met = value >= bound if higher_is_better else value <= bound
    return {"target": text, "value": round(value, 4), "bound": bound, "met": bool(met)}


def add_targets(records: list[dict]) -> None:
    """Attach the project's speed targets to the compiled-backend records they apply to.

    * every case: ahead of ``torch_compile``;
    * GPU single task, conv fwd+bwd: within 1.10x of ``plain``; >= 1.5x ``reference`` for the
      large-weight, small-activation blocks (GP-GAN 256, 4x4 to 16x16);
    * GPU, 64 distinct tasks in a batch of 64: within 1.25x of the single-task time, >= 5x
      ``reference``, peak memory within 1.10x of the 1-task mixed batch (independent of T);
    * GPU low rank: within 1.15x of the same case with dense Gamma/B;
    * CPU: the weight build (fwd, and fwd+bwd) >= 3x ``reference``, at every size but the per-call one;
    * CPU per-call cost: the weight build at the per-call size (``cases.PER_CALL``) within 2x of
      ``aten`` (one ATen op with autograd writing an output of the same size).
    """
    index = {(r["case"], r["backend"]): r for r in records}
    by_key = {}
    for r in records:
        by_key[(r["op"], r["layer"], r["kind"], r["batch"], r["tasks"], r["mix"], r["rank"], r["dtype"],
                r["tf32"], r["pass"], r["backend"])] = r

    def find(r, **changes):
        key = dict(op=r["op"], layer=r["layer"], kind=r["kind"], batch=r["batch"], tasks=r["tasks"],
                   mix=r["mix"], rank=r["rank"], dtype=r["dtype"], tf32=r["tf32"], pass_=r["pass"],
                   backend=r["backend"])
        key.update(changes)
        return by_key.get(tuple(key.values()))

    for r in records:
        if not is_compiled(r["backend"]) or not r.get("ms"):
            continue
        targets = []
        tc = index.get((r["case"], "torch_compile"))
        if tc and tc.get("ms"):
            targets.append(_target("ahead of torch_compile", r["ms"] / tc["ms"], 1.0, False))
        gpu, conv = r["device"] == "cuda", r["op"] == "modulated_conv2d"
        speedup = 1 / r["ratio_reference"] if r.get("ratio_reference") else None
        if gpu and conv and r["kind"] == "single" and r["pass"] == "fwd+bwd":
            targets.append(_target("single task fwd+bwd <= 1.10x plain", r.get("ratio_plain"), 1.10, False))
            if r["layer"].startswith("gpgan256") and r["size"] <= 16:
                targets.append(_target("large weights, small activations: >= 1.5x reference", speedup, 1.5, True))
        if gpu and conv and r["kind"] == "mixed" and r["tasks"] == 64 and r["batch"] == 64:
            single = find(r, kind="single", tasks=1, mix="-")
            if single and single.get("ms"):
                targets.append(_target("64 tasks in 64 <= 1.25x single task", r["ms"] / single["ms"], 1.25, False))
            targets.append(_target("64 tasks in 64 >= 5x reference", speedup, 5.0, True))
            one = find(r, tasks=1, mix="uniform")
            if one and one.get("peak_bytes") and r.get("peak_bytes") is not None:
                targets.append(_target("memory independent of tasks (<= 1.10x of 1 task)",
                                       r["peak_bytes"] / one["peak_bytes"], 1.10, False))
        if gpu and r["kind"] == "lowrank":
            dense = find(r, kind="mixed" if r["tasks"] > 1 else "single", rank=None,
                         mix=r["mix"] if r["tasks"] > 1 else "-")
            if dense and dense.get("ms"):
                targets.append(_target("low rank <= 1.15x dense", r["ms"] / dense["ms"], 1.15, False))
        per_call = r["layer"] == PER_CALL.name
        if not gpu and r["op"] == "madafm_weight" and not per_call:
            targets.append(_target(f"CPU weight build {r['pass']} >= 3x reference", speedup, 3.0, True))
        aten = index.get((r["case"], "aten"))
        if not gpu and per_call and aten and aten.get("ms"):
            targets.append(_target("per call: within 2x of one ATen op", r["ms"] / aten["ms"], 2.0, False))
        r["targets"] = [t for t in targets if t]


# ---------------------------------------------------------------------------------------------
# table
# ---------------------------------------------------------------------------------------------
def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def format_table(records: list[dict]) -> str:
    """One block per case: a row per provider with ms, ratios, throughput, peak memory, targets."""
    lines = []
    header = f"  {'backend':<14}{'ms':>10}{'x ref':>8}{'x plain':>9}{'rate':>16}{'peak MB':>10}  targets"
    by_case: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_case[r["case"]].append(r)
    for case, rows in by_case.items():
        lines.append(f"{rows[0]['op']}  {case}")
        lines.append(header)
        for r in rows:
            if r.get("images_per_s") is not None:
                rate = f"{r['images_per_s']:.1f} img/s"
            elif r.get("tflops") is not None:
                rate = f"{r['tflops']:.3f} TFLOP/s"
            elif r.get("gbps") is not None:
                rate = f"{r['gbps']:.1f} GB/s"
            else:
                rate = "-"
            peak = None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**20
            marks = "  ".join(
                f"{'OK ' if t['met'] else 'MISS'} {t['target']} ({t['value']:.2f})" for t in r.get("targets", [])
            )
            extra = f" [compile {r['compile_s']:.1f}s]" if r.get("compile_s") else ""
            lines.append(
                f"  {r['backend']:<14}{_fmt(r['ms'], '10.3f')}{_fmt(r.get('ratio_reference'), '8.2f')}"
                f"{_fmt(r.get('ratio_plain'), '9.2f')}{rate:>16}{_fmt(peak, '10.3g')}  {marks}{extra}"
            )
    return "\n".join(lines)


def target_summary(records: list[dict]) -> str:
    rows = [(r, t) for r in records for t in r.get("targets", [])]
    if not rows:
        return "targets: none apply to the backends measured here"
    met = sum(t["met"] for _, t in rows)
    out = [f"targets met: {met}/{len(rows)}"]
    for r, t in rows:
        out.append(f"  {'OK  ' if t['met'] else 'MISS'} {r['backend']:<8} {t['target']}: {t['value']:.2f} "
                   f"(bound {t['bound']})  [{r['case']}]")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` atomically (a temporary file renamed over ``path``)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".bench-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=False)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; results are for sharing
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_records(path: str) -> tuple[dict, list[dict]]:
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, list):
        return {}, data
    return data.get("meta", {}), data["results"]


def plot_ratio_to_plain(files: Iterable[str], out: str) -> None:
    """One panel per results file: each provider's time relative to ``plain`` for every case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(path, *load_records(path)) for path in files]
    height = max(4.0, max(len({r["case"] for r in recs}) for _, _, recs in panels) * 0.28 + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(9 * len(panels), height), squeeze=False)
    markers = {"reference": "o", "torch_compile": "s", "grouped_conv": "^", "per_task_plain": "v", "cpu": "D",
               "cuda": "P", "triton": "X"}
    # one colour per provider in every panel (matplotlib's cycle would recolour per panel)
    colors = {b: f"C{i}" for i, b in enumerate(markers)}
    for ax, (path, meta, recs) in zip(axes[0], panels):
        recs = [r for r in recs if r.get("ratio_plain") and r["backend"] != "plain"]
        cases = list(dict.fromkeys(r["case"] for r in recs))
        backends = list(dict.fromkeys(r["backend"] for r in recs))
        for b in backends:
            pts = [(r["ratio_plain"], cases.index(r["case"])) for r in recs if r["backend"] == b]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=b, marker=markers.get(b, "*"),
                       color=colors.get(b, "C9"), s=36)
        ax.axvline(1.0, color="k", lw=1)
        ax.axvline(1.10, color="g", lw=0.8, ls="--", label="1.10x plain (GPU target)")
        ax.set_xscale("log")
        ax.set_yticks(range(len(cases)))
        ax.set_yticklabels(cases, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("time / time of plain F.conv2d / F.linear (lower is better, log scale)")
        machine = meta.get("machine", os.path.basename(path))
        threads = meta.get("threads", "?")
        plural = "" if threads == 1 else "s"
        ax.set_title(f"{machine} ({meta.get('device', '?')}, {threads} thread{plural})", fontsize=9)
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def markdown_table(records: list[dict]) -> str:
    """A compact markdown table: one row per case, one column of ms (x plain) per provider."""
    backends = list(dict.fromkeys(r["backend"] for r in records))
    by_case = defaultdict(dict)
    for r in records:
        by_case[r["case"]][r["backend"]] = r
    lines = ["| case | " + " | ".join(backends) + " | targets |", "|---" * (len(backends) + 2) + "|"]
    for case, row in by_case.items():
        cells = []
        for b in backends:
            r = row.get(b)
            if not r or r.get("ms") is None:
                cells.append("")
            elif r.get("ratio_plain"):
                cells.append(f"{r['ms']:.3g} ({r['ratio_plain']:.2f}x)")
            else:
                cells.append(f"{r['ms']:.3g}")
        marks = [f"{'✓' if t['met'] else '✗'} {r2['backend']}: {t['target']} ({t['value']:.2f})"
                 for r2 in row.values() for t in r2.get("targets", [])]
        lines.append(f"| {case} | " + " | ".join(cells) + " | " + "; ".join(marks) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Summarise benchmark results files.")
    parser.add_argument("files", nargs="+", help="results JSON files")
    parser.add_argument("--plot", help="write the ratio-to-plain plot (PNG) here")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table per file")
    args = parser.parse_args(argv)
    for path in args.files:
        meta, recs = load_records(path)
        if args.markdown:
            print(f"### {meta.get('machine', path)}\n")
            print(markdown_table(recs))
            print()
        else:
            print(format_table(recs))
            print(target_summary(recs))
    if args.plot:
        plot_ratio_to_plain(args.files, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
