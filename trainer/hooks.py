"""Optional behaviour around the training step, as small named pieces called at fixed moments.

A hook overrides the moments it needs; each is a no-op by default:

- ``training(trainer)``: a context manager around the whole of training, entered before the
  first step of the run, or of a resume once its checkpoint is restored (anomaly mode, a
  batch fitted to memory).
- ``before_epoch(trainer, epoch)``: before the epoch's first batch (a freezing schedule).
- ``after_step(trainer, epoch, batch_idx)``: after each optimizer step. Only hooks that
  override it are called per step (:func:`step_hooks`), and they must take negligible time
  unless they act, so a run without them pays nothing per step.
- ``on_train_error(trainer, epoch, error)``: an exception left the epoch's steps. None lets it
  propagate; a hook that can recover returns a function, called once the error and the
  failed step's frames (and so their tensors) are gone, that returns the batch to redo the
  epoch from (or raises). Called only when an error happens: it costs nothing per step.
- ``after_train_epoch(trainer, epoch, last_batch)``: after the epoch's last training step,
  before validation (histograms, image grids). ``last_batch`` is the last input batch.
- ``after_epoch(trainer, epoch, result)``: after validation and the monitor's update, before
  the epoch's checkpoints; ``result`` holds the epoch's values (``val_*`` included). Setting
  ``trainer.finished`` ends the run after this epoch, with its checkpoint written.
- ``state_dict()`` / ``load_state_dict(trainer, state)``: the top-level keys a hook adds to a
  checkpoint. Loading runs before the model and optimizer are restored, because a hook may
  change the optimizer's parameter groups.

What a hook may set on the Trainer besides its counters: ``epochs``, ``len_epoch`` (batches per
epoch; None: one pass over the data), ``val_batch_limit`` (validation batches; None: all) and
``accumulate``; ``trainer.run.writes`` is False in a run that writes no file.

To add a feature: write a :class:`Hook`, and add it in :func:`hooks_for` when its config key is on
(or in a part's ``hooks()``: utils/parts.py).
"""

import contextlib
import json
import os
import time

import torch

from utils.cluster import OUT_OF_TIME, parse_duration


class Hook:
    """Base class: every moment does nothing."""

    def training(self, trainer):
        """A context manager around the whole of training (a part's anomaly mode, say)."""
        return contextlib.nullcontext()

    def before_epoch(self, trainer, epoch):
        pass

    def after_step(self, trainer, epoch, batch_idx):
        pass

    def on_train_error(self, trainer, epoch, error):
        """None, or a function (called after the error is let go) returning the batch to redo the epoch from."""
        return None

    def after_train_epoch(self, trainer, epoch, last_batch):
        pass

    def after_epoch(self, trainer, epoch, result):
        pass

    def validating(self, trainer):
        """A context manager around each validation (an EMA scores its averaged weights inside it)."""
        return contextlib.nullcontext()

    def state_dict(self):
        return {}

    def load_state_dict(self, trainer, state):
        pass


def hooks_for(config, parts, run):
    """The hooks a run's config turns on, in the order they are called."""
    cfg = config["trainer"]
    hooks = []
    if parts.frozen:
        hooks.append(Unfreeze(parts.frozen, cfg["unfreeze_at_epoch"], cfg["unfreeze_lr"]))
    if cfg["val_every_n_steps"]:  # before the step checkpoint: last.pth then holds the validation's outcome
        hooks.append(StepValidation(cfg["val_every_n_steps"]))
    if cfg["save_every_n_steps"]:
        hooks.append(StepCheckpoint(cfg["save_every_n_steps"]))
    if cfg["max_time"]:
        hooks.append(MaxTime(parse_duration(cfg["max_time"])))
    if run.dist.is_main and run.writer and (cfg["log_images"] or cfg["histogram_every"]):
        hooks.append(EpochVisuals(cfg["log_images"], cfg["histogram_every"], cfg["activation_histograms"]))
    from utils import parts as optional_parts

    for more in optional_parts.call_each(config, "hooks", config, parts, run):  # the parts' (utils/parts.py)
        hooks.extend(more)
    from trainer.sweep import STUDY_TRIAL_ENV

    if os.environ.get(STUDY_TRIAL_ENV) and cfg["monitor"] != "off" and run.writes:  # (a dry run reports nothing)
        hooks.append(StudyReport(json.loads(os.environ[STUDY_TRIAL_ENV]), run.dist))  # a trial of sweep.py --optuna
    return hooks


