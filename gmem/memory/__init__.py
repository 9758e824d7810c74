"""The GAN memory: :class:`GANMemory`, a frozen GP-GAN base plus one small style set per learned task.

The facade (:mod:`.gan_memory`) combines the parts, each the one owner of its state:

- :mod:`.registry`: :class:`TaskRegistry`, the converted networks, the tasks in order with their
  records, the tasks still pending on disk, the per-task discriminator heads and the knowledge bases;
- :mod:`.learning`: learning one task with the shared GP-GAN step (:mod:`gmem.training`);
- :mod:`.sampling`: sampling, mixed-task batches, interpolation;
- :mod:`.persist`: saving to and loading from a store (:mod:`gmem.store`); what a memory knows about
  its store is a :class:`StoreLink`;
- :mod:`.compression`: compressed tasks (loading order, the knowledge-base file, ``mem.compress``);
- :mod:`.learner`: the :class:`Learner` protocol the experiments drive (GAN memory and every baseline);
- :mod:`.replay`: generative replay for continual-learning code that takes a generator.
"""
from .gan_memory import GANMemory
from .registry import D_MODULATED, G_MODULATED

__all__ = ["GANMemory", "G_MODULATED", "D_MODULATED"]
