"""GP-GAN training, written once: the step (:class:`GANStep`), the loop (:class:`TrainLoop`) and plug-ins.

    parts = GANParts(generate=lambda z, y: G(z, y), discriminate=lambda x, y: D(x, y),
                     g_params=list(G.parameters()), d_params=list(D.parameters()), z_dim=G.z_dim,
                     modules=(G, D))
    step = GANStep(parts, RealBatches(dataset, 16, seed=0), StepConfig(), seed=0)
    TrainLoop(step, 1000, out_dir="runs/x", sample_fn=...).run()

``gmem train-base`` (:mod:`gmem.train_base`), :meth:`gmem.GANMemory.learn` and the end-to-end
benchmark all run :class:`GANStep`. Variations (extra loss terms, a prior every k iterations,
replay batches) are :class:`Plugin` objects; see :class:`LossTerm`.

R1 convention: :func:`r1_penalty` returns ``gamma * E||grad_x D(x)||^2`` and the discriminator loss adds
it as is (the released GAN_stability / GAN memory code; the paper writes ``gamma/2``), default gamma 10.
"""
from .ema import EMA
from .loop import CHECKPOINT_NAME, TrainLoop
from .losses import DEQUANTIZE_NOISE, augment, discriminator_losses, generator_loss, r1_penalty
from .progress import Progress
from .resume import ResumeMismatch, check_fingerprint, data_fingerprint
from .step import LEARN_DEFAULTS, GANParts, GANStep, LossTerm, Plugin, RealBatches, StepConfig, StepContext

__all__ = [
    "EMA", "TrainLoop", "CHECKPOINT_NAME", "DEQUANTIZE_NOISE", "augment", "discriminator_losses", "generator_loss",
    "r1_penalty", "Progress", "ResumeMismatch", "check_fingerprint", "data_fingerprint", "GANParts", "GANStep",
    "LossTerm", "Plugin", "RealBatches", "StepConfig", "StepContext", "LEARN_DEFAULTS",
]
