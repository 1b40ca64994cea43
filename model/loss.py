"""Loss functions. Config files name a loss by its key in ``LOSSES``."""
import numpy as np
import torch
import torch.nn.functional as F

_REDUCTIONS = ("none", "mean", "sum")


def nll_loss(output, target, **kwargs):
    """Negative log-likelihood of log-probabilities; see ``F.nll_loss``."""
    return F.nll_loss(output, target, **kwargs)


def cross_entropy(output, target, **kwargs):
    """Cross-entropy of raw logits; see ``F.cross_entropy``."""
    return F.cross_entropy(output, target, **kwargs)


def mse_loss(output, target, reduction="mean"):
    """Mean squared error for regression, with the shapes a regression model and dataset give.

    A model with one output unit returns (N, 1) while a dataset of scalar targets batches
    to (N,); ``F.mse_loss`` would broadcast the two to (N, N) and average every output
    against every target, with only a warning. So a trailing dimension of size 1 is
    dropped from ``output``, and any other mismatch is an error rather than a broadcast.
    Targets are cast to the output's dtype because datasets often yield float64 (NumPy)
    or integer values, which ``F.mse_loss`` would promote or reject.

    Args:
        output: predictions of shape (N,) or (N, 1) (generally: the target's shape, with
            or without an extra trailing 1).
        target: values of shape (N,), any real dtype.
        reduction: "none", "mean" or "sum", as in ``F.mse_loss``.

    Raises:
        ValueError: when the shapes differ after dropping that trailing 1.
    """
    if output.dim() == target.dim() + 1 and output.shape[-1] == 1:
        output = output.squeeze(-1)
    if output.shape != target.shape:
        raise ValueError(f"mse_loss: output shape {tuple(output.shape)} does not match target shape "
                         f"{tuple(target.shape)} (an output of shape (N, 1) is taken as (N,))")
    return F.mse_loss(output, target.to(output.dtype), reduction=reduction)


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

    Invalid input is accepted or rejected as by ``F.cross_entropy`` (torch 2.14), with the
    same exception type (the messages are this module's own), so that swapping one for the
    other never turns an error into a silently wrong loss or the reverse;
    ``tests/test_loss.py`` holds the cases, and the few accidents of torch's C++ code that
    are not copied. Without the checks, basic ops accept what torch rejects: a target
    batch shorter than the input, or class weights of the wrong length, give the loss of a
    part of the batch. The checks look at shapes and dtypes only, so they cost a few
    microseconds and never wait for a device. Class indices out of range are caught by
    the ``gather`` that picks the target log-probabilities, which checks its indices on
    the CPU anyway, and only then turned into torch's IndexError. On CUDA torch does not
    check on the host either: an out-of-range target fails a kernel assertion there, in
    torch's kernel and in this function's ``gather`` alike.

    Args:
        input: floating-point logits of shape (C,), (N, C) or (N, C, d1, d2, ...); classes
            on dim 1 (dim 0 when unbatched).
        target: class indices (int64; uint8 too with (C,) or (N, C) input, like torch) of
            shape (), (N,) or (N, d1, d2, ...), or class probabilities (floating point)
            of the same shape as ``input``. Unbatched input also takes an index target of
            shape (1,), as torch does.
        weight: optional per-class weight of shape (C,); with index targets it must have
            the dtype of ``input`` and must not require grad (torch has no gradient for it
            there).
        ignore_index: class-index targets equal to this add 0 to the loss and are left out
            of the "mean". Unused with probability targets, where (as in torch) it must
            be negative.
        reduction: "none" (per-position losses), "mean" or "sum".
        label_smoothing: at most 1; mixes the target with the uniform distribution over
            the C classes, with the same formula as torch (see the helpers below). As in
            torch, a value <= 0 (or NaN) means no smoothing.

    Returns:
        A scalar for "mean" and "sum", else a tensor shaped like the target positions
        ((N,), (N, d1, ...) or () when unbatched). For index targets, "mean" divides by
        the summed weight of the non-ignored targets (their count without ``weight``), so
        it is NaN if every target is ignored. For probability targets, "mean" divides by
        the number of positions N * d1 * ..., whatever ``weight`` is.

    Raises:
        TypeError: an argument of the wrong kind (``input``, ``target`` or ``weight`` not a
            tensor, ``ignore_index`` not an int, ``label_smoothing`` not a real number).
        ValueError: an unknown ``reduction``; a target batch size that differs from the
            input's.
        RuntimeError: ``label_smoothing`` > 1; a target of the wrong dtype, or of the
            wrong number of dimensions or spatial size; class weights of the wrong shape,
            dtype, or requiring grad; probability targets with ``ignore_index`` >= 0.
        NotImplementedError: logits that are not floating point.
        IndexError: 0-dimensional logits; a class-index target outside [0, C) that is not
            ``ignore_index`` (checked on the CPU only, see above).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction: use one of {_REDUCTIONS}")
    ignore_index, label_smoothing = _check_types(input, target, weight, ignore_index,
                                                 label_smoothing)
    probabilities = input.shape == target.shape  # the same rule torch uses
    if probabilities:
        _check_probability_target(input, target, weight, ignore_index, label_smoothing)
    else:
        target = _check_index_target(input, target, weight, ignore_index, reduction, label_smoothing)

    if input.dim() == 1:  # unbatched: a batch of one
        loss = logsumexp_cross_entropy(input.unsqueeze(0), target.unsqueeze(0), weight,
                                       ignore_index, reduction, label_smoothing)
        return loss.squeeze(0) if reduction == "none" else loss

    log_probs = _log_softmax(input, dim=1)
    # shape (1, C, 1, ...) so the per-class weight broadcasts against (N, C, d1, ...)
    class_weight = None if weight is None else weight.view(1, -1, *[1] * (input.dim() - 2))

    if probabilities:
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


_INT_TYPES = (int, np.integer)
_REAL_TYPES = (int, float, np.integer, np.floating, np.bool_)


def _check_types(input, target, weight, ignore_index, label_smoothing):
    """Reject what torch's argument parser rejects; return ``ignore_index`` as an int and
    ``label_smoothing`` as a float (a tensor ``label_smoothing`` is read once, as torch does).

    torch takes for an int a Python or NumPy integer or a one-element integer tensor (not a
    bool), and for a float any real Python or NumPy scalar or 0-dim tensor.
    """
    for name, value in (("input", input), ("target", target), ("weight", weight)):
        if not isinstance(value, torch.Tensor) and not (name == "weight" and value is None):
            raise TypeError(f"cross-entropy: {name} must be a Tensor, not {type(value).__name__}")
    if isinstance(ignore_index, torch.Tensor):
        ok = ignore_index.numel() == 1 and not ignore_index.is_floating_point() \
            and not ignore_index.is_complex() and ignore_index.dtype != torch.bool
    else:
        ok = isinstance(ignore_index, _INT_TYPES) and not isinstance(ignore_index, bool)
    if not ok:
        raise TypeError(f"cross-entropy: ignore_index must be an int, not {ignore_index!r}")
    ignore_index = int(ignore_index)
    if not -2**63 <= ignore_index < 2**63:  # torch reads it as a C++ int64
        raise ValueError(f"cross-entropy: ignore_index {ignore_index} does not fit in 64 bits")
    if isinstance(label_smoothing, torch.Tensor):
        ok = label_smoothing.dim() == 0 and not label_smoothing.is_complex()
    else:
        ok = isinstance(label_smoothing, _REAL_TYPES)
    if not ok:
        raise TypeError(f"cross-entropy: label_smoothing must be a real number, not {label_smoothing!r}")
    return ignore_index, float(label_smoothing)


def _check_label_smoothing(label_smoothing):
    # No lower bound: torch takes a value <= 0, and NaN, as "no smoothing".
    if label_smoothing > 1:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")


def _check_logits(input, empty_too=True):
    # torch's log_softmax kernel never runs on an empty tensor, so it lets empty integer
    # logits through; with index targets its nll_loss kernel rejects them later.
    if input.dim() == 0:
        raise IndexError("cross-entropy needs logits of shape (C,), (N, C) or (N, C, d1, ...); got a 0-dim tensor")
    if not input.is_floating_point() and (empty_too or input.numel()):
        raise NotImplementedError(f"cross-entropy of {input.dtype} logits: convert them to a floating point dtype")


def _check_weight_shape(weight, n_classes):
    if weight is not None and (weight.dim() != 1 or weight.numel() != n_classes):
        raise RuntimeError(f"cross-entropy: weight must have shape ({n_classes},), one value per class; "
                           f"got {tuple(weight.shape)}")


def _check_index_dtype(input, target, reduction):
    # torch reads uint8 targets only in its kernels for (C,) and (N, C) input; for an empty
    # target, "mean" and "sum" return before any kernel could object.
    uint8_ok = input.dim() <= 2 or (target.numel() == 0 and reduction != "none")
    if target.dtype != torch.int64 and not (target.dtype == torch.uint8 and uint8_ok):
        allowed = "int64 (or uint8)" if input.dim() <= 2 else "int64"
        raise RuntimeError(f"expected target dtype {allowed} for class indices, but got {target.dtype}")


def _check_probability_target(input, target, weight, ignore_index, label_smoothing):
    """The checks torch makes, in its order, when ``target`` has the shape of ``input``."""
    if not target.is_floating_point():
        raise RuntimeError("Expected floating point type for target with class probabilities "
                           f"(a target shaped like the input), got {target.dtype}")
    if ignore_index >= 0:
        raise RuntimeError(f"ignore_index is not supported for floating point target: got {ignore_index}, "
                           "leave it at a negative value")
    _check_weight_shape(weight, input.shape[1] if input.dim() > 1 else input.numel())
    _check_logits(input, empty_too=False)
    _check_label_smoothing(label_smoothing)


def _check_index_target(input, target, weight, ignore_index, reduction, label_smoothing):
    """The checks torch makes, in its order, for a class-index target; returns the target
    as int64 of shape (N, d1, ...), or () with unbatched input."""
    _check_label_smoothing(label_smoothing)
    _check_logits(input, empty_too=False)
    if input.dim() == 1:
        # torch checks the dtype first here, and the batch size first otherwise
        _check_index_dtype(input, target, reduction)
        if target.dim() > 1:
            raise RuntimeError(f"With unbatched input (C,), the target must have shape () or (1,); "
                               f"got {tuple(target.shape)}")
        if target.dim() == 1 and target.shape[0] != 1:
            raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}")
        smoothing_failure = _torch_smoothing_failure(target, weight, reduction, label_smoothing, unbatched=True)
        target = target.reshape(())
        n_classes = input.shape[0]
    else:
        if target.dim() == 0 or target.shape[0] != input.shape[0]:
            got = "a 0-dim target" if target.dim() == 0 else f"target batch_size ({target.shape[0]})"
            raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match {got}")
        if target.shape[1:] != input.shape[2:]:
            raise RuntimeError(f"Expected target size {(input.shape[0], *input.shape[2:])} for input of size "
                               f"{tuple(input.shape)}, got {tuple(target.shape)}")
        n_classes = input.shape[1]
        if n_classes == 0 and input.dim() > 2 and input.dim() != 4 and target.numel():
            # torch folds (N, C, d1, ...) into 4 dims with a reshape that loses the
            # spatial sizes when C = 0, then finds them mismatched.
            raise RuntimeError(f"cross-entropy of logits with no classes, shape {tuple(input.shape)}, "
                               f"fails in torch for target positions {tuple(target.shape)}")
        smoothing_failure = _torch_smoothing_failure(target, weight, reduction, label_smoothing, unbatched=False)
    _check_index_dtype(input, target, reduction)
    _check_weight_shape(weight, n_classes)
    _check_logits(input)  # empty integer logits, which torch's nll_loss kernel rejects
    if weight is not None:
        if weight.dtype != input.dtype:
            raise RuntimeError(f"cross-entropy: weight dtype {weight.dtype} differs from the input's {input.dtype}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("cross-entropy with class-index targets has no gradient for weight "
                               "(as in torch): pass weight.detach()")
    if target.dtype == torch.uint8:  # so that ignore_index (e.g. -100) is not compared in uint8
        target = target.long()
    if smoothing_failure:
        _check_target_range(target, ignore_index, n_classes)  # torch's nll_loss step comes first
        raise RuntimeError(f"cross-entropy with label_smoothing fails in torch 2.14 for {smoothing_failure}")
    return target


