"""Metrics that keep state over an epoch: torchmetrics classes by name, and the confusion matrix.

The built-in metrics of ``model/metric.py`` are a batch mean each, weighted and summed by the
trainer. A macro F1 score or an AUROC is not a mean of per-batch values: it needs counts or
scores gathered over the whole epoch. Such a metric is an object with state:

* ``update(output, target)`` once per batch (on the device, on detached outputs);
* ``compute()`` once at the epoch's end; under torchrun every process calls it, and the states
  of all processes are combined first (torchmetrics' own sync, a collective);
* ``reset()`` at the start of each epoch; ``state_dict(reduce)`` / ``load_state_dict(state)`` for
  mid-epoch checkpoints, so a resumed epoch ends with the value of the uninterrupted one.

A config names one as ``{"type": "torchmetrics.classification.MulticlassF1Score", "args": {...}}``
(``"name"`` sets its short name, by default the class name in snake case). torchmetrics is imported
only when a config names it: importing it takes seconds.

What ``build_metrics`` returns for such an entry is a *spec* (:class:`TorchMetric` without a
metric inside): ``spec.new(device, sync)`` makes the object that accumulates. The trainer makes
one for training and ``evaluate`` a fresh one for each evaluation, so the two never mix.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re

from utils.config import ConfigError, did_you_mean

PREFIX = "torchmetrics."
# Arguments of torchmetrics' base class a config may give (the rest are about syncing, which the trainer owns).
BASE_ARGS = {"compute_on_cpu": False, "compute_with_cache": True}
CONFUSION_NAME = "confusion_matrix"


def snake_case(name):
    """``MulticlassF1Score`` -> ``multiclass_f1_score``, ``BinaryAUROC`` -> ``binary_auroc``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


# --------------------------------------------------------------------------- names -> classes


def _import_torchmetrics(name):
    try:
        import torchmetrics
    except ImportError:
        raise ConfigError(f"metrics: {name!r} needs the package torchmetrics: pip install torchmetrics") from None
    return torchmetrics


def known_classes():
    """Every metric class torchmetrics offers by a dotted name: ``torchmetrics.NAME`` and
    ``torchmetrics.<module>.NAME`` for the modules ``import torchmetrics`` loads."""
    torchmetrics = _import_torchmetrics("torchmetrics")
    found = {}
    modules = [("", torchmetrics)] + [(f"{n}.", m) for n, m in vars(torchmetrics).items()
                                      if inspect.ismodule(m) and m.__name__.startswith("torchmetrics.")]
    for prefix, module in modules:
        for attr, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, torchmetrics.Metric) and not attr.startswith("_"):
                found[f"{PREFIX}{prefix}{attr}"] = obj
    return found


def torchmetrics_metric(name):
    """The builder of the torchmetrics class ``name`` (for :class:`utils.config.Registry`'s ``extra``), or None
    for names that do not start with ``torchmetrics.``.

    The builder takes the class's own arguments and those of :data:`BASE_ARGS`; its signature says so,
    so the config check binds ``args`` against it like any other constructor's.

    Raises:
        ConfigError: no such class (with a did-you-mean from torchmetrics' own), or torchmetrics is missing.
    """
    if not isinstance(name, str) or not name.startswith(PREFIX):
        return None
    torchmetrics = _import_torchmetrics(name)
    module_name, _, attr = name.rpartition(".")
    cls = None
    if all(part.isidentifier() for part in name.split(".")):
        try:
            cls = getattr(importlib.import_module(module_name), attr, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, torchmetrics.Metric)):
        known = known_classes()
        hint = did_you_mean(name, known)
        if not hint:  # the class name alone, wherever the module path went wrong
            by_class = {}
            for dotted in known:
                by_class.setdefault(dotted.rsplit(".", 1)[1], dotted)
            close = difflib.get_close_matches(attr, list(by_class), n=1, cutoff=0.6)
            hint = f"; did you mean {by_class[close[0]]!r}?" if close else ""
        raise ConfigError(f"metrics: unknown torchmetrics metric {name!r}{hint} (torchmetrics has {len(known)}, e.g."
                          " torchmetrics.classification.MulticlassF1Score)")
    return _builder(name, cls)


def _builder(name, cls):
    own = [p for n, p in inspect.signature(cls).parameters.items()
           if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    base = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=bool) for n, d in BASE_ARGS.items()
            if n not in {p.name for p in own}]

    def build(**args):
        return cls(**args)

    build.__signature__ = inspect.Signature(own + base)
    build.__name__ = build.__qualname__ = cls.__name__
    build.metric_class = cls
    build.dotted_name = name
    return build


