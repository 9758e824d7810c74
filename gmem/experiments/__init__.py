"""Lifelong-learning experiments of the paper at embedded scale (CPU) or larger (GPU).

- ``python -m gmem.experiments.generation --out DIR [--quick]``: a stream of generation tasks; after
  each stage the quality of every task learned so far for GAN memory and the baselines of
  :mod:`gmem.baselines` (the paper's Figure 5 grid and Figure 6-left curves, a results table);
- ``python -m gmem.experiments.classification --out DIR [--quick]``: class-incremental classification
  with generative replay from a conditional GAN memory vs EWC, MeRGAN replay, fine-tuning and joint
  training (Figure 6 right, Figure 12).

Sample quality is scored by a metric chosen by name (:mod:`gmem.experiments.metrics`).
"""
