"""Metrics: ``fn(output, target) -> 0-d tensor``, the batch's mean, left on the device.

The trainer weights each batch's value by its number of samples (or, for a metric with an
``averages_over(output, target)`` attribute, by what that returns: accuracy's count of
targets not ignored), so an epoch's value is the true mean over its samples, and a short
last batch counts for what it holds. Nothing
here calls ``.item()``: reading a value back to the host is a device sync, done only when
a value is logged.
"""


def accuracy(output, target, ignore_index=-100):
    """Fraction of the targets whose highest-scoring class is the target; targets equal to ``ignore_index``
    (as in ``F.cross_entropy``) are left out (0 when every target is)."""
    kept = target != ignore_index
    return ((output.argmax(dim=1) == target) & kept).sum() / kept.sum().clamp(min=1)


def top_k_acc(output, target, k=3, ignore_index=-100):
    """Fraction of the targets among the ``k`` highest-scoring classes; ``ignore_index`` targets left out."""
    k = min(k, output.shape[1])
    top = output.topk(k, dim=1).indices
    kept = target != ignore_index
    return ((top == target.unsqueeze(1)).any(dim=1) & kept).sum() / kept.sum().clamp(min=1)


def _accuracy_all_kept(output, target):
    """:func:`accuracy` on data none of whose targets is ignored: the same value with four fewer tensor operations
    (the trainer uses it when the data holds no ``ignore_index`` target; utils.metric_tracker.weighing)."""
    return (output.argmax(dim=1) == target).sum() / target.numel()


def _top_k_acc_all_kept(output, target, k=3):
    """:func:`top_k_acc` on data none of whose targets is ignored."""
    top = output.topk(min(k, output.shape[1]), dim=1).indices
    return (top == target.unsqueeze(1)).any(dim=1).sum() / target.numel()


_accuracy_all_kept.__name__, _top_k_acc_all_kept.__name__ = "accuracy", "top_k_acc"  # the names they are logged by


def kept_targets(output, target, ignore_index=-100):
    """What :func:`accuracy` and :func:`top_k_acc` average over: the count of targets not ignored."""
    return (target != ignore_index).sum()


# The tracker weights a batch's value by what it averages over (utils.metric_tracker.batch_weights).
accuracy.averages_over = top_k_acc.averages_over = kept_targets
accuracy.all_kept, top_k_acc.all_kept = _accuracy_all_kept, _top_k_acc_all_kept


def mae(output, target):
    """Mean absolute error of a regression; an output of shape ``(N, 1)`` is compared with targets ``(N,)``."""
    if output.shape != target.shape and output.numel() == target.numel():
        output = output.reshape(target.shape)
    return (output - target).abs().mean()


METRICS = {"accuracy": accuracy, "top_k_acc": top_k_acc, "mae": mae}
