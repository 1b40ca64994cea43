"""What only a ``torchrun`` run uses: joining the process group of this round, the collectives, the messages
processes leave each other; and the launch's SLURM and torchrun counts for a resume's history and a stop's
record. Imported where it is used (utils/dist.py joining a process group, a stop), so a default run never does.

Joining. The processes meet through the store that torchrun names in ``MASTER_ADDR:MASTER_PORT``, where
each one publishes its address. torchrun keeps that store for the whole launch, so a round it restarted
(``--max-restarts``), or a second process group in the same processes, would find the addresses of
processes that are gone: each group needs keys of its own. torchrun's restart count cannot name them: it
counts a restart only on the node whose worker failed (the other nodes restart theirs uncounted), so on
several nodes the counts differ and the round would wait out the join timeout. So the processes agree on
a fresh number instead (:func:`fresh_prefix`).
"""

import os
import signal
import time

import torch
import torch.distributed as dist

# A gloo group for small host-side agreements (:func:`max_over_ranks`, :func:`barrier`) when the default is nccl.
_control_group = None


def join(info, device):
    """Join the process group of torchrun's round as ``info`` (a :class:`utils.dist.DistInfo`); returns the device,
    on CUDA this process's local GPU."""
    global _control_group
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(fresh_prefix(store, info.rank, info.world_size), store)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size)
        # Collective: every rank creates it, right after joining.
        _control_group = None if backend == "gloo" else dist.new_group(backend="gloo")
    return device


def fresh_prefix(store, rank, world_size):
    """A key prefix that no earlier process group in ``store`` used, the same on every rank; waits for every rank.

    Rank 0 draws a number from a counter in the store and posts it; every other rank posts a ticket of
    its own under the number it reads, and goes on once rank 0 has confirmed that ticket. A number an
    earlier round left is never confirmed (its rank 0 is gone), so the rank reads the number again until
    this round's rank 0 has posted its own.
    """
    if rank == 0:
        number = store.add("utils.dist/rounds", 1)
        store.set("utils.dist/round", str(number))
        for other in range(1, world_size):  # each get waits (up to the store's timeout) for that rank's ticket
            ticket = store.get(f"utils.dist/round{number}/rank{other}").decode()
            store.set(f"utils.dist/round{number}/ticket{ticket}", "")
        return f"utils.dist/round{number}/"
    ticket, posted = store.add("utils.dist/tickets", 1), None
    give_up = time.monotonic() + store.timeout.total_seconds()
    while time.monotonic() < give_up:
        number = store.get("utils.dist/round").decode()  # (waits for the launch's first number)
        if number != posted:
            store.set(f"utils.dist/round{number}/rank{rank}", str(ticket))
            posted = number
        if store.check([f"utils.dist/round{number}/ticket{ticket}"]):
            return f"utils.dist/round{number}/"
        time.sleep(0.02)  # polling: this round's rank 0 has not posted its number, or not confirmed the ticket yet
    raise TimeoutError(f"rank {rank}: rank 0 did not let this process join within {store.timeout} (round {posted})")


def cleanup():
    global _control_group
    _control_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def torchrun_round(environ=None):
    """``(run id, restart count)`` of this torchrun launch (``--rdzv-id``: the job id in slurm/train.sbatch; how
    often it restarted its workers), or None outside torchrun."""
    environ = os.environ if environ is None else environ
    run_id, count = environ.get("TORCHELASTIC_RUN_ID"), environ.get("TORCHELASTIC_RESTART_COUNT")
    if run_id is None or count is None or not count.isdigit():
        return None
    return run_id, int(count)


# ---- collectives: every process must call them equally often

def broadcast_object(obj, info):
    """Rank 0's ``obj`` on every rank (the run id, for example)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_over_ranks(*values):
    """The largest of every process's value, for each of ``values`` (ints); the values themselves without a group.

    For decisions every process must take at the same point, such as stopping after this step for a
    signal that reached the processes at different moments. It travels over gloo on the host, so under
    nccl it does not wait for the GPU. One value gives an int, several a list.
    """
    if not (dist.is_available() and dist.is_initialized()):
        out = [int(v) for v in values]
    else:
        box = torch.tensor([int(v) for v in values], dtype=torch.int64)
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_control_group)
        out = box.tolist()
    return out[0] if len(out) == 1 else out


def barrier():
    """Wait until every process got here (over gloo, on the host), before the processes end a run together.

    Rank 0 may still be writing the run's last files or scoring the test split, and a process that tears
    its group down while a peer still holds connections to it can abort inside gloo ("terminate called
    without an active exception").
    """
    dist.barrier(group=_control_group)


# ---- messages left in torchrun's store: they cost nothing while the run goes well

_STOPPED_KEY = "utils.dist/stopped_alone"


def tell_others(message):
    """Leave ``message`` for the other processes before this one stops on its own, out of step with them.

    Not a collective: it goes to the process group's store (torchrun's), which outlives this process;
    the others read it (:func:`told_by_others`) only when a collective of theirs fails.
    """
    _leave(_store(), _STOPPED_KEY, message)


def told_by_others():
    """The message a process that stopped on its own left (:func:`tell_others`), or None."""
    return _read(_store(), _STOPPED_KEY)


def _launch_key():
    return f"utils.dist/launch/{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/stopped"


def stop_the_launch(message):
    """Leave ``message`` where every later round of this torchrun launch finds it (:func:`launch_stopped`).

    For a stop that a restart would only repeat (out of memory at the same step of the same data): with
    ``--max-restarts`` torchrun would resume the same checkpoint with the same batch. It goes to torchrun's
    own store, under no round's prefix, so it outlives this round and nothing is written to disk.
    """
    _leave(_launch_store(), _launch_key(), message)


def launch_stopped():
    """The message of :func:`stop_the_launch` an earlier round of this launch left, else None. Asked after
    joining, by every process alike, and only in a round that torchrun restarted."""
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


def agreed_stop(trainer, now, stop_class, stopped_error):
    """:meth:`BaseTrainer.agreed_stop_signal` under torchrun, given its ``Stop`` and ``RunStopped`` (base_trainer
    imports this module). A signal reaches the processes at different moments, and one stopping alone would hang
    the others: every ``log_every_n_steps`` steps (and where ``now``) they agree in one small collective, which also
    says whether one saw a non-finite loss (then it raises)."""
    own = trainer.stop  # read once: the handler may set it meanwhile
    if not now and trainer.global_step % trainer.agree_every:
        return trainer.agreed_stop
    # The highest exit code wins: a signal's (128 + N) over a hook's.
    agreed, diverged = max_over_ranks(own.exit_code if own else 0, bool(trainer.diverged))
    if diverged:
        raise stopped_error(trainer.diverged or "another process saw a non-finite loss; stopping without saving, so"
                         " the last good checkpoint is untouched")
    if agreed:  # (never cleared: a signal arriving during the exchange is agreed on next time)
        trainer.agreed_stop = trainer.stop = own if own and own.exit_code == agreed else stop_of(agreed, stop_class)
    return trainer.agreed_stop


def stop_of(code, stop_class):
    """The ``Stop`` of exit code ``code``, as a process that did not see it itself knows it."""
    why = f"by {signal.Signals(code - 128).name}" if code > 128 else f"as another process asked (exit code {code})"
    return stop_class(code, why)
