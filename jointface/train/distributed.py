"""Data-parallel training on torch.distributed: what ``train`` needs to run as N processes.

Launch with ``jointface train --nproc N ...`` (which runs ``torchrun
--standalone --nproc_per_node N``), or ``torchrun --nproc_per_node N -m
cli.app train ...`` yourself (several machines: torchrun's ``--nnodes``,
``--rdzv-endpoint``). Each process finds its rank in the environment that
torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and joins the process group: ``gloo`` on CPU, ``nccl`` on
CUDA (one GPU per local rank).

What changes against one process:

* **Sharded batches, same global batch.** The sampler still makes the
  global P x K batches (a pure function of seed and epoch); rank r trains on
  its contiguous 1/N of each (:func:`shard`), so N processes see exactly the
  images, and the per-image augmentation seeds, of one process. Keep
  ``people_per_batch`` a multiple of N so that each shard holds whole people
  (for the triplet loss).
* **Gradients averaged** over the processes after every backward pass (one
  all-reduce per parameter group, :func:`average_gradients`), BatchNorm
  buffers broadcast from rank 0 before every step (like DDP's
  ``broadcast_buffers``), parameters broadcast from rank 0 at the start. So
  every rank holds the same weights at every step.
* **One writer.** Only rank 0 writes ``config.json``, the logs, checkpoints,
  curves and the exported weights, and runs validation; logged losses are
  the mean over the ranks. Every rank reads the same checkpoint to resume.

The loss of N processes is not bit-identical to one process: each rank's
BatchNorm normalises with its shard's statistics, and the triplet loss mines
negatives within a shard. ``tests/test_distributed.py`` checks the
trajectory of 2 processes against 1 with the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def from_environment() -> DistContext:
    """The process's place in a torchrun job (a single process when not launched by torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device_name: str) -> tuple[DistContext, str]:
    """Join the process group if launched by torchrun; returns the context and the device to use."""
    context = from_environment()
    if not context.enabled:
        return context, device_name
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(context.local_rank)
        device_name = f"cuda:{context.local_rank}"
    elif device_name == "auto":
        device_name = "cpu"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", context.world_size))
    if not use_cuda and local_world == context.world_size:
        # All processes on this machine: keep gloo's traffic on the loopback interface.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    return context, device_name


def default_threads(context: DistContext) -> int | None:
    """Intra-op threads per process when the config sets none: the cores shared by the local processes."""
    if not context.enabled:
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", context.world_size))
    return max(1, (os.cpu_count() or 1) // local)


class NullLog:
    """What a rank other than 0 writes its logs to: nothing."""

    def write(self, row: dict) -> None:
        pass

    def rows(self) -> list[dict]:
        return []


def launch_command(nproc: int, cli_arguments: list[str]) -> list[str]:
    """torchrun (``torch.distributed.run``) running ``jointface`` with these arguments, minus ``--nproc``."""
    import sys

    arguments, skip = [], False
    for argument in cli_arguments:
        if skip:
            skip = False
        elif argument == "--nproc":
            skip = True
        elif not argument.startswith("--nproc="):
            arguments.append(argument)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}",
            "-m", "cli.app", *arguments]


def cleanup(context: DistContext) -> None:
    if context.enabled and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def shard(batches: list[list], context: DistContext) -> list[list]:
    """Rank ``r``'s contiguous share of each global batch (all of it in one process)."""
    if not context.enabled:
        return batches
    shards = []
    for batch in batches:
        if len(batch) % context.world_size:
            raise ValueError(f"a batch of {len(batch)} images cannot be split evenly over {context.world_size} "
                             "processes: make people_per_batch x images_per_person a multiple of --nproc")
        size = len(batch) // context.world_size
        shards.append(batch[context.rank * size:(context.rank + 1) * size])
    return shards


def broadcast_parameters(modules, context: DistContext) -> None:
    if not context.enabled:
        return
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            torch_dist.broadcast(tensor.data, src=0)


def broadcast_buffers(module, context: DistContext) -> None:
    if not context.enabled:
        return
    for tensor in module.buffers():
        torch_dist.broadcast(tensor.data, src=0)


def average_gradients(parameters, context: DistContext) -> None:
    """Mean of every parameter's gradient over the processes (flattened into one all-reduce)."""
    if not context.enabled:
        return
    parameters = list(parameters)
    # A parameter without a gradient on one rank may have one on another (a head unused by one shard):
    # all ranks must reduce the same tensors, so agree first on which parameters take part.
    present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.int32)
    torch_dist.all_reduce(present)
    for p, count in zip(parameters, present.tolist()):
        if count and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p, count in zip(parameters, present.tolist()) if count]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat)
    flat /= context.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_losses(losses: dict[str, float], context: DistContext) -> dict[str, float]:
    """Loss terms averaged over the processes (what rank 0 logs)."""
    if not context.enabled or not losses:
        return losses
    names = sorted(losses)
    values = torch.tensor([losses[name] for name in names], dtype=torch.float64)
    torch_dist.all_reduce(values)
    values /= context.world_size
    return dict(zip(names, values.tolist()))


def check_in_sync(modules, context: DistContext) -> float | None:
    """Largest difference between the ranks' parameter checksums (0.0: every rank holds the same weights);
    rank 0 prints it. ``None`` in one process."""
    if not context.enabled:
        return None
    sums = torch.stack([torch.stack([p.detach().double().sum() for p in module.parameters()]).sum()
                        for module in modules])
    gathered = [torch.zeros_like(sums) for _ in range(context.world_size)]
    torch_dist.all_gather(gathered, sums)
    spread = float((torch.stack(gathered).max(0).values - torch.stack(gathered).min(0).values).max())
    if context.is_main:
        print(f"ranks in sync: largest parameter checksum difference over {context.world_size} processes "
              f"{spread:.3g}", flush=True)
    return spread


def barrier(context: DistContext) -> None:
    if context.enabled:
        torch_dist.barrier()