def _torch_smoothing_failure(target, weight, reduction, label_smoothing, unbatched):
    """What makes torch's label-smoothing step fail on an input its other checks accept
    (a broadcast, a ``gather`` that takes no uint8), with the fix; None if nothing does."""
    if label_smoothing <= 0:  # also False for NaN: no smoothing step
        return None
    if unbatched and target.dim() == 1:
        return "unbatched input with a target of shape (1,): pass a 0-dim target"
    if target.dtype == torch.uint8 and weight is not None and reduction == "mean" and target.numel():
        return "uint8 targets with class weights and reduction='mean': pass int64 targets"
    return None


def _log_softmax(x, dim):
    """log_softmax with the LogSumExp trick (see ``logsumexp_cross_entropy``)."""
    if x.shape[dim] == 0:  # no classes: nothing to normalise, and amax() has no maximum
        return x * 1
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
    n_classes = log_probs.shape[1]
    if n_classes == 0:  # any kept target is out of range; without one, nothing to gather
        _check_target_range(target, ignore_index, n_classes, keep)
        return _no_class_loss(log_probs, label_smoothing)
    try:
        picked = log_probs.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    except RuntimeError:
        # gather on the CPU checks its indices anyway, so the valid path pays nothing for
        # the range check; its RuntimeError becomes torch's IndexError naming the target.
        # (On CUDA neither gather nor torch checks on the host: see logsumexp_cross_entropy.)
        _check_target_range(target, ignore_index, n_classes, keep)
        raise
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
        loss = (1 - label_smoothing) * loss + (label_smoothing / n_classes) * smooth

    # Both terms are averaged over the weight of the kept targets, like torch.
    return loss, target_weight.sum()


