"""The epoch loop and everything around it: monitoring, checkpoints, exact resume, interruption, seeding (the
moments a part acts at are in base/base_hook.py). Subclasses provide :meth:`train_epoch`, :meth:`valid_epoch` and
:meth:`log_epoch`.

A checkpoint holds everything the rest of the run depends on (weights, optimizer, scheduler, scaler, counters,
the epoch's running sums, every RNG state), and the data order is a pure function of the seed and the epoch, so
a run resumed from it ends bit-identical to the run left alone (on the CPU). Sharded (fsdp): a folder, utils/sharded.py.
"""

import contextlib
import logging
import math
import random
import re
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from utils.dist import DistInfo
from utils.io import save_checkpoint


def seed_everything(seed):
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state():
    """Every global RNG state as plain values and tensors, loadable with ``weights_only=True``."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # NumPy's key array is stored as a tensor: arrays are not allowed under weights_only.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunStopped(Exception):
    """The run stopped before its end; ``exit_code`` is what the command line exits with."""

    def __init__(self, message, exit_code=1, logged=False, together=True):
        super().__init__(message)
        self.exit_code = exit_code
        self.logged = logged  # already said in the run's log: the command line need not repeat it
        self.together = together  # torchrun: every process stops here (they wait for each other), not this alone


# The signals that stop a run with a resumable last.pth. SIGUSR1 is the warning a scheduler sends before a time
# limit (SLURM's --signal=B:USR1@120): to the run, a stop signal is a stop signal.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


@dataclass(frozen=True)
class Stop:
    """Why a run stops early, after a step, with a resumable ``last.pth``: ``why`` for the log ("by SIGTERM"); the
    exit code, ``128 + N`` for signal N (130 Ctrl-C, 143 SIGTERM), or a hook's own below 128 (:meth:`ask_to_stop`)."""

    exit_code: int
    why: str


@dataclass
class Parts:
    """The built components a run trains (:func:`trainer.run.build_parts`): ``model`` is the plain module (what
    checkpoints hold), ``forward_model`` runs the steps (it, or its compiled or DDP wrapper); ``scaler``: fp16's."""

    model: torch.nn.Module
    criterion: Callable
    metric_fns: list
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    data_loader: Any
    valid_data_loader: Any
    device: torch.device
    frozen: list = field(default_factory=list)  # the parameters trainer.freeze froze
    scaler: Any = None
    wrap: Callable = None  # model -> forward_model
    forward_model: torch.nn.Module = None
    valid_metric_fns: list = field(default_factory=list)  # a part's metrics that only validation scores
    task: Any = None  # the config's task (base/base_task.py); None: the default step

    def __post_init__(self):
        if self.forward_model is None:
            self.forward_model = self.wrap(self.model) if self.wrap is not None else self.model


@dataclass
class Run:
    """Where a run lives and how it reports: its id and folders, logger, writer (logger/logger.py), process group.
    ``resumed_from``: the checkpoint continued from (``keep_last`` never deletes it); ``branched_from``: the run
    folder it came from, for a resume into a new folder; ``writes`` False: a dry run (``fast_dev_run``)."""

    run_id: str
    checkpoint_dir: Path
    log_dir: Path
    logger: logging.Logger
    writer: Any = None
    dist: DistInfo = field(default_factory=DistInfo)
    resumed_from: Any = None
    branched_from: Any = None
    writes: bool = True


