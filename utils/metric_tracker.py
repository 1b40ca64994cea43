"""Weighted sums of the loss and the metrics, kept on the device; and the few methods of a metric kept over an epoch.

Each batch's value is weighted by what it averages over: its sample count, unless the
update says otherwise for that value (a loss averaging over the kept targets only, under
``ignore_index`` or class ``weight``; an accuracy leaving ignored targets out). An epoch's
value is then the mean over everything the batch values averaged over, whatever the
batches' sizes. A value that is no such mean (a macro F1) is an :class:`EpochMetric`'s.
"""

import torch


class MetricTracker:
    """Accumulates ``value * weight`` and ``weight`` for each name; :meth:`result` divides the one by the other.

    The weight is the batch's sample count, or the value's own weight given to :meth:`update`.

    The sums stay on the device, so :meth:`update` never forces a host-device sync;
    :meth:`result` reads them back (and, under ``torch.distributed``, sums them over
    all processes first, so every process gets the numbers of the whole dataset).
    """

    def __init__(self, names, device):
        self.names = list(names)
        # float64 keeps long sums exact enough; MPS has no float64.
        self.dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        self.sums = torch.zeros(len(self.names), dtype=self.dtype, device=device)
        self.weight_sums = torch.zeros(len(self.names), dtype=self.dtype, device=device)
        self.count = 0
        self._values, self._sizes = [], []  # batches not yet added to the sums
        self._weights = []  # (row in the queue, index of the name, weight tensor) of values not weighted by n

    def reset(self):
        self.sums.zero_()
        self.weight_sums.zero_()
        self.count = 0
        self._values, self._sizes, self._weights = [], [], []

    def update(self, values, n, weights=None):
        """Add one batch: ``values`` are 0-d tensors in the order of ``names``, ``n`` the batch's sample count.

        ``weights``, when given, holds one entry per value: None (weighted by ``n``) or a 0-d tensor,
        what that value averages over in this batch (e.g. the count of targets not ignored). A value
        of weight 0 adds nothing, even when it is NaN (a mean over no targets).

        This runs every step, so it only queues the tensors: a handful of tiny tensor ops
        per step would cost a few percent of a small model's step time. They are summed, in
        one go, when read (and every few hundred batches, to bound the queue).
        """
        if weights is not None:
            row = len(self._sizes)
            self._weights += [(row, i, w) for i, w in enumerate(weights) if w is not None]
        self._values += values
        self._sizes.append(n)
        self.count += n
        if len(self._sizes) >= 512:
            self._flush()

    def _flush(self):
        if not self._sizes:
            return
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

    def totals(self):
        """The sample-weighted sums so far (a tensor on the device)."""
        self._flush()
        return self.sums

    def result(self, reduce=False):
        """The weighted mean of each name over all batches seen; ``reduce=True`` sums over processes first."""
        sums, weights = self.totals(), self.weight_sums
        if reduce:
            import torch.distributed as dist

            both = torch.cat([sums, weights])
            dist.all_reduce(both)
            sums, weights = both.split(len(self.names))
        values = (sums / torch.where(weights > 0, weights, 1)).tolist()
        return dict(zip(self.names, values))

    def state_dict(self, reduce=False):
        """The running sums, their weights and the count; ``reduce=True`` (a collective) sums them over all processes first."""
        sums, weights, count = self.totals().detach(), self.weight_sums.detach(), self.count
        if reduce:
            import torch.distributed as dist

            n = len(self.names)
            all_ = torch.cat([sums, weights, torch.tensor([float(count)], dtype=self.dtype, device=sums.device)])
            dist.all_reduce(all_)
            sums, weights, count = all_[:n], all_[n:2 * n], int(all_[-1].item())
        return {"sums": sums.cpu(), "weights": weights.cpu(), "count": count}

    def load_state_dict(self, state):
        self._values, self._sizes, self._weights = [], [], []
        self.sums.copy_(state["sums"])
        # Checkpoints from before per-value weights: every value was weighted by the sample count.
        self.weight_sums.copy_(state["weights"] if "weights" in state else torch.full_like(self.weight_sums, state["count"]))
        self.count = state["count"]

    def mark(self):
        """A snapshot for :meth:`rollback`: one copy of the small sums tensor, the queue by reference (its
        tensors are never changed in place)."""
        return self.sums.clone(), self.weight_sums.clone(), self.count, list(self._values), list(self._sizes), list(self._weights)

    def rollback(self, mark):
        """Return to the state of :meth:`mark`: the batches added since are forgotten."""
        sums, weight_sums, self.count, values, sizes, weights = mark
        self.sums.copy_(sums)
        self.weight_sums.copy_(weight_sums)
        self._values, self._sizes, self._weights = list(values), list(sizes), list(weights)


# The core's fast paths for the built-in metrics of model/metric.py, found by name: a metric itself is only
# fn(output, target). Accuracy and top-k leave targets equal to ignore_index out, so a batch's value is weighed by
# the targets kept; on data that never holds such a target, variants with fewer tensor operations give the same
# values. (A loss may say what it averages over itself: its ``averages_over`` attribute, see model/loss.py.)


def _kept_targets(output, target, ignore_index=-100, **_):
    return (target != ignore_index).sum()


def _accuracy_all_kept(output, target):
    return (output.argmax(dim=1) == target).sum() / target.numel()


def _top_k_acc_all_kept(output, target, k=3):
    top = output.topk(min(k, output.shape[1]), dim=1).indices
    return (top == target.unsqueeze(1)).any(dim=1).sum() / target.numel()


