"""Running under ``torchrun``: process-group set-up, the few collective helpers the run needs, and what the
launcher says of the launch (:func:`torchrun_round`, :func:`launch_context`).

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


def torchrun_round(environ=None):
    """``(run id, restart count)`` of the torchrun launch this process belongs to, or None outside torchrun.

    The run id is torchrun's ``--rdzv-id`` (a fresh one per launch with ``--standalone``; the job id
    in slurm/train.sbatch); the count is how often this launch restarted its workers.
    """
    environ = os.environ if environ is None else environ
    run_id, count = environ.get("TORCHELASTIC_RUN_ID"), environ.get("TORCHELASTIC_RESTART_COUNT")
    if run_id is None or count is None or not count.isdigit():
        return None
    return run_id, int(count)


def launch_context(environ=None):
    """Where this process runs, for the manifest's resume history: the SLURM job and how often it was requeued,
    and how often torchrun restarted its workers; only the values that are set."""
    environ = os.environ if environ is None else environ
    keys = {"SLURM_JOB_ID": "slurm_job_id", "SLURM_RESTART_COUNT": "slurm_restart_count",
            "TORCHELASTIC_RESTART_COUNT": "torchrun_restart_count"}
    context = {}
    for variable, key in keys.items():
        value = environ.get(variable)
        if value is not None:
            context[key] = int(value) if value.isdigit() and key != "slurm_job_id" else value
    return context


# A gloo group for small host-side agreements (see :func:`max_over_ranks`) when the default group is nccl.
_control_group = None


def setup(device):
    """Join the process group torchrun describes; returns this process's :class:`DistInfo` and device.

    ``nccl`` on CUDA (each process pinned to its local GPU), ``gloo`` on the CPU.
    Can be called again after :func:`cleanup` (a second run in the same processes).
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        _init_group("nccl" if device.type == "cuda" else "gloo", info)
    return info, device


def _init_group(backend, info):
    """``init_process_group`` from torchrun's environment, under keys no earlier group in torchrun's store used.

    torchrun keeps its store (``MASTER_ADDR:MASTER_PORT``) for all its rounds and nodes: the processes
    that join agree on the keys of this group through it (utils/dist_round.py), never by torchrun's
    restart count, which differs between nodes after a failure on one of them.
    """
    global _control_group
    from utils.dist_round import fresh_prefix  # (torchrun only)

    store, _, _ = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(fresh_prefix(store, info.rank, info.world_size), store)
    dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size)
    # Collective: every rank creates it, right after joining.
    _control_group = None if backend == "gloo" else dist.new_group(backend="gloo")


def broadcast_object(obj, info):
    """Rank 0's ``obj`` on every rank (the run id, for example)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_over_ranks(*values):
    """The largest of every process's value, for each of ``values`` (ints); the values themselves without a group.

    For decisions every process must take at the same point, such as stopping after this
    step for a signal that reached the processes at different moments. A collective: every
    process must call it equally often. It travels over gloo on the host, so under nccl
    it does not wait for the GPU. One value gives an int, several a list.
    """
    if not (dist.is_available() and dist.is_initialized()):
        out = [int(v) for v in values]
    else:
        box = torch.tensor([int(v) for v in values], dtype=torch.int64)
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_control_group)
        out = box.tolist()
    return out[0] if len(out) == 1 else out


def leave_together():
    """Wait until every process got here (a barrier over gloo, on the host); nothing without a group.

    Called before :func:`cleanup` when the processes end a run together (finished, or an
    agreed stop): rank 0 may still be writing the run's last files or scoring the test split,
    and a process that tears its group down while a peer still holds connections to it can
    abort inside gloo ("terminate called without an active exception").
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=_control_group)


# The store key under which a process that stops on its own leaves its reason (see :func:`tell_others`).
_STOPPED_KEY = "utils.dist/stopped_alone"


def tell_others(message):
    """Leave ``message`` for the other processes before this one stops on its own, out of step with them.

    Not a collective: it goes to the process group's key-value store (torchrun's), which
    outlives this process. The others learn of it only when a collective of theirs fails
    (:func:`told_by_others`), so it costs nothing while the run goes well.
    """
    _leave(_store(), _STOPPED_KEY, message)


def told_by_others():
    """The message a process that stopped on its own left (:func:`tell_others`), or None."""
    return _read(_store(), _STOPPED_KEY)


def _launch_key():
    return f"utils.dist/launch/{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/stopped"


def stop_the_launch(message):
    """Leave ``message`` where every later round of this torchrun launch finds it (:func:`launch_stopped`).

    For a stop that a restart would only repeat (an out-of-memory error at the same step of the
    same data): torchrun restarts failed workers with ``--max-restarts``, and they would resume
    the same checkpoint with the same batch. It goes to torchrun's own store, under no round's
    prefix, so it outlives this round and nothing is written to disk.
    """
    _leave(_launch_store(), _launch_key(), message)


def launch_stopped():
    """The message of :func:`stop_the_launch` when an earlier round of this launch left one, else None.

    Asked after joining the group, by every process alike (all read the same key), and only in a
    round that torchrun restarted.
    """
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        return None
    return _read(_launch_store(), _launch_key())


def _leave(store, key, message):
    """``store[key] = message``, as a courtesy: without it the others still stop, with a less clear message."""
    if store is not None:
        try:
            store.set(key, message)
        except Exception:
            pass


def _read(store, key):
    """``store[key]`` as text when it is there (never waiting for it), else None."""
    try:
        if store is not None and store.check([key]):
            return store.get(key).decode("utf-8", "replace")
    except Exception:
        pass
    return None


def _launch_store():
    """torchrun's store itself, under the prefixes the process group's store adds (one per round and run)."""
    store = _store()
    try:
        while isinstance(store, dist.PrefixStore):
            store = store.underlying_store
    except AttributeError:  # (a torch without PrefixStore.underlying_store)
        return None
    return store


def _store():
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # (a private helper: should it go, the messages are lost, not the stop)
        return None


def cleanup():
    global _control_group
    _control_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
