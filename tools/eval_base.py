#!/usr/bin/env python3
"""Quality numbers for a base GAN: Frechet distances between generated and real 32x32 images.

FID proper needs Inception weights, which this machine cannot download, and runs at a few images/s on
2 CPU cores. Instead two cheap, fixed feature spaces are used (both documented with the numbers):

- ``pixel-FD``: Frechet distance of images area-downsampled to 8x8 (192-d), i.e. colour layout statistics.
- ``randconv-FD``: Frechet distance of 256-d features of a fixed, randomly initialised (seed 0) 4-layer
  conv net (3->32->64->128->256 channels, 3x3 stride 2, leaky ReLU, global average pool) whose
  features form a "random network" FID, comparable only within this script.

Each is reported with a real-vs-real reference (two disjoint halves of the data) and for an untrained
generator, so the trained value can be placed between the two.

    python tools/eval_base.py --data gmem/assets/source/crawl_tiles.npz --base gmem/assets/base
    python tools/eval_base.py --data ... --checkpoint /work/base_run/run/checkpoint.pt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's gmem, not another install


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature rows of ``a`` and ``b`` ([N, d])."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_convnet() -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    layers, cin = [], 3
    for cout in (32, 64, 128, 256):
        conv = torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        with torch.no_grad():
            conv.weight.normal_(0, (2.0 / (cin * 9)) ** 0.5, generator=g)
            conv.bias.zero_()
        layers += [conv, torch.nn.LeakyReLU(0.2)]
        cin = cout
    return torch.nn.Sequential(*layers).eval()


@torch.no_grad()
def features(x: torch.Tensor, net: torch.nn.Module) -> dict[str, np.ndarray]:
    """``x`` [N, 3, 32, 32] in [-1, 1] -> {'pixel': [N, 192], 'randconv': [N, 256]}."""
    pix = F.adaptive_avg_pool2d(x, 8).flatten(1)
    rc = torch.cat([net(x[i:i + 500]).mean(dim=(2, 3)) for i in range(0, len(x), 500)])
    return {"pixel": pix.double().numpy(), "randconv": rc.double().numpy()}


@torch.no_grad()
def generate(G, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([G(torch.randn(min(500, n - i), G.z_dim, generator=g)) for i in range(0, n, 500)])


def evaluate(G, real: torch.Tensor, n: int = 2000, seed: int = 0) -> dict:
    net = random_convnet()
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
    half = min(n, len(real) // 2)
    ra, rb = real[perm[:half]], real[perm[half:2 * half]]
    fa, fb, fg = features(ra, net), features(rb, net), features(generate(G, half, seed), net)
    return {k: {"generated_vs_real": frechet(fg[k], fa[k]), "real_vs_real": frechet(fb[k], fa[k])}
            for k in fa} | {"n": half}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--base", help="a base directory (base.json + base.safetensors)")
    p.add_argument("--checkpoint", help="a train-base checkpoint (EMA generator)")
    p.add_argument("--untrained", action="store_true", help="also score an untrained generator")
    p.add_argument("--n", type=int, default=2000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from gmem.data import as_dataset
    from gmem.models import Generator, load_base, load_gan_stability

    real = as_dataset(args.data, 32).images
    out = {}
    if args.base:
        G, _ = load_base(args.base)
        out["base"] = evaluate(G, real, args.n)
    if args.checkpoint:
        G, _ = load_gan_stability(args.checkpoint)
        out["checkpoint"] = evaluate(G, real, args.n)
    if args.untrained:
        ref = G if (args.base or args.checkpoint) else Generator(32, 32, 128, 64)
        torch.manual_seed(0)
        out["untrained"] = evaluate(Generator(**ref.config()).eval(), real, args.n)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
