"""Loss functions. Config files name a loss by its key in ``LOSSES``."""
import torch
import torch.nn.functional as F

_REDUCTIONS = ("none", "mean", "sum")


def nll_loss(output, target, **kwargs):
    """Negative log-likelihood of log-probabilities; see ``F.nll_loss``."""
    return F.nll_loss(output, target, **kwargs)


def cross_entropy(output, target, **kwargs):
    """Cross-entropy of raw logits; see ``F.cross_entropy``."""
    return F.cross_entropy(output, target, **kwargs)


def logsumexp_cross_entropy(input, target, weight=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0):
    r"""Cross-entropy written from basic tensor ops; same results as ``F.cross_entropy``.

    Cross-entropy needs log-probabilities ``log_softmax(x)_c = x_c - log(sum_k exp(x_k))``.
    Computed literally, ``exp(x_k)`` overflows to inf for logits above ~89 (float32) or
    ~710 (float64), and underflows to 0 for very negative ones, giving inf - inf = NaN or
    log(0) = -inf. The LogSumExp trick subtracts the row maximum ``m = max_k x_k`` first::

        log_softmax(x)_c = (x_c - m) - log(sum_k exp(x_k - m))

    This is the same value for any constant ``m``, because
    ``log(sum_k exp(x_k)) = m + log(sum_k exp(x_k - m))``. With ``m`` the maximum, every
    exponent is <= 0 (nothing overflows) and one of them is exactly 0, so the sum is at
    least 1 (its log is finite). ``m`` is detached: the result does not depend on it, so
    its gradient would be zero anyway.

    A row with some ``-inf`` logits (but a finite maximum) needs nothing special: those
    classes get probability 0 and log-probability ``-inf``. If ``m`` itself is infinite,
    ``x - m`` would produce ``inf - inf = NaN``, so ``m`` is replaced by 0 (any constant is
    valid). Such rows (all ``-inf``, or containing ``+inf``) have no defined softmax and
    still give a non-finite loss (NaN, or inf for a finite target logit next to a
    ``+inf``); ``F.cross_entropy`` gives NaN. Other rows are unaffected, and an ignored
    row adds 0 to the loss.

    Args:
        input: logits of shape (C,), (N, C) or (N, C, d1, d2, ...); classes on dim 1
            (dim 0 when unbatched).
        target: class indices (int64) of shape (), (N,) or (N, d1, d2, ...), or class
            probabilities (float) of the same shape as ``input``.
        weight: optional per-class weight of shape (C,).
        ignore_index: class-index targets equal to this add 0 to the loss and are left out
            of the "mean". Unused with probability targets, where (as in torch) it must
            be negative.
        reduction: "none" (per-position losses), "mean" or "sum".
        label_smoothing: in [0, 1]; mixes the target with the uniform distribution over
            the C classes, with the same formula as torch (see the helpers below).

    Returns:
        A scalar for "mean" and "sum", else a tensor shaped like the target positions
        ((N,), (N, d1, ...) or () when unbatched). For index targets, "mean" divides by
        the summed weight of the non-ignored targets (their count without ``weight``), so
        it is NaN if every target is ignored. For probability targets, "mean" divides by
        the number of positions N * d1 * ..., whatever ``weight`` is.

    Raises:
        ValueError: for an unknown ``reduction``, a ``label_smoothing`` outside [0, 1], or
            probability targets that are not floating point or come with an
            ``ignore_index`` >= 0.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")

    if input.dim() == 1:  # unbatched: a batch of one
        loss = logsumexp_cross_entropy(input.unsqueeze(0), target.unsqueeze(0), weight,
                                       ignore_index, reduction, label_smoothing)
        return loss.squeeze(0) if reduction == "none" else loss

    log_probs = _log_softmax(input, dim=1)
    # shape (1, C, 1, ...) so the per-class weight broadcasts against (N, C, d1, ...)
    class_weight = None if weight is None else weight.view(1, -1, *[1] * (input.dim() - 2))

    if target.shape == input.shape:  # the same rule torch uses to detect probabilities
        if not target.is_floating_point():
            raise ValueError("Expected floating point type for target with class probabilities")
        if ignore_index >= 0:
            raise ValueError("ignore_index is not supported for floating point target")
        loss, mean_divisor = _probability_target_loss(log_probs, target, class_weight,
                                                      label_smoothing)
    else:
        loss, mean_divisor = _index_target_loss(log_probs, target, weight, class_weight,
                                                ignore_index, label_smoothing)

    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / mean_divisor


def _log_softmax(x, dim):
    """log_softmax with the LogSumExp trick (see ``logsumexp_cross_entropy``)."""
    m = x.detach().amax(dim=dim, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    shifted = x - m
    return shifted - shifted.exp().sum(dim=dim, keepdim=True).log()


def _index_target_loss(log_probs, target, weight, class_weight, ignore_index, label_smoothing):
    """Per-position loss and the "mean" divisor for class-index targets."""
    keep = target != ignore_index
    # Ignored positions may hold an out-of-range value (e.g. -100): point them at class 0
    # so indexing is valid; torch.where below then drops them, value and gradient.
    safe_target = torch.where(keep, target, torch.zeros_like(target))
    picked = log_probs.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    if weight is None:
        target_weight = keep.to(log_probs.dtype)
    else:
        target_weight = torch.where(keep, weight[safe_target], torch.zeros_like(picked))
    # torch.where rather than multiplying by the 0/1 mask: an ignored row may have
    # log-probability -inf, and -inf * 0 = NaN.
    loss = torch.where(keep, -picked * target_weight, torch.zeros_like(picked))

    # Skipped when 0 so that -inf logits of non-target classes do not make the loss inf.
    if label_smoothing > 0:
        # torch's smoothing term is -sum_c weight_c * log p_c (weighted, unlike some
        # textbook versions), mixed as (1 - eps) * nll + eps / C * smooth.
        weighted = log_probs if class_weight is None else log_probs * class_weight
        smooth = torch.where(keep, -weighted.sum(dim=1), torch.zeros_like(picked))
        n_classes = log_probs.shape[1]
        loss = (1 - label_smoothing) * loss + (label_smoothing / n_classes) * smooth

    # Both terms are averaged over the weight of the kept targets, like torch.
    return loss, target_weight.sum()


def _probability_target_loss(log_probs, target, class_weight, label_smoothing):
    """Per-position loss and the "mean" divisor for class-probability targets."""
    if label_smoothing > 0:
        target = target * (1 - label_smoothing) + label_smoothing / log_probs.shape[1]
    # A class with target probability 0 and log-probability -inf would give 0 * -inf = NaN
    # (torch's own loss is NaN there); count it as 0, the limit of p * log q, with zero
    # gradient. Only where log q is -inf, so everywhere else the gradient w.r.t. the
    # target (-log q) stays the same as torch's.
    impossible = (target == 0) & torch.isneginf(log_probs)
    log_probs = torch.where(impossible, torch.zeros_like(log_probs), log_probs)
    terms = target * log_probs
    if class_weight is not None:
        terms = terms * class_weight
    loss = -terms.sum(dim=1)
    # torch averages over the positions, not over the weights.
    return loss, loss.numel()


LOSSES = {
    "nll_loss": nll_loss,
    "cross_entropy": cross_entropy,
    "logsumexp_cross_entropy": logsumexp_cross_entropy,
}
