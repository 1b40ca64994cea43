"""Metrics: ``fn(output, target) -> 0-d tensor``, the batch's mean, left on the device.

The trainer weights each batch's value by its number of samples, so an epoch's value is
the true mean over its samples, and a short last batch counts for what it holds. Nothing
here calls ``.item()``: reading a value back to the host is a device sync, done only when
a value is logged.
"""


def accuracy(output, target):
    """Fraction of samples whose highest-scoring class is the target."""
    return (output.argmax(dim=1) == target).float().mean()


def top_k_acc(output, target, k=3):
    """Fraction of samples whose target is among the ``k`` highest-scoring classes."""
    k = min(k, output.shape[1])
    top = output.topk(k, dim=1).indices
    return (top == target.unsqueeze(1)).any(dim=1).float().mean()


def mae(output, target):
    """Mean absolute error of a regression; an output of shape ``(N, 1)`` is compared with targets ``(N,)``."""
    if output.shape != target.shape and output.numel() == target.numel():
        output = output.reshape(target.shape)
    return (output - target).abs().mean()


METRICS = {"accuracy": accuracy, "top_k_acc": top_k_acc, "mae": mae}
