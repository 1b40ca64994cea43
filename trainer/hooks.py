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
- ``validating(trainer)``: a context manager around each validation (an EMA scores its
  averaged weights inside it).
- ``after_validation(trainer, epoch, result)``: after each validation (by epoch or by step),
  before its values are used or logged; ``result`` holds them without the ``val_`` prefix. A
  part that added a metric to ``Parts.valid_metric_fns`` takes its value out here (the
  confusion matrix, which is no number to log).
- ``after_epoch(trainer, epoch, result)``: after validation and the monitor's update, before
  the epoch's checkpoints; ``result`` holds the epoch's values (``val_*`` included).
  ``trainer.end_run(reason)`` ends the run after this epoch, with its checkpoint written.
- ``state_dict()`` / ``load_state_dict(trainer, state)``: the top-level keys a hook adds to a
  checkpoint. Loading runs before the model and optimizer are restored, because a hook may
  change the optimizer's parameter groups.

A hook may end the run early: ``trainer.ask_to_stop(exit_code, why)`` stops it after the step with a
resumable ``last.pth`` and that exit code, as a signal does (see base/base_trainer.py).

What a hook may use of the trainer: its public attributes and methods, among them
``global_step``, ``batch_in_epoch``, ``batches_per_epoch()``, ``valid_epoch(epoch)``,
``update_monitor(result)`` (count a validation towards the best value and early stopping),
``save_resumable(name)`` (a mid-epoch checkpoint), ``end_run(reason)`` and ``finished``.

What a hook may set on the Trainer besides its counters: ``epochs``, ``len_epoch`` (batches per
epoch; None: one pass over the data), ``val_batch_limit`` (validation batches; None: all) and
``accumulate``; ``trainer.run.writes`` is False in a run that writes no file.

To add a feature: write a :class:`Hook`, and add it in :func:`hooks_for` when its config key is on
(or in a part's ``hooks()``: utils/parts.py).
"""

import contextlib

import torch



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

    def after_validation(self, trainer, epoch, result):
        """After each validation, before its values are used: a part takes its validation-only metric out here."""

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
    if run.dist.is_main and run.writer and (cfg["log_images"] or cfg["histogram_every"]):
        hooks.append(EpochVisuals(cfg["log_images"], cfg["histogram_every"], cfg["activation_histograms"]))
    from utils import parts as optional_parts

    for more in optional_parts.call_each(config, "hooks", config, parts, run):  # the parts' (utils/parts.py)
        hooks.extend(more)
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
