"""Baselines for lifelong learning, each a small extension of the shared GP-GAN trainer or a classifier.

Generation (:mod:`gmem.baselines.gan`), all on the same :class:`gmem.training.GANStep`, data and iterations
as :meth:`gmem.GANMemory.learn`:

- :class:`FineTune`: the whole GAN trained task after task (sequential fine-tuning, forgets);
- :class:`MeRGAN` with ``mode="ra"``: replay alignment (Wu et al. 2018): the new generator's output for an
  old condition ``(z, c)`` is pulled towards the frozen previous generator's output,
  ``lambda_RA * E ||G_t(z, c) - G_{t-1}(z, c)||^2`` (default ``lambda_RA = 1e-3``);
- :class:`MeRGAN` with ``mode="replay"``: joint training with replay: part of each real batch is
  replaced by samples of the earlier conditions drawn from the frozen previous generator;
- :class:`Joint`: trained on all the real data seen so far (an upper bound, not a lifelong method).

The networks are a conditional copy of a :class:`gmem.models.Generator` / :class:`~gmem.models.Discriminator`
(:func:`conditional_copy`): a "condition" is a task (task-incremental generation) or a class
(class-incremental data, e.g. Fashion-MNIST in tasks of two classes).

Classification (:mod:`gmem.baselines.ewc`): elastic weight consolidation with a diagonal Fisher.
"""
from .ewc import EWC, fisher_diagonal
from .gan import (
                  FineTune,
                  GANLearner,
                  Joint,
                  MeRGAN,
                  ReplayAlignment,
                  ReplayMix,
                  conditional_copy,
)

__all__ = ["GANLearner", "FineTune", "MeRGAN", "Joint", "ReplayAlignment", "ReplayMix", "conditional_copy",
           "EWC", "fisher_diagonal"]
