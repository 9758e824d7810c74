"""Compression and knowledge sharing of style sets (the paper's Section 4.3 and Algorithm 1).

The pieces, lowest first (the package sits above :mod:`gmem.nn` and :mod:`gmem.training`):

- :mod:`.energy`: the energy rule. :func:`truncate_energy` ``(matrix [m, n], keep) -> (u, s, v)`` keeps
  the fewest leading singular values whose sum reaches ``keep`` of the total (``keep=0`` -> rank 0);
  :func:`residual_rank` counts the base's energy towards the target; :func:`width_fraction` is the
  released code's kept fraction by layer width; :class:`ResidualEnergyRule` (the default rank rule) decides
  a task's new columns from the energy of the residual the stored basis does not explain, within a budget.
- :mod:`gmem.lowrank` (below :mod:`gmem.nn`, which holds its objects in the bank): :class:`LowRankStyle`,
  one style matrix while a task trains (``G = L diag(lam) R^T + E``), and :func:`nuclear_prior`, the
  weighted nuclear norm on ``E``.
- :mod:`.base`: :class:`KnowledgeBase`, the growing basis of one style matrix and the tasks stored in it.
- :mod:`.study`: singular-value plots and tables. :mod:`.posthoc`: truncating a naive task's dense
  matrices directly (no training-time prior). :mod:`.truncation`: the per-block truncation study
  (quality vs kept energy, one block at a time: the paper's Figure 4b).
- :mod:`.layers`: the layer selection (globs, or ``(glob, (rows, cols))`` for a linear layer) and each
  selected layer's matrices: a conv's ``[O, I]``, the GP-GAN fc's mFiLM vectors as ``(16 nf) x (s0^2)``.

In a memory (phase B): :mod:`.knowledge` (the bases of a generator's compressed convs, the task life
cycle: training-time entries, the prior plug-in, storing, post-hoc compression, installing from a file;
``CompressionSettings``: blocks B0-B3 and the fc, the residual rule (the released width fractions are
``keep="width"``), weight 0.01 every 10 iterations; ``RELEASED_LAYERS``: B0-B3 alone, the released
code's choice, the fc dense; a layer whose factors
would cost more than its dense matrices is stored dense) and :mod:`gmem.memory.compression` (loading
order, the knowledge-base file, ``mem.compress``);
the bank entries are :mod:`gmem.nn.lowrank`. ``GANMemory.learn(..., compress=True)``,
``GANMemory.compress(task)``, ``parameter_counts(task)["generator_stored"]``.

The core API, per compressed conv (two matrices: ``Gamma`` and ``B``)::

    kb = KnowledgeBase(O, I, dtype)                      # one per matrix, kept by the memory
    style = LowRankStyle.from_base(kb, residual=init)    # training: lam from the last task, E init
    gamma = style.dense()                                # [O, I] -> gmem.ops.modulated_conv2d
    # trainer plug-in, every PRIOR_EVERY iterations (``it % PRIOR_EVERY == 0``), at full weight:
    loss = loss + sum(s.prior(first_task=kb.rank == 0) for s in styles)
    info = kb.add_task(name, style.lam, style.residual)  # after the task; keep=width_fraction(O)
    lam, residual = fit_coefficients(kb, dense_gamma)    # converting a naive task, then add_task
    kb.express(name) -> LowRank                          # sampling one task, never densified
    kb.express_stack(names) -> LowRank [T, ...]          # mixed-task batch (task_ids index names)
    kb.stored_values(name)                               # "generator_stored" (naive: O * I)
    kb.tasks_using(columns), kb.remove_task(name)        # removal refused while later tasks use columns
    kb.state_dict()                                      # flat tensors: "shape" + "tasks.<name>.*";
    KnowledgeBase.from_state_dict(sd)                    #   one task's keys can go to its own file
    storage_table({matrix_name: kb}) -> str              # ``gmem info`` in the paper's Table 1 layout
"""
from __future__ import annotations

from .base import KnowledgeBase, fit_coefficients
from .energy import (
    WIDTH_FRACTIONS,
    EnergyRule,
    RankRule,
    ResidualEnergyRule,
    energy_rank,
    residual_rank,
    truncate_energy,
    width_fraction,
)
from .knowledge import DEFAULT_LAYERS, PRIOR_EVERY, RELEASED_LAYERS, CompressionSettings, Knowledge
from .posthoc import compress_style, compress_tasks, express_in_base, knowledge_base
from .study import energy_table, plot_singular_values, singular_values, storage_table

__all__ = [
    "truncate_energy", "energy_rank", "residual_rank", "width_fraction", "WIDTH_FRACTIONS", "RankRule", "EnergyRule",
    "ResidualEnergyRule", "PRIOR_EVERY",
    "KnowledgeBase", "fit_coefficients",
    "singular_values", "plot_singular_values", "energy_table", "storage_table",
    "compress_style", "compress_tasks", "knowledge_base", "express_in_base",
    "CompressionSettings", "Knowledge", "DEFAULT_LAYERS", "RELEASED_LAYERS",
]
