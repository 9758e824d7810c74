"""Naive vs compressed GAN memory on a stream of similar tasks (the paper's Section 4.3 / Table 1, small).

    .venv/bin/python tools/compression_study.py --out experiments/results/compression

Tasks: pairs of classes of the embedded Fashion-MNIST set (0+1, 2+3, ..., 8+9: 160 images each), learned
in order on the embedded 32 px base, once naive and once compressed (``learn(compress=...)``: low-rank
prior on the residuals, knowledge base shared by the stream). Per task: generator style values stored,
the ratio to naive, and quality as pixFID8 (a proxy: Frechet distance of 8x8-pooled pixels, NOT the
Inception FID) of 256 samples against the task's images. Writes ``table.md``, ``results.json`` and
``storage_quality.png`` to ``--out``; the command line is recorded in the table.

The generator fc's mFiLM ``gamma``/``beta`` are compressed too (as ``(16 nf) x (s0^2)`` matrices, the
library's default); ``--no-compress-fc`` compresses B0-B3 only, as the released code; ``--truncation``
adds the per-block truncation study of the first naive task (the paper's Figure 4b:
``fig4b_truncation.png`` and ``truncation.md``); ``--spectra`` the singular values of every
naive task's style matrices (Figures 4a and 14: ``fig4a_spectra.png``, ``fig14_spectra.png``, ``spectra.md``).
The experiment of ``experiments/results/compression/`` is the command in its ``table.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import gmem
from gmem.compress.energy import rank_rule
from gmem.compress.study import energy_table, plot_singular_values, singular_values, style_matrices
from gmem.data import as_dataset, batch
from gmem.eval import fid_from_features, inception_features, near_duplicate_share, pixel_fid
from gmem.experiments.common import base_sha256


def tasks(n_tasks: int):
    data = as_dataset("fashion_mnist", 32, 3)
    images = batch(data, torch.arange(len(data)))
    out = []
    for t in range(n_tasks):
        classes = (2 * t % 10, (2 * t + 1) % 10)
        keep = (data.labels == classes[0]) | (data.labels == classes[1])
        out.append((f"fmnist_{classes[0]}{classes[1]}", images[keep]))
    return out


def run(args) -> dict:
    stream = tasks(args.tasks)
    rows = []
    mems = {"naive": gmem.GANMemory.default(), "compressed": gmem.GANMemory.default()}
    settings = {"keep": args.keep, "prior_weight": args.prior_weight, "prior_every": args.prior_every}
    from gmem.compress.knowledge import DEFAULT_LAYERS, RELEASED_LAYERS

    settings["layers"] = DEFAULT_LAYERS if args.compress_fc else RELEASED_LAYERS
    truncation, spectra = None, {}
    layers = settings.get("layers")
    for name, images in stream:
        row = {"task": name, "images": int(images.shape[0]),
               "real_near_duplicates": round(near_duplicate_share(images[:256]), 4)}
        features = {}
        for mode, mem in mems.items():
            t0 = time.time()
            mem.learn(name, images, iterations=args.iterations, batch_size=args.batch_size, seed=args.seed,
                      progress=False, compress=settings if mode == "compressed" else False)
            c = mem.parameter_counts(name)
            fake = mem.sample(name, args.samples, seed=0)
            row[mode] = {"stored": c["generator_stored"], "naive": c["generator_style"],
                         "pixfid8": round(pixel_fid(images, fake), 3), "seconds": round(time.time() - t0, 1),
                         "near_duplicates": round(near_duplicate_share(fake[:256]), 4)}
            if args.fid_samples:
                t1 = time.process_time()
                if "real" not in features:
                    features["real"] = inception_features(images)
                fid_fake = mem.sample(name, args.fid_samples, seed=1)
                row[mode]["fid"] = round(fid_from_features(features["real"], inception_features(fid_fake)), 2)
                row[mode]["fid_cpu_seconds"] = round(time.process_time() - t1, 1)
            if mode == "compressed":
                rec = mem.records[name]["compression"]
                row[mode]["new_ranks"] = rec["new_ranks"]
                row[mode]["max_rel_error"] = rec["max_rel_error"]
                row[mode]["convs_stored"], row[mode]["convs_dense"] = rec["stored_values"], rec["dense_values"]
                row[mode]["dense_layers"] = rec.get("dense_layers", [])
                row[mode]["capped"] = rec.get("capped", [])
            else:
                if args.truncation and truncation is None:
                    truncation = truncation_run(args, mem, name, images)
                if args.spectra:
                    spectra[name] = {k: [round(float(x), 6) for x in v]
                                     for k, v in singular_values(style_matrices(mem, name, layers)).items()}
        row["ratio"] = row["compressed"]["stored"] / row["naive"]["stored"]
        rows.append(row)
        print(f"{name}: naive {row['naive']['stored']:,} pixFID8 {row['naive']['pixfid8']} FID "
              f"{row['naive'].get('fid')}, compressed {row['compressed']['stored']:,} ({100 * row['ratio']:.1f}%) "
              f"pixFID8 {row['compressed']['pixfid8']} FID {row['compressed'].get('fid')}", flush=True)
    return {"args": vars(args), "rows": rows, "truncation": truncation, "spectra": spectra or None}


def truncation_run(args, mem, name, images) -> dict:
    """Figure 4b on the first naive task: each block truncated alone (pixFID8 proxy, same latents)."""
    from gmem.compress.knowledge import DEFAULT_LAYERS, RELEASED_LAYERS
    from gmem.compress.truncation import truncation_study

    t0 = time.time()
    layers = DEFAULT_LAYERS if args.compress_fc else RELEASED_LAYERS
    out = truncation_study(mem, name, lambda fake: pixel_fid(images, fake), layers=layers,
                           n=args.truncation_samples, seed=0)
    out["seconds"] = round(time.time() - t0, 1)
    print(f"truncation study of {name}: {out['seconds']} s", flush=True)
    return out


def table(result: dict, command: str) -> str:
    a = result["args"]
    which = "B0-B3 and fc's gamma/beta" if a.get("compress_fc") else "B0-B3"
    rest = {r["compressed"]["stored"] - r["compressed"]["convs_stored"] for r in result["rows"]}
    lines = [f"Command: `{command}`", "",
             f"Settings: {a['tasks']} tasks, {a['iterations']} iterations x batch {a['batch_size']} per task, "
             f"rank rule: {rule_text(a.get('keep'))}, prior weight "
             f"{a['prior_weight']} every {a['prior_every']} iterations, compressed layers: {which}.", "",
             machine_line(result), "",
             f"Base: the embedded base, weights SHA-256 `{result.get('base_sha256', 'not recorded')}`.", "",
             quality_line(a), "",
             "Stored = generator style values of the task (`parameter_counts()['generator_stored']`); the "
             f"knowledge-base column is what the compressed matrices ({which}) store against their dense size; "
             f"the rest of a compressed task stays dense ({', '.join(f'{v:,}' for v in sorted(rest))} values: "
             "the conv biases and whatever of fc is not compressed).", "",
             "| # | task | naive stored | compressed stored | ratio | knowledge base: stored / dense "
             "| FID naive | FID compressed | pixFID8 naive | pixFID8 compressed | near-dup. naive / compr. / real |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(result["rows"], start=1):
        c = r["compressed"]
        dense = f" (dense: {', '.join(c['dense_layers'])})" if c.get("dense_layers") else ""
        dup = "/".join(f"{100 * x:.1f}%" if x is not None else "-" for x in (
            r["naive"].get("near_duplicates"), c.get("near_duplicates"), r.get("real_near_duplicates")))
        lines.append(f"| {i} | {r['task']} | {r['naive']['stored']:,} | {c['stored']:,} | "
                     f"{100 * r['ratio']:.1f}% | {c['convs_stored']:,} / {c['convs_dense']:,} "
                     f"({100 * c['convs_stored'] / max(c['convs_dense'], 1):.1f}%){dense} | "
                     f"{r['naive'].get('fid', '-')} | {c.get('fid', '-')} | "
                     f"{r['naive']['pixfid8']} | {r['compressed']['pixfid8']} | {dup} |")
    return "\n".join(lines + [""] + notes(result)) + "\n"


def notes(result: dict) -> list[str]:
    """What the numbers say against the targets (first task <= 40% of naive, later ones <= 10%), computed."""
    rows, a = result["rows"], result["args"]
    first, later = rows[0], rows[1:]
    out = [f"- First task: {100 * first['ratio']:.1f}% of naive (target <= 40%: "
           f"{'met' if first['ratio'] <= 0.40 else 'missed'})."]
    if later:
        worst = max(r["ratio"] for r in later)
        out.append(f"- Later tasks: at most {100 * worst:.1f}% of naive (target <= 10%: "
                   f"{'met' if worst <= 0.10 else 'missed'}).")
        r = later[-1]["compressed"]
        rest = r["stored"] - r["convs_stored"]
        out.append(f"- The floor of a later task is what stays dense: {rest:,} values = "
                   f"{100 * rest / later[-1]['naive']['stored']:.1f}% of naive (the conv biases"
                   + (" and fc's bias b_fc" if a.get("compress_fc") else ", fc's gamma, beta and b_fc")
                   + f"); the knowledge-base part adds {r['convs_stored']:,} values (coefficients lam and any new "
                   "columns).")
    if all("fid" in r["naive"] and "fid" in r["compressed"] for r in rows):
        rel = [round(r["compressed"]["fid"] / r["naive"]["fid"] - 1, 3) for r in rows]
        out.append(f"- Standard FID, compressed / naive - 1 (target within +10%): {rel} "
                   f"({'met' if max(rel) <= 0.10 else 'missed'}; N = {a.get('fid_samples')} samples per task and "
                   "mode, so the figures carry the small-N bias and noise of FID: compare them within this table).")
    gaps = [round(r["compressed"]["pixfid8"] - r["naive"]["pixfid8"], 3) for r in rows]
    out.append(f"- Quality gap, pixFID8 compressed - naive (proxy, lower is better): {gaps}.")
    capped = {r["task"]: len(r["compressed"].get("capped", [])) for r in rows}
    if any(capped.values()):
        out.append(f"- Matrices whose new columns the rule's budget cut (of the compressed ones): {capped}.")
    if a.get("keep") is not None:
        out.append(f"- keep = {a['keep']} is not the default: the released code's width rule keeps 1.0 of the energy "
                   "for layers under 256 channels; B0-B3 of the embedded 32 px base are 128/64/32/32 channels wide, "
                   "so it keeps every singular value there, full-rank factors cost more than the dense matrices and "
                   "those layers are stored dense (100% of naive; fc, 512 rows, would keep 0.9). The first task's "
                   "matrices start as the source style, whose spectra are flat: its ratio is set by keep.")
    return out


def rule_text(keep) -> str:
    if keep is None:
        return f"the default ResidualEnergyRule {rank_rule(None).describe()}"
    return f"the released energy rule, keep = {keep}"


def quality_line(a: dict) -> str:
    fid = (f"Quality: the standard FID (gmem.eval Inception, offline), N = {a['fid_samples']} samples per task and "
           "mode (latents seed 1) against all of the task's 160 images; " if a.get("fid_samples") else "Quality: ")
    return (fid + "pixFID8 (a proxy: Frechet distance of 8x8-pooled pixels, not the Inception FID; lower is "
            f"better), {a['samples']} samples (seed 0) vs the task's 160 images. Near-duplicates: share of pairs of "
            "the first 256 samples (and of the task's real images) closer than RMS 0.1 on 16x16-pooled pixels "
            "(gmem.eval.near_duplicate_share).")


def machine_line(result: dict) -> str:
    m = result.get("machine")
    if not m:
        return "Machine: not recorded."
    return (f"Machine: {m['cpus']} CPUs ({m['platform']}), torch threads {m['torch_threads']}; load average "
            f"(1/5/15 min) {m['load_start']} at the start, {m['load_end']} at the end (other jobs share the CPUs); "
            f"wall time {m['wall_seconds'] / 60:.1f} minutes.")


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    rows = result["rows"]
    x = range(1, len(rows) + 1)
    fig = Figure(figsize=(8, 3.2))
    a, b = fig.subplots(1, 2)
    a.bar([i - 0.2 for i in x], [r["naive"]["stored"] for r in rows], 0.4, label="naive")
    a.bar([i + 0.2 for i in x], [r["compressed"]["stored"] for r in rows], 0.4, label="compressed")
    a.set_xlabel("task"), a.set_ylabel("generator values stored"), a.legend(fontsize=8)
    b.plot(list(x), [r["naive"]["pixfid8"] for r in rows], "o-", label="naive")
    b.plot(list(x), [r["compressed"]["pixfid8"] for r in rows], "s-", label="compressed")
    b.set_xlabel("task"), b.set_ylabel("pixFID8 (proxy, lower is better)"), b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/results/compression")
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--keep", type=float, default=None,
                   help="kept energy of the released energy rule (default: the residual rule, ResidualEnergyRule)")
    p.add_argument("--fid-samples", type=int, default=0,
                   help="also the standard FID (gmem.eval Inception) of this many samples per task and mode "
                        "against all of the task's images (0: skip; a few images per second on a CPU)")
    p.add_argument("--prior-weight", type=float, default=0.01)
    p.add_argument("--prior-every", type=int, default=10)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine more threads only contend)")
    p.add_argument("--no-compress-fc", action="store_true",
                   help="compress B0-B3 only, as the released code (the fc's gamma/beta stay dense)")
    p.add_argument("--truncation", action="store_true",
                   help="per-block truncation study of the first naive task (Figure 4b)")
    p.add_argument("--spectra", action="store_true",
                   help="also the singular values of every naive task's style matrices: fig4a_spectra.png (the "
                        "first task, Gamma per layer), fig14_spectra.png (every task) and spectra.md")
    p.add_argument("--truncation-samples", type=int, default=128, help="samples per cell of the truncation study")
    p.add_argument("--rewrite", action="store_true",
                   help="only render table.md and the plots again from --out's results.json (no training)")
    args = p.parse_args(argv)
    args.compress_fc = not args.no_compress_fc  # (results.json records which layers: "compress_fc")
    out = Path(args.out)
    if args.rewrite:
        result = json.loads((out / "results.json").read_text())
        command = (out / "table.md").read_text().split("`")[1]
        write_outputs(result, out, command)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)  # a script entry point: the only place that sets global state
    t0, load0 = time.time(), os.getloadavg()
    result = run(args)
    result["base_sha256"] = base_sha256()  # the embedded base the tasks were learned on
    result["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "platform": platform.platform(), "load_start": [round(x, 2) for x in load0],
                         "load_end": [round(x, 2) for x in os.getloadavg()], "wall_seconds": round(time.time() - t0)}
    command = "python tools/compression_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    write_outputs(result, out, command)
    print(table(result, command))
    return 0


def write_outputs(result: dict, out: Path, command: str) -> None:
    """table.md and storage_quality.png; with a truncation study, truncation.md and fig4b_truncation.png; with
    spectra, fig4a_spectra.png, fig14_spectra.png and spectra.md."""
    args = result["args"]
    (out / "table.md").write_text(table(result, command))
    plot(result, out / "storage_quality.png")
    if result["truncation"] is not None:
        from gmem.compress.truncation import plot_truncation, truncation_table

        note = ("Per-block truncation (Figure 4b): one block's Gamma/B truncated to a kept energy fraction f at a "
                "time, the others intact; pixFID8 is a proxy (8x8-pooled pixels, not the Inception FID), lower is "
                f"better, {args.get('truncation_samples', args['samples'])} samples, the same latents in every "
                "cell.")
        text = f"Command: `{command}`\n\n{note}\n\n" + truncation_table(result["truncation"])
        (out / "truncation.md").write_text(text)
        plot_truncation(result["truncation"], out / "fig4b_truncation.png")
    if result.get("spectra"):
        write_spectra(result["spectra"], out, command)


def write_spectra(spectra: dict, out: Path, command: str) -> None:
    """Figures 4a and 14 and their energy tables, from ``{task: {matrix: singular values}}``."""
    tensors = {task: {k: torch.tensor(v, dtype=torch.float64) for k, v in m.items()} for task, m in spectra.items()}
    first, last = next(iter(tensors)), list(tensors)[-1]
    plot_singular_values({k.removesuffix(".gamma"): v for k, v in tensors[first].items() if k.endswith(".gamma")},
                         out / "fig4a_spectra.png", title=f"Gamma singular values, naive task {first}")
    per_task = {f"{task} {k.removesuffix('.conv_0.gamma')}": v for task, m in tensors.items()
                for k, v in m.items() if k.endswith("conv_0.gamma")}
    plot_singular_values(per_task, out / "fig14_spectra.png", title="conv_0 Gamma per block, every naive task")
    text = [f"Command: `{command}`", "",
            "Singular values of the naive tasks' style matrices (Figures 4a and 14): the rank the energy rule keeps "
            "at each kept-energy fraction (of J singular values). Convs: Gamma/B [C_out, C_in]; fc: gamma/beta "
            "seen as [16 nf, s0^2].", ""]
    for task in dict.fromkeys((first, last)):
        text += [f"Task {task}:", "", energy_table(tensors[task], keeps=(0.6, 0.8, 0.9, 0.95, 0.99)), ""]
    (out / "spectra.md").write_text("\n".join(text))


if __name__ == "__main__":
    sys.exit(main())