def step_hooks(hooks):
    """The hooks that act after every step: those overriding :meth:`Hook.after_step`."""
    return [hook for hook in hooks if type(hook).after_step is not Hook.after_step]


class Unfreeze(Hook):
    """``trainer.unfreeze_at_epoch``: from that epoch on, the parameters ``trainer.freeze`` froze train too.

    They join the optimizer as a new parameter group at ``unfreeze_lr`` (default: the
    optimizer's learning rate). The checkpoint records whether this has happened, so a resume
    on either side of the epoch rebuilds the same parameter groups before loading the optimizer.
    """

    def __init__(self, frozen, at_epoch, lr):
        self.frozen, self.at_epoch, self.lr = list(frozen), at_epoch, lr
        self.unfrozen = False

    def before_epoch(self, trainer, epoch):
        if not self.unfrozen and self.at_epoch and epoch >= self.at_epoch:
            self.unfreeze(trainer)
            trainer.logger.info(f"Epoch {epoch}: unfroze {len(self.frozen)} parameter tensors")

    def unfreeze(self, trainer):
        params = dict(trainer.model.named_parameters())
        new = [params[name].requires_grad_(True) for name in self.frozen]
        lr = self.lr or trainer.optimizer.defaults["lr"]
        trainer.optimizer.add_param_group({"params": new, "lr": lr})
        if trainer.lr_scheduler is not None and hasattr(trainer.lr_scheduler, "base_lrs"):
            trainer.lr_scheduler.base_lrs.append(lr)  # schedulers keep one base lr per group
        self.unfrozen = True
        trainer.parameters_changed()

    def state_dict(self):
        return {"frozen": self.frozen, "unfrozen": self.unfrozen}

    def load_state_dict(self, trainer, state):
        if state.get("unfrozen") and not self.unfrozen:
            self.unfreeze(trainer)


class StepCheckpoint(Hook):
    """``trainer.save_every_n_steps``: a resumable ``last.pth`` every N optimizer steps (long epochs)."""

    def __init__(self, every):
        self.every = every

    def after_step(self, trainer, epoch, batch_idx):
        if trainer.global_step % self.every == 0:
            trainer.save_resumable("last.pth")


class StepValidation(Hook):
    """``trainer.val_every_n_steps``: validate every N optimizer steps, for epochs too long to wait for.

    Each validation is logged (TensorBoard ``step/val_*``), updates the monitored value, writes
    ``model_best.pth`` when it improves (a resumable checkpoint, mid-epoch like ``last.pth``),
    and counts towards ``early_stop``, which then counts validations, not epochs. The step that
    ends an epoch is left to the epoch's own validation, so no validation counts twice.
    """

    def __init__(self, every):
        self.every = every

    def after_step(self, trainer, epoch, batch_idx):
        if trainer.global_step % self.every or trainer.batch_in_epoch >= trainer.batches_per_epoch():
            return
        result = {f"val_{k}": v for k, v in trainer.valid_epoch(epoch).items()}  # a collective under torchrun
        trainer.forward_model.train()  # evaluate() left it in eval mode
        step, logger = trainer.global_step, trainer.logger
        if trainer.is_main:
            logger.info(f"step {step} (epoch {epoch}, batch {trainer.batch_in_epoch}): "
                        + "  ".join(f"{k} {v:.6g}" for k, v in result.items()))
            trainer.writer.add_scalars(result, step, prefix="step/")
        if trainer.monitor_key not in result:  # monitor off, or a training metric: monitored at the epoch's end
            return
        if trainer._update_monitor(result):
            trainer.best_epoch = epoch  # the epoch in progress (the update counts the completed ones)
            if trainer.is_main:
                logger.info(f"{trainer.monitor_key} improved to {trainer.monitor_best:.6g} at step {step}: saving"
                            " model_best.pth")
            trainer.save_resumable("model_best.pth")  # every process: the epoch's running sums are gathered
        if trainer.not_improved_count > trainer.early_stop:
            logger.info(f"Validation performance didn't improve for {trainer.early_stop} validations. Training stops.")
            trainer.finished = trainer.stopped_early = True


