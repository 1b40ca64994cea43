"""``trainer.auto_accumulate``: an out-of-memory error in a step divides the per-process batch and multiplies the
accumulation by the same factor, so every optimizer step still sees the same samples.

A part (utils/parts.py): delete this file, tests/parts/test_auto_accumulate.py and
tests/parts/test_oom_dist.py, and runs without ``trainer.auto_accumulate`` train as before. In a
config: ``"trainer": {"auto_accumulate": true}``.

- One process (:class:`RedoWindow`): an out-of-memory error in a step's forward or backward
  divides the batch by its smallest factor (2 for an even batch) and multiplies
  ``accumulate_grad_batches`` by it; the step's window of batches is then redone, from the
  running sums of the step before it (copied after every step: this part's one cost per step).
- Under torchrun (:class:`FitTogether`): a process out of memory in a step cannot tell the
  others, which wait for it in the gradient all-reduce, and agreeing after every step would
  cost a collective per step. So the batch is fitted once, before the first step (and after a
  resume): a forward and backward of a full batch on every process without communication, one
  agreement, and the same switch on every process where any of them ran out
  (:func:`fit_batch_together`). An out-of-memory error later in the run (inputs that vary in
  size) stops every process (:func:`stop_out_of_step`), without a checkpoint, saying how to
  resume with the smaller batch; a torchrun restart of such a launch stops at once (:func:`prepare`).

A switch goes into the run's config (so checkpoints, and a resume, carry the smaller batch, and
every count of batches is scaled: utils.resume.batch_counts), the log, the checkpoints'
``batch_changes`` and the run's manifest.
"""

import contextlib
import functools
import json
import time
from pathlib import Path

import torch

from base.base_trainer import RunStopped
from base.base_hook import Hook
from base.base_trainer import rng_state, set_rng_state
from base.base_task import to_device
from trainer.extras import roll_back, running_sums
from utils import dist_round
from utils.io import write_json
from utils.resume import batch_counts, newest_first

# The exit code of a run that out-of-memory errors stopped (under torchrun, or a batch of 1 that does not fit):
# ENOMEM's number, as a full disk exits with ENOSPC's (utils/errors.py), so a script can tell "resume with a
# smaller batch" from other failures.
EXIT_OUT_OF_MEMORY = 12


def check(config):
    value = config["trainer"]["auto_accumulate"]
    return [] if isinstance(value, bool) else [f"trainer.auto_accumulate: got {json.dumps(value)}, expected true or false"]


def prepare(config, parts):
    """Under torchrun, a round that restarted processes an out-of-memory error stopped stops before training: it
    would resume the same checkpoint and run out again."""
    if (stopped := dist_round.launch_stopped()) is not None:
        raise RunStopped(f"an earlier round of this torchrun launch stopped: {stopped} (not trained again in this"
                         " round: it would resume the same checkpoint and run out again)", exit_code=EXIT_OUT_OF_MEMORY)


def hooks(config, parts, run):
    return [FitTogether() if run.dist.enabled else RedoWindow()]


class BatchChanges(Hook):
    """The switches of a run (:func:`switch_batch`), kept in its checkpoints (``batch_changes``) and its manifest."""

    def __init__(self):
        self.changes = []

    def training(self, trainer):
        if self.changes:  # a resume: its manifest was written afresh, and the switches before it go back in
            record(trainer, self.changes)
        return contextlib.nullcontext()

    def state_dict(self):
        return {"batch_changes": self.changes}

    def load_state_dict(self, trainer, state):
        self.changes = list(state.get("batch_changes", []))


