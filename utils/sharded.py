"""Sharded checkpoints: a run of ``trainer.strategy: "fsdp"`` writes each checkpoint as a folder of Distributed
Checkpoint (``torch.distributed.checkpoint``, DCP) under the usual name (``model_best.pth``, ``last.pth``,
``checkpoint-epoch5.pth``). Imported only by such a run, or where a checkpoint path is a folder.

A folder holds every process's shards of the weights and of the optimizer state (``__<rank>_0.distcp``), DCP's
``.metadata`` (which shard holds which slice of which tensor), and ``trainer.pth``: the rest of the checkpoint
(config, counters, scheduler, RNG states, the epoch's running sums), written by rank 0 as a .pth is. The optimizer
state is keyed by parameter name, not by position, so a checkpoint loads into any number of processes (DCP reads
the slices each process's shards need), into an unsharded model, and back.

Crash-safe like every file of the project (utils/io.py): the processes write into a hidden temporary folder
``.<name>.<token>.tmp``; once all have written, rank 0 adds ``trainer.pth`` and renames the folder into place. A
folder under a checkpoint's name is therefore complete. Replacing one (``last.pth``) moves the old folder aside to
``.<name>.<token>.old`` first and deletes it after: a kill between the two renames leaves it there, and
:func:`recover` (run before a checkpoint is listed or written) moves it back.
"""

import os
import re
import secrets
import shutil
from pathlib import Path

import torch

STATE_FILE = "trainer.pth"  # what is no tensor of the model or optimizer, written by rank 0
_ASIDE = re.compile(r"\.(?P<target>.+)\.[0-9a-f]{8}\.(?P<kind>tmp|old)")


def is_sharded(path):
    """Whether ``path`` is a sharded checkpoint (a folder holding DCP's metadata and our ``trainer.pth``)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / STATE_FILE).is_file()


# --------------------------------------------------------------------------- writing


def save(trainer, path, save_checkpoint):
    """Write ``trainer``'s checkpoint as the folder ``path``, crash-safely; every process calls it. ``save_checkpoint``:
    utils/io.py's, which writes the run state (given: utils/io.py imports this module)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from utils import dist_round

    path, main = Path(path), trainer.is_main
    if main:
        recover(path.parent)
    token = dist_round.broadcast_object(secrets.token_hex(4), trainer.run.dist)  # (also: rank 0 has recovered)
    tmp = path.parent / f".{path.name}.{token}.tmp"
    state = trainer.state_dict()
    state["model"], state["optimizer"] = get_state_dict(trainer.model, trainer.optimizer)
    dcp_save({"model": state.pop("model"), "optimizer": state.pop("optimizer")},
             storage_writer=FileSystemWriter(tmp, sync_files=True))  # returns once every process has written
    if main:
        save_checkpoint(state, tmp / STATE_FILE)
        publish(tmp, path)
    dist.barrier()  # (no process goes on before the checkpoint is in place)


def publish(tmp, path):
    """Rename the complete folder ``tmp`` to ``path``; one already there is moved aside first, deleted after."""
    aside = None
    if path.exists():
        aside = path.parent / f".{path.name}.{tmp.name.split('.')[-2]}.old"
        os.replace(path, aside)
    os.replace(tmp, path)
    _sync_folder(path.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def remove(path):
    """Delete a checkpoint (a folder or a file) so that no part of it is left under its name."""
    path = Path(path)
    if not path.is_dir():
        return path.unlink(missing_ok=True)
    gone = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def recover(folder, idle_only=False):
    """Undo what a killed writer left in ``folder``: a checkpoint moved aside and not replaced goes back under its
    name; temporary folders and the old copies of replaced checkpoints are deleted. ``idle_only``: only while no
    run holds the folder's lock (utils/io.py: lock_folder), as when ``-r auto`` lists the checkpoints of a run."""
    try:
        entries = [e for e in os.scandir(folder) if e.is_dir(follow_symlinks=False) and _ASIDE.fullmatch(e.name)]
    except OSError:
        return
    if entries and idle_only:
        try:
            import fcntl

            with open(Path(folder) / ".lock", "a+") as lock:
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (released when the file closes)
                return recover(folder)
        except (ImportError, OSError):  # held by a run (or no locks here): its own next save recovers
            return
    for entry in sorted(entries, key=lambda e: e.name.endswith(".tmp")):  # the .old first
        match = _ASIDE.fullmatch(entry.name)
        target = Path(folder) / match["target"]
        if match["kind"] == "old" and not target.exists() and is_sharded(entry.path):
            os.replace(entry.path, target)
        else:
            shutil.rmtree(entry.path, ignore_errors=True)


def _sync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# --------------------------------------------------------------------------- reading


def read_tensors(path, keys=None):
    """The tensors and values of the folder ``path`` as one process's whole (unsharded) state dict: ``{"model":
    {name: tensor}, "optimizer": {"state": {name: {...}}, "param_groups": [...]}}`` (``keys``: only those)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    # DCP's own way to read a checkpoint whole (format_utils.dcp_to_torch_save uses it): the state dict is built from
    # the metadata. no_dist: this process alone reads, whether or not it is in a process group.
    out = {}
    _load_state_dict(out, FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    return out


def load(path, purpose):
    """utils/io.py's load_checkpoint for a folder: the state as a .pth holds it, checked the same way. To resume,
    ``"model"`` and ``"optimizer"`` stay on disk (``"sharded"``: the folder), read into the run by :func:`load_into`;
    for the weights (test.py, --init-from) the whole model is read."""
    from utils.errors import UserError
    from utils.io_problems import check_checkpoint, unreadable_checkpoint

    path = Path(path)
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        if purpose == "resume":
            state.update(model={}, optimizer={"state": {}, "param_groups": []}, sharded=str(path))
        else:
            state["model"] = read_tensors(path, keys={"model"})["model"]
    except Exception as err:
        raise UserError(unreadable_checkpoint(err, path)) from None
    check_checkpoint(state, purpose, path)
    return state


def by_position(named):
    """A name-keyed optimizer state (DCP's) as ``optimizer.state_dict()`` keys it: by position in its groups."""
    order = [name for group in named["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {"state": {index[name]: value for name, value in named["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]}


def by_name(model, positional, optimizer):
    """The reverse of :func:`by_position`, for ``optimizer`` over ``model``'s parameters."""
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: value for i, value in positional["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in positional["param_groups"]]}


def load_into(model, optimizer, state):
    """Load a checkpoint's weights and optimizer state into a run's ``model`` and ``optimizer``, sharded or not: from
    a folder (``state["sharded"]``) each process reads the slices of its shards; a .pth's whole tensors (a DDP run's,
    a consolidated one) are cut into this process's shards."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    if state.get("sharded"):
        model_state, optimizer_state = get_state_dict(model, optimizer)  # this run's layout, filled from the folder
        both = {"model": model_state, "optimizer": optimizer_state}
        dcp_load(both, storage_reader=FileSystemReader(state["sharded"]))
        set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=by_name(model, state["optimizer"], optimizer),
                       options=StateDictOptions(full_state_dict=True))


def consolidate(path):
    """The folder ``path`` as one ordinary checkpoint (what a .pth of an unsharded run holds)."""
    state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    tensors = read_tensors(path)
    state["model"], state["optimizer"] = tensors["model"], by_position(tensors["optimizer"])
    return state
