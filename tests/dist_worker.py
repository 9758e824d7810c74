"""A stand-in GP-GAN task step on many processes, for tests/test_distributed.py and tools/ddp_bench.py.

The step is the GAN memory's one (generator update with the non-saturating loss, then a
discriminator update on real images with R1 and on fakes; Adam; an EMA of the generator's style
set) on a tiny converted GP-GAN, with :mod:`gmem.distributed` doing what a rank must: its share of
every global batch, gradient averaging of the trainable parameters only, rank 0 writing files.

Run one rank per process, e.g. ``torchrun --nproc_per_node 2 tests/dist_worker.py --out DIR``
(without torchrun it is a single process). Files written in ``--out``: ``ckpt_XXXX.pt`` after every
step and ``final.pt`` (rank 0), ``rank{r}.json`` (what each rank saw, for the tests).

``dist_worker.py learn MEMORY DATA ...`` instead runs the real trainer, :meth:`gmem.GANMemory.learn`,
as a user's script would under torchrun (tests/test_ddp_learn.py), and can kill one rank mid-run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gmem.nn as gnn
from gmem import distributed as dist
from gmem.models import Discriminator, Generator

TASK = "task"
G_INCLUDE = ("fc", "resnet_*.conv_0", "resnet_*.conv_1")
D_INCLUDE = ("resnet_*.conv_0", "resnet_*.conv_1")


def dataset(n: int = 20, size: int = 16, seed: int = 1) -> torch.Tensor:
    """Fixed random "images" ``[n, 3, size, size]`` in [-1, 1]."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class StandIn:
    """One task of a tiny converted GP-GAN and everything needed to train it and resume exactly.

    ``global_batch`` images per step in all; this rank takes ``global_batch / world_size()``.
    """

    def __init__(self, global_batch: int = 8, size: int = 16, nf: int = 8, z_dim: int = 16, seed: int = 0,
                 lr: float = 1e-3, r1_gamma: float = 10.0, dtype=torch.float32):
        with torch.random.fork_rng(devices=[]):  # the base's random init, without touching global state
            torch.manual_seed(seed)
            self.G = Generator(size=size, nf=nf, z_dim=z_dim, embed_size=8).to(dtype)
            self.D = Discriminator(size=size, nf=nf).to(dtype)
        gnn.convert(self.G, include=G_INCLUDE)
        gnn.convert(self.D, include=D_INCLUDE)
        gnn.add_task(self.G, TASK)
        gnn.add_task(self.D, TASK)
        for p in list(self.G.parameters()) + list(self.D.parameters()):
            p.requires_grad_(False)  # the frozen base; the task's parameters are switched on below
        self.g_params = gnn.style_parameters(self.G, TASK)
        self.d_params = gnn.style_parameters(self.D, TASK) + list(self.D.fc.parameters())  # style + head
        for p in self.g_params + self.d_params:
            p.requires_grad_(True)
        dist.broadcast_parameters(self.g_params + self.d_params)
        self.g_ema = [p.detach().clone() for p in self.g_params]
        self.opt_g = torch.optim.Adam(self.g_params, lr=lr, betas=(0.0, 0.99))
        self.opt_d = torch.optim.Adam(self.d_params, lr=lr, betas=(0.0, 0.99))
        self.data = dataset(size=size).to(dtype)
        self.global_batch, self.z_dim, self.r1_gamma, self.dtype = global_batch, z_dim, r1_gamma, dtype
        self.sampler = dist.ShardedInfiniteSampler(len(self.data), dist.local_batch_size(global_batch), seed)
        self.rng = torch.Generator().manual_seed(seed + 1)
        self.iteration = 0
        self.seen: list[list[int]] = []  # this rank's data indices per step

    def _z(self) -> torch.Tensor:
        return dist.shard(torch.randn(self.global_batch, self.z_dim, generator=self.rng).to(self.dtype))

    def step(self) -> dict:
        G, D = self.G, self.D
        with gnn.use_task(G, TASK), gnn.use_task(D, TASK):
            for p in self.d_params:
                p.requires_grad_(False)
            g_loss = F.softplus(-D(G(self._z()))).mean()
            self.opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            dist.all_reduce_gradients(self.g_params)
            self.opt_g.step()
            decay = min(0.999, (1 + self.iteration) / (10 + self.iteration))
            with torch.no_grad():
                for e, p in zip(self.g_ema, self.g_params):
                    e.lerp_(p, 1.0 - decay)
            for p in self.d_params:
                p.requires_grad_(True)
            for p in self.g_params:
                p.requires_grad_(False)
            idx = self.sampler.next_indices()
            self.seen.append(idx.tolist())
            flip = dist.shard(torch.rand(self.global_batch, generator=self.rng) < 0.5)
            x = self.data[idx]
            x_real = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x).requires_grad_(True)
            d_real = D(x_real)
            (grad,) = torch.autograd.grad(d_real.sum(), x_real, create_graph=True)  # R1, double backward
            r1 = grad.pow(2).reshape(grad.shape[0], -1).sum(1).mean()
            loss_real = F.softplus(-d_real).mean() + 0.5 * self.r1_gamma * r1
            self.opt_d.zero_grad(set_to_none=True)
            loss_real.backward()
            with torch.no_grad():
                x_fake = G(self._z())
            loss_fake = F.softplus(D(x_fake)).mean()
            loss_fake.backward()
            dist.all_reduce_gradients(self.d_params)
            self.opt_d.step()
            for p in self.g_params:
                p.requires_grad_(True)
        self.iteration += 1
        return {k: float(v.detach()) for k, v in
                (("g_loss", g_loss), ("d_real", loss_real), ("d_fake", loss_fake), ("r1", r1))}

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "g": [p.detach().clone() for p in self.g_params],
                "g_ema": [e.clone() for e in self.g_ema], "d": [p.detach().clone() for p in self.d_params],
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "sampler": self.sampler.state_dict(), "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for dst, key in ((self.g_params, "g"), (self.g_ema, "g_ema"), (self.d_params, "d")):
                for p, v in zip(dst, state[key], strict=True):
                    p.copy_(v)
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sampler.load_state_dict(state["sampler"])
        self.rng.set_state(state["rng"])
        self.iteration = int(state["iteration"])

    def base_tensors(self) -> list[torch.Tensor]:
        """Every parameter and buffer that is not trained (the frozen base and the source task)."""
        trained = {id(p) for p in self.g_params + self.d_params}
        return [t.detach().clone() for m in (self.G, self.D) for t in list(m.parameters()) + list(m.buffers())
                if id(t) not in trained]


