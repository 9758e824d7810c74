"""The gmem benchmark suite: every backend against PyTorch, torch.compile and the plain-op limit.

``python -m benchmarks.run [--quick] [--device cpu|cuda] [--ops ...] [--json FILE]`` runs it; see
``benchmarks/README.md``. Modules:

* :mod:`benchmarks.cases`: the cases (GP-GAN 256 and 32x32 demo layers, single/mixed/low-rank).
* :mod:`benchmarks.providers`: for one case, a callable per provider (reference, torch_compile,
  each compiled backend, grouped_conv, plain).
* :mod:`benchmarks.timing`: warm-up + median timing (CUDA events with an L2 flush on GPU) and peak
  memory; :mod:`benchmarks.machine`: what the numbers were measured on.
* :mod:`benchmarks.e2e`: end-to-end GAN-memory training and replay steps.
* :mod:`benchmarks.report`: ratios, targets, the table, JSON records and the plot.
"""
