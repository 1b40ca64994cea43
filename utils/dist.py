"""Which process of a run this is (:class:`DistInfo`), and joining the others under ``torchrun``.

Without torchrun (no ``WORLD_SIZE`` in the environment) a run is one process: :func:`setup` returns at once,
so the same ``train.py`` serves both. What only torchrun runs use (the process group, the collectives, what
the launch says of itself) is in utils/dist_round.py, imported on first use: ``dist.max_over_ranks`` and the
others reach it through this module's ``__getattr__``.
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


def __getattr__(name):
    """``dist.<name>`` for the public names of utils/dist_round.py (torchrun only), imported on first use."""
    if not name.startswith("_"):
        from utils import dist_round

        if hasattr(dist_round, name):
            return getattr(dist_round, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