# --------------------------------------------------------------------------- a torchmetrics metric in the loop


class TorchMetric:
    """A torchmetrics metric as the trainer uses it: a spec (``metric`` None) or, from :meth:`new`, an accumulator.

    Args:
        name: the short name the epoch's results use (``val_<name>`` for validation).
        build: the builder :func:`torchmetrics_metric` returned.
        args: the config's ``args`` (plus ``ignore_index``, see :func:`trainer.build.build_metrics`).
    """

    stateful = True  # evaluate() and the trainer tell these from the per-batch functions by this

    def __init__(self, name, build, args, device=None, sync=True, check_inputs=False):
        self.__name__ = name
        self._build, self._args = build, dict(args)
        self.metric = None
        if device is not None:
            extra = {} if sync else {"sync_on_compute": False}  # where only this process computes (test.py, ...)
            # torchmetrics checks every update's inputs (target values in range, ...), which reads values back
            # from the device: a sync per step on a GPU. The dry batch before the run checks them once
            # (check_inputs=True); the loop's own metrics skip it, unless the config sets validate_args.
            if not check_inputs and "validate_args" in inspect.signature(build).parameters and "validate_args" not in args:
                extra["validate_args"] = False
            self.metric = build(**self._args, **extra).to(device)

    def new(self, device, sync=True, check_inputs=False):
        """A fresh accumulator on ``device``; ``sync``: whether compute() combines all processes' states;
        ``check_inputs``: torchmetrics' per-update input checks (off in the loop: see ``__init__``)."""
        return TorchMetric(self.__name__, self._build, self._args, device, sync, check_inputs)

    def update(self, output, target):
        output = output.detach()
        if output.dtype.is_floating_point and output.dtype.itemsize < 4:  # bf16/fp16 under autocast
            output = output.float()
        self.metric.update(output, target)

    def compute(self):
        """The epoch's value as a float (a collective under torchrun: every process must call it)."""
        import torch

        value = self.metric.compute()
        if not isinstance(value, torch.Tensor):  # a curve (ROC: a tuple), a dict of values
            raise ValueError(f"{self.__name__} computes a {type(value).__name__}, not one number; name a metric"
                             " that gives one value per epoch")
        if value.numel() != 1:
            raise ValueError(f"{self.__name__} computes {tuple(value.shape)} values, not one number"
                             ' (an average of "none"?)')
        return float(value)

    def reset(self):
        self.metric.reset()

    def state_dict(self, reduce=False):
        """The running state (on the CPU); ``reduce=True`` (a collective) gathers every process's state first.

        List states (the scores an AUROC keeps) are saved concatenated, as one tensor in a list.
        """
        from torchmetrics.utilities.data import dim_zero_cat

        with self.metric.sync_context(should_sync=reduce, should_unsync=True):
            states = {}
            for attr, default in self.metric._defaults.items():
                value = getattr(self.metric, attr)
                if isinstance(default, list):
                    value = [dim_zero_cat(value).to("cpu", copy=True)] if len(value) else []
                else:
                    value = value.to("cpu", copy=True)
                states[attr] = value
        return {"spec": self.spec(), "states": states, "updates": int(self.metric.update_count)}

    def spec(self):
        """What the state means: the metric's class and arguments (a resume with other ones must not load it)."""
        return [self._build.dotted_name, {k: self._args[k] for k in sorted(self._args)}]

    def fits(self, state):
        """Whether ``state`` (from :meth:`state_dict`) is this metric's: the same spec, each state's shape and type."""
        import torch

        if state.get("spec", self.spec()) != self.spec():
            return False
        for attr, default in self.metric._defaults.items():
            saved = state["states"].get(attr)
            if isinstance(default, list):
                if not isinstance(saved, list):
                    return False
            elif not (isinstance(saved, torch.Tensor) and saved.shape == default.shape and saved.dtype == default.dtype):
                return False
        return True

    def load_empty_like(self, state):
        """Start empty, but with list states of the saved dtype and shape (an empty slice of each): a process
        whose share comes back empty then still gathers with the others (torchmetrics' stand-in for an empty
        list state is a 1-d float tensor, which matches no other process's scores)."""
        self.metric.reset()
        for attr, value in state["states"].items():
            if isinstance(value, list) and value:
                setattr(self.metric, attr, [value[0][:0].to(self.metric.device)])

    def load_state_dict(self, state):
        device = self.metric.device
        for attr, value in state["states"].items():
            value = [v.to(device) for v in value] if isinstance(value, list) else value.to(device)
            setattr(self.metric, attr, value)
        self.metric._update_count = state["updates"]
        self.metric._computed = None

    def mark(self):
        """A snapshot for :meth:`rollback` (``trainer.auto_accumulate``): list lengths, copies of tensor states."""
        return self.metric.update_count, {attr: len(v) if isinstance(v, list) else v.clone()
                                          for attr, v in self.metric.metric_state.items()}

    def rollback(self, mark):
        count, states = mark
        for attr, saved in states.items():
            if isinstance(saved, int):
                setattr(self.metric, attr, getattr(self.metric, attr)[:saved])
            else:
                getattr(self.metric, attr).copy_(saved)
        self.metric._update_count = count
        self.metric._computed = None


