"""The training step (:meth:`Trainer.train_epoch`), the evaluation that validation and ``test.py`` share, and the
sums the loss and the metrics are averaged from.

Metric sums: each batch's value is weighted by what it averages over (its sample count, or its kept targets
under ``ignore_index`` or a class ``weight``), so an epoch's value is the mean over all of it whatever the
batches' sizes. A value that is no such mean (a macro F1) is an :class:`EpochMetric`'s.
"""

import contextlib
import itertools
import math
import time

import torch
from tqdm import tqdm

from base.base_trainer import BaseTrainer


def hooks_for(config, parts, run):
    """The hooks a run's config turns on, in the order they are called: the core's own, then the parts'."""
    from utils import parts as optional_parts

    hooks = []
    if parts.frozen or config["trainer"]["histogram_every"] or config["trainer"]["strategy"] != "ddp":  # (extras.py)
        from trainer.extras import core_hooks

        hooks = core_hooks(config["trainer"], parts, run)
    for more in optional_parts.call_each(config, "hooks", config, parts, run):
        hooks.extend(more)
    return hooks + (parts.task.hooks(config, parts, run) if parts.task else [])


def step_hooks(hooks):
    """The hooks that act after every step: those overriding :meth:`Hook.after_step` (base/base_hook.py)."""
    if not hooks:
        return []
    from base.base_hook import Hook

    return [hook for hook in hooks if type(hook).after_step is not Hook.after_step]


def default_step(model, batch, criterion):
    """How a batch becomes ``(loss, output, target)``, the metrics getting ``(output, target)``: the model reads the
    batch's inputs, all but its last item; the loss compares the output with the last. A config's ``task``
    replaces it (base/base_task.py: batches of any structure, several named losses)."""
    *inputs, target = batch
    output = model(*inputs)
    return criterion(output, target), output, target


@torch.no_grad()
def evaluate(model, loader, criterion, metric_fns, device, autocast=None, reduce=False, progress=False, desc="eval",
             max_batches=None, step=default_step):
    """Mean loss and metrics of ``model`` over ``loader`` (its first ``max_batches``), as ``step`` computes them, each
    batch weighted by what its value averages over; an :class:`EpochMetric` gets a fresh accumulator. ``reduce=True``
    (torchrun, every process calls it): summed over all processes, so each gets the whole dataset's values."""
    model.eval()
    stateful = [fn.new(device, sync=reduce) for fn in metric_fns if isinstance(fn, EpochMetric)]
    plain, weighed = weighing(criterion, [fn for fn in metric_fns if not isinstance(fn, EpochMetric)], loader)
    tracker = MetricTracker(["loss", *(fn.__name__ for fn in plain)], device)
    autocast = autocast or contextlib.nullcontext()
    batches = loader if max_batches is None else itertools.islice(loader, max_batches)
    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    for batch in tqdm(batches, total=total, desc=desc, leave=False, disable=None if progress else True):
        if device.type != "cpu":  # (batches are made on the CPU)
            from base.base_task import to_device

            batch = to_device(batch, device)
        with autocast:
            loss, output, target = step(model, batch, criterion)
        tracker.update([loss.detach(), *(fn(output, target) for fn in plain)], len(target),
                       weighed and batch_weights(weighed, output, target))
        for metric in stateful:
            metric.update(output, target)
    result = tracker.result(reduce=reduce)
    for metric in stateful:  # under torchrun a collective: every process computes, in the same order
        result[metric.__name__] = metric.compute()
    return result


