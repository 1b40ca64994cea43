"""Loss functions: what a config's ``"loss"`` names (``LOSSES``).

A loss is ``fn(output, target, **args) -> 0-d tensor``, the batch's mean (so the learning rate does not depend
on the batch size); the config's ``args`` come by keyword. Two optional attributes: ``fn.check(output, target,
**args)`` raises a ValueError saying what is wrong, called once by the dry batch (trainer/build.py) so that
``fn`` checks nothing per step; ``fn.averages_over(...)`` is what its mean divides by in a batch, so that the
epoch's loss is the mean over the epoch's targets.
"""
import numbers

import torch
import torch.nn.functional as F


def logsumexp_cross_entropy(output, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Cross-entropy from basic tensor ops; the same values and gradients as ``F.cross_entropy``.

    output: logits, (N, C, d1, ...) or (C,). target: class indices (int64), shaped (N, d1, ...)
    or (), or class probabilities shaped like ``output``. weight: one value per class.
    """
    if output.dim() == 1:  # one sample without a batch dimension: a batch of one
        loss = logsumexp_cross_entropy(output[None], target[None], weight, ignore_index, reduction, label_smoothing)
        return loss[0] if reduction == "none" else loss

    # Log-probabilities: log p_c = x_c - log(sum_k exp(x_k)), classes on dim 1.
    # Taken literally, exp(x) overflows to inf for x above ~88 (float32), and if every logit of a
    # row is very negative the sum underflows to 0, whose log is -inf. Subtracting the row's
    # maximum m changes nothing, as log(sum_k exp(x_k)) = m + log(sum_k exp(x_k - m)), but then
    # every exponent is <= 0 (no overflow) and one of them is 0 (the sum is at least 1).
    # m is detached: the result does not depend on it, so its gradient would be 0 anyway.
    shifted = output - output.detach().amax(dim=1, keepdim=True)
    log_p = shifted - shifted.exp().sum(dim=1, keepdim=True).log()
    # class weights, shaped (C, 1, ...) to line up with dim 1 of log_p
    w = 1 if weight is None else weight.view(-1, *[1] * (output.dim() - 2))

    if target.is_floating_point():  # class probabilities: -sum_c w_c q_c log p_c
        if label_smoothing > 0:  # mix the target with the uniform distribution
            target = (1 - label_smoothing) * target + label_smoothing / output.shape[1]
        # A class with q_c = 0 and p_c = 0 adds 0 (the limit of q log p), not 0 * -inf = NaN.
        log_p = torch.where((target == 0) & log_p.isneginf(), 0, log_p)
        loss = -(target * log_p * w).sum(dim=1)
        divisor = loss.numel()  # "mean" is over the positions, whatever the weights
    else:  # class indices: -w_t log p_t for the target class t
        keep = target != ignore_index
        safe = torch.where(keep, target, 0)  # an ignored position may hold -100: point it at class 0
        nll = -log_p.gather(1, safe.unsqueeze(1)).squeeze(1)
        target_w = keep.to(log_p.dtype) if weight is None else torch.where(keep, weight[safe], 0)
        # where, not a product with the mask: an ignored position's nll may be inf, and inf * 0 is NaN
        loss = torch.where(keep, nll * target_w, 0)
        if label_smoothing > 0:
            # The smoothed target puts label_smoothing / C on every class; its term is the mean over the classes
            # of -w_c log p_c (weighted, as torch does).
            smooth = torch.where(keep, -(log_p * w).mean(dim=1), 0)
            loss = (1 - label_smoothing) * loss + label_smoothing * smooth
        divisor = target_w.sum()  # "mean" is over the kept targets' weights (0 / 0 = NaN if none)

    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / divisor


def check_cross_entropy(output, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """One ValueError, naming the problem and what would be valid, for arguments ``logsumexp_cross_entropy``
    cannot take. Reads the target's values (a wait on the device): for the dry batch, not every step."""
    def fail(problem):
        raise ValueError(f"cross-entropy: {problem}")

    def describe(value):
        shape = f" tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
        return f"a {value.dtype}{shape}" if shape else f"a {type(value).__name__}"

    if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.dim() == 0:
        fail(f"the output must be floating-point logits of shape (N, C, ...) or (C,), got {describe(output)}")
    n_classes = output.shape[1] if output.dim() > 1 else output.shape[0]
    if n_classes == 0:
        fail(f"the output {tuple(output.shape)} has no classes on dim {int(output.dim() > 1)}")
    if not isinstance(target, torch.Tensor):
        fail(f"the target must be a tensor, got {describe(target)}")
    if reduction not in ("mean", "sum", "none"):
        fail(f'reduction must be "mean", "sum" or "none", got {reduction!r}')
    if not isinstance(label_smoothing, numbers.Real) or not 0 <= label_smoothing <= 1:
        fail(f"label_smoothing must be a number from 0 to 1, got {label_smoothing!r}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        fail(f"ignore_index must be an int (a class index, or -100 for none), got {ignore_index!r}")
    if weight is not None and not (isinstance(weight, torch.Tensor) and weight.is_floating_point()
                                   and tuple(weight.shape) == (n_classes,)):
        fail(f"weight must be a floating-point tensor of shape ({n_classes},), one value per class, "
             f"got {describe(weight)}")
    if target.is_floating_point():
        if target.shape != output.shape:
            fail(f"a floating-point target holds class probabilities and must have the output's shape "
                 f"{tuple(output.shape)}, got {tuple(target.shape)} (class indices must be int64)")
        return
    positions = output.shape[:1] + output.shape[2:] if output.dim() > 1 else ()
    if target.dtype != torch.int64:
        fail(f"class-index targets must be int64 (torch.long), got {target.dtype}: convert them with "
             f".long(), or give floating-point class probabilities shaped like the output")
    if target.shape != positions:
        fail(f"class-index targets for an output of shape {tuple(output.shape)} must have shape "
             f"{tuple(positions)}, got {tuple(target.shape)}")
    wrong = target[(target != ignore_index) & ((target < 0) | (target >= n_classes))]
    if wrong.numel():
        fail(f"target {wrong[0].item()} is not a class: class indices must be 0 to {n_classes - 1} "
             f"(the output has {n_classes} classes) or ignore_index ({ignore_index})")


def nll_loss(output, target, **kwargs):
    """Negative log-likelihood of log-probabilities; see ``F.nll_loss``."""
    return F.nll_loss(output, target, **kwargs)


def cross_entropy(output, target, **kwargs):
    """Cross-entropy of raw logits by torch's own kernel; see ``F.cross_entropy``."""
    return F.cross_entropy(output, target, **kwargs)


def mse_loss(output, target, reduction="mean"):
    """Mean squared error for regression. An output (N, 1) is taken as (N,): ``F.mse_loss`` would broadcast it
    against targets (N,) to (N, N) with only a warning; any other shape mismatch is a ValueError. The target
    is cast to the output's dtype (datasets often give float64 or integers)."""
    if output.dim() == target.dim() + 1 and output.shape[-1] == 1:
        output = output.squeeze(-1)
    if output.shape != target.shape:
        raise ValueError(f"mse_loss: output shape {tuple(output.shape)} does not match target shape "
                         f"{tuple(target.shape)} (an output of shape (N, 1) is taken as (N,))")
    return F.mse_loss(output, target.to(output.dtype), reduction=reduction)


def targets_averaged(output, target, weight=None, ignore_index=-100, reduction="mean", **_):
    """What a class-index loss's "mean" divides by in this batch: the summed class ``weight`` of the targets
    that are not ``ignore_index`` (their count without ``weight``), on the device. None where the loss averages
    over every position (probability targets) or does not average: the sample count then weighs the batch."""
    if reduction != "mean" or target.is_floating_point() or output.dim() < 2:
        return None
    kept = target != ignore_index
    if weight is None:
        return kept.sum()
    weight = torch.as_tensor(weight, dtype=output.dtype if output.is_floating_point() else None, device=output.device)
    return (weight[target.masked_fill(~kept, 0)] * kept).sum()


logsumexp_cross_entropy.check = check_cross_entropy
nll_loss.averages_over = cross_entropy.averages_over = logsumexp_cross_entropy.averages_over = targets_averaged

LOSSES = {
    "nll_loss": nll_loss,
    "cross_entropy": cross_entropy,
    "logsumexp_cross_entropy": logsumexp_cross_entropy,
    "mse_loss": mse_loss,
}