def check_collectives(out: Path, hang: bool) -> None:
    """Exact float64 checks of the collectives on 2 ranks; then rank 1 stops answering if ``hang``."""
    r = dist.rank()
    results = {}
    a = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    unused = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    a.grad = torch.full((3, 2), float(r + 1), dtype=torch.float64)
    b.grad = torch.arange(5, dtype=torch.float64) * (r + 1)
    dist.all_reduce_gradients([a, unused, b], bucket_mb=40 / 2**20)  # 40 bytes: one bucket per tensor
    results["a"], results["b"], results["unused_is_none"] = a.grad.tolist(), b.grad.tolist(), unused.grad is None
    c = torch.nn.Parameter(torch.zeros(2))
    c.grad = torch.ones(2) if r == 1 else None
    try:
        dist.all_reduce_gradients([c])
    except RuntimeError as e:
        results["partial_grad_error"] = str(e)
    p = torch.full((4,), float(r + 10))
    dist.broadcast_parameters([p])
    results["broadcast"] = p.tolist()
    try:
        dist.broadcast_parameters([torch.zeros(3)] * (r + 1))
    except RuntimeError as e:
        results["mismatch_error"] = str(e)
    results["scalars"] = dist.average_scalars({"x": float(r), "y": 2.0 * r})
    results["shard"] = dist.shard(torch.arange(6)).tolist()
    dist.barrier()
    (out / f"collectives{r}.json").write_text(json.dumps(results))
    if hang and r == 1:
        time.sleep(3600)  # alive but silent: rank 0 must time out
    dist.barrier()


def learn_run_dir(memory, name: str) -> Path:
    """Where ``gmem learn MEMORY NAME DATA`` keeps its checkpoint (so a script and the CLI share it)."""
    try:
        from gmem.store.files import run_dir_name  # the store's layout: runs/<stem>-<hash8>
    except ImportError:
        return Path(memory) / "runs" / name
    return Path(memory) / "runs" / run_dir_name(name)


