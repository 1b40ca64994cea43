"""torchmetrics classes by name in ``metrics``, each computed over the whole epoch and resumed exactly mid-epoch.

A part (utils/parts.py): delete this file and tests/parts/test_torchmetrics*.py, and configs naming
only built-in metrics train as before. In a config, beside the built-in names::

    "metrics": ["accuracy",
                {"type": "torchmetrics.classification.MulticlassF1Score", "args": {"num_classes": 10, "average": "macro"}},
                {"type": "torchmetrics.classification.MulticlassAUROC", "args": {"num_classes": 10}, "name": "auroc"}]

Promises:

* torchmetrics is imported only when a config names one of its classes (importing it takes seconds).
* The class name and its ``args`` are checked with the config: an unknown class is one line with a
  did-you-mean from torchmetrics' own classes, and values the class refuses show there too.
* The value is the epoch's, not a mean of batch values: each metric is a
  :class:`trainer.trainer.EpochMetric`, updated per batch on the device, computed at the
  epoch's end; under torchrun the states of all processes are combined first (torchmetrics' own sync).
* A mid-epoch checkpoint holds every process's state, so a resume (under any world size) ends the
  epoch with the value of the run left alone; a state of another class or other args is not loaded.
* A model output of shape ``(N, 1)`` is scored against targets of shape ``(N,)`` (one regression
  output, one binary logit): the trailing 1 is dropped, as ``mse_loss`` does.
* ``args.target_stats`` (``{"mean": m, "std": s}``; parts/tables.py sets it for a regression run
  whose target it standardised) maps outputs and targets back to the target's units
  (``x * std + mean``) before each update, so MAE, RMSE and R² read in those units.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re

from utils.config import ConfigError, did_you_mean
from trainer.trainer import EpochMetric

PREFIX = "torchmetrics."
# Arguments of torchmetrics' base class a config may give (the rest are about syncing, which the trainer owns).
BASE_ARGS = {"compute_on_cpu": False, "compute_with_cache": True}
OWN_ARGS = {"target_stats": None}  # ours, not the class's: see the module's docstring


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


def metric(name):
    """The builder of the torchmetrics class ``name`` (``torchmetrics.<module>.<Class>``), for
    :func:`utils.parts.provider`.

    The builder takes the class's own arguments and those of :data:`BASE_ARGS`; its signature says so,
    so the config check binds ``args`` against it like any other constructor's. It returns the
    :class:`TorchMetric` spec.

    Raises:
        ConfigError: no such class (with a did-you-mean from torchmetrics' own), or torchmetrics is missing.
    """
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
    base += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d) for n, d in OWN_ARGS.items()]

    def build(**args):
        return TorchMetric(name, cls, args)

    build.__signature__ = inspect.Signature(own + base)
    build.__name__ = build.__qualname__ = cls.__name__
    return build


# --------------------------------------------------------------------------- a torchmetrics metric in the loop


class TorchMetric(EpochMetric):
    """A torchmetrics metric as the loop uses it: a spec (``metric`` None) or, from :meth:`new`, an accumulator.

    Args:
        dotted: the class's name in the config (``torchmetrics.classification.MulticlassF1Score``).
        cls: the class.
        args: the config's ``args`` (plus the loss's ``ignore_index``, see :func:`trainer.build.build_metrics`).
    """

    def __init__(self, dotted, cls, args, device=None, sync=True, check_inputs=False):
        self.__name__ = snake_case(cls.__name__)  # build_metrics gives it the config's name
        self.dotted, self.cls, self.args = dotted, cls, dict(args)
        self.metric = None
        self.target_stats = self.args.get("target_stats")
        own = {k: v for k, v in self.args.items() if k not in OWN_ARGS}
        if device is None:
            stats = self.target_stats
            if stats is not None and not (isinstance(stats, dict) and set(stats) == {"mean", "std"} and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in stats.values()) and stats["std"] > 0):
                raise ValueError(f'target_stats: expected {{"mean": m, "std": s}} with s > 0, got {stats!r}')
            cls(**own)  # built once, so that values the class refuses (average="macr") show with the config
            return
        extra = {} if sync else {"sync_on_compute": False}  # where only this process computes (test.py, ...)
        # torchmetrics checks every update's inputs (target values in range, ...), which reads values back
        # from the device: a sync per step on a GPU. The dry batch before the run checks them once
        # (check_inputs=True); the loop's own metrics skip it, unless the config sets validate_args.
        if not check_inputs and "validate_args" in inspect.signature(cls).parameters and "validate_args" not in args:
            extra["validate_args"] = False
        self.metric = cls(**own, **extra).to(device)

    def new(self, device, sync=True, check_inputs=False):
        fresh = TorchMetric(self.dotted, self.cls, self.args, device, sync, check_inputs)
        fresh.__name__ = self.__name__
        return fresh

    def update(self, output, target):
        output = output.detach()
        if output.dtype.is_floating_point and output.dtype.itemsize < 4:  # bf16/fp16 under autocast
            output = output.float()
        if output.dim() == target.dim() + 1 and output.shape[-1] == 1:  # (N, 1) against (N,)
            output = output.squeeze(-1)
        if self.target_stats is not None:  # back to the target's units
            mean, std = self.target_stats["mean"], self.target_stats["std"]
            output, target = output * std + mean, target * std + mean
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
        return [self.dotted, {k: self.args[k] for k in sorted(self.args)}]

    def _fits(self, state):
        """Whether ``state`` (from :meth:`state_dict`) is this metric's: the same spec, each state's shape and type."""
        import torch

        if state.get("spec", self.spec()) != self.spec():  # (checkpoints from before specs were kept: no spec)
            return False
        for attr, default in self.metric._defaults.items():
            saved = state["states"].get(attr)
            if isinstance(default, list):
                if not isinstance(saved, list):
                    return False
            elif not (isinstance(saved, torch.Tensor) and saved.shape == default.shape and saved.dtype == default.dtype):
                return False
        return True

    def load_state_dict(self, state, own=True):
        """Continue from ``state``; with ``own=False`` start empty, but with list states of the saved dtype and
        shape (an empty slice of each): a process whose share comes back empty then still gathers with the others
        (torchmetrics' stand-in for an empty list state is a 1-d float tensor, which matches no other process's
        scores). Returns False for the state of another metric, or of other arguments."""
        if not self._fits(state):
            return False
        self.metric.reset()
        device = self.metric.device
        for attr, value in state["states"].items():
            if own:
                value = [v.to(device) for v in value] if isinstance(value, list) else value.to(device)
                setattr(self.metric, attr, value)
            elif isinstance(value, list) and value:
                setattr(self.metric, attr, [value[0][:0].to(device)])
        if own:
            self.metric._update_count = state["updates"]
            self.metric._computed = None
        return True

    def mark(self):
        """A snapshot for :meth:`rollback` (``trainer.auto_accumulate``): list lengths, copies of tensor states
        (not :meth:`state_dict`, which copies every score of the epoch at every optimizer step)."""
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
