"""Data parallel under ``torchrun``: this process's place in the group, gradient averaging and
weight broadcast (nccl on CUDA, gloo on the CPU; a lone process is rank 0 of 1)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    """This process's place in the data-parallel group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all processes."""
        value = value.detach().float().reshape(1).clone()
        if self.distributed:
            dist.all_reduce(value)
            value /= self.world
        return float(value)

    def average_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """All-reduce every gradient (one flat buffer) and divide by the number of processes: the
        gradient of the mean loss over the global batch."""
        if not self.distributed:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(parameters, grads):
            n = g.numel()
            reduced = flat[offset:offset + n].view_as(g)
            if p.grad is None:
                p.grad = reduced.clone()
            else:
                p.grad.copy_(reduced)
            offset += n

    def broadcast_(self, module: torch.nn.Module) -> None:
        if self.distributed:
            with torch.no_grad():
                for tensor in module.state_dict().values():
                    dist.broadcast(tensor, src=0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_processes() -> Processes:
    """Join the group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_*``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    return Processes(rank=rank, world=world, local_rank=local_rank)

