"""``gmem train-base [DATA]``: train the unconverted base GP-GAN (:mod:`gmem.train_base`).
"""
from __future__ import annotations

import argparse

HELP = "train the unconverted base GP-GAN (GP-GAN objective, R1, EMA)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="?", default=None,
                   help="training images: a directory (searched recursively), an .npy/.npz file of uint8 "
                        "images [N, H, W(, C)], or an embedded demo set name (default: the embedded "
                        "source set gmem/assets/source/crawl_tiles.npz the default base was trained on)")
    p.add_argument("--out", default="runs/base", help="output directory: checkpoint.pt, samples/, log.jsonl "
                                                      "(default runs/base); an existing checkpoint is resumed")
    p.add_argument("--iterations", type=int, default=20000, help="total iterations (default 20000)")
    p.add_argument("--size", type=int, default=32, help="resolution, 4*2**k (default 32)")
    p.add_argument("--nf", type=int, default=32, help="base width; 64 at size 256 is the public GP-GAN (default 32)")
    p.add_argument("--z-dim", type=int, default=128, help="latent size (default 128)")
    p.add_argument("--embed-size", type=int, default=64, help="label embedding size (default 64)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate, betas (0, 0.99) (default 1e-4)")
    p.add_argument("--r1-gamma", type=float, default=10.0,
                   help="R1 penalty on real data, added as GAMMA * E||grad D(x)||^2 (the released code's "
                        "convention; the paper's gamma/2 notation) (default 10)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the sampling generator (default 0.999)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--sample-every", type=int, default=500, help="iterations between sample grids (default 500)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="iterations between checkpoints (default 500)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (at a checkpoint) after this much wall time")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1, or OMP_NUM_THREADS: robust on a busy machine; README "
                        "\"Threads\")")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/checkpoint.pt exists")
    p.add_argument("--restart", action="store_true",
                   help="if OUT/checkpoint.pt belongs to another run (other data or settings), discard it "
                        "and start over (without this, that is an error saying what differs)")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="after training, write the EMA generator + discriminator as a base "
                        "(base.json + base.safetensors, fp16) to DIR; load with gmem.models.load_base(DIR)")
    p.add_argument("--init", default=None, metavar="BASE_DIR",
                   help="start from the weights of a saved base (e.g. gmem/assets/base) to train it longer; "
                        "Adam starts fresh; the architecture flags must match the base")
    p.add_argument("--export-only", action="store_true",
                   help="do not train: export OUT/checkpoint.pt to the --export directory")


def run(args: argparse.Namespace) -> int:
    from ..data import SOURCE_DATA
    from ..train_base import CHECKPOINT_NAME, export_base, train_base

    if args.export_only:
        if not args.export:
            raise SystemExit("gmem train-base: error: --export-only needs --export DIR")
        export_base(f"{args.out}/{CHECKPOINT_NAME}", args.export)
        print(f"exported {args.out}/{CHECKPOINT_NAME} to {args.export}")
        return 0
    if args.data is None:
        args.data = str(SOURCE_DATA)
    for option, value, high in (("--nf", args.nf, 1024), ("--z-dim", args.z_dim, 4096),
                                ("--embed-size", args.embed_size, 4096), ("--batch-size", args.batch_size, 1_000_000),
                                ("--size", args.size, 1024)):
        if not 1 <= value <= high:
            raise ValueError(f"{option} must be an int in 1..{high}, got {value}")
    if args.iterations < 0:
        raise ValueError(f"--iterations must be >= 0, got {args.iterations}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # a CLI entry point: the only place that sets global state
    trainer = train_base(args.data, args.out, iterations=args.iterations, size=args.size, nf=args.nf,
                         z_dim=args.z_dim, embed_size=args.embed_size, batch_size=args.batch_size, lr=args.lr,
                         r1_gamma=args.r1_gamma, ema_decay=args.ema, seed=args.seed,
                         sample_every=args.sample_every, checkpoint_every=args.checkpoint_every,
                         max_minutes=args.max_minutes, resume=not args.no_resume, restart=args.restart,
                         device=args.device, init=args.init)
    print(f"trained to iteration {trainer.iteration}; checkpoint in {args.out}/checkpoint.pt")
    if args.export:
        export_base(f"{args.out}/{CHECKPOINT_NAME}", args.export, info={"data": str(args.data)})
        print(f"exported the base to {args.export}")
    return 0
