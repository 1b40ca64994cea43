"""A task: how a batch becomes a loss, when the default step (a batch of ``(inputs..., target)``, ``model(*inputs)``,
``criterion(output, target)``) does not fit. Imported only by a run whose config names a ``task``.

Write a subclass in a file of your own and name it in the config; its arguments come from ``args``::

    "task": {"type": "examples.two_inputs:TwoInputTask", "args": {"loss_weights": {"label": 1.0, "image": 0.5}}}

The Trainer calls the task where it would call the default step, for training, validation and ``test.py``
alike, so a batch of any structure (a tuple of several inputs, a dict of tensors, per-sample lists of dicts) and
a model of any signature train with everything the core keeps right around the step: moving batches to the
device, accumulation, AMP, torchrun, exact resume mid-epoch. A step returning a dict of named losses has their
weighted sum backpropagated, and each logged and averaged per epoch as ``loss_<name>`` (``val_loss_<name>``).

Contract (each method optional):

- ``step(model, batch, criterion) -> (loss, output, target)``: ``loss`` a 0-d tensor, or a dict of them named
  in ``loss_weights``; ``output`` and ``target`` are what the config's ``metrics`` receive, ``len(target)`` the
  batch's sample count (a tensor's first dimension, a list's length) that the epoch's means weigh it by.
- ``inputs(batch) -> tuple``: what ``model(*inputs)`` takes (predict.py, export.py, the logged images).
- ``hooks(config, parts, run) -> [Hook]``: behaviour at moments of the run (base/base_hook.py), such as a text
  sample written to the log after each epoch.
- ``load_input(path) -> tensor`` and ``write_prediction(output, stem) -> path`` (both, or neither; not on this
  class): predict.py then reads each input file with the first (one sample's model input, no batch dimension;
  OSError or ValueError: the file is reported and skipped) and gives the second each sample's output, which it
  writes as a file named ``stem`` plus its own suffix (``-o FOLDER``/the input's stem), such as a mask image.
"""

import torch

from utils.errors import UserError


class Task:
    """The default step's behaviour, to override in part. ``loss_weights``: ``{name: weight}`` for a step that
    returns several named losses (None: it returns one tensor); a config's ``task.args.loss_weights`` replaces a
    class's own."""

    loss_weights = None

    def __init__(self, loss_weights=None):
        if loss_weights is not None:
            self.loss_weights = loss_weights
        if self.loss_weights is not None and (not isinstance(self.loss_weights, dict) or not self.loss_weights or any(
                not isinstance(k, str) or isinstance(w, bool) or not isinstance(w, (int, float))
                for k, w in self.loss_weights.items())):
            raise UserError(f"task.args.loss_weights: got {self.loss_weights!r}, expected a mapping of loss names to"
                            ' numbers, such as {"label": 1.0, "image": 0.5}')
        self.last_losses = {}  # the last step's named losses, detached (read by the loss_<name> metrics)

    def step(self, model, batch, criterion):
        *inputs, target = batch
        output = model(*inputs)
        return criterion(output, target), output, target

    def inputs(self, batch):
        return tuple(batch[:-1])

    def hooks(self, config, parts, run):
        return []

    def __call__(self, model, batch, criterion):
        """The step as the Trainer calls it: a dict of losses becomes their weighted sum, each kept for its metric."""
        loss, output, target = self.step(model, batch, criterion)
        if isinstance(loss, dict):
            self.last_losses = {name: value.detach() for name, value in loss.items()}
            loss = sum(self.loss_weights[name] * value for name, value in loss.items())
        return loss, output, target

    def loss_metrics(self):
        """One per-batch metric per named loss, ``loss_<name>``: the value of the step just taken."""
        return [_NamedLoss(self, name) for name in self.loss_weights or ()]


def to_device(batch, device):
    """``batch`` with every tensor in it moved to ``device``: a tensor, or tuples, lists and dicts of them at any depth
    (a dict of tensors, a list of per-sample dicts); anything else (strings, numbers) as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return type(batch)((key, to_device(value, device)) for key, value in batch.items())
    if isinstance(batch, (list, tuple)):
        moved_items = [to_device(item, device) for item in batch]
        return type(batch)(*moved_items) if hasattr(batch, "_fields") else type(batch)(moved_items)  # namedtuple
    return batch


class _NamedLoss:
    """A metric reading one named loss of the task's last step (called right after it, like every metric)."""

    def __init__(self, task, name):
        self.task, self.name, self.__name__ = task, name, f"loss_{name}"

    def __call__(self, output, target):
        return self.task.last_losses[self.name]


def check_task_batch(config, parts, batch, autocast):
    """The dry batch of a run with a ``task`` (or with batches the default step cannot take): one step in eval mode,
    without gradients, checked: a one-line UserError names what does not fit."""
    task, where = parts.task, config["task"]["type"] if config.get("task") else None
    if task is None:
        kind = type(batch).__name__
        kind += f" of {len(batch)}" if isinstance(batch, (list, tuple)) else ""
        raise UserError(f"data_loader: its batches are a {kind}, but the default step takes (inputs..., target);"
                        ' name a task that reads them in the config ("task": {"type": "my_module:MyTask"},'
                        " base/base_task.py)")
    batch = to_device(batch, parts.device)
    with torch.no_grad(), autocast:
        try:
            loss, output, target = task.step(parts.model, batch, parts.criterion)
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as err:
            raise UserError(f"task: {where}.step failed on the first batch: {type(err).__name__}: {err}") from None
        named = task.loss_weights or {}
        if isinstance(loss, dict):
            if set(loss) != set(named):
                raise UserError(f"task: {where}.step returned the losses {sorted(loss)}, but its loss_weights name"
                                f" {sorted(named)}; give each loss a weight (task.args.loss_weights)")
            losses = loss
        elif named:
            raise UserError(f"task: {where} has loss_weights {sorted(named)}, but its step returned one loss, not a"
                            " dict of them")
        else:
            losses = {"loss": loss}
        for name, value in losses.items():
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                raise UserError(f"task: {where}.step returned loss {name!r} as {_shape(value)}; a loss is a 0-d tensor"
                                " (average it over the batch)")
        try:
            len(target)
        except TypeError:
            raise UserError(f"task: {where}.step returned a target of type {type(target).__name__}; it must have a"
                            " length, the batch's sample count (a tensor, or a list)") from None
        for metric in [*parts.metric_fns, *parts.valid_metric_fns]:
            if isinstance(metric, _NamedLoss):
                continue
            try:
                if hasattr(metric, "new"):  # an epoch metric (a part's)
                    probe = metric.new(parts.device, sync=False, check_inputs=True)
                    probe.update(output, target)
                else:
                    metric(output, target)
            except (RuntimeError, ValueError, TypeError, IndexError) as err:
                name = getattr(metric, "__name__", type(metric).__name__)
                raise UserError(f"metrics: {name} cannot take what {where}.step returns (output {_shape(output)},"
                                f" target {_shape(target)}): {type(err).__name__}: {err}") from None


def _shape(value):
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"
