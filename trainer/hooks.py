"""Optional behaviour around the training step, as small named pieces called at fixed moments.

A hook overrides the moments it needs; each is a no-op by default:

- ``before_epoch(trainer, epoch)``: before the epoch's first batch (a freezing schedule).
- ``after_step(trainer, epoch, batch_idx)``: after each optimizer step. Only hooks that
  override it are called per step (:func:`step_hooks`), and they must take negligible time
  unless they act, so a run without them pays nothing per step.
- ``after_train_epoch(trainer, epoch, last_batch)``: after the epoch's last training step,
  before validation (histograms, image grids). ``last_batch`` is the last input batch.
- ``state_dict()`` / ``load_state_dict(trainer, state)``: the top-level keys a hook adds to a
  checkpoint. Loading runs before the model and optimizer are restored, because a hook may
  change the optimizer's parameter groups.

To add a feature: write a :class:`Hook`, and add it in :func:`hooks_for` when its config key is on.
"""

import torch


class Hook:
    """Base class: every moment does nothing."""

    def before_epoch(self, trainer, epoch):
        pass

    def after_step(self, trainer, epoch, batch_idx):
        pass

    def after_train_epoch(self, trainer, epoch, last_batch):
        pass

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
    if cfg["save_every_n_steps"]:
        hooks.append(StepCheckpoint(cfg["save_every_n_steps"]))
    if run.dist.is_main and run.writer and (cfg["log_images"] or cfg["histogram_every"]):
        hooks.append(EpochVisuals(cfg["log_images"], cfg["histogram_every"], cfg["activation_histograms"]))
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
