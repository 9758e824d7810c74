"""One training step of a converted torchvision model against the alternatives a user weighs.

    .venv/bin/python -m benchmarks.dropin [--size 64] [--batch 8] [--reps 5] [--profile] [--json FILE]

ResNet-18 (10 classes), forward + backward of a cross-entropy loss, train mode, 1 thread, CPU time
(``time.process_time``) per step, the providers interleaved round by round and the median reported:

* ``full``: full fine-tuning, every parameter trained (the weight-gradient cost gmem cannot avoid:
  mAdaFM's style gradients are reductions of each weight's gradient);
* ``gmem``: ``gmem.nn.convert`` + one task, ``trainable_parameters`` only (styles and the task's
  BatchNorm copies);
* ``frozen``: no parameter trained, the input's gradient only (activation gradients, no weight
  gradients): the floor of any method that adapts every layer;
* ``lora``: peft's LoRA, r = 8, on the same conv and linear layers (when peft is installed:
  ``pip install -r requirements-bench.txt -c constraints.txt``), BatchNorms frozen.

``--profile`` adds each provider's heaviest operators (torch.profiler, self CPU time).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import gmem.nn as gnn


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).train()


def _layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def steps(size: int, batch: int) -> dict[str, tuple[Callable[[], None], nn.Module]]:
    """``{provider: (one forward+backward step, the model it trains)}``."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    out: dict[str, Callable[[], None]] = {}

    full = _resnet()

    def full_step():
        full.zero_grad(set_to_none=True)
        F.cross_entropy(full(x), y).backward()

    out["full"] = (full_step, full)

    frozen = _resnet().requires_grad_(False)
    x_grad = x.clone().requires_grad_(True)

    def frozen_step():
        x_grad.grad = None
        F.cross_entropy(frozen(x_grad), y).backward()

    out["frozen"] = (frozen_step, frozen)

    model = _resnet()
    gnn.convert(model)
    gnn.add_task(model, "task")
    params = gnn.trainable_parameters(model, "task")

    def gmem_step():
        for p in params:
            p.grad = None
        with gnn.use_task(model, "task"):
            loss = F.cross_entropy(model(x), y)
        loss.backward()

    out["gmem"] = (gmem_step, model)

    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        return out
    base = _resnet()
    config = LoraConfig(r=8, lora_alpha=8, target_modules=_layer_names(base))
    lora = inject_adapter_in_model(config, copy.deepcopy(base))
    for name, p in lora.named_parameters():
        p.requires_grad_("lora_" in name)

    def lora_step():
        lora.zero_grad(set_to_none=True)
        F.cross_entropy(lora(x), y).backward()

    out["lora"] = (lora_step, lora)
    return out


def measure(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Median CPU milliseconds per step, providers interleaved (one warm-up step each first)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[name].append((time.process_time() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


# where a step's time goes: operator name prefixes -> share (the first match wins)
SHARES = (
    ("conv weight+input gradients", ("aten::convolution_backward", "aten::_slow_conv2d_backward",
                                     "aten::mkldnn_convolution_backward")),
    ("conv forward", ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::convolution")),
    ("gmem weight build + style reduction", ("gmem::", "_Modulated")),
    ("batch norm", ("aten::native_batch_norm", "aten::_batch_norm", "aten::batch_norm")),
)


def profile(fn: Callable[[], None], top: int = 8) -> tuple[list[tuple[str, float]], dict[str, float]]:
    """The ``top`` operators by self CPU time (ms) of one step, and the step's self time by share."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    shares: dict[str, float] = {}
    for e in events:
        share = next((name for name, prefixes in SHARES if e.key.startswith(prefixes)), "other")
        shares[share] = shares.get(share, 0.0) + e.self_cpu_time_total / 1e3
    return [(e.key, e.self_cpu_time_total / 1e3) for e in rows], shares


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fns = {name: fn for name, (fn, _) in steps(args.size, args.batch).items()}
    ms = measure(fns, args.reps)
    load = os.getloadavg()[0]
    print(f"resnet18 forward+backward, {args.batch} x 3 x {args.size} x {args.size}, 1 thread, "
          f"median of {args.reps} (CPU ms per step), load average {load:.2f}")
    for name, value in ms.items():
        print(f"  {name:8s} {value:9.1f} ms   {value / ms['full']:.2f} x full   {value / ms['frozen']:.2f} x frozen")
    result = {"ms": ms, "size": args.size, "batch": args.batch, "reps": args.reps, "load_average": load,
              "torch": torch.__version__}
    if args.profile:
        result["profile"] = {}
        for name, fn in fns.items():
            rows, shares = profile(fn)
            result["profile"][name] = {"operators": rows, "shares": shares}
            print(f"{name}: self time by share (profiled ms): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])))
            print("    heaviest operators: " + ", ".join(f"{key} {value:.1f}" for key, value in rows[:5]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