class Trainer(BaseTrainer):
    """Trains ``parts`` with the settings of ``config["trainer"]`` (:class:`base.base_trainer.BaseTrainer`). The
    step is :meth:`train_epoch`; optional behaviour around it is in ``self.hooks`` (:class:`Hook`)."""

    def __init__(self, config, parts, run):
        super().__init__(config, parts, run)
        cfg = config["trainer"]
        self.criterion, self.metric_fns, self.device = parts.criterion, list(parts.metric_fns), parts.device
        # Per-batch metrics go through the tracker (where the data can hold no ignored target, in their
        # variants that count none); epoch metrics (a part's) keep their own state for the epoch.
        plain = [fn for fn in self.metric_fns if not isinstance(fn, EpochMetric)]
        self.batch_metric_fns, self.weighed = weighing(self.criterion, plain, parts.data_loader)
        self.epoch_metrics = [m.new(self.device, sync=run.dist.enabled) for m in self.metric_fns
                              if isinstance(m, EpochMetric)]
        self.train_metrics = MetricTracker(["loss", *(fn.__name__ for fn in self.batch_metric_fns)], self.device)
        self.metrics_state = None  # all processes' running sums, for the next mid-epoch checkpoint
        self.valid_metric_fns = self.metric_fns + list(parts.valid_metric_fns)  # what validation scores
        self.forward_model, self.scaler, self.task = parts.forward_model, parts.scaler, parts.task
        self.step = parts.task or default_step  # how a batch becomes the loss (a config's task: base/base_task.py)
        self.data_loader, self.valid_data_loader = parts.data_loader, parts.valid_data_loader
        self.len_epoch = cfg["len_epoch"]  # batches per epoch; None: one pass over the data
        self.val_batch_limit = None  # validation batches; None: all
        self.accumulate, self.max_steps = cfg["accumulate_grad_batches"], cfg["max_steps"]
        self.log_every = cfg["log_every_n_steps"]
        self.clip_norm, self.clip_norm_type = cfg["clip_grad_norm"], float(cfg["clip_grad_norm_type"])
        self.clip_value, self.skip_nonfinite = cfg["clip_grad_value"], cfg["skip_nonfinite"]
        self.check_loss = self.device.type == "cpu" or self.skip_nonfinite  # each step (see train_epoch)
        self.quiet = cfg["verbosity"] < 2 or not self.is_main  # (no progress bars)
        self.log_images = cfg["log_images"] and self.is_main and bool(self.writer)
        self.step_scheduler = self.lr_scheduler is not None and config["lr_scheduler"]["interval"] == "step"
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["amp"])
        self.autocast = torch.autocast(self.device.type, dtype=amp) if amp else contextlib.nullcontext()
        self.nonfinite_skips = 0
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]  # what is clipped
        self.last_log = (time.perf_counter(), 0)  # for steps per second at the logging interval
        self.hooks = hooks_for(config, parts, run)
        self.step_hooks = step_hooks(self.hooks)

    def fit_epoch(self, epoch, start_batch=0):
        """:meth:`train_epoch`; an error in it goes to the hooks (:meth:`Hook.on_train_error`), and one that
        can recover from it (a smaller batch after running out of memory) has the epoch redone from a batch."""
        self.epoch_started = time.perf_counter()  # (for the epoch's line)
        self.last_log = (self.epoch_started, self.global_step)
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
        Override it to change what a step does; what is around the step is a named call after it."""
        model, optimizer, batch = self.forward_model, self.optimizer, None
        model.train()
        for batch_idx, batch in self.batches(epoch, start_batch):  # on the device
            first, last, window = self.windows[batch_idx]  # where the batch is in its accumulation window
            if first:
                optimizer.zero_grad(set_to_none=True)
            # Under DDP, gradients are averaged over the processes on a window's last batch only.
            with model.no_sync() if self.distributed and not last else _NO_CONTEXT:
                with self.autocast:  # trainer.amp
                    loss, output, target = self.step(model, batch, self.criterion)  # forward, loss
                # Non-finite: stop, or skip (trainer.skip_nonfinite). Reading the loss back is free on the CPU
                # but a sync elsewhere: there it is checked at the logging interval (log_step) instead.
                skip = self.check_loss and not math.isfinite(loss.item()) and self.nonfinite(loss, epoch, batch_idx)
                if not skip:
                    scaled = loss / window if window > 1 else loss  # N batches of B step like one batch of N*B
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()  # fp16: through the scaler
                    self.track(loss, output, target)
            if not last:
                continue
            grad_norm = self.clip_gradients()
            self.optimizer_step()
            if self.step_scheduler:
                self.lr_scheduler.step()
            if self.after_step(epoch, batch_idx, loss, grad_norm):
                break
        return self.end_train_epoch(epoch, batch)

    def batches(self, epoch, start_batch):
        """``(batch_idx, batch)`` for the batches of ``epoch`` from ``start_batch``, on the device, behind
        the progress bar; and the epoch's accumulation windows (:attr:`windows`). With ``len_epoch``, they are cut
        from an endless stream of passes over the data."""
        if start_batch == 0:
            self.train_metrics.reset()
            for metric in self.epoch_metrics:
                metric.reset()
        n = self.len_epoch or len(self.data_loader)  # (batches_per_epoch())
        # (first, last, size) of the window of `accumulate` batches each batch is in (looked up per step): a window
        # starts every `accumulate` batches; the epoch's last may be shorter (it still steps).
        starts = [i - i % self.accumulate for i in range(n)]
        self.windows = [(i == start, i + 1 == min(start + self.accumulate, n), min(start + self.accumulate, n) - start)
                        for i, start in enumerate(starts)]
        if self.len_epoch is None:
            self.data_loader.set_epoch(epoch, start_batch)
            batches = iter(self.data_loader)
        else:
            from trainer.extras import endless

            batches = endless(self.data_loader, (epoch - 1) * self.len_epoch + start_batch, n - start_batch)
        self.bar = tqdm(batches, total=n, initial=start_batch, leave=False, desc=f"epoch {epoch}", dynamic_ncols=True,
                        disable=True if self.quiet else None, mininterval=0.5)  # redraws cost; twice a second will do
        batches = enumerate(self.bar, start_batch)
        if self.device.type != "cpu":  # (batches are made on the CPU)
            from trainer.extras import moved

            batches = moved(batches, self.device)
        return batches

    def no_sync(self, last_in_window):
        """Under DDP, a batch that is not its window's last skips the gradient all-reduce (as in the step)."""
        return self.forward_model.no_sync() if self.distributed and not last_in_window else _NO_CONTEXT

    def nonfinite(self, loss, epoch, batch_idx, since_last_log=False):
        """A non-finite loss: True to skip the batch (``trainer.skip_nonfinite``), or raises (trainer/extras.py)."""
        from trainer.extras import nonfinite_loss

        return nonfinite_loss(self, loss, epoch, batch_idx, since_last_log)

    def track(self, loss, output, target):
        """Add the batch to the epoch's running loss and metrics (on the device: no sync)."""
        values = [loss.detach()]
        for fn in self.batch_metric_fns:  # (a loop, not a generator: no call per metric beyond its own)
            values.append(fn(output, target))
        self.train_metrics.update(values, len(target), self.weighed and batch_weights(self.weighed, output, target))
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
            grads = [p.grad.detach() for p in self.params if p.grad is not None]
            norms = [torch.linalg.vector_norm(g, self.clip_norm_type) for g in grads] or [torch.tensor(0.0)]
            grad_norm = torch.linalg.vector_norm(torch.stack(norms), self.clip_norm_type)
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

    # ------------------------------------------------------------------ around the step

    def after_step(self, epoch, batch_idx, loss, grad_norm):
        """Count the step, log it, run the step's hooks; True when the epoch ends here (a stop, the end, max_steps)."""
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
        """The input images (``trainer.log_images``, first epoch), the hooks' ``after_train_epoch``, then the epoch's
        mean loss and metrics (a sync; under torchrun, over all processes)."""
        self.bar.close()
        inputs = None if last_batch is None else self.task.inputs(last_batch) if self.task else last_batch[:-1]
        images = inputs[0] if inputs and self.log_images and epoch == 1 else None
        if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] in (1, 3):
            self.writer.add_images("inputs", images[:16], self.global_step)
        for hook in self.hooks:
            hook.after_train_epoch(self, epoch, inputs)
        result = self.train_metrics.result(reduce=self.distributed)
        for metric in self.epoch_metrics:  # under torchrun a collective (torchmetrics' sync): every process computes
            result[metric.__name__] = metric.compute()
        return result

    def log_step(self, epoch, batch_idx, loss, grad_norm):
        # The only host-device sync of a training step, and only at the logging interval.
        value = loss.item()
        if not self.check_loss and not torch.isfinite(self.train_metrics.totals()).all():
            self.nonfinite(loss, epoch, batch_idx, since_last_log=True)
        if not self.is_main:
            return
        step, write = self.global_step, self.writer.add_scalar
        write("train/loss", value, step)
        if grad_norm is not None:
            write("train/grad_norm", float(grad_norm), step)
        for i, group in enumerate(self.optimizer.param_groups):
            write(f"lr/group{i}", group["lr"], step)
        if self.nonfinite_skips:
            write("train/nonfinite_skips", self.nonfinite_skips, step)
        now, (then, then_step) = time.perf_counter(), self.last_log
        if step > then_step and now > then:  # the loss was read above: the steps before it have finished
            steps_per_s = (step - then_step) / (now - then)
            samples = self.data_loader.batch_size * self.accumulate * self.world_size  # per step, all processes
            write("perf/steps_per_s", steps_per_s, step)
            write("perf/samples_per_s", steps_per_s * samples, step)
        self.last_log = (now, step)
        self.logger.debug(f"epoch {epoch} batch {batch_idx + 1}/{len(self.windows)} step {step} loss {value:.6f}")

    def batches_per_epoch(self):
        return self.len_epoch or len(self.data_loader)

    # ------------------------------------------------------------------ validation, logging, checkpoints

    def valid_epoch(self, epoch):
        if self.valid_data_loader is None:
            return {}
        # Under DDP, evaluate the plain module: the wrapper's forward broadcasts buffers, a collective that
        # would wait forever on a process whose validation shard has fewer batches.
        model = self.model if self.distributed else self.forward_model
        with contextlib.ExitStack() as stack:  # each hook's context (an EMA's averaged weights are scored)
            self.validating = True
            stack.callback(setattr, self, "validating", False)
            for hook in self.hooks:
                stack.enter_context(hook.validating(self))
            result = evaluate(model, self.valid_data_loader, self.criterion, self.valid_metric_fns, self.device,
                              self.autocast, reduce=self.distributed, progress=not self.quiet, desc=f"valid {epoch}",
                              max_batches=self.val_batch_limit, step=self.step)
        for hook in self.hooks:  # (a part's validation-only metric is taken out of the result here)
            hook.after_validation(self, epoch, result)
        return result

    def log_epoch(self, epoch, result, improved=False):
        """One line: the loss, the validation values (without validation: all values), the time, a new best; every
        value to the writer, and one a line to the log (to the console at verbosity 3)."""
        shown = [f"{k} {v:<8.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
                 if k == "loss" or k.startswith("val_") or "val_loss" not in result]
        took = time.perf_counter() - self.epoch_started
        self.logger.info(f"epoch {epoch:{len(str(self.epochs))}d}/{self.epochs}  {'  '.join(shown)}  {took:.1f} s"
                         + ("  -> model_best.pth" if improved else ""))
        for key, value in result.items():
            self.logger.debug(f"    {key:15s}: {value:.6g}" if isinstance(value, float) else f"    {key:15s}: {value}")
        if self.is_main:
            self.writer.add_scalars({**result, "epoch": epoch}, self.global_step, prefix="epoch/")
            if self.global_step % self.log_every:  # not already written by this step's log
                for i, group in enumerate(self.optimizer.param_groups):
                    self.writer.add_scalar(f"lr/group{i}", group["lr"], self.global_step)
            self.writer.flush()

    def before_checkpoint(self):
        from trainer.extras import gather_running_sums

        self.metrics_state = gather_running_sums(self)  # for extra_state

    def extra_state(self):
        metrics_state, self.metrics_state = self.metrics_state, None
        return {"scaler": self.scaler.state_dict() if self.scaler else None, "frozen": [], "unfrozen": False,
                "nonfinite_skips": self.nonfinite_skips, "train_metrics": self.train_metrics.state_dict(),
                **(metrics_state or {})}

    def load_extra_state(self, state):
        from trainer.extras import load_trainer_state

        super().load_extra_state(state)
        load_trainer_state(self, state)


