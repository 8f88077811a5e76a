"""Process-group setup from the torchrun environment, model wrapping (DDP or FSDP2), and the few
collectives the loop needs. A single process without torchrun needs no process group."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdengine.train.errors import TrainError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed() -> DistInfo:
    """Reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and joins the process group when
    WORLD_SIZE > 1: nccl with one GPU per process on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise TrainError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                "run torchrun with --nproc_per_node <= the GPU count"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(module: torch.nn.Module, layers: torch.nn.ModuleList, info: DistInfo, *, fsdp: bool) -> torch.nn.Module:
    """Wraps the training module for data parallelism.

    Args:
        module: the module whose forward the loop calls (on `info.device`).
        layers: its decoder layers; with `fsdp` each becomes its own FSDP unit so only one layer's
            full parameters exist at a time.
        fsdp: shard parameters, gradients and optimizer state (FSDP2 `fully_shard`) instead of
            replicating them (DDP).
    Returns:
        The module unchanged for one process without --fsdp, else the DDP / FSDP module. Both average
        gradients over ranks.
    """
    if fsdp:
        if not info.distributed:
            return module
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    if not info.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of `values` over ranks, on the device `values` came from (NCCL reduces on the GPU)."""
    if not info.distributed:
        return values
    on_device = values.to(info.device)
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
    return on_device.to(values.device)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