def _check_target_range(target, ignore_index, n_classes, keep=None):
    """Raise IndexError, as torch does, for a class index that is neither ``ignore_index``
    nor in [0, n_classes). Reads the target back: called only on the way to an error, or
    with no classes."""
    if keep is None:
        keep = target != ignore_index
    bad = target[keep & ((target < 0) | (target >= n_classes))]
    if bad.numel():
        raise IndexError(f"Target {bad[0].item()} is out of bounds: class indices must be in "
                         f"[0, {n_classes - 1}] or equal ignore_index ({ignore_index})")


def _no_class_loss(log_probs, label_smoothing):
    """torch's values with C = 0 and every target ignored: 0 per position, NaN with
    smoothing (eps / C * 0); "mean" divides by the zero kept weight. Built from
    ``log_probs`` (empty along dim 1) so that it stays in the autograd graph."""
    loss = -log_probs.sum(dim=1)
    if label_smoothing > 0:
        loss = loss + float("nan")
    return loss, loss.new_zeros(())


def _probability_target_loss(log_probs, target, class_weight, label_smoothing):
    """Per-position loss and the "mean" divisor for class-probability targets."""
    if label_smoothing > 0:
        # max(): with no classes the target is empty, and the division must not fail
        target = target * (1 - label_smoothing) + label_smoothing / max(log_probs.shape[1], 1)
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
    # torch averages over the positions, not over the weights; with no classes (or no
    # positions) its "mean" is NaN.
    return loss, loss.numel() if log_probs.numel() else float("nan")


def targets_averaged(output, target, weight=None, ignore_index=-100, reduction="mean", **_):
    """What a class-index loss's ``"mean"`` divides by in this batch: the summed class ``weight`` of the targets
    that are not ``ignore_index`` (their count without ``weight``), as a tensor on the device; None where the
    loss averages over every position (probability targets) or does not average (``"sum"``, ``"none"``).

    The trainer weights each batch's loss by it, so that the epoch's loss is the mean over the kept targets
    of the epoch, not a mean of batch means (which overweights batches with many ignored targets).
    """
    if reduction != "mean" or target.is_floating_point() or output.dim() < 2:
        return None
    kept = target != ignore_index
    if weight is None:
        return kept.sum()
    weight = torch.as_tensor(weight, dtype=output.dtype if output.is_floating_point() else None, device=output.device)
    return (weight[target.masked_fill(~kept, 0)] * kept).sum()


nll_loss.averages_over = cross_entropy.averages_over = logsumexp_cross_entropy.averages_over = targets_averaged


LOSSES = {
    "nll_loss": nll_loss,
    "cross_entropy": cross_entropy,
    "logsumexp_cross_entropy": logsumexp_cross_entropy,
    "mse_loss": mse_loss,
}
