#!/usr/bin/env python3
"""Quality numbers for a base GAN: Frechet distances between generated and real 32x32 images.

The standard (Inception) FID runs at a few images/s on 2 CPU cores, so by default two cheap, fixed
feature spaces are used; both are PROXIES, comparable only within this script (documented with the
numbers):

- ``pixel-FD``: Frechet distance of images area-downsampled to 8x8 (192-d), i.e. colour layout statistics.
- ``randconv-FD``: Frechet distance of 256-d features of a fixed, randomly initialised (seed 0) 4-layer
  conv net (3->32->64->128->256 channels, 3x3 stride 2, leaky ReLU, global average pool) whose
  features form a "random network" FID, comparable only within this script.

Each is reported with a real-vs-real reference (two disjoint halves of the data) and for an untrained
generator, so the trained value can be placed between the two. ``--inception-n N`` adds the standard
FID (gmem.eval.protocol_fid: N real images, statistics cached, and N samples; the paper's N is
min(data size, 10,000)).

    python tools/eval_base.py --data gmem/assets/source/crawl_tiles.npz --base gmem/assets/base
    python tools/eval_base.py --data ... --checkpoint /work/base_run/run/checkpoint.pt
    python tools/eval_base.py --data ... --base gmem/assets/base --inception-n 6350   # slow on a CPU
    python tools/eval_base.py --data ... --base gmem/assets/base --n 0 --figures gmem/assets/base

``--figures DIR`` writes ``DIR/samples.png`` (64 samples of the scored generator, z seed 0) and
``DIR/real.png`` (64 training images, seed 0), 8x8 grids upscaled 2x, to be looked at side by side.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's gmem, not another install
from gmem.eval import fid_from_features, protocol_fid  # noqa: E402


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature rows of ``a`` and ``b`` ([N, d])."""
    return fid_from_features(a, b)


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


def evaluate(G, real: torch.Tensor, n: int = 2000, seed: int = 0, inception_n: int = 0) -> dict:
    net = random_convnet()
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
    half = min(n, len(real) // 2)
    ra, rb = real[perm[:half]], real[perm[half:2 * half]]
    fa, fb, fg = features(ra, net), features(rb, net), features(generate(G, half, seed), net)
    out = {k: {"generated_vs_real": frechet(fg[k], fa[k]), "real_vs_real": frechet(fb[k], fa[k])}
           for k in fa} | {"n": half}
    if inception_n:
        fake = generate(G, min(inception_n, len(real)), seed + 1)
        out["inception_fid"] = {"generated_vs_real": protocol_fid(real, fake, inception_n), "n": len(fake)}
    return out


def write_figures(G, real: torch.Tensor, directory: Path) -> None:
    """64 samples (z seed 0) and 64 training images (seed 0) as 8x8 grids, 2x nearest upscaled."""
    from gmem.images import save_grid

    directory.mkdir(parents=True, exist_ok=True)
    pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:64]
    save_grid(generate(G, 64, 0), directory / "samples.png", nrow=8, scale=2)
    save_grid(real[pick], directory / "real.png", nrow=8, scale=2)
    print(f"wrote {directory / 'samples.png'} and {directory / 'real.png'}", file=sys.stderr)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--base", help="a base directory (base.json + base.safetensors)")
    p.add_argument("--checkpoint", help="a train-base checkpoint (EMA generator)")
    p.add_argument("--untrained", action="store_true", help="also score an untrained generator")
    p.add_argument("--n", type=int, default=2000, help="samples (and real images) per score (0: no scores)")
    p.add_argument("--inception-n", type=int, default=0,
                   help="also the standard FID from this many real images and samples (0: skip)")
    p.add_argument("--figures", metavar="DIR",
                   help="write DIR/samples.png (64 samples, z seed 0) and DIR/real.png (64 training images)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from gmem.data import as_dataset
    from gmem.models import Generator, load_base, load_gan_stability

    real = as_dataset(args.data, 32).images
    scored = {}  # name -> generator; --figures draws the last of --base / --checkpoint
    if args.base:
        scored["base"] = load_base(args.base)[0]
    if args.checkpoint:
        scored["checkpoint"] = load_gan_stability(args.checkpoint)[0]
    if args.figures:
        if not scored:
            p.error("--figures needs --base or --checkpoint")
        write_figures(list(scored.values())[-1], real, Path(args.figures))
    if args.untrained:
        ref = list(scored.values())[-1] if scored else Generator(32, 32, 128, 64)
        torch.manual_seed(0)
        scored["untrained"] = Generator(**ref.config()).eval()
    out = {name: evaluate(G, real, args.n, inception_n=args.inception_n)
           for name, G in scored.items()} if args.n else {}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