# --------------------------------------------------------------------------- the confusion matrix


class ConfusionMatrix:
    """Counts of (true class, predicted class) over an epoch: ``trainer.confusion_matrix``.

    Rows are the targets, columns the argmax of the outputs; targets equal to ``ignore_index``
    are left out. The same spec / :meth:`new` pattern as :class:`TorchMetric`; :meth:`compute`
    returns the matrix (a CPU int64 tensor), summed over all processes under torchrun.
    """

    stateful = True

    def __init__(self, ignore_index=-100, device=None, sync=True):
        self.__name__ = CONFUSION_NAME  # the key evaluate() returns the matrix under
        self.ignore_index, self.device, self.sync = ignore_index, device, sync
        self.counts = None  # (C, C), made at the first batch: C is the output's number of classes

    def new(self, device, sync=True):
        return ConfusionMatrix(self.ignore_index, device, sync)

    def update(self, output, target):
        import torch

        n = output.shape[1]
        kept = target != self.ignore_index
        pairs = target[kept] * n + output.detach().argmax(1)[kept]
        counts = torch.bincount(pairs, minlength=n * n)[: n * n].view(n, n)
        self.counts = counts if self.counts is None else self.counts + counts

    def compute(self):
        import torch

        counts = self.counts if self.counts is not None else torch.zeros(0, 0, dtype=torch.int64, device=self.device)
        if self.sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            # A process whose shard held no batch has no matrix yet: agree on the size, then sum.
            size = torch.tensor([counts.shape[0]], device=counts.device)
            torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MAX)
            n = int(size)
            counts = torch.nn.functional.pad(counts, (0, n - counts.shape[0], 0, n - counts.shape[0]))
            torch.distributed.all_reduce(counts)
        return counts.cpu()

    def reset(self):
        self.counts = None


def confusion_image(counts, class_names=None, cell=28):
    """The confusion matrix as an RGB image tensor ``(3, H, W)`` in [0, 1], drawn with PIL (no matplotlib).

    Each cell shows its count; its shade is the count's share of its row (the recall of that
    class on the diagonal). Rows (true class) are labelled on the left, columns (predicted) on
    top, with ``class_names`` or the class indices.
    """
    import numpy as np
    import torch
    from PIL import Image, ImageDraw, ImageFont

    counts = counts.to(torch.int64).cpu()
    n = counts.shape[0]
    names = [str(c) for c in (class_names if class_names and len(class_names) == n else range(n))]
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text):
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    label = max([text_size(name)[0] for name in names] + [4]) + 8  # room for the longest name
    width = height = label + n * cell + 4
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    shares = counts.double() / counts.sum(1, keepdim=True).clamp(min=1)
    for row in range(n):
        for col in range(n):
            x, y = label + col * cell, label + row * cell
            shade = int(255 * (1 - 0.85 * float(shares[row, col])))  # white (none) to dark blue (all of the row)
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255), outline=(200, 200, 200))
            text = str(int(counts[row, col]))
            w, h = text_size(text)
            draw.text((x + (cell - w) / 2, y + (cell - h) / 2), text, font=font,
                      fill="white" if shade < 128 else "black")
    for i, name in enumerate(names):
        w, h = text_size(name)
        draw.text((label - w - 4, label + i * cell + (cell - h) / 2), name, font=font, fill="black")  # rows
        column = Image.new("RGB", (w + 2, h + 4), "white")  # columns: the name turned upwards
        ImageDraw.Draw(column).text((1, 0), name, font=font, fill="black")
        column = column.rotate(90, expand=True)
        image.paste(column, (label + i * cell + (cell - column.width) // 2, label - column.height - 4))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return pixels.permute(2, 0, 1).contiguous()