class StudyReport(Hook):
    """A trial of ``sweep.py --optuna``: each epoch's monitored value goes to the Optuna study, and an
    epoch the study's pruner rejects is the run's last (``trainer.pruned_at``, and ``result.json``).

    The sweep names the study and the trial in the ``SWEEP_OPTUNA_TRIAL`` environment variable.
    Rank 0 talks to the study (one database write and read per epoch, nothing per step); under
    torchrun it tells the other processes whether to stop.
    """

    def __init__(self, spec, info):
        from trainer.sweep import open_study_trial

        self.info = info
        self.trial = open_study_trial(spec) if info.is_main else None

    def after_epoch(self, trainer, epoch, result):
        from utils import dist

        pruned = False
        if self.trial is not None and trainer.monitor_key in result:
            self.trial.report(float(result[trainer.monitor_key]), epoch)
            pruned = self.trial.should_prune()
        if dist.broadcast_object(pruned, self.info) and not trainer.finished:
            trainer.finished, trainer.pruned_at = True, epoch
            trainer.logger.info(f"{trainer.monitor_key} {result[trainer.monitor_key]:.6g} at epoch {epoch}: the"
                                " study's pruner stops this trial")


class MaxTime(Hook):
    """``trainer.max_time``: once this wall-clock budget (counted from the start of training) is spent, stop after
    the step with a resumable ``last.pth`` and exit code 75 (see utils/cluster.py). One clock read per step."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def after_step(self, trainer, epoch, batch_idx):
        if trainer.stop_signal is None and time.monotonic() >= self.deadline:
            trainer.stop_signal = OUT_OF_TIME
            trainer.logger.warning(f"trainer.max_time ({trainer.config['trainer']['max_time']}) is spent: stopping"
                                   + (" when the processes next agree" if trainer.distributed else ""))


class EpochVisuals(Hook):
    """TensorBoard pictures at the end of a training epoch (rank 0, TensorBoard on).

    An input image grid on the first epoch (``log_images``); parameter, gradient and
    activation histograms every ``histogram_every`` epochs.
    """

    def __init__(self, log_images, histogram_every, activation_modules):
        self.log_images, self.histogram_every = log_images, histogram_every
        self.activation_modules = list(activation_modules)

    def after_train_epoch(self, trainer, epoch, last_batch):
        if last_batch is None:
            return
        writer, step = trainer.writer, trainer.global_step
        histograms = self.histogram_every and epoch % self.histogram_every == 0
        if self.log_images and (epoch == 1 or histograms) and last_batch.dim() == 4 and last_batch.shape[1] in (1, 3):
            writer.add_images("inputs", last_batch[:16], step)
        if not histograms:
            return
        for name, param in trainer.model.named_parameters():
            writer.add_histogram(f"params/{name}", param, step)
            if param.grad is not None:
                writer.add_histogram(f"grads/{name}", param.grad, step)
        if self.activation_modules:
            self._activations(trainer, last_batch, step)

    def _activations(self, trainer, data, step):
        # One extra forward pass in eval mode: no dropout draws, so the RNG stream (and resume) is unaffected.
        model, writer = trainer.model, trainer.writer
        modules = dict(model.named_modules())
        handles = [
            modules[name].register_forward_hook(
                lambda module, inputs, output, name=name: writer.add_histogram(f"activations/{name}", output, step)
            )
            for name in self.activation_modules
        ]
        try:
            model.eval()
            with torch.no_grad(), trainer.autocast:
                model(data)
        finally:
            for handle in handles:
                handle.remove()
            model.train()
