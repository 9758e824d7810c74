"""Scale-out of one task over many processes: torchrun launch, gradient sync, sharded data, rank 0 I/O.

Launch (one process per GPU; gloo on CPU)::

    torchrun --nproc_per_node N -m gmem.cli learn MEMORY NAME DATA ...

Without torchrun every function here is a no-op for a single process (rank 0 of 1), so the same
trainer code runs in both cases.

What scales. Each of the ``N`` ranks takes ``global_batch / N`` images of every global batch (it must
divide evenly): one step of ``N`` ranks sees exactly the images, latents and noise of one step of a
single process with the same seed, and the averaged gradients give its update up to the order of the
floating-point sum. Keep the learning rate when you keep the global batch; growing the global batch
with ``N`` is a different run (rescale the lr as you would for a larger batch on one process).

Why an explicit all-reduce, not ``DistributedDataParallel``. Only the task's trainable parameters
(style sets, per-task copies such as the discriminator head) are synchronised; the frozen base is the
same on every rank and never enters a bucket. One GP-GAN step backpropagates the generator loss
through a discriminator whose parameters are switched off (``requires_grad_(False)``), then runs two
discriminator forwards and backwards (real with R1, fake) before one optimiser step, and R1 is a
double backward (``autograd.grad(..., create_graph=True)``). DDP's reducer expects one forward and one
backward per step over a fixed set of parameters needing gradients: it would all-reduce twice (or
need ``no_sync``), does not support toggling ``requires_grad`` on the parameters it manages nor
double backward through its hooks, and excluding the base needs a private API. Averaging the
trainable gradients once, after the last backward and before ``optimizer.step()``, is exact for any
number of forwards and backwards. It does not overlap communication with the backward pass: the
cost is one flat all-reduce of the (small) style gradients per network and step.

Failures. Collectives time out after ``timeout_s`` (default ``$GMEM_DIST_TIMEOUT`` or 600 s). A rank
that sees a peer die or go silent raises :class:`PeerFailure` naming itself and what to do (under
torchrun the launcher also stops the other ranks and names the first failure). With NCCL, a timed-out
collective is ended by PyTorch's watchdog, which stops the process with its own message. Checkpoints
hold no per-rank state, so a rerun resumes from the last one with any ``N`` dividing the global batch.

The API a trainer calls::

    from gmem import distributed as dist
    with dist.distributed(resume_hint=str(ckpt_path)) as info:  # torchrun's env; cleanup on exit
        model.to(info.device)                      # cuda:LOCAL_RANK with NCCL, else cpu
        dist.broadcast_parameters(trainable)       # every rank starts from rank 0's values
        sampler = dist.ShardedInfiniteSampler(len(data), dist.local_batch_size(bs), seed)
        bar = dist.progress(total=iterations)      # tqdm, disabled off rank 0
        for step ...:
            z = dist.shard(torch.randn(bs, z_dim, generator=rng))  # draw global, keep own rows
            loss.backward()
            dist.all_reduce_gradients(trainable)   # after the last backward, before opt.step()
            opt.step(); update_ema(...)            # on every rank: states stay identical
            dist.save_on_main(state, ckpt_path)    # rank 0 writes, atomically
            if dist.is_main(): write_samples()

Drawing random tensors at the global batch size on every rank from the same seeded generator, then
keeping :func:`shard`, makes the generator's state independent of ``N``, like the sampler's.
"""
from __future__ import annotations

from .collectives import all_reduce_gradients, any_rank, average_scalars, broadcast_parameters, same_on_all_ranks
from .group import (
                          DistInfo,
                          PeerFailure,
                          barrier,
                          distributed,
                          ensure_joined,
                          init,
                          is_initialized,
                          is_main,
                          launched_by_torchrun,
                          local_rank,
                          rank,
                          shutdown,
                          world_size,
)
from .rank0 import main_only, progress, save_on_main
from .sharding import ShardedInfiniteSampler, local_batch_size, shard

__all__ = [
    "DistInfo", "PeerFailure", "ShardedInfiniteSampler", "all_reduce_gradients", "any_rank", "average_scalars",
    "barrier", "broadcast_parameters", "distributed", "ensure_joined", "init", "is_initialized", "is_main",
    "launched_by_torchrun", "local_batch_size", "local_rank", "main_only", "progress", "rank",
    "same_on_all_ranks", "save_on_main", "shard", "shutdown", "world_size",
]
