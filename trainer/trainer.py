"""The training step loop, and the one evaluation function that validation and ``test.py`` share."""

import contextlib
import itertools
import math
import time

import torch
from tqdm import tqdm

from base.base_trainer import BaseTrainer, RunStopped
from trainer.hooks import hooks_for, step_hooks
from utils.metric_tracker import EpochMetric, MetricTracker, batch_weights, weighing


@torch.no_grad()
def evaluate(model, loader, criterion, metric_fns, device, autocast=None, reduce=False, progress=False, desc="eval",
             max_batches=None):
    """Mean loss and metrics of ``model`` over ``loader`` (its first ``max_batches``, if given), each batch weighted
    by what its value averages over (its sample count; a loss's or accuracy's kept targets under ``ignore_index``).

    Epoch metrics in ``metric_fns`` (:class:`utils.metric_tracker.EpochMetric`) get a fresh accumulator
    each call, updated per batch and computed at the end.
    ``reduce=True`` (under ``torch.distributed``) sums over all processes, so every
    process gets the value of the whole dataset (every process must then call this).
    """
    model.eval()
    plain, stateful = split_metrics(metric_fns)
    plain, weighed = weighing(criterion, plain, loader)
    stateful = [fn.new(device, sync=reduce) for fn in stateful]
    tracker = MetricTracker(["loss", *(fn.__name__ for fn in plain)], device)
    autocast = autocast or contextlib.nullcontext()
    batches = loader if max_batches is None else itertools.islice(loader, max_batches)
    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    for data, target in tqdm(batches, total=total, desc=desc, leave=False, disable=None if progress else True):
        data, target = data.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast:
            output = model(data)
            loss = criterion(output, target)
        tracker.update([loss.detach(), *(fn(output, target) for fn in plain)], target.shape[0],
                       weighed and batch_weights(weighed, output, target))
        for metric in stateful:
            metric.update(output, target)
    result = tracker.result(reduce=reduce)
    for metric in stateful:  # under torchrun a collective: every process computes, in the same order
        result[metric.__name__] = metric.compute()
    return result


def split_metrics(metric_fns):
    """``(per-batch functions, epoch metric specs)`` of a list of metrics, each in its order."""
    epoch = [fn for fn in metric_fns if isinstance(fn, EpochMetric)]
    return [fn for fn in metric_fns if not isinstance(fn, EpochMetric)], epoch