class RedoWindow(BatchChanges):
    """One process: an out-of-memory error in a forward or backward pass switches to the smaller batch and redoes the
    optimizer step's window of batches from its first, its batches dropped from the epoch's running sums."""

    mark = None  # the epoch's running sums at the last optimizer step (or the epoch's start)

    def before_epoch(self, trainer, epoch):
        self.mark = running_sums(trainer)

    def after_step(self, trainer, epoch, batch_idx):
        self.mark = running_sums(trainer)  # what an error in the next window rolls back to

    def on_train_error(self, trainer, epoch, error):
        if not isinstance(error, torch.OutOfMemoryError):
            return None
        smaller = smaller_batch(trainer.data_loader.batch_size)
        if smaller is None or not recoverable(error):
            trainer.logger.error("auto_accumulate: out of memory " + ("in the optimizer step, which cannot be redone"
                                 if smaller is not None else "with a batch of 1 sample; nothing left to divide"))
            return None
        return functools.partial(self.redo, trainer, epoch, *smaller)

    def redo(self, trainer, epoch, new_batch, factor):
        """Once the error's frames (and the failed step's tensors) are gone: switch, roll the sums back; returns the
        batch to redo the epoch from (the window's first, counted in batches of the new size)."""
        switch_batch(trainer, self.changes, epoch, new_batch, factor,
                     where=f"at epoch {epoch}, step {trainer.global_step + 1}", then="; the step is redone")
        roll_back(trainer, self.mark)
        if trainer.device.type == "cuda":
            torch.cuda.empty_cache()
        return trainer.batch_in_epoch * factor


class FitTogether(BatchChanges):
    """Under torchrun: the batch fitted on every process before the first step; an error in a step stops the run."""

    def training(self, trainer):
        context = super().training(trainer)
        fit_batch_together(trainer, self.changes)
        return context

    def on_train_error(self, trainer, epoch, error):
        if not isinstance(error, RuntimeError):  # (torch.OutOfMemoryError is one, and so is a failed collective)
            return None
        stopped = stop_out_of_step(trainer, epoch, error)
        return None if stopped is None else functools.partial(_raise, stopped)  # raised once the step's frames are gone


def _raise(error):
    raise error


# --------------------------------------------------------------------------- the switch


def smaller_batch(batch_size):
    """``(new batch size, factor)``: the batch divided by its smallest factor, so that ``factor`` batches of the
    new size hold exactly the samples of one old batch; None for a batch of 1."""
    for factor in range(2, batch_size + 1):
        if batch_size % factor == 0:
            return batch_size // factor, factor
    return None


def recoverable(err):
    """Whether an out-of-memory error came from a forward or backward pass (redo the window) rather than the
    optimizer step itself (which may have changed some weights already, so the step cannot be redone)."""
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in ("optimizer_step", "after_step"):
            return False
        tb = tb.tb_next
    return True


