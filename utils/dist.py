"""Running under ``torchrun``: process-group set-up and the few collective helpers the run needs.

Without torchrun (no ``WORLD_SIZE`` in the environment) every function here is a
no-op for a single process, so the same ``train.py`` serves both.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def launched_by_torchrun():
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(device):
    """Join the process group torchrun describes; returns this process's :class:`DistInfo` and device.

    ``nccl`` on CUDA (each process pinned to its local GPU), ``gloo`` on the CPU.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def broadcast_object(obj, info):
    """Rank 0's ``obj`` on every rank (the run id, for example)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj, info):
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
