"""Data-parallel training across processes started by torchrun or srun (PyTorch DistributedDataParallel).

The launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) decides: without it
the run is a single process and nothing here touches the model. NCCL joins GPUs, gloo joins CPU processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from fervit.errors import FervitError

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistContext:
    """Where this process stands: its rank among `world_size` processes and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this context started the process group, so it also ends it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str, resolve_device) -> DistContext:
    """Join the process group described by the launcher's environment, or stay a single process.

    `resolve_device` turns the configured device name into a torch.device for a single process; under a
    launcher, `auto`/`cuda` become this process's GPU (cuda:LOCAL_RANK).
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistContext(device=resolve_device(device_name))
    missing = [v for v in LAUNCH_VARS if not os.environ.get(v)]
    if missing:
        raise FervitError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; start fervit with torchrun, or "
                          "with srun through scripts/slurm/train.sbatch, which sets them")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_name)
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        index = 0 if visible == 1 else local_rank  # Slurm's --gpus-per-task shows each task only its own GPU
        if index >= visible:
            raise FervitError(f"local rank {local_rank} has no GPU ({visible} visible); start at most one "
                              "process per GPU")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if dist.is_initialized():  # a caller (a test, a notebook) already joined the group
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group=False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world,
                            device_id=device if device.type == "cuda" else None)
    return DistContext(rank, world, local_rank, device, owns_group=True)


def close(ctx: DistContext) -> None:
    """Leave the process group if this context joined it."""
    if ctx.owns_group and dist.is_initialized():
        try:  # tear the group down together: a rank that leaves first can abort gloo's threads in the other
            dist.barrier()
        except Exception:  # a broken group (a rank failed): leave it anyway, the original error says why
            pass
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP for several processes; the model itself for one (no wrapper, no cost).

    On GPUs BatchNorm becomes SyncBatchNorm, so the CNN stem normalises over the global batch as a single
    process would; torch has no SyncBatchNorm on CPU, where each rank normalises over its own shard.
    """
    if not ctx.enabled:
        return model
    if ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                               else None)


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The sum over ranks of `t` (in place; `t` returned unchanged for a single process)."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when `flag` is true on at least one: ranks must agree before they stop."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([int(flag)], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_value(value, ctx: DistContext):
    """Rank 0's `value` (any small picklable object) on every rank."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=ctx.device)
    return box[0]


def gather_tensors(t: torch.Tensor, ctx: DistContext) -> list[torch.Tensor]:
    """Every rank's `t` (same shape and dtype on all ranks), as CPU tensors in rank order."""
    if not ctx.enabled:
        return [t.cpu()]
    local = t.to(ctx.device)
    out = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(out, local)
    return [o.cpu() for o in out]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