_NO_CONTEXT = contextlib.nullcontext()  # reusable: entering it does nothing


# ---------------------------------------------------------------------- metric sums


class MetricTracker:
    """Accumulates ``value * weight`` and ``weight`` for each name; :meth:`result` divides the one by the other.
    The sums stay on the device: :meth:`update` never forces a host-device sync, :meth:`result` reads them back."""

    def __init__(self, names, device):
        self.names = list(names)
        self.dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64  # (MPS has no float64)
        self.sums = torch.zeros(len(self.names), dtype=self.dtype, device=device)
        self.weight_sums = torch.zeros(len(self.names), dtype=self.dtype, device=device)
        self.reset()

    def reset(self):
        self.sums.zero_()
        self.weight_sums.zero_()
        self.count = 0
        self._values, self._sizes, self._weights = [], [], []  # batches queued, not yet in the sums

    def update(self, values, n, weights=None):
        """Add one batch: ``values``, 0-d tensors in the order of ``names``; ``n``, its sample count; ``weights``,
        None (all weighted by ``n``) or per value None or a 0-d tensor of what it averages over (a value of weight 0
        adds nothing, even NaN). It runs every step, so it only queues the tensors (a few tiny tensor ops per step
        would cost a small model a few percent): they are summed in one go when read, and every 512 batches."""
        if weights is not None:
            row = len(self._sizes)
            self._weights += [(row, i, w) for i, w in enumerate(weights) if w is not None]
        self._values += values
        self._sizes.append(n)
        self.count += n
        if len(self._sizes) >= 512:
            self.totals()

    def totals(self):
        """The weighted sums so far (a tensor on the device), the queue added in."""
        if self._sizes:
            values = torch.stack(self._values).to(self.dtype).view(len(self._sizes), len(self.names))
            sizes = torch.tensor(self._sizes, dtype=self.dtype, device=values.device)
            if not self._weights:  # the usual case: every value weighted by its batch's sample count
                self.sums += (values * sizes[:, None]).sum(0)
                self.weight_sums += sizes.sum()
            else:
                weights = sizes[:, None].repeat(1, len(self.names))
                rows, cols, given = zip(*self._weights)
                weights[list(rows), list(cols)] = torch.stack(given).to(device=values.device, dtype=self.dtype)
                self.sums += torch.where(weights > 0, values * weights, 0).sum(0)
                self.weight_sums += weights.sum(0)
            self._values, self._sizes, self._weights = [], [], []
        return self.sums

    def result(self, reduce=False):
        """The weighted mean of each name over all batches seen; ``reduce=True`` sums over processes first."""
        sums, weights = self.totals(), self.weight_sums
        if reduce:
            both = torch.cat([sums, weights])
            torch.distributed.all_reduce(both)
            sums, weights = both.split(len(self.names))
        return dict(zip(self.names, (sums / torch.where(weights > 0, weights, 1)).tolist()))

    def state_dict(self, reduce=False):
        """The sums, their weights and the count, on the CPU; ``reduce=True`` (a collective) sums all processes'."""
        sums, weights, count = self.totals().detach(), self.weight_sums.detach(), self.count
        if reduce:
            n, all_ = len(self.names), torch.cat([sums, weights, sums.new_tensor([float(count)])])
            torch.distributed.all_reduce(all_)
            sums, weights, count = all_[:n], all_[n:2 * n], int(all_[-1].item())
        return {"sums": sums.cpu(), "weights": weights.cpu(), "count": count}

    def load_state_dict(self, state):
        self._values, self._sizes, self._weights = [], [], []
        self.sums.copy_(state["sums"])
        # Checkpoints from before per-value weights: every value was weighted by the sample count.
        self.weight_sums.copy_(state.get("weights", torch.full_like(self.weight_sums, state["count"])))
        self.count = state["count"]


