"""End-to-end cases: one GAN-memory training step and one replay step, per backend.

Built on :mod:`gmem.models` (the GP-GAN ResNet G and D) and :mod:`gmem.nn` (modulation), with the
GAN-memory configuration of the paper's code: generator ``fc`` and every block ``conv_0``/``conv_1``
modulated (1x1 shortcuts, ``conv_img`` and the embedding frozen and shared); discriminator block
convs modulated, its ``fc`` trained.

* ``e2e_train``: one training iteration of a new task, run by the product's own step
  (:class:`gmem.training.GANStep` with the settings :meth:`gmem.GANMemory.learn` uses: a generator
  update, then a discriminator update on the same fakes with R1 ``10 * E||grad||^2`` on the reals,
  Adam (lr 1e-4, betas (0, 0.99)) on the task's style parameters and discriminator head, EMA).
  The real batch lives on the device and is not augmented (flips and dequantisation noise belong to
  the data pipeline, not to the step being timed). Reported as ms per step and images/s (batch /
  step time). The R1 penalty differentiates through a gradient; gmem computes that double backward
  with the differentiable reference formulas on every backend.
* ``e2e_replay``: generative replay, one generator forward of a batch whose samples come from
  different tasks (``use_tasks``), without gradients.

Providers: ``reference`` and each compiled backend (``gmem.nn.set_backend``), and ``plain``: the
unconverted networks (every conv/linear weight trained in the training step), the limit.
``torch_compile`` is not run end to end: the modulated layers call gmem's custom ops, which
``torch.compile`` treats as opaque, so it would not measure a compiled reference.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from . import timing
from .providers import compiled_backends

# steps take ~0.1-1 s on a CPU: a few repetitions are enough for the quick suite
E2E_QUICK = timing.Budget(warmup=1, warmup_s=0.0, min_reps=3, max_reps=5, min_time_s=0.0)

try:  # the configuration GANMemory uses, when it is there
    from gmem.memory.registry import D_MODULATED, G_MODULATED
except Exception:  # noqa: BLE001 - the paper's configuration
    G_MODULATED = ("fc", "resnet_*.conv_0", "resnet_*.conv_1")
    D_MODULATED = ("resnet_*.conv_0", "resnet_*.conv_1")


@dataclass(frozen=True)
class Model:
    name: str
    size: int
    nf: int
    z_dim: int
    embed_size: int
    batch: int
    replay_batch: int
    replay_tasks: int


QUICK_MODEL = Model("demo32", size=32, nf=16, z_dim=128, embed_size=64, batch=8, replay_batch=32, replay_tasks=8)
DEMO_MODEL = Model("demo32", size=32, nf=32, z_dim=128, embed_size=64, batch=64, replay_batch=64, replay_tasks=64)
GPGAN_MODEL = Model("gpgan256", size=256, nf=64, z_dim=256, embed_size=1, batch=16, replay_batch=64, replay_tasks=64)


def _networks(model: Model, device: str, modulated: bool, tasks: int):
    import gmem.nn as gnn
    from gmem.models import Discriminator, Generator

    torch.manual_seed(0)
    G = Generator(model.size, model.nf, model.z_dim, model.embed_size).to(device)
    D = Discriminator(model.size, model.nf).to(device)
    if not modulated:
        return G, D, list(G.parameters()), list(D.parameters())
    gnn.convert(G, include=list(G_MODULATED))
    gnn.convert(D, include=list(D_MODULATED))
    for t in range(tasks):
        gnn.add_task(G, f"task{t}")
        gnn.add_task(D, f"task{t}")
    # the new task: its style parameters, plus D's fc (trained per task in GAN memory)
    g_params = gnn.style_parameters(G, tasks)
    d_params = gnn.style_parameters(D, tasks) + list(D.fc.parameters())
    for p in G.parameters():
        p.requires_grad_(False)
    for p in D.parameters():
        p.requires_grad_(False)
    for p in g_params + d_params:
        p.requires_grad_(True)
    return G, D, g_params, d_params


def train_step_fn(model: Model, device: str, backend: Optional[str]) -> Callable[[], object]:
    """One :class:`gmem.training.GANStep` on a new task; ``backend=None`` means unconverted (plain)."""
    import gmem.nn as gnn
    from gmem.data import TensorImages
    from gmem.memory.registry import TaskRegistry
    from gmem.models import Discriminator, Generator
    from gmem.seeding import seeded
    from gmem.training import LEARN_DEFAULTS, GANParts, GANStep, RealBatches, StepConfig

    with seeded(0):
        G = Generator(model.size, model.nf, model.z_dim, model.embed_size)
        D = Discriminator(model.size, model.nf)
    if backend is None:  # every conv/linear weight trains
        G, D = G.to(device), D.to(device)
        parts = GANParts(generate=lambda z, y: G(z, y), discriminate=lambda x, y: D(x, y),
                         g_params=list(G.parameters()), d_params=list(D.parameters()), z_dim=model.z_dim,
                         modules=(G, D))
    else:  # the task's style parameters and discriminator head, as GANMemory.learn trains them
        reg = TaskRegistry(G, D, g_include=list(G_MODULATED), d_include=list(D_MODULATED))
        reg.to(device)
        gnn.set_backend(reg.G, backend)
        gnn.set_backend(reg.D, backend)
        reg.add("task", None, {"name": "task"})
        g_params, d_params = reg.trainable("task")
        parts = GANParts(generate=lambda z, y: reg.generate("task", z, y),
                         discriminate=lambda x, y: reg.discriminate("task", x, y),
                         g_params=g_params, d_params=d_params, z_dim=model.z_dim, modules=(reg.G, reg.D))
    b = model.batch
    with seeded(1):
        real = TensorImages(torch.rand(b, 3, model.size, model.size).to(device) * 2 - 1, model.size)
    config = StepConfig(**LEARN_DEFAULTS, flip=False, noise=0.0)
    step = GANStep(parts, RealBatches(real, b, seed=0), config, seed=0, device=device)
    return step.step


def replay_step_fn(model: Model, device: str, backend: Optional[str]) -> Callable[[], object]:
    """A generator forward of a mixed-task batch (``replay_tasks`` tasks spread over the batch)."""
    import gmem.nn as gnn

    from .cases import task_assignment

    G, _, _, _ = _networks(model, device, backend is not None, tasks=model.replay_tasks)
    G.eval()
    n = model.replay_batch
    z = torch.randn(n, model.z_dim, device=device)
    if backend is None:
        def plain():
            with torch.no_grad():
                return G(z)
        return plain
    gnn.set_backend(G, backend)
    # tasks 1..T (task 0 is the source), spread uniformly over the batch
    ids = torch.tensor([t + 1 for t in task_assignment(n, model.replay_tasks, "uniform")], device=device)

    def replay():
        with torch.no_grad(), gnn.use_tasks(G, ids):
            return G(z)

    return replay


def run(device: str, quick: bool, budget: timing.Budget, env: dict, include: Optional[set[str]] = None,
        compile_mode=None, log: Callable[[str], None] = print, model: Optional[Model] = None,
        ops: Optional[list[str]] = None) -> list[dict]:
    """The e2e records (one per step kind and provider); an empty list if gmem.nn/models are missing.

    ``ops``: which of ``e2e_train``, ``e2e_replay`` to run (default both)."""
    try:
        import gmem.models  # noqa: F401
        import gmem.nn  # noqa: F401
    except ImportError as err:
        log(f"e2e: skipped, {err}")
        return []
    if model is None:
        model = QUICK_MODEL if quick else (GPGAN_MODEL if device == "cuda" else DEMO_MODEL)
    names, _ = compiled_backends(device, torch.float32)
    providers = ["reference", *names, "plain"]
    if include is not None:
        providers = [p for p in providers if p in include]
    records = []
    for op, make, batch, tasks in (("e2e_train", train_step_fn, model.batch, 1),
                                   ("e2e_replay", replay_step_fn, model.replay_batch, model.replay_tasks)):
        if ops is not None and op not in ops:
            continue
        what = "G+D training step with R1" if op == "e2e_train" else f"replay, {tasks} tasks"
        case = f"{model.name} nf{model.nf} {what} N{batch} fp32"
        line = []
        for name in providers:
            base = {"op": op, "case": case, "layer": f"{model.name}.G+D" if op == "e2e_train" else f"{model.name}.G",
                    "kind": "single" if tasks == 1 else "mixed", "c_in": None, "c_out": None, "size": model.size,
                    "kernel": None, "batch": batch, "tasks": tasks, "mix": "uniform" if tasks > 1 else "-",
                    "rank": None, "dtype": "fp32", "tf32": False, "pass": "fwd+bwd" if op == "e2e_train" else "fwd",
                    "backend": name, "nf": model.nf, **env}
            try:
                fn = make(model, device, None if name == "plain" else name)
                stats = timing.measure(fn, device, replace(E2E_QUICK, clock=budget.clock) if quick else budget)
                peak = timing.peak_memory(fn, device)
            except Exception as err:  # noqa: BLE001
                records.append({**base, "ms": None, "error": f"{type(err).__name__}: {err}"[:300]})
                line.append(f"{name} ERROR")
                continue
            rec = {**base, **stats, "peak_bytes": peak, "images_per_s": batch / (stats["ms"] * 1e-3),
                   "tflops": None, "gbps": None}
            records.append(rec)
            line.append(f"{name} {stats['ms']:.1f}")
        log(f"[e2e] {case}: " + ", ".join(line))
    return records