def smaller_settings(trainer, factor):
    """The config values (dotted keys) that a batch ``factor`` times smaller changes: the batch, the accumulation,
    and every count of batches that is set (utils.resume.batch_counts: ``len_epoch``, say), so an epoch and an
    optimizer step hold the same samples as before."""
    changed = {"data_loader.args.batch_size": trainer.data_loader.batch_size // factor,
               "trainer.accumulate_grad_batches": trainer.accumulate * factor}
    for key in batch_counts(trainer.config):
        value = trainer.config
        for name in key.split("."):
            value = value.get(name) if isinstance(value, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value:
            changed[key] = value * factor
    return changed


def switch_batch(trainer, changes, epoch, new_batch, factor, where, then=""):
    """Divide the per-process batch by ``factor`` and multiply the accumulation by it; log the change, record it in
    the config (so checkpoints carry it), ``changes`` (the checkpoints' ``batch_changes``) and the run's manifest."""
    loader, config = trainer.data_loader, trainer.config
    old = (loader.batch_size, trainer.accumulate)
    for key, value in smaller_settings(trainer, factor).items():
        section, *rest = key.split(".")
        node = config[section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = value
    loader.set_batch_size(new_batch)
    trainer.accumulate = config["trainer"]["accumulate_grad_batches"]
    if trainer.len_epoch:  # a count of batches of the old size: scaled so the epoch holds the same samples
        trainer.len_epoch *= factor
    trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.device.type == "cuda":
        torch.cuda.empty_cache()
    event = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "epoch": epoch, "global_step": trainer.global_step,
             "batch_size": [old[0], new_batch], "accumulate_grad_batches": [old[1], trainer.accumulate]}
    changes.append(event)
    if trainer.is_main:  # (under torchrun every process switches; one line says so)
        trainer.logger.warning(
            f"out of memory {where} with a batch of {old[0]} per process: continuing with batches of {new_batch}"
            f" and accumulate_grad_batches {trainer.accumulate} (the same {old[0] * old[1]} samples per process and"
            f" optimizer step){then}")
    record(trainer, changes)
    return event


def record(trainer, changes):
    """The run's ``manifest.json`` (its config and ``batch_changes``) and ``config.json`` as they are now (rank 0;
    nothing in a run that writes no file)."""
    if not (trainer.is_main and trainer.run.writes):
        return
    folder = Path(trainer.run.checkpoint_dir)
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    manifest["config"], manifest["batch_changes"] = trainer.config, list(changes)
    write_json(folder / "manifest.json", manifest)
    write_json(folder / "config.json", trainer.config)


# --------------------------------------------------------------------------- under torchrun


def fit_batch_together(trainer, changes):
    """Before the first step (of a run, or of a resume), a batch every process fits; switches go to ``changes``.

    Every process runs a forward and backward of one full batch (:func:`out_of_memory_in_probe`: no
    communication, and nothing it touches changes the run), then they agree in one small
    collective whether any of them ran out of memory; if so, all switch to the smaller batch
    (:func:`switch_batch`, recorded as a switch in a step is) and try again.

    Raises:
        RunStopped: (every process, exit code 12) a batch of 1 sample does not fit.
    """
    epoch, loader = trainer.epoch + 1, trainer.data_loader
    rank, world_size = trainer.run.dist.rank, trainer.world_size
    while True:
        failed = out_of_memory_in_probe(trainer, epoch)
        if trainer.device.type == "cuda":
            torch.cuda.empty_cache()  # (the probe's tensors are gone with its frame)
        flags = dist_round.max_over_ranks(*(failed and r == rank for r in range(world_size)))
        short = [r for r, flag in enumerate(flags) if flag]
        if not short:
            return
        which = f"process{'es' if len(short) > 1 else ''} {', '.join(map(str, short))} of {world_size}"
        smaller = smaller_batch(loader.batch_size)
        if smaller is None:
            message = (f"auto_accumulate: out of memory on {which} with a batch of 1 sample per process, in the memory"
                       " check before the first step; nothing left to divide: the model does not fit this device's"
                       " memory (use a smaller model, trainer.amp, or devices with more memory)")
            if trainer.is_main:
                trainer.logger.error(message)
            raise RunStopped(message, exit_code=EXIT_OUT_OF_MEMORY, logged=True)  # every process, at the same point
        switch_batch(trainer, changes, epoch, *smaller,
                     where=f"on {which} in the memory check before epoch {epoch}, step {trainer.global_step + 1}",
                     then=" on every process")
        trainer.batch_in_epoch *= smaller[1]  # a mid-epoch resume: the same samples done, in batches of the new size


def out_of_memory_in_probe(trainer, epoch):
    """Whether one forward and backward of a full batch of ``epoch`` (its first) runs out of memory here.

    Under DDP's ``no_sync`` (no gradient all-reduce: a process out of memory leaves no other
    waiting). On an accelerator, memory for the optimizer's state is held meanwhile when the
    optimizer has none yet (a fresh run: it is made at the first step, and the steps after it
    run beside it). Everything the probe touches is put back: every RNG state, the buffers
    (batch-norm statistics), the gradients (None, as at the start of a step), the data order.
    """
    model, loader, device = trainer.model, trainer.data_loader, trainer.device
    saved_rng = rng_state()
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        loader.set_epoch(epoch, 0)  # (every epoch sets its own order and start again: trainer._batches)
        iterator = iter(loader)
        batch = to_device(next(iterator), device)
        del iterator  # frees non-persistent workers now
        reserve = None
        if device.type != "cpu" and (size := optimizer_state_bytes(trainer.optimizer)):
            reserve = torch.empty(size, dtype=torch.uint8, device=device)
        with trainer.no_sync(False), trainer.autocast:
            loss = trainer.step(trainer.forward_model, batch, trainer.criterion)[0]
        with trainer.no_sync(False):
            loss.backward()
        del reserve
        return False
    except torch.OutOfMemoryError:
        return True
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for live, saved in buffers:
                live.copy_(saved)
        set_rng_state(saved_rng)


def optimizer_state_bytes(optimizer):
    """The bytes of the state ``optimizer`` makes at its first step (momentum, Adam's two moments); 0 when it has
    state already or the amount cannot be told.

    Found by stepping an optimizer of the same type and settings over stand-ins on the meta device:
    no memory, no computation, and the real optimizer (and any hook on it) sees nothing.
    """
    if optimizer.state:
        return 0
    skip = ("params", "initial_lr", "fused", "foreach", "capturable", "differentiable")
    groups = []
    for group in optimizer.param_groups:
        stand_ins = []
        for p in group["params"]:
            stand_in = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            if p.requires_grad:  # (a frozen parameter gets no gradient, so no state)
                stand_in.grad = torch.empty_like(stand_in)
            stand_ins.append(stand_in)
        groups.append({**{k: v for k, v in group.items() if k not in skip}, "params": stand_ins})
    try:
        trial = type(optimizer)(groups)
        with torch.no_grad():
            trial.step()
    except Exception:  # an optimizer that cannot run on stand-ins: the probe goes without the reserve
        return 0
    return sum(t.numel() * t.element_size() for state in trial.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and t.device.type == "meta")


def stop_out_of_step(trainer, epoch, err):
    """The :class:`RunStopped` for an error in a step under torchrun with ``auto_accumulate``, or None (re-raise it).

    An out-of-memory error here (the memory check before the first step passed: inputs that vary
    in size, say) leaves this process out of step with the others, which wait for it in the
    gradient all-reduce: they cannot switch to a smaller batch together, and no checkpoint of
    this moment would be consistent. This process leaves its message for the others
    (:func:`utils.dist_round.tell_others`) and stops alone, without saving; the others stop when their
    next collective fails (this function again, with that error: they find the message). The
    message says how to resume from the newest checkpoint with the smaller batch.
    """
    if not isinstance(err, torch.OutOfMemoryError):
        told = dist_round.told_by_others()
        if told is None:
            return None
        message = f"another process stopped: {told}"
    else:
        rank, batch = trainer.run.dist.rank, trainer.data_loader.batch_size
        where = f"out of memory on process {rank} at epoch {epoch}, step {trainer.global_step + 1}, with a batch of {batch}"
        smaller = smaller_batch(batch)
        if not recoverable(err):
            message = (f"{where}, in the optimizer step: the optimizer's state does not fit, and a smaller batch would"
                       " not change that; stopping every process without saving")
        elif smaller is None:
            message = f"{where}: nothing left to divide; stopping every process without saving"
        else:
            message = (f"{where}, after the memory check at the start passed (do the batches vary in size?). Under"
                       " torchrun the processes cannot switch to a smaller batch in the middle of a run (the others"
                       " wait in the gradient all-reduce), so every process stops without saving. "
                       + resume_advice(trainer, smaller[1]))
        dist_round.tell_others(message)
        dist_round.stop_the_launch(message)  # a torchrun restart would resume the same checkpoint and run out again
    trainer.logger.error(message)
    return RunStopped(message, exit_code=EXIT_OUT_OF_MEMORY, logged=True, together=False)


def resume_advice(trainer, factor):
    """How to continue with a batch ``factor`` times smaller: the command that resumes the newest checkpoint (a
    mid-epoch one too: a batch split is the one data change a mid-epoch resume takes, utils.resume.batch_split)."""
    settings = " ".join(f"{k}={v}" for k, v in smaller_settings(trainer, factor).items())
    checkpoint = newest_checkpoint(trainer.run.checkpoint_dir)
    if checkpoint is None:
        return f"Start the run again with {settings}"
    return f"Resume with the smaller batch: python train.py -r {checkpoint} {settings}"


def newest_checkpoint(folder):
    """The checkpoint of ``folder`` with the most steps (as ``-r auto`` ranks them), or None."""
    ranked, _ = newest_first(folder)
    return ranked[0] if ranked else None