def weighing(criterion, metric_fns, loader):
    """``(metric_fns, weighed)``: the per-batch metrics as a loop should call them, and the functions whose weights
    it must ask of each batch (:func:`batch_weights`; None: the sample count is every weight). Counting is needed
    only where a function that weighs itself has a class ``weight``, or the data may hold its ``ignore_index``
    (``loader.holds_target``, asked once); elsewhere a built-in metric runs as its variant that counts nothing."""
    holds = getattr(loader, "holds_target", None)
    fast, needed = [], False
    for fn in [criterion, *metric_fns]:
        name, weigh, kwargs = _weighs(fn)
        kept = weigh is None or (kwargs.get("weight") is None and holds is not None
                                 and holds(kwargs.get("ignore_index", -100)) is False)
        needed = needed or not kept
        if fn is not criterion:
            fast.append(_ALL_KEPT.get(name, fn) if kept and not hasattr(fn, "keywords") else fn)
    return fast, [criterion, *fast] if needed else None


def batch_weights(fns, output, target):
    """What each of ``fns`` (the loss, then the metrics) averages over in this batch, for :meth:`MetricTracker.update`:
    a 0-d tensor for a function that weighs itself, else None (the sample count); None when every one is."""
    weights = []
    for fn in fns:
        _, weigh, kwargs = _weighs(fn)
        weights.append(weigh(output, target, **kwargs) if weigh is not None else None)
    return weights if any(w is not None for w in weights) else None