class Trainer(BaseTrainer):
    """Trains ``parts`` with the settings of ``config["trainer"]``; see :class:`base.base_trainer.BaseTrainer`.

    The step itself is :meth:`train_epoch` (fetch, zero_grad, forward, loss, backward, clip, step), which
    :meth:`fit_epoch` calls (again, when a hook recovers from an error in it); optional behaviour around it
    is in ``self.hooks`` (trainer/hooks.py).
    """

    def __init__(self, config, parts, run):
        super().__init__(config, parts, run)
        cfg = config["trainer"]
        self.criterion, self.metric_fns, self.device = parts.criterion, list(parts.metric_fns), parts.device
        # Per-batch metrics go through the tracker; epoch metrics (a part's) keep their own state for the epoch.
        self.batch_metric_fns, stateful = split_metrics(self.metric_fns)
        # Counting each batch's ignored targets only where the data can hold one (most data cannot).
        self.batch_metric_fns, self._weighed = weighing(self.criterion, self.batch_metric_fns, parts.data_loader)
        self.epoch_metrics = [spec.new(self.device, sync=run.dist.enabled) for spec in stateful]
        self._epoch_metrics_state = None  # their states (all processes'), for the next mid-epoch checkpoint
        self.valid_metric_fns = self.metric_fns + list(parts.valid_metric_fns)  # what validation scores
        self.forward_model = parts.forward_model
        self.data_loader, self.valid_data_loader = parts.data_loader, parts.valid_data_loader
        self.scaler = parts.scaler
        self.len_epoch = cfg["len_epoch"]  # batches per epoch; None: one pass over the data
        self.val_batch_limit = None  # validation batches; None: all
        self.accumulate = cfg["accumulate_grad_batches"]
        self.max_steps = cfg["max_steps"]
        self.log_every = cfg["log_every_n_steps"]
        self.clip_norm, self.clip_norm_type = cfg["clip_grad_norm"], float(cfg["clip_grad_norm_type"])
        self.clip_value = cfg["clip_grad_value"]
        self.skip_nonfinite = cfg["skip_nonfinite"]
        # Reading the loss back each step is free on the CPU but a sync on an accelerator:
        # there, a non-finite loss is caught at the logging interval unless skipping is on.
        self.check_every_step = self.device.type == "cpu" or self.skip_nonfinite
        self.quiet = cfg["verbosity"] == 0 or not self.is_main
        self.step_scheduler = self.lr_scheduler is not None and config["lr_scheduler"]["interval"] == "step"
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["amp"])
        self.autocast = torch.autocast(self.device.type, dtype=amp) if amp else contextlib.nullcontext()
        self.nonfinite_skips = 0
        names = ["loss", *(fn.__name__ for fn in self.batch_metric_fns)]
        self.train_metrics = MetricTracker(names, self.device)
        self._train_metrics_state = None  # all processes' running sums, for the next mid-epoch checkpoint
        self.params = self._optimizer_params()
        self.last_log = (time.perf_counter(), 0)  # for steps per second at the logging interval
        self.hooks = hooks_for(config, parts, run)
        self.step_hooks = step_hooks(self.hooks)

    # ------------------------------------------------------------------ one epoch

    def fit_epoch(self, epoch, start_batch=0):
        """:meth:`train_epoch`; an error in it goes to the hooks (:meth:`~trainer.hooks.Hook.on_train_error`), and
        one that can recover from it (a smaller batch after running out of memory) has the epoch redone from a batch."""
        self.last_log = (time.perf_counter(), self.global_step)
        while True:
            try:
                return self.train_epoch(epoch, start_batch)
            except Exception as error:
                recover = next(filter(None, (hook.on_train_error(self, epoch, error) for hook in self.hooks)), None)
                if recover is None:
                    raise
            start_batch = recover()  # out of the except block: the failed step's frames and tensors are gone

    # ------------------------------------------------------------------ the step

    def train_epoch(self, epoch, start_batch=0):
        """The training step, for each batch of ``epoch`` from ``start_batch`` on; returns the epoch's means.

        This is the method to override to change what a step does. Everything around the step
        is a named call after it: :meth:`after_step` counts the step, logs it, runs the hooks and
        asks whether to stop; :meth:`end_train_epoch` reads the epoch's loss and metrics.
        """
        model, optimizer, data = self.forward_model, self.optimizer, None
        model.train()
        for batch_idx, (data, target) in self.batches(epoch, start_batch):  # on the device
            first, last, window = self.windows[batch_idx]  # where the batch is in its accumulation window
            if first:
                optimizer.zero_grad(set_to_none=True)
            with self.forward_context(last):  # AMP; under DDP, gradients are averaged on a window's last batch
                output = model(data)
                loss = self.criterion(output, target)
            if self.loss_is_usable(loss, epoch, batch_idx):  # non-finite: stop, or skip (trainer.skip_nonfinite)
                with self.no_sync(last):
                    self.backward(loss, window)
                self.track(loss, output, target)
            if not last:
                continue
            grad_norm = self.clip_gradients()
            self.optimizer_step()
            if self.step_scheduler:
                self.lr_scheduler.step()
            if self.after_step(epoch, batch_idx, loss, grad_norm):
                break
        return self.end_train_epoch(epoch, data)

    def batches(self, epoch, start_batch):
        """``(batch_idx, (data, target))`` for the batches of ``epoch`` from ``start_batch``, on the device, behind
        the progress bar; and the epoch's accumulation windows (:attr:`windows`)."""
        if start_batch == 0:
            self.reset_metrics()
        self.epoch_length = n = self.batches_per_epoch()
        # (first, last, size) of the window of trainer.accumulate_grad_batches batches each batch is in (looked up
        # per step): a window starts every `accumulate` batches; the epoch's last may be shorter (it still steps).
        starts = [i - i % self.accumulate for i in range(n)]
        self.windows = [(i == start, i + 1 == min(start + self.accumulate, n), min(start + self.accumulate, n) - start)
                        for i, start in enumerate(starts)]
        self.bar = tqdm(self._batches(epoch, start_batch), total=self.epoch_length, initial=start_batch, leave=False,
                        desc=f"epoch {epoch}", disable=True if self.quiet else None, dynamic_ncols=True,
                        mininterval=0.5)  # redraws cost time; twice a second is plenty to watch
        batches = enumerate(self.bar, start_batch)
        return batches if self.device.type == "cpu" else self._moved(batches)  # (batches are made on the CPU)

    def _moved(self, batches):
        for batch_idx, (data, target) in batches:
            yield batch_idx, (data.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True))

    def forward_context(self, last_in_window):
        """Around the forward pass: AMP's autocast (``trainer.amp``), and :meth:`no_sync`."""
        if self.distributed and not last_in_window:
            return _both(self.forward_model.no_sync(), self.autocast)
        return self.autocast

    def no_sync(self, last_in_window):
        """Under DDP, a batch that is not its window's last skips the gradient all-reduce."""
        if self.distributed and not last_in_window:
            return self.forward_model.no_sync()
        return _NO_CONTEXT

    def loss_is_usable(self, loss, epoch, batch_idx):
        """False to skip the batch (its loss is non-finite and ``trainer.skip_nonfinite`` is on); raises to stop.

        Reading the loss back is free on the CPU but a device sync elsewhere: there it is checked at
        the logging interval instead (:meth:`log_step`), unless skipping is on.
        """
        if not self.check_every_step or math.isfinite(loss.item()):
            return True
        return not self._nonfinite(loss, epoch, batch_idx)

    def backward(self, loss, window):
        """Backward of ``loss / window`` (N batches of B then step like one batch of N*B); fp16 through the scaler."""
        scaled = loss / window if window > 1 else loss
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def track(self, loss, output, target):
        """Add the batch to the epoch's running loss and metrics (on the device: no sync)."""
        values, weighed = [loss.detach()], self._weighed
        for fn in self.batch_metric_fns:  # (a loop, not a generator: no call per metric beyond its own)
            values.append(fn(output, target))
        self.train_metrics.update(values, target.shape[0], weighed and batch_weights(weighed, output, target))
        for metric in self.epoch_metrics:  # usually none
            metric.update(output, target)

    def clip_gradients(self):
        """Clip the gradients as ``trainer.clip_grad_norm`` / ``clip_grad_value`` say; returns their norm where it
        was computed (clipping by norm, or a logging step), else None. fp16: unscaled first."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # clip and log the true gradients, not the scaled ones
        grad_norm = None
        if self.clip_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm, self.clip_norm_type)
        elif (self.global_step + 1) % self.log_every == 0:
            grad_norm = _total_norm(self.params, self.clip_norm_type)
        if self.clip_value:
            torch.nn.utils.clip_grad_value_(self.params, self.clip_value)
        return grad_norm

    def optimizer_step(self):
        """The optimizer's step; fp16: through the gradient scaler, which skips a step with inf gradients."""
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def after_step(self, epoch, batch_idx, loss, grad_norm):
        """Count the step, log it, run the step's hooks; returns True when the epoch ends here (a stop asked
        for, the run finished, or ``trainer.max_steps`` reached)."""
        self.global_step += 1
        if self.global_step % self.log_every == 0:
            self.log_step(epoch, batch_idx, loss, grad_norm)
        self.batch_in_epoch = batch_idx + 1
        # The step's hooks are part of the step: a stop after it (and its last.pth) includes what they did
        # (the EMA update, a validation by step), so a resume repeats none of it and misses none of it.
        for hook in self.step_hooks:  # usually none: then this costs nothing per step
            hook.after_step(self, epoch, batch_idx)
        stopping = self.agreed_stop_signal() if self.distributed else self.stop  # (one process: its own reason)
        if stopping or self.finished or (self.max_steps and self.global_step >= self.max_steps):
            self.finished = self.finished or not stopping  # (finished: early stop by a validation by step)
            return True
        return False

    def end_train_epoch(self, epoch, last_batch):
        """The hooks' ``after_train_epoch``, then the epoch's mean loss and metrics (a sync; under torchrun, over all
        processes)."""
        self.bar.close()
        for hook in self.hooks:
            hook.after_train_epoch(self, epoch, last_batch)
        result = self.train_metrics.result(reduce=self.distributed)
        for metric in self.epoch_metrics:  # under torchrun a collective (torchmetrics' sync): every process computes
            result[metric.__name__] = metric.compute()
        return result

    def reset_metrics(self):
        self.train_metrics.reset()
        for metric in self.epoch_metrics:
            metric.reset()

    def log_step(self, epoch, batch_idx, loss, grad_norm):
        # The only host-device sync of a training step, and only at the logging interval.
        value = loss.item()
        if not self.check_every_step and not torch.isfinite(self.train_metrics.totals()).all():
            self._nonfinite(loss, epoch, batch_idx, since_last_log=True)
        if not self.is_main:
            return
        step = self.global_step
        self.writer.add_scalar("train/loss", value, step)
        if grad_norm is not None:
            self.writer.add_scalar("train/grad_norm", float(grad_norm), step)
        for i, group in enumerate(self.optimizer.param_groups):
            self.writer.add_scalar(f"lr/group{i}", group["lr"], step)
        if self.nonfinite_skips:
            self.writer.add_scalar("train/nonfinite_skips", self.nonfinite_skips, step)
        now, (then, then_step) = time.perf_counter(), self.last_log
        if step > then_step and now > then:  # the loss was read above: the steps before it have finished
            steps_per_s = (step - then_step) / (now - then)
            samples = self.data_loader.batch_size * self.accumulate * self.world_size  # per step, all processes
            self.writer.add_scalar("perf/steps_per_s", steps_per_s, step)
            self.writer.add_scalar("perf/samples_per_s", steps_per_s * samples, step)
        self.last_log = (now, step)
        self.logger.debug(f"epoch {epoch} batch {batch_idx + 1}/{self.batches_per_epoch()} step {step} loss {value:.6f}")

    def _nonfinite(self, loss, epoch, batch_idx, since_last_log=False):
        """Handle a non-finite loss: returns True to skip the batch, or raises to stop the run.

        Under torchrun the message is kept until the processes agree after this step
        (:meth:`agreed_stop_signal`), so that all of them stop together.
        """
        where = f"epoch {epoch}, step {self.global_step + 1} (batch {batch_idx + 1})"
        if self.skip_nonfinite:
            self.nonfinite_skips += 1
            self.logger.warning(f"non-finite loss ({loss.item()}) at {where}: step skipped ({self.nonfinite_skips} so far)")
            return True
        if since_last_log:
            where = f"epoch {epoch}, between steps {self.global_step - self.log_every + 1} and {self.global_step}"
        message = (
            f"the loss became non-finite ({loss.item()}) at {where}; stopping without saving, so the last good"
            " checkpoint is untouched. Lower the learning rate, set trainer.clip_grad_norm, or set"
            " trainer.skip_nonfinite=true to skip such steps"
        )
        if not self.distributed:
            raise RunStopped(message)
        self.diverged = message
        return False

    def batches_per_epoch(self):
        return self.len_epoch or len(self.data_loader)

    def _batches(self, epoch, start_batch):
        """The batches of ``epoch`` from ``start_batch`` on.

        With ``len_epoch`` an epoch is a fixed number of batches cut from an endless
        stream of passes over the data; pass ``k`` has the data order of sampler epoch ``k``.
        """
        loader = self.data_loader
        if self.len_epoch is None:
            loader.set_epoch(epoch, start_batch)
            return iter(loader)
        return self._endless(loader, (epoch - 1) * self.len_epoch + start_batch, self.len_epoch - start_batch)

    @staticmethod
    def _endless(loader, position, count):
        passes, offset = divmod(position, len(loader))
        while count > 0:
            passes += 1
            loader.set_epoch(passes, offset)
            for batch in itertools.islice(loader, count):
                yield batch
                count -= 1
            offset = 0

    # ------------------------------------------------------------------ validation and epoch-level hooks

    def valid_epoch(self, epoch):
        if self.valid_data_loader is None:
            return {}
        # Under DDP, evaluate the plain module: the wrapper's forward broadcasts buffers, a collective that
        # would wait forever on a process whose validation shard has fewer batches.
        model = self.model if self.distributed else self.forward_model
        with contextlib.ExitStack() as stack:  # each hook's context (an EMA's averaged weights are scored)
            for hook in self.hooks:
                stack.enter_context(hook.validating(self))
            result = evaluate(model, self.valid_data_loader, self.criterion, self.valid_metric_fns, self.device,
                              self.autocast, reduce=self.distributed, progress=not self.quiet, desc=f"valid {epoch}",
                              max_batches=self.val_batch_limit)
        for hook in self.hooks:  # (a part's validation-only metric is taken out of the result here)
            hook.after_validation(self, epoch, result)
        return result

    def log_epoch(self, epoch, result):
        super().log_epoch(epoch, result)
        if self.is_main:
            self.writer.add_scalars(result, self.global_step, prefix="epoch/")
            self.writer.add_scalar("epoch/epoch", epoch, self.global_step)
            if self.global_step % self.log_every:  # not already written by this step's log
                for i, group in enumerate(self.optimizer.param_groups):
                    self.writer.add_scalar(f"lr/group{i}", group["lr"], self.global_step)
            self.writer.flush()

    # ------------------------------------------------------------------ what hooks call

    def parameters_changed(self):
        """The optimizer's parameters changed (a parameter group was added): clip them all, and under DDP wrap
        the model again, since DDP registers only the parameters trainable when it was built (a collective:
        every process unfreezes at the same epoch)."""
        self.params = self._optimizer_params()
        if self.distributed and self.parts.wrap is not None:
            self.forward_model = self.parts.wrap(self.model)

    def _optimizer_params(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # ------------------------------------------------------------------ checkpoint extras

    def before_checkpoint(self):
        # A mid-epoch checkpoint holds the epoch's running sums of all processes (a collective),
        # so that a resume, under any world size, ends the epoch with the numbers of the whole epoch.
        self._train_metrics_state = self.train_metrics.state_dict(reduce=self.distributed)
        if self.epoch_metrics:  # the same for epoch metrics: their states, gathered from every process
            self._epoch_metrics_state = {m.__name__: m.state_dict(reduce=self.distributed) for m in self.epoch_metrics}

    def extra_state(self):
        metrics_state, self._train_metrics_state = self._train_metrics_state, None
        epoch_metrics_state, self._epoch_metrics_state = self._epoch_metrics_state, None
        return {
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "frozen": [],
            "unfrozen": False,
            "nonfinite_skips": self.nonfinite_skips,
            "train_metrics": metrics_state or self.train_metrics.state_dict(),
            # (only mid-epoch: after an epoch's end a resume starts the next epoch afresh)
            **({"train_epoch_metrics": epoch_metrics_state} if epoch_metrics_state else {}),
            **super().extra_state(),  # the hooks' (the freezing schedule's "frozen" and "unfrozen")
        }

    def load_extra_state(self, state):
        super().load_extra_state(state)
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.nonfinite_skips = state.get("nonfinite_skips", 0)
        if state.get("batch_in_epoch"):
            # The sums are all processes' (see before_checkpoint): one process carries them on.
            if self.is_main:
                self.train_metrics.load_state_dict(state["train_metrics"])
            else:
                self.train_metrics.reset()
            saved = state.get("train_epoch_metrics") or {}
            for metric in self.epoch_metrics:
                metric.reset()
                mine = saved.get(metric.__name__)
                # The others start empty, in a form that still gathers with rank 0's.
                loaded = mine is not None and metric.load_state_dict(mine, own=self.is_main)
                if not loaded and self.is_main:
                    why = "no running state" if mine is None else "the state of another metric (changed args?)"
                    self.logger.warning(f"the checkpoint holds {why} for {metric.__name__}: its value for epoch"
                                        f" {state['epoch'] + 1} covers only the batches after the resume")


_NO_CONTEXT = contextlib.nullcontext()  # reusable: entering it does nothing


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


def _total_norm(params, norm_type):
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), norm_type) for g in grads])
    return torch.linalg.vector_norm(norms, norm_type)
