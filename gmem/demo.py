"""``gmem demo`` (``make demo``): learn a stream of tasks on the embedded base, show there is no forgetting.

For each task of the stream (default: the three embedded demo sets) the demo learns the task, then
writes to the output directory

- ``tasks_after_<k>_<task>.png``: samples of the source and of every task learned so far for the same
  fixed latents, one row per task (the layout of the paper's Figure 5);
- ``interp_<k>_<a>_to_<b>.png``: the style of the previous task morphing into the new one (rows =
  latents, columns = lambda from 0 to 1);

and checks that every earlier task's samples for the fixed latents are *bit-identical* to those
taken right after that task was learned. At the end it prints a table per task (style parameters,
training time, a quality score) and saves + reloads the memory (``memory/``), checking the reloaded
samples too. Exit code 0 when nothing was forgotten, 3 otherwise.

Quality: the standard FID (:func:`gmem.eval.inception_fid`'s network, offline) of ``fid_samples``
samples against as many of the task's images (the summary states N; small N biases FID upwards, so
compare the figures within one run), and pixFID8 (:func:`gmem.eval.pixel_fid`: a Fréchet distance
between 8x8-pooled pixels, cheap on a CPU but NOT the Inception FID) for the source (before learning)
and the task (after); lower is better. Diversity: the share of near-duplicate pairs among
``score_samples`` samples for fixed seeds (:func:`gmem.eval.near_duplicate_share`) next to the same
figure on the task's real images: a share far above the real one means mode collapse; and the
nearest-neighbour ratio (:func:`gmem.eval.nearest_neighbour_ratio`: about 1 is as spread out as the
data, well below 1 is collapse).

The demo's learning rate is 1e-4 (the paper's, and ``gmem learn``'s default): a sweep on emoji at
200 iterations of batch 16 (``python -m gmem.experiments.lr_sweep``, standard FID of 256 samples, 2
seeds; experiments/results/lr_sweep) found 1e-4 best for GAN memory, with 1e-3 (the demo's earlier
rate) worse by the standard FID and less diverse (a lower nearest-neighbour ratio).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .data import as_dataset, batch, demo_datasets
from .eval import fid_from_features, inception_features, near_duplicate_share, nearest_neighbour_ratio, pixel_fid
from .images import save_grid
from .memory import GANMemory
from .models import load_base

DEFAULT_TASKS = ("emoji", "oxygen_icons", "fashion_mnist")
CONDITIONAL = {"fashion_mnist"}  # learned as a conditional task (one generator bias per class)


def run_demo(out="runs/demo", *, tasks=None, iterations: int = 400, time_budget: float = 360.0,
             batch_size: int = 16, lr: float = 1e-4, seed: int = 0, threads: int | None = None, base=None,
             device="cpu", columns: int = 10, score_samples: int = 256, fid_samples: int = 50,
             progress: bool = True) -> int:
    """Run the demo (the ``gmem demo`` entry point); returns the process exit code (0 ok, 3 if anything
    was forgotten). Runs with ``threads`` torch threads (default 1: on a busy 2-core machine two
    OpenMP threads were much slower than one) and restores the caller's thread count afterwards.
    ``fid_samples``: N of the standard FID per task (0: skip it; where no Inception network is installed
    the summary says so and shows pixFID8 only)."""
    if isinstance(fid_samples, bool) or not isinstance(fid_samples, int) or fid_samples < 0 or fid_samples == 1:
        raise ValueError(f"fid_samples must be 0 (skip the FID) or an int >= 2, got {fid_samples!r}")
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads or 1)
    try:
        return _demo(out, tasks=tasks, iterations=iterations, time_budget=time_budget, batch_size=batch_size, lr=lr,
                     seed=seed, base=base, device=device, columns=columns, score_samples=score_samples,
                     fid_samples=fid_samples, progress=progress)
    finally:
        torch.set_num_threads(saved_threads)


def _demo(out, *, tasks, iterations: int, time_budget: float, batch_size: int, lr: float, seed: int, base, device,
          columns: int, score_samples: int, fid_samples: int, progress: bool) -> int:

    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    available = demo_datasets()
    tasks = list(tasks or [t for t in DEFAULT_TASKS if t in available])
    if len(tasks) < 1:
        raise FileNotFoundError(f"no embedded demo data found (expected {list(DEFAULT_TASKS)} in gmem/assets/data)")
    mem = GANMemory.from_base(*load_base(base)) if base else GANMemory.default()
    mem.to(device)
    n_params_g = mem.parameter_counts()["generator_base"]
    print(f"gmem demo: base {mem.size}x{mem.size}, nf={mem.generator.nf}, {n_params_g:,} generator weights "
          f"(frozen); tasks {tasks}; up to {iterations} iterations per task, training budget {time_budget:.0f} s; "
          f"Adam lr {lr:g}; {torch.get_num_threads()} threads; outputs in {out}/")

    z = mem.latents(columns, seed=seed + 1000)         # the fixed latents of every picture
    z_interp = mem.latents(4, seed=seed + 2000)
    reference: dict[str, torch.Tensor] = {"source": mem.sample("source", z=z)}
    rows, forgotten = [], []
    fid_note = f"FID: N = {fid_samples} samples vs {fid_samples} task images" if fid_samples else "FID: skipped"
    train_spent = 0.0

    for k, name in enumerate(tasks, start=1):
        dataset = as_dataset(name, mem.size, mem.channels)
        labels = True if (name in CONDITIONAL and getattr(dataset, "labels", None) is not None) else None
        share = max(5.0, (time_budget - train_spent) / (len(tasks) - k + 1))
        stale = out / "learn" / name / "checkpoint.pt"
        if stale.is_file():  # a demo always starts from scratch (a kept checkpoint would be resumed)
            stale.unlink()
        t0 = time.time()
        mem.learn(name, dataset, iterations=iterations, batch_size=batch_size, seed=seed + k, labels=labels, lr=lr,
                  out_dir=out / "learn" / name, sample_every=max(50, iterations // 4), max_seconds=share,
                  progress=progress)
        train_spent += time.time() - t0
        reference[name] = mem.sample(name, z=z)

        # no forgetting: every earlier task (and the source) gives the very same samples for z
        for old, ref in reference.items():
            same = torch.equal(mem.sample(old, z=z), ref)
            if not same:
                forgotten.append((old, name))
        status = "bit-identical" if not forgotten else f"CHANGED: {forgotten}"
        print(f"[{k}/{len(tasks)}] learned {name!r}; samples of {list(reference)} for fixed z: {status}")

        # Figure-5 layout: rows = source + tasks learned so far, same z per column
        grid = torch.cat([reference[t] for t in reference])
        save_grid(grid, out / f"tasks_after_{k}_{name}.png", nrow=columns, scale=3, row_labels=list(reference))
        prev = tasks[k - 2] if k > 1 else "source"
        if mem.num_classes(prev) is None and mem.num_classes(name) is None:
            lams = torch.linspace(0, 1, 8).tolist()
            strip = mem.interpolate(prev, name, lams, z=z_interp)        # [lam, n, C, H, W]
            save_grid(strip.transpose(0, 1).reshape(-1, *strip.shape[2:]), out / f"interp_{k}_{prev}_to_{name}.png",
                      nrow=len(lams), scale=3)
        else:  # a conditional task: show its classes instead (rows = latents, columns = classes)
            c = mem.num_classes(name) or mem.num_classes(prev)
            cls = name if mem.num_classes(name) else prev
            zz = z_interp.repeat_interleave(c, 0)
            imgs = mem.sample(cls, z=zz, labels=torch.arange(c).repeat(z_interp.shape[0]))
            save_grid(imgs, out / f"classes_{k}_{cls}.png", nrow=c, scale=3)

        # quality: pixFID8 of the source and of the task against the task's images
        n = min(score_samples, len(dataset))
        real = batch(dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n])
        fake = mem.sample(name, n, seed=seed + 3000)
        fid_task = pixel_fid(real, fake)
        fid_src = pixel_fid(real, mem.sample("source", n, seed=seed + 3000))
        mem.set_metric(name, "pixfid8", round(fid_task, 3))
        mem.set_metric(name, "pixfid8_source", round(fid_src, 3))
        dup_task, dup_real = near_duplicate_share(fake), near_duplicate_share(real)
        mem.set_metric(name, "near_duplicates", round(dup_task, 4))
        spread = nearest_neighbour_ratio(fake, real) if min(len(fake), len(real)) >= 2 else float("nan")
        mem.set_metric(name, "nn_ratio", round(spread, 4))
        fid = None
        if fid_samples and fid_note.startswith("FID: N"):
            try:
                fid = _standard_fid(dataset, mem, name, fid_samples, seed)
                mem.set_metric(name, f"fid{fid_samples}", round(fid, 2))
            except FileNotFoundError as e:  # no Inception network installed: say so, keep the proxy
                fid_note = f"FID: unavailable ({str(e).splitlines()[0][:90]}...)"
        counts = mem.parameter_counts(name)
        m = mem.records[name]["metrics"]
        rows.append((name, mem.num_classes(name) or "-", m["iterations_done"], counts["generator_style"],
                     100.0 * counts["generator_style_ratio"],
                     counts["discriminator_style"] + counts["discriminator_fc"],
                     m["train_seconds"], m["it_per_s"] or 0.0, fid_src, fid_task, fid, dup_task, dup_real, spread))

    # save, reload, and check the reloaded memory too
    mem_dir = mem.save(out / "memory")
    reloaded = GANMemory.load(mem_dir)
    reload_ok = all(torch.equal(reloaded.sample(t, z=z), ref) for t, ref in reference.items())

    print()
    header = (f"{'task':<14}{'classes':>8}{'iters':>7}{'G style':>10}{'% of G':>8}{'D style':>10}"
              f"{'train s':>9}{'it/s':>7}{'pixFID8 src':>13}{'pixFID8 task':>14}{'FID task':>10}{'near-dup':>10}"
              f"{'real':>7}{'NN ratio':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r[0]:<14}{str(r[1]):>8}{r[2]:>7}{r[3]:>10,}{r[4]:>7.1f}%{r[5]:>10,}{r[6]:>9.1f}{r[7]:>7.2f}"
              f"{r[8]:>13.2f}{r[9]:>14.2f}{(f'{r[10]:.1f}' if r[10] is not None else '-'):>10}"
              f"{100 * r[11]:>9.1f}%{100 * r[12]:>6.1f}%{r[13]:>10.2f}")
    print(f"{fid_note} (the standard Inception FID, lower is better; small N biases it upwards). pixFID8 = "
          "Frechet distance of 8x8-pooled pixels vs the task's images (cheap CPU proxy, not Inception FID); 'src' = "
          f"the base before learning the task. near-dup = share of near-duplicate pairs among {score_samples} "
          "samples (fixed seed) and among the task's real images ('real'): far above 'real' means mode collapse. "
          "NN ratio = median distance of a sample to its nearest other sample over the same on as many real "
          "images: about 1 is as diverse as the data, well below 1 is collapse.")
    print(f"memory saved to {mem_dir} and reloaded: samples {'bit-identical' if reload_ok else 'DIFFERENT'}")
    wall = time.time() - t_start
    if forgotten or not reload_ok:
        print(f"FORGETTING DETECTED: {forgotten or 'reloaded memory differs'} (wall time {wall:.0f} s)")
        return 3
    print(f"no forgetting: every earlier task's samples stayed bit-identical after each new task "
          f"(wall time {wall:.0f} s); pictures in {out}/")
    return 0


def _standard_fid(dataset, mem, task: str, n: int, seed: int) -> float:
    """The standard FID of ``n`` samples of ``task`` (fixed seed) against ``n`` of its images (or all, if fewer)."""
    m = min(n, len(dataset))
    real = batch(dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 1))[:m])
    fake = mem.sample(task, n, seed=seed + 4000)
    return fid_from_features(inception_features(real), inception_features(fake))
