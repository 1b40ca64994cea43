"""Metrics: ``fn(output, target) -> 0-d tensor``, the batch's mean, left on the device.

A metric is only that function: add yours here and to ``METRICS``. The trainer weights each batch's value by its
number of samples, so an epoch's value is the true mean over its samples and a short last batch counts for what it
holds (accuracy's, by the targets it kept: trainer/trainer.py knows the built-in ones). Nothing here calls
``.item()``: reading a value back to the host is a device sync, done only when a value is logged.
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


def mae(output, target):
    """Mean absolute error of a regression; an output of shape ``(N, 1)`` is compared with targets ``(N,)``."""
    if output.shape != target.shape and output.numel() == target.numel():
        output = output.reshape(target.shape)
    return (output - target).abs().mean()


METRICS = {"accuracy": accuracy, "top_k_acc": top_k_acc, "mae": mae}