def learn_main(argv) -> int:
    """``GANMemory.learn`` of task ``t`` on the default base inside ``gmem.distributed.distributed()``;
    rank 0 saves the memory. ``--kill-rank R --kill-at K``: rank R kills itself (SIGKILL) after iteration K.
    ``--train-base DIR``: first a tiny ``train_base`` on the same data into DIR. ``--times FILE``: rank 0
    writes the wall time of every iteration there (JSON list, seconds; tools/ddp_bench.py)."""
    import signal

    from gmem import GANMemory
    from gmem.data import as_dataset

    ap = argparse.ArgumentParser(prog="dist_worker.py learn")
    ap.add_argument("memory")
    ap.add_argument("data")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kill-rank", type=int, default=1)
    ap.add_argument("--kill-at", type=int, default=None)
    ap.add_argument("--train-base", default=None, metavar="DIR")
    ap.add_argument("--checkpoint-every", type=int, default=1)
    ap.add_argument("--times", default=None, metavar="FILE")
    args = ap.parse_args(argv)
    run_dir = learn_run_dir(args.memory, "t")

    ticks = [time.perf_counter()]

    def kill(iteration: int, losses: dict) -> None:
        ticks.append(time.perf_counter())
        if iteration == args.kill_at and dist.rank() == args.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)

    with dist.distributed(resume_hint=str(run_dir)):
        if args.train_base:
            from gmem.train_base import train_base

            train_base(args.data, args.train_base, iterations=2, size=16, nf=8, z_dim=16, batch_size=4, lr=1e-3,
                       progress=False)
        mem = GANMemory.default()
        ticks[:] = [time.perf_counter()]  # the first iteration's time also holds learn's setup
        mem.learn("t", as_dataset(args.data, mem.size, mem.channels), iterations=args.iterations,
                  batch_size=args.batch_size, seed=0, lr=args.lr, out_dir=run_dir,
                  checkpoint_every=args.checkpoint_every, progress=False, callback=kill)
        if dist.is_main():
            mem.save(args.memory)
            if args.times:
                Path(args.times).write_text(json.dumps([b - a for a, b in zip(ticks, ticks[1:])]))
        dist.barrier()
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["learn"]:
        return learn_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--nf", type=int, default=8)
    ap.add_argument("--resume", default=None, help="checkpoint to continue from")
    ap.add_argument("--timeout", type=float, default=None, help="collective timeout, seconds")
    ap.add_argument("--die-at", type=int, default=None, help="rank 1 exits (code 17) when reaching this step")
    ap.add_argument("--collectives", action="store_true", help="check the collectives instead of training")
    ap.add_argument("--hang", action="store_true", help="with --collectives: rank 1 then stops answering")
    ap.add_argument("--bench", type=int, default=0, help="untimed warm-up steps, then time --steps steps")
    args = ap.parse_args(argv)
    out = Path(args.out)
    with dist.distributed(timeout_s=args.timeout, resume_hint=str(out)) as info:
        if args.collectives:
            check_collectives(out, args.hang)
            return 0
        run = StandIn(args.global_batch, size=args.size, nf=args.nf)
        if args.resume:
            run.load_state_dict(torch.load(args.resume, map_location="cpu", weights_only=True))
        with open(os.devnull, "w") as devnull:
            bar = dist.progress(total=1, file=devnull)
            progress_disabled = bar.disable  # read before close(), which sets it
            bar.close()
        report = {"rank": info.rank, "world": info.world_size, "backend": info.backend,
                  "progress_disabled": progress_disabled, "main_only": dist.main_only(lambda: "ran")()}
        for _ in range(args.bench):
            run.step()
        times, losses = [], {}
        target = run.iteration + args.steps
        while run.iteration < target:
            if info.rank == 1 and run.iteration + 1 == args.die_at:
                os._exit(17)  # no cleanup, as a crashed or killed process
            if args.bench:
                dist.barrier()  # time the step, not the wait for the slowest rank's previous one
            t0 = time.perf_counter()
            losses = run.step()
            times.append(time.perf_counter() - t0)
            dist.save_on_main(run.state_dict(), out / f"ckpt_{run.iteration:04d}.pt")
            if not args.bench:  # what this rank holds now, for the tests (every rank writes its own)
                torch.save({**report, "iteration": run.iteration, "seen": run.seen, "base": run.base_tensors(),
                            "g": [p.detach() for p in run.g_params],
                            "d": [p.detach() for p in run.d_params], "g_ema": run.g_ema}, out / f"rank{info.rank}.pt")
        report.update(step_s=times, losses=dist.average_scalars(losses))
        (out / f"rank{info.rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
