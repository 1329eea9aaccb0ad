"""The distributed context of a training process: one rank of a torchrun job, or a single process."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job, and the device it computes on."""

    rank: int
    world: int  # number of processes
    local_rank: int  # index of this process's GPU on its machine
    ddp: bool  # started by torchrun with WORLD_SIZE > 1: a process group exists
    device: torch.device

    @property
    def master(self) -> bool:
        """Rank 0: the one process that logs INFO and writes into --output-dir."""
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU) and pick the device
    (cuda:LOCAL_RANK with TF32 matmuls, else the CPU)."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local_rank = 0, 1, 0
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    return Dist(rank=rank, world=world, local_rank=local_rank, ddp=ddp, device=device)


def teardown_distributed(d: Dist) -> None:
    """Leave the process group (if this process joined one and it is still up)."""
    if d.ddp and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(d: Dist, *flags: bool) -> Tuple[bool, ...]:
    """Each of ``flags``, True when it is set on any rank (one tiny all-reduce under DDP)."""
    if not d.ddp:
        return tuple(flags)
    t = torch.tensor([float(f) for f in flags], device=d.device)
    dist.all_reduce(t)
    return tuple(v > 0 for v in t.tolist())