_accuracy_all_kept.__name__, _top_k_acc_all_kept.__name__ = "accuracy", "top_k_acc"  # the names they are logged by
AVERAGES_OVER = {"model.metric.accuracy": _kept_targets, "model.metric.top_k_acc": _kept_targets}
ALL_KEPT = {"model.metric.accuracy": _accuracy_all_kept, "model.metric.top_k_acc": _top_k_acc_all_kept}


def _unwrapped(fn):
    """``(function, its bound keyword arguments)`` of a function or a ``functools.partial`` of one."""
    return (fn.func, fn.keywords) if hasattr(fn, "func") and hasattr(fn, "keywords") else (fn, {})


def _name(func):
    return f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', '')}"


def averages_over(func):
    """What ``func``'s batch value averages over, as a function of ``(output, target, **args)``; None: the samples."""
    return getattr(func, "averages_over", None) or AVERAGES_OVER.get(_name(func))


def fast_variant(fn):
    """The variant of a built-in metric for data holding no ignored target (the same values), or None."""
    return ALL_KEPT.get(_name(fn)) if not hasattr(fn, "keywords") else None


def weighing(criterion, metric_fns, loader):
    """The per-batch metrics as a loop should call them, and the functions whose weights it must ask each batch.

    Returns ``(metric_fns, weighed)``: ``weighed`` is ``[criterion, *metric_fns]`` for
    :func:`batch_weights`, or None when every batch's values average over its samples, so that
    the sample count is every weight and nothing need be counted per batch. That holds when no
    function that weighs itself (:func:`averages_over`) has a class ``weight`` and the data never
    holds a target equal to its ``ignore_index`` (asked once of ``loader.holds_target``). On
    such data a metric with a :func:`fast_variant` is replaced by it.
    """
    holds = getattr(loader, "holds_target", None)

    def all_kept(fn):
        func, kwargs = _unwrapped(fn)
        if averages_over(func) is None:
            return True
        return kwargs.get("weight") is None and holds is not None and holds(kwargs.get("ignore_index", -100)) is False

    fast = [(fast_variant(fn) or fn) if all_kept(fn) else fn for fn in metric_fns]
    needed = not all(all_kept(fn) for fn in [criterion, *metric_fns])
    return fast, [criterion, *fast] if needed else None


def batch_weights(fns, output, target):
    """What each of ``fns`` (the loss, then the metrics) averages over in this batch, for :meth:`MetricTracker.update`.

    A function (or a ``functools.partial`` of one) that weighs itself (:func:`averages_over`, called with its
    args) gives its own weight (a 0-d tensor); the others are weighted by the sample count. Returns None when
    every value is (the tracker's fast path).
    """
    weights, any_given = [], False
    for fn in fns:
        func, kwargs = _unwrapped(fn)
        weigh = averages_over(func)
        weight = weigh(output, target, **kwargs) if weigh is not None else None
        any_given = any_given or weight is not None
        weights.append(weight)
    return weights if any_given else None


class EpochMetric:
    """A metric whose epoch value is not a mean of batch values (a macro F1, an AUROC): it keeps state over the epoch.

    This is all the core knows of one; a part provides them (utils/parts.py: a ``metrics`` prefix
    such as ``torchmetrics.``). The list of metrics holds a *spec*, and each loop makes its own
    accumulator from it with :meth:`new`: the trainer one for training, :func:`trainer.trainer.evaluate`
    a fresh one for each evaluation, so their batches never mix. ``__name__`` is the name its value
    goes by (``val_<name>``; :func:`trainer.build.build_metrics` sets it from the config).

    A subclass provides :meth:`new`, :meth:`update`, :meth:`compute`, :meth:`reset`, :meth:`state_dict`
    and :meth:`load_state_dict`: what a mid-epoch checkpoint needs for a resume to end the epoch with
    the value of the run left alone. :meth:`mark` and :meth:`rollback` (``trainer.auto_accumulate``
    redoing a window of batches) go through the last two; a subclass may give cheaper ones.
    """

    def new(self, device, sync=True, check_inputs=False):
        """An empty accumulator on ``device``.

        ``sync``: :meth:`compute` and ``state_dict(reduce=True)`` combine every process's state
        (under torchrun a collective: every process calls them, in the same order). ``check_inputs``:
        check each update's inputs even where that costs a host-device sync (the dry batch's probe
        asks for it; the loop's accumulators do not, and cost no sync per step).
        """
        raise NotImplementedError

    def update(self, output, target):
        """Add one batch (``output`` may still require grad: keep it detached)."""
        raise NotImplementedError

    def compute(self):
        """The value over the batches so far (all processes' with ``sync``): a float; or, for a metric a part added
        to ``Parts.valid_metric_fns``, whatever that part's hook takes out of the result before it is logged."""
        raise NotImplementedError

    def reset(self):
        raise NotImplementedError

    def state_dict(self, reduce=False):
        """The running state, on the CPU; ``reduce=True`` (a collective) combines every process's state first."""
        raise NotImplementedError

    def load_state_dict(self, state, own=True):
        """Continue from ``state``; or, with ``own=False``, start empty but in a form that still combines with the
        processes continuing from it (under torchrun one process carries a saved state on, the others start
        empty). Returns False, loading nothing, when ``state`` is not this metric's (another class, other args)."""
        raise NotImplementedError

    def mark(self):
        """A snapshot for :meth:`rollback`."""
        return self.state_dict()

    def rollback(self, mark):
        """Return to the state of :meth:`mark`: the batches added since are forgotten."""
        self.load_state_dict(mark)
