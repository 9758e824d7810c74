"""GP-GAN models: the ResNet generator/discriminator, public-checkpoint loading, the embedded base.

- ``Generator(size=256, nf=64, z_dim=256, embed_size=256, nlabels=1, channels=3, s0=4)``:
  ``G(z [N, z_dim], y [N] or None) -> [N, 3, size, size]`` in [-1, 1].
- ``Discriminator(size=256, nf=64, nlabels=1, channels=3, s0=4)``: ``D(x, y=None) -> [N]`` logits.
  ``s0 = size // 64`` gives GAN_stability's 'resnet4' (7 blocks) at any size.
- ``load_gan_stability(path, use_ema=True) -> (G, D)``: public GAN_stability checkpoints, every size.
- ``load_default_base() -> (G, D)``: the small pretrained base shipped in ``gmem/assets``.
"""
from .base import default_base_info, load_base, load_default_base, save_base
from .checkpoint import CheckpointError, load_gan_stability, strip_prefix
from .resnet import Discriminator, Generator, ResnetBlock, actvn, generator_channels

__all__ = [
    "Generator", "Discriminator", "ResnetBlock", "actvn", "generator_channels",
    "load_gan_stability", "CheckpointError", "strip_prefix",
    "load_default_base", "load_base", "save_base", "default_base_info",
]