class BaseTrainer:
    """Runs epochs, validates, monitors a metric, saves and restores checkpoints, for ``config`` (checked; its
    ``"trainer"`` holds the settings), ``parts`` (:class:`Parts`) and ``run`` (:class:`Run`)."""

    def __init__(self, config, parts, run):
        self.config, self.parts, self.run = config, parts, run
        self.model, self.optimizer, self.lr_scheduler = parts.model, parts.optimizer, parts.lr_scheduler
        self.writer, self.logger = run.writer, run.logger
        self.is_main = run.dist.is_main  # whether this process writes files (rank 0 under torchrun)
        self.distributed = run.dist.enabled  # under torchrun: every process takes the stop decision together
        self.world_size = run.dist.world_size  # recorded so a resume can tell the data order changed
        self.sharded = config["trainer"]["strategy"] == "fsdp"  # checkpoints: DCP folders, every process writes
        cfg = config["trainer"]
        self.epochs, self.save_period, self.keep_last = cfg["epochs"], cfg["save_period"], cfg["keep_last"]
        # Misses allowed before training stops; 0 or null: never stop early (victoresque's convention).
        self.early_stop = cfg["early_stop"] or math.inf
        self.mode, self.monitor_key = ("off", None) if cfg["monitor"] == "off" else cfg["monitor"].split()
        self.monitor_best = math.inf if self.mode == "min" else -math.inf
        self.not_improved_count, self.best_epoch = 0, None  # (best_epoch: the epoch of monitor_best)
        self.best_val_loss = None  # val_loss at monitor_best: of two equal values the lower loss wins
        # Epochs completed, batches completed of the epoch in progress, optimizer steps taken.
        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0
        self.stop = None  # why to stop after this step (a Stop): set by a signal's handler, or a hook (ask_to_stop)
        self.validating = False  # (a stop asked now waits for the validation's end and its checkpoint)
        self.agreed_stop = None  # under torchrun: the stop all processes last agreed on
        self.agree_every = cfg["log_every_n_steps"]  # under torchrun: steps between agreements (agreed_stop_signal)
        self.diverged = None  # under torchrun: this process's non-finite-loss message, until all processes agree
        self.finished = False  # max_steps reached, early stop, or a hook ended the run (end_run)
        self.stopped_early = False  # early stopping ended the run: checkpoints say so, and -r auto does not go on
        self.stopped_by = None  # the stop last.pth is written for, and where (torchrun's launch and round)
        self.ended_by = None  # why a hook ended the run (end_run): the end-of-run log and result.json say it
        self.final_metrics = {}
        self.hooks = []  # optional behaviour at fixed moments (base/base_hook.py); a subclass fills it

    # ------------------------------------------------------------------ the loop

    def train(self):
        """Train from the current state to the end; returns the last epoch's metrics."""
        with contextlib.ExitStack() as stack:
            for hook in self.hooks:  # each hook's context around the whole of training (anomaly mode, say)
                stack.enter_context(hook.training(self))
            if threading.current_thread() is threading.main_thread():  # (handlers can only be set there)
                for sig in STOP_SIGNALS:  # restored on the way out
                    stack.callback(signal.signal, sig, signal.signal(sig, self._on_stop_signal))
            while self.epoch < self.epochs and not self.finished:
                if self.stop and not self.distributed:  # asked during the validation: no step of the next epoch
                    self._stop_if_asked()  # (under torchrun: the next agreement, within log_every_n_steps steps)
                epoch = self.epoch + 1
                for hook in self.hooks:
                    hook.before_epoch(self, epoch)
                result = self.fit_epoch(epoch, self.batch_in_epoch)
                self._stop_if_asked()
                result.update({f"val_{k}": v for k, v in self.valid_epoch(epoch).items()})
                self._end_epoch(epoch, result)
        return self.final_metrics

    def _stop_if_asked(self):
        if self.agreed_stop_signal(now=True) if self.distributed else self.stop:
            from base.stopping import save_last  # (last.pth, and where a resume continues)

            raise RunStopped(**save_last(self))

    def _end_epoch(self, epoch, result):
        self.epoch, self.batch_in_epoch = epoch, 0
        nonfinite = {k: v for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)}
        if nonfinite:  # the same on every process: the values are reduced over all of them
            self.log_epoch(epoch, result)
            raise RunStopped(
                f"{', '.join(f'{k} = {v}' for k, v in nonfinite.items())} at the end of epoch {epoch}: stopping"
                " without saving, so the last good checkpoint is untouched. Lower the learning rate or set"
                " trainer.clip_grad_norm")
        if self.lr_scheduler is not None and self.config["lr_scheduler"]["interval"] == "epoch":
            if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.lr_scheduler.step(result[self.monitor_key or ("val_loss" if "val_loss" in result else "loss")])
            else:
                self.lr_scheduler.step()
        self.final_metrics = {"epoch": epoch, **result}
        improved = self.update_monitor(result)
        self.log_epoch(epoch, result, improved)
        if self.not_improved_count > self.early_stop:  # before the saves: the last epoch's checkpoint is written
            self.logger.info(f"{self.monitor_key} did not improve for {self.not_improved_count} epochs"
                             f" (trainer.early_stop={self.early_stop}): training stops")
            self.finished = self.stopped_early = True
        for hook in self.hooks:  # before the saves: a hook that ends the run (end_run) gets its checkpoint
            hook.after_epoch(self, epoch, result)
        periodic = epoch % self.save_period == 0 or epoch == self.epochs or self.finished
        if improved or periodic:
            self.check_finite_weights(f"the end of epoch {epoch}")
        if not (self.is_main or self.sharded):
            return
        if improved:  # (the epoch's line says so)
            self.save("model_best.pth")
        if periodic:
            self.save(f"checkpoint-epoch{epoch}.pth")
            folder = Path(self.run.checkpoint_dir)  # keep the newest trainer.keep_last, and the one resumed from
            numbered = sorted((int(m.group(1)), path) for path in folder.glob("checkpoint-epoch*.pth")
                              if (m := re.fullmatch(r"checkpoint-epoch(\d+)\.pth", path.name)))
            kept = {Path(self.run.resumed_from).resolve()} if self.run.resumed_from else set()
            for _, path in numbered[: -self.keep_last] if self.keep_last and self.is_main else ():
                if path.resolve() not in kept:
                    from utils.sharded import remove  # (a .pth file, or a sharded checkpoint's folder)

                    remove(path)

    def update_monitor(self, result):
        """Count ``result``'s monitored value towards the best one and early stopping; returns whether it improved:
        a better value, or an equal one with a lower ``val_loss`` (accuracy on few samples moves in steps: ties)."""
        if self.mode == "off":
            return False
        value, loss = result[self.monitor_key], result.get("val_loss")
        improved = value < self.monitor_best if self.mode == "min" else value > self.monitor_best
        if value == self.monitor_best and None not in (loss, self.best_val_loss):
            improved = loss < self.best_val_loss
        if improved:
            self.monitor_best, self.not_improved_count, self.best_epoch = value, 0, self.epoch
            self.best_val_loss = loss
        else:
            self.not_improved_count += 1
        return improved

    def end_run(self, reason):
        """End the run, saying why (the log, and ``ended_by`` in ``result.json``): from a hook's ``after_epoch``,
        after this epoch, its checkpoint written; from ``after_step``, after this step, the epoch so far validated
        and saved. A run already ending keeps its own end."""
        if not self.finished:
            self.finished, self.ended_by = True, reason

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self):
        """Everything the rest of the run depends on, as state dicts and plain values."""
        state = {
            "arch": self.config["arch"]["type"], "config": self.config, "run_id": self.run.run_id,
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "global_step": self.global_step,
            "world_size": self.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "monitor_best": self.monitor_best, "not_improved_count": self.not_improved_count,
            "best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
            "stopped_early": self.stopped_early,  # (not restored: a resume that may go on has raised the patience)
            "stopped_by": self.stopped_by,  # (not restored either: it concerns the launch that wrote it)
            "rng": rng_state(),
            **self.extra_state(),
        }
        for hook in self.hooks:  # (the freezing schedule's "frozen" and "unfrozen")
            state.update(hook.state_dict())
        # The loggers' run ids, for a resume to continue them: of those that keep any (logger/logger.py).
        state["trackers"] = self.writer.checkpoint_state() if hasattr(self.writer, "checkpoint_state") else {}
        return state

    def extra_state(self):
        """What a subclass adds to a checkpoint (top-level keys)."""
        return {}

    def load_state_dict(self, state):
        """Continue the run that wrote ``state``."""
        self.load_extra_state(state)  # first: a hook may change the optimizer's parameter groups
        if state.get("sharded") or self.sharded:  # a DCP folder, or a sharded model (utils/sharded.py)
            from utils.sharded import load_into

            load_into(self.model, self.optimizer, state)
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.global_step = state["global_step"]
        self.monitor_best, self.not_improved_count = state["monitor_best"], state["not_improved_count"]
        self.best_epoch, self.best_val_loss = state.get("best_epoch"), state.get("best_val_loss")  # (older: absent)
        set_rng_state(state["rng"])

    def load_extra_state(self, state):
        """Restore what :meth:`extra_state` and the hooks saved (before the model and optimizer)."""
        for hook in self.hooks:
            hook.load_state_dict(self, state)

    def save(self, filename):
        """Write a checkpoint of the current state into the checkpoint folder, crash-safely (a dry run: a log line)."""
        path = Path(self.run.checkpoint_dir) / filename
        if not self.run.writes:
            self.logger.info(f"dry run: would write {path}")
            return path
        if self.sharded:  # every process writes its shards (utils/sharded.py)
            from utils.sharded import save

            save(self, path, save_checkpoint)
        else:
            save_checkpoint(self.state_dict(), path)
        self.logger.debug(f"Saved checkpoint: {path}")
        return path

    def before_checkpoint(self):
        """Called on every process before a mid-epoch checkpoint is written (by rank 0): collectives go here."""

    def check_finite_weights(self, where):
        """Raise :class:`RunStopped` if a weight or buffer is NaN or infinite: such a state is never saved. One
        reduction, only before a checkpoint; every process checks (DDP's weights are equal), so all stop together."""
        tensors = {n: t.detach() for n, t in self.model.state_dict().items() if t.is_floating_point()}
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors.values()]).all()):
            bad = next(n for n, t in tensors.items() if not torch.isfinite(t).all())
            raise RunStopped(f"the model's weights became non-finite ({bad}, at {where}, step {self.global_step}):"
                             " stopping without saving, so the last good checkpoint is untouched. Lower the learning"
                             " rate or set trainer.clip_grad_norm")

    def save_resumable(self, filename):
        """A mid-epoch checkpoint: every process gathers what it must (a collective), rank 0 writes it. Under
        torchrun the processes first agree (a non-finite loss on any of them stops all, unsaved)."""
        self.agreed_stop_signal(now=True)
        self.check_finite_weights(f"epoch {self.epoch + 1}, batch {self.batch_in_epoch}")
        self.before_checkpoint()
        return self.save(filename) if self.is_main or self.sharded else None

    # ------------------------------------------------------------------ interruption

    def _on_stop_signal(self, signum, frame):
        """SIGINT/SIGTERM/SIGUSR1 ask the loop to stop after the current step; a second SIGINT stops at once. The
        warning is logged by another thread: a handler writing to the stream it interrupted fails (a reentrant write)."""
        if self.stop is not None and self.stop.exit_code > 128 and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: files are written atomically, nothing tears
        self.stop = Stop(128 + signum, f"by {signal.Signals(signum).name}")
        when = (f"within {self.agree_every} steps (when the processes agree)" if self.distributed else
                "after this validation and its checkpoint" if self.validating else "after this step")
        message = f"{signal.Signals(signum).name} received: stopping {when} (Ctrl-C again to quit at once)"
        threading.Thread(target=self.logger.warning, args=(message,)).start()

    def ask_to_stop(self, exit_code, why):
        """Stop after this step with a resumable ``last.pth``, exiting with ``exit_code`` (1 to 127: a hook's own
        reason, such as a spent time budget) and logging ``why``. A stop already asked for stays; under torchrun
        the processes agree first (:meth:`agreed_stop_signal`), and a signal's stop outranks it."""
        if self.stop is None:
            self.stop = Stop(exit_code, why)

    def agreed_stop_signal(self, now=False):
        """Why to stop now (a :class:`Stop`), or None; under torchrun, what all processes agreed on every
        ``log_every_n_steps`` steps and where ``now`` (utils/dist_round.py: one alone stopping would hang the rest)."""
        if not self.distributed:
            return self.stop
        from utils.dist_round import agreed_stop

        return agreed_stop(self, now, Stop, RunStopped)
