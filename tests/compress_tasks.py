"""Building tasks of a GAN memory by hand for the compression tests: a naive task with perturbed
styles, and a compressed one that runs ``learn(compress=...)``'s steps around a random low-rank
change in place of training."""
import torch

import gmem
from gmem.compress import knowledge
from gmem.compress.knowledge import RELEASED_LAYERS, CompressionSettings
from gmem.memory import compression


def record(name):
    return {"name": name, "num_classes": None, "training": {}, "metrics": {}}


def add_naive(mem, name, seed):
    mem.registry.add(name, None, record(name))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gmem.nn.style_parameters(mem.generator, name):
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))


def add_compressed(mem, name, seed, keep=0.9, layers=RELEASED_LAYERS, rank=2):
    """What ``learn(compress=...)`` does around training, with a random rank-``rank`` change for the training."""
    settings = CompressionSettings(keep=keep, layers=layers)
    compression.load_all_compressed(mem)
    mem.registry.add(name, None, record(name))
    styles = knowledge.begin_task(mem.generator, name, mem.registry.knowledge, settings)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in styles:
            o, i = s.residual.shape
            s.residual.add_(0.05 * torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g))
            s.lam.mul_(1 + 0.05 * torch.randn(s.lam.shape, generator=g))
    info = knowledge.finish_task(mem.generator, name, mem.registry.knowledge, settings)
    mem.records[name]["compression"] = compression.compression_record(mem, name, {"mode": "test"}, info)
    mem.link.knowledge_dirty = True
    return info
