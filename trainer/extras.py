"""What some runs of the trainer need and a default run does not, imported at the point of use.

The core's own hooks that a config turns on (``trainer.freeze``/``unfreeze_at_epoch``,
``trainer.histogram_every``), the epochs of ``trainer.len_epoch``, batches moved to an accelerator,
what a non-finite loss does, a resume's restoring of the epoch's running sums, and their copy and roll-back
(``trainer.auto_accumulate``).
"""

import contextlib
import itertools

import torch

from base.base_hook import Hook

from base.base_trainer import RunStopped


def core_hooks(cfg, parts, run):
    """The core's own hooks that ``cfg`` (``config["trainer"]``) turns on."""
    hooks = []
    if cfg["strategy"] == "fsdp":  # the whole model gathered for each validation (trainer/fsdp.py)
        hooks.append(GatheredForValidation())
    if parts.frozen:
        hooks.append(Unfreeze(parts.frozen, cfg["unfreeze_at_epoch"], cfg["unfreeze_lr"]))
    if cfg["histogram_every"] and run.dist.is_main and run.writer:
        hooks.append(Histograms(cfg["histogram_every"], cfg["activation_histograms"], cfg["log_images"]))
    return hooks


class Unfreeze(Hook):
    """``trainer.unfreeze_at_epoch``: from that epoch on, the parameters ``trainer.freeze`` froze train too.

    They join the optimizer as a new parameter group at ``unfreeze_lr`` (default: the optimizer's
    learning rate). The checkpoint records whether this has happened, so a resume on either side
    of the epoch rebuilds the same parameter groups before loading the optimizer.
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
        trainer.params = [p for group in trainer.optimizer.param_groups for p in group["params"]]  # all clipped
        # DDP registers only the parameters trainable when it was built: wrap again (a collective: every process
        # unfreezes at the same epoch).
        if trainer.distributed and trainer.parts.wrap is not None:
            trainer.forward_model = trainer.parts.wrap(trainer.model)

    def state_dict(self):
        return {"frozen": self.frozen, "unfrozen": self.unfrozen}

    def load_state_dict(self, trainer, state):
        if state.get("unfrozen") and not self.unfrozen:
            self.unfreeze(trainer)


class GatheredForValidation(Hook):
    """The whole model gathered on every process for each validation, and sharded again after it (see trainer/fsdp.py's
    docstring): each process may then score its own number of batches."""

    @contextlib.contextmanager
    def validating(self, trainer):
        sharded = [m for m in trainer.model.modules() if hasattr(m, "reshard")]
        for module in sharded:  # (a collective: every process validates at the same point)
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()
        try:
            yield
        finally:
            for module in sharded:
                module.reshard()
                module.set_reshard_after_forward(True, recurse=False)


class Histograms(Hook):
    """``trainer.histogram_every``: parameter, gradient and activation (``activation_histograms``) histograms every
    N epochs, with the input images (``log_images``) at those epochs (rank 0, TensorBoard on)."""

    def __init__(self, every, activation_modules, log_images):
        self.every, self.activation_modules, self.log_images = every, list(activation_modules), log_images

    def after_train_epoch(self, trainer, epoch, last_inputs):
        if last_inputs is None or epoch % self.every:
            return
        writer, step = trainer.writer, trainer.global_step  # (the first epoch's images: the trainer's)
        images = last_inputs[0] if last_inputs else None
        if self.log_images and epoch > 1 and isinstance(images, torch.Tensor) and images.dim() == 4 \
                and images.shape[1] in (1, 3):
            writer.add_images("inputs", images[:16], step)
        for name, param in trainer.model.named_parameters():
            writer.add_histogram(f"params/{name}", param, step)
            if param.grad is not None:
                writer.add_histogram(f"grads/{name}", param.grad, step)
        if not self.activation_modules:
            return
        # One extra forward pass in eval mode: no dropout draws, so the RNG stream (and resume) is unaffected.
        modules = dict(trainer.model.named_modules())
        handles = [modules[name].register_forward_hook(
            lambda module, inputs, output, name=name: writer.add_histogram(f"activations/{name}", output, step))
            for name in self.activation_modules]
        try:
            trainer.model.eval()
            with torch.no_grad(), trainer.autocast:
                trainer.model(*last_inputs)
        finally:
            for handle in handles:
                handle.remove()
            trainer.model.train()


def endless(loader, position, count):
    """``count`` batches from batch ``position`` of an endless stream of passes over ``loader`` (``len_epoch``);
    pass ``k`` has the data order of sampler epoch ``k``."""
    passes, offset = divmod(position, len(loader))
    while count > 0:
        passes += 1
        loader.set_epoch(passes, offset)
        for batch in itertools.islice(loader, count):
            yield batch
            count -= 1
        offset = 0


def moved(batches, device):
    """``(batch_idx, batch)`` with the batch moved to ``device`` (an accelerator: batches are made on the CPU)."""
    from base.base_task import to_device

    for batch_idx, batch in batches:
        yield batch_idx, to_device(batch, device)


def nonfinite_loss(trainer, loss, epoch, batch_idx, since_last_log=False):
    """A non-finite loss: returns True to skip the batch (``trainer.skip_nonfinite``), or raises to stop the run.
    Under torchrun the message is kept until the processes agree after this step, so that all of them stop."""
    where = f"epoch {epoch}, step {trainer.global_step + 1} (batch {batch_idx + 1})"
    if trainer.skip_nonfinite:
        trainer.nonfinite_skips += 1
        trainer.logger.warning(f"non-finite loss ({loss.item()}) at {where}: step skipped"
                               f" ({trainer.nonfinite_skips} so far)")
        return True
    if since_last_log:
        where = f"epoch {epoch}, between steps {trainer.global_step - trainer.log_every + 1} and {trainer.global_step}"
    message = (f"the loss became non-finite ({loss.item()}) at {where}; stopping without saving, so the last good"
               " checkpoint is untouched. Lower the learning rate, set trainer.clip_grad_norm, or set"
               " trainer.skip_nonfinite=true to skip such steps")
    if not trainer.distributed:
        raise RunStopped(message)
    trainer.diverged = message
    return False


def gather_running_sums(trainer):
    """What ``Trainer.before_checkpoint`` adds to a mid-epoch checkpoint: the epoch's running sums of all processes
    (a collective), epoch metrics' states included, so that a resume under any world size ends the epoch with the
    whole epoch's numbers (only mid-epoch: after an epoch's end a resume starts the next epoch afresh)."""
    state = {"train_metrics": trainer.train_metrics.state_dict(reduce=trainer.distributed)}
    if trainer.epoch_metrics:
        state["train_epoch_metrics"] = {m.__name__: m.state_dict(reduce=trainer.distributed)
                                        for m in trainer.epoch_metrics}
    return state


def load_trainer_state(trainer, state):
    """Resuming: the scaler, the count of skipped steps, and mid-epoch the epoch's running sums, which are all
    processes' (see ``Trainer.before_checkpoint``): one process carries them on, the others start empty."""
    if trainer.scaler and state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.nonfinite_skips = state.get("nonfinite_skips", 0)
    if not state.get("batch_in_epoch"):
        return
    if trainer.is_main:
        trainer.train_metrics.load_state_dict(state["train_metrics"])
    else:
        trainer.train_metrics.reset()
    saved = state.get("train_epoch_metrics") or {}
    for metric in trainer.epoch_metrics:
        metric.reset()
        mine = saved.get(metric.__name__)
        # The others start empty, in a form that still gathers with rank 0's.
        loaded = mine is not None and metric.load_state_dict(mine, own=trainer.is_main)
        if not loaded and trainer.is_main:
            why = "no running state" if mine is None else "the state of another metric (changed args?)"
            trainer.logger.warning(f"the checkpoint holds {why} for {metric.__name__}: its value for epoch"
                                   f" {state['epoch'] + 1} covers only the batches after the resume")


def running_sums(trainer):
    """A copy of the epoch's running loss and metrics, for :func:`roll_back` (``trainer.auto_accumulate`` redoing a
    window of batches): the tracker's sums, and its queue by reference (its tensors never change in place)."""
    tracker = trainer.train_metrics
    return ((tracker.sums.clone(), tracker.weight_sums.clone(), tracker.count, list(tracker._values),
             list(tracker._sizes), list(tracker._weights)), [metric.mark() for metric in trainer.epoch_metrics])


def roll_back(trainer, mark):
    """Return the running sums to those of :func:`running_sums`: the batches added since are forgotten."""
    tracker = trainer.train_metrics
    sums, weight_sums, tracker.count, values, sizes, weights = mark[0]
    tracker.sums.copy_(sums)
    tracker.weight_sums.copy_(weight_sums)
    tracker._values, tracker._sizes, tracker._weights = list(values), list(sizes), list(weights)
    for metric, saved in zip(trainer.epoch_metrics, mark[1]):
        metric.rollback(saved)
