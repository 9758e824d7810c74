"""Benchmark cases, taken from the real workload.

Layer shapes come from the GP-GAN ResNet ('resnet4' of Mescheder et al.'s GAN_stability code):

* ``gpgan256``: size 256, nf 64, nf_max 1024, z 256 + label embedding 1: generator ``fc``
  257 -> 16384 (1024 x 4 x 4), block convs from 1024 channels at 4x4 down to 64 channels at 256x256;
* ``demo32``: the same design at 32x32 (nf 32, z 128 + embedding 64: the defaults of
  ``gmem train-base``), the CPU-sized demo model: fc 192 -> 8192, convs 512 channels at 4x4 to 32
  at 32x32.

A :class:`Case` is one op at one shape, one mode (single task, mixed tasks, low rank), one dtype and
one pass (``fwd`` or ``fwd+bwd``). The providers that run it live in :mod:`benchmarks.providers`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

OPS = ("madafm_weight", "modulated_conv2d", "modulated_linear", "e2e_train", "e2e_replay")
KERNEL_OPS = OPS[:3]


@dataclass(frozen=True)
class Layer:
    """One modulated layer: conv ``c_in -> c_out`` with a ``kernel`` window at ``size x size``
    (``kernel == 0`` means a linear layer ``c_in -> c_out``)."""

    name: str
    c_in: int
    c_out: int
    size: int = 1
    kernel: int = 3

    @property
    def is_linear(self) -> bool:
        return self.kernel == 0

    @property
    def padding(self) -> int:
        return self.kernel // 2


def resnet4_layers(model: str, size: int, nf: int, z_dim: int, embed: int) -> dict[str, Layer]:
    """The modulated layers of a GP-GAN 'resnet4' generator (the layout of ``gmem.models.Generator``):
    ``fc`` and each block's ``conv_0``/``conv_1`` (``fhidden = min(fin, fout)``).

    Block widths in multiples of ``nf``: the last block ``1 -> 1``, doubling per block backwards up
    to 16 (size 256: 16->16, 16->16, 16->8, 8->4, 4->2, 2->1, 1->1). The discriminator mirrors them.
    """
    s0 = 4
    n_blocks = int(math.log2(size // s0)) + 1
    outs = [min(16, 2 ** max(0, n_blocks - 2 - k)) for k in range(n_blocks)]
    ins = [16] + outs[:-1]
    layers = {"fc": Layer(f"{model}.G.fc", z_dim + embed, 16 * nf * s0 * s0, kernel=0)}
    for k, (fin, fout) in enumerate(zip(ins, outs)):
        res, fin, fout = s0 * 2**k, fin * nf, fout * nf
        hidden = min(fin, fout)
        layers[f"b{res}.conv_0"] = Layer(f"{model}.G.block{res}.conv_0", fin, hidden, res)
        layers[f"b{res}.conv_1"] = Layer(f"{model}.G.block{res}.conv_1", hidden, fout, res)
    return layers


#: a tiny weight, W[16,16,3,3]: a few microseconds of arithmetic, so a call's time is what it costs
#: to get from Python to the kernel and back (the per-call case)
PER_CALL = Layer("tiny16.conv", 16, 16, 1)

GPGAN256 = resnet4_layers("gpgan256", size=256, nf=64, z_dim=256, embed=1)
DEMO32 = resnet4_layers("demo32", size=32, nf=32, z_dim=128, embed=64)


@dataclass(frozen=True)
class Case:
    """One benchmark case. ``tasks``: distinct tasks in the batch (mixed) or stacked style sets
    (madafm_weight); ``mix``: how samples spread over tasks; ``rank``: low-rank Gamma/B."""

    op: str
    layer: Layer
    kind: str = "single"  # single | mixed | lowrank
    batch: int = 16
    tasks: int = 1
    mix: str = "-"  # uniform | skewed (mixed only)
    rank: int = 0
    dtype: str = "fp32"  # fp32 | bf16
    tf32: bool = False
    pass_: str = "fwd+bwd"  # fwd | fwd+bwd
    note: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        parts = [self.layer.name]
        if self.op == "madafm_weight":
            k = self.layer.kernel
            parts.append(f"W[{self.layer.c_out},{self.layer.c_in},{k},{k}]")
            if self.tasks > 1:
                parts.append(f"T{self.tasks}")
        else:
            parts.append(f"N{self.batch}")
            if self.kind == "mixed" or (self.kind == "lowrank" and self.tasks > 1):
                parts.append(f"T{self.tasks}-{self.mix}")
        if self.kind == "lowrank":
            parts.append(f"r{self.rank}")
        parts.append(self.dtype_label)
        parts.append(self.pass_)
        return " ".join(parts)

    @property
    def dtype_label(self) -> str:
        return "tf32" if (self.dtype == "fp32" and self.tf32) else self.dtype

    @property
    def style_tasks(self) -> int:
        """Stacked style sets passed to the op (0 = one unstacked set)."""
        if self.kind == "mixed" or self.tasks > 1:
            return self.tasks
        return 0

    def single_counterpart(self) -> "Case":
        """The single-task dense case with the same layer, batch, dtype and pass."""
        return replace(self, kind="single", tasks=1, mix="-", rank=0, note="")

    def dense_counterpart(self) -> "Case":
        """For a low-rank case: the same case with dense Gamma/B."""
        kind = "mixed" if self.tasks > 1 else "single"
        return replace(self, kind=kind, rank=0, note="")

    def fields(self) -> dict:
        layer = self.layer
        return {
            "op": self.op,
            "case": self.name,
            "layer": layer.name,
            "kind": self.kind,
            "c_in": layer.c_in,
            "c_out": layer.c_out,
            "size": layer.size if not layer.is_linear else None,
            "kernel": layer.kernel if not layer.is_linear else None,
            "batch": self.batch if self.op != "madafm_weight" else None,
            "tasks": self.tasks,
            "mix": self.mix,
            "rank": self.rank or None,
            "dtype": self.dtype,
            "tf32": self.tf32,
            "pass": self.pass_,
        }


def task_assignment(batch: int, tasks: int, mix: str) -> list[int]:
    """Task id of each sample, every task present at least once.

    ``uniform``: as equal counts as possible. ``skewed``: Zipf-like counts (task t gets a share
    proportional to 1/(t+1)), as a replay of many old tasks with a few frequent ones looks.
    Ids are shuffled deterministically (the ops accept any order).
    """
    if not 1 <= tasks <= batch:
        raise ValueError(f"task_assignment: need 1 <= tasks <= batch, got tasks={tasks}, batch={batch}")
    if mix == "skewed":
        weights = [1.0 / (t + 1) for t in range(tasks)]
        spare = batch - tasks
        counts = [1 + int(spare * w / sum(weights)) for w in weights]
        counts[0] += batch - sum(counts)
    else:
        counts = [batch // tasks + (1 if t < batch % tasks else 0) for t in range(tasks)]
    ids = [t for t, c in enumerate(counts) for _ in range(c)]
    # a fixed pseudo-random permutation (LCG), independent of torch's RNG state
    perm = sorted(range(batch), key=lambda i: (i * 2654435761 + 12345) % 4294967296)
    return [ids[p] for p in perm]


# ---------------------------------------------------------------------------------------------
# case lists
# ---------------------------------------------------------------------------------------------
def _mixed(base: Case, counts=(1, 2, 8, 32, 64), skewed=(2, 8, 32)) -> list[Case]:
    out = [replace(base, kind="mixed", tasks=t, mix="uniform") for t in counts if t <= base.batch]
    out += [replace(base, kind="mixed", tasks=t, mix="skewed") for t in skewed if t < base.batch]
    return out


def _lowrank(base: Case, ranks=(8, 32, 128)) -> list[Case]:
    limit = min(base.layer.c_in, base.layer.c_out)
    return [replace(base, kind="lowrank", rank=r) for r in ranks if r <= limit]


def full_cases(device: str) -> list[Case]:
    """The full suite (meant for a GPU; on CPU it takes hours)."""
    g, d = GPGAN256, DEMO32
    convs = [g[k] for k in ("b4.conv_0", "b8.conv_0", "b16.conv_0", "b32.conv_0", "b64.conv_0",
                            "b128.conv_0", "b256.conv_0")]
    demo_convs = [d[k] for k in ("b4.conv_0", "b8.conv_0", "b16.conv_0", "b32.conv_0")]
    gpu = device == "cuda"
    precisions = [("fp32", False)] + ([("fp32", True), ("bf16", False)] if gpu else [])
    cases: list[Case] = []
    # weight modulation alone
    for layer in (g["b4.conv_0"], g["b16.conv_1"], g["b256.conv_0"], d["b8.conv_0"]):
        for tasks in (1, 8):
            for p in ("fwd", "fwd+bwd"):
                cases.append(Case("madafm_weight", layer, tasks=tasks, pass_=p))
    # single task: every block, both batches, both passes; other precisions at batch 64
    for layer in convs + demo_convs:
        for batch in (16, 64):
            for p in ("fwd", "fwd+bwd"):
                for dtype, tf32 in precisions:
                    if (dtype, tf32) != ("fp32", False) and batch != 64:
                        continue
                    cases.append(Case("modulated_conv2d", layer, batch=batch, dtype=dtype, tf32=tf32, pass_=p))
    # mixed tasks in a batch of 64 (fp32 with TF32 as training on GPU would run; plain fp32 on CPU)
    mixed_prec = ("fp32", gpu)
    for layer in (g["b4.conv_0"], g["b16.conv_0"], g["b64.conv_0"], d["b8.conv_0"]):
        for p in ("fwd", "fwd+bwd"):
            base = Case("modulated_conv2d", layer, batch=64, dtype=mixed_prec[0], tf32=mixed_prec[1], pass_=p)
            cases += [base] + _mixed(base)
    # low rank Gamma/B
    for layer in (g["b4.conv_0"], g["b16.conv_0"], g["b64.conv_0"]):
        base = Case("modulated_conv2d", layer, batch=64, dtype=mixed_prec[0], tf32=mixed_prec[1])
        cases += [base] + _lowrank(base)
        cases += [replace(base, kind="mixed", tasks=64, mix="uniform")]
        cases += [replace(base, kind="lowrank", tasks=64, mix="uniform", rank=32, note="mixed")]
    # mFiLM linear
    for layer in (g["fc"], d["fc"]):
        for batch in (16, 64):
            for p in ("fwd", "fwd+bwd"):
                base = Case("modulated_linear", layer, batch=batch, pass_=p)
                cases += [base]
                if batch == 64:
                    cases += [replace(base, kind="mixed", tasks=64, mix="uniform"),
                              replace(base, kind="mixed", tasks=8, mix="skewed")]
    return _unique(cases)


def quick_cases() -> list[Case]:
    """A small subset at small sizes: about two minutes on 2 CPU cores."""
    d, g = DEMO32, GPGAN256
    cases = [
        Case("madafm_weight", PER_CALL, pass_="fwd+bwd", note="per-call cost"),
        Case("madafm_weight", d["b8.conv_0"], pass_="fwd+bwd"),
        Case("madafm_weight", g["b32.conv_0"], pass_="fwd+bwd"),
        Case("madafm_weight", d["b8.conv_0"], tasks=8, pass_="fwd"),
        Case("madafm_weight", g["b16.conv_1"], tasks=8, pass_="fwd"),
        Case("modulated_conv2d", d["b8.conv_0"], batch=16, pass_="fwd"),
        Case("modulated_conv2d", d["b8.conv_0"], batch=16, pass_="fwd+bwd"),
        Case("modulated_conv2d", d["b32.conv_0"], batch=16, pass_="fwd+bwd"),
    ]
    base = Case("modulated_conv2d", d["b8.conv_0"], batch=16, pass_="fwd+bwd")
    cases += [replace(base, kind="mixed", tasks=t, mix="uniform") for t in (1, 4, 16)]
    cases += [replace(base, kind="mixed", tasks=4, mix="skewed")]
    cases += [replace(base, kind="lowrank", rank=r) for r in (8, 32)]
    lin = Case("modulated_linear", d["fc"], batch=16, pass_="fwd+bwd")
    cases += [lin, replace(lin, kind="mixed", tasks=16, mix="uniform")]
    return cases


def tiny_cases() -> list[Case]:
    """Seconds in all: what ``tests/test_benchmarks.py`` runs."""
    conv = Layer("tiny.conv", 4, 6, 5, 3)
    lin = Layer("tiny.fc", 5, 7, kernel=0)
    base = Case("modulated_conv2d", conv, batch=4, pass_="fwd+bwd")
    return [
        Case("madafm_weight", conv, pass_="fwd+bwd"),
        Case("modulated_conv2d", conv, batch=4, pass_="fwd"),
        base,
        replace(base, kind="mixed", tasks=3, mix="skewed"),
        replace(base, kind="lowrank", rank=2),
        Case("modulated_linear", lin, batch=4, pass_="fwd+bwd"),
        Case("modulated_linear", lin, batch=4, kind="mixed", tasks=2, mix="uniform", pass_="fwd"),
    ]


def _unique(cases: list[Case]) -> list[Case]:
    seen, out = set(), []
    for c in cases:
        if c.name not in seen:
            seen.add(c.name)
            out.append(c)
    return out
