"""Rank and world size from the torchrun environment; process-group set-up and tear-down."""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

__all__ = ["distributed_context", "local_device"]


def env_world() -> tuple:
    """``(rank, world_size)`` from the torchrun environment variables ((0, 1) if absent)."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1
    return (rank, world) if 0 <= rank < world else (0, 1)


def local_device(device: str) -> str:
    """``"cuda"`` becomes ``"cuda:<LOCAL_RANK>"`` under torchrun (one GPU per process)."""
    if str(device) == "cuda" and "LOCAL_RANK" in os.environ and env_world()[1] > 1:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return str(device)


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj`` (a list indexed by rank); ``[obj]`` in one process."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


@contextlib.contextmanager
def distributed_context(device: str = "cpu"):
    """Yields a `Dist`. Under torchrun (``WORLD_SIZE`` > 1) it initialises the default group
    from the environment (gloo on CPU, nccl on CUDA) and destroys it on exit; a group the
    caller initialised is used as is."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        yield Dist(d.get_rank(), d.get_world_size())
        return
    rank, world = env_world()
    if world == 1:
        yield Dist(0, 1)
        return
    if not d.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this "
                           "PyTorch build")
    backend = "nccl" if (str(device).startswith("cuda") and torch.cuda.is_available()) else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(local_device(device)))
    d.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    try:
        yield Dist(rank, world)
    finally:
        with contextlib.suppress(Exception):
            d.destroy_process_group()