def _weighs(fn):
    """``(name, weigh, kwargs)`` of a loss or metric (or a ``functools.partial`` of one): its qualified name, what its
    batch value averages over as a function of ``(output, target, **kwargs)`` (None: the samples; a loss says it
    itself, model/loss.py; the built-in metrics are known by name), and the keyword arguments bound."""
    func, kwargs = (fn.func, fn.keywords) if hasattr(fn, "func") and hasattr(fn, "keywords") else (fn, {})
    name = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', '')}"
    return name, getattr(func, "averages_over", None) or _AVERAGES_OVER.get(name), kwargs


def _kept_targets(output, target, ignore_index=-100, **_):
    return (target != ignore_index).sum()


def _accuracy_all_kept(output, target):
    return (output.argmax(dim=1) == target).sum() / target.numel()


def _top_k_acc_all_kept(output, target, k=3):
    top = output.topk(min(k, output.shape[1]), dim=1).indices
    return (top == target.unsqueeze(1)).any(dim=1).sum() / target.numel()


# model/metric.py's accuracy and top-k leave targets equal to ignore_index out; on data holding none, the variants
# above give the same values with fewer tensor operations, logged under the same names.
_accuracy_all_kept.__name__, _top_k_acc_all_kept.__name__ = "accuracy", "top_k_acc"
_AVERAGES_OVER = {"model.metric.accuracy": _kept_targets, "model.metric.top_k_acc": _kept_targets}
_ALL_KEPT = {"model.metric.accuracy": _accuracy_all_kept, "model.metric.top_k_acc": _top_k_acc_all_kept}


class EpochMetric:
    """A metric whose epoch value is no mean of batch values (a macro F1): it keeps state over the epoch.

    A part provides the spec, named by ``__name__``; each loop makes an accumulator with ``new(device, sync=True,
    check_inputs=False)`` (``sync``: combine all processes' states). An accumulator has ``update(output, target)``,
    ``compute()`` (a float), ``reset()``, ``state_dict(reduce=False)`` and ``load_state_dict(state, own=True)``
    (``own=False``: start empty; returns False for another metric's state): what an exact resume needs.
    """

    def mark(self):
        """A snapshot for :meth:`rollback` (``trainer.auto_accumulate`` redoing a window of batches)."""
        return self.state_dict()

    def rollback(self, mark):
        """Return to the state of :meth:`mark`: the batches added since are forgotten."""
        self.load_state_dict(mark)
