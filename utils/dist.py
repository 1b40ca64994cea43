"""Which process of a run this is (:class:`DistInfo`), and joining the others under ``torchrun``.

Without torchrun (no ``WORLD_SIZE``) a run is one process and :func:`setup` returns at once. What only torchrun
runs use (the process group, the collectives, the messages processes leave each other) is in utils/dist_round.py.
"""

import os
from dataclasses import dataclass

import torch.distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def setup(device):
    """This process's :class:`DistInfo` and device; under torchrun it joins the process group first (``nccl`` on
    CUDA, each process on its local GPU; ``gloo`` on the CPU). Can be called again after ``cleanup()``."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo(), device
    from utils import dist_round

    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    return info, dist_round.join(info, device)


def leave_together():
    """Wait for every process before they end a run together (:func:`utils.dist_round.barrier` says why); nothing
    without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from utils import dist_round

        dist_round.barrier()
