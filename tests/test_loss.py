"""Tests for model/loss.py, with torch.nn.functional.cross_entropy as the reference."""
import pytest
import torch
import torch.nn.functional as F

from model.loss import LOSSES, cross_entropy, logsumexp_cross_entropy, nll_loss

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
N_CLASSES = 5
SHAPES = [(6, N_CLASSES), (3, N_CLASSES, 2, 4)]  # (N, C) and (N, C, d1, d2)
INF = float("inf")


def _assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, atol=TOL[dtype], rtol=TOL[dtype])


def _index_targets(shape, ignore_index, generator):
    target_shape = (shape[0],) + shape[2:]
    target = torch.randint(0, N_CLASSES, target_shape, generator=generator)
    if ignore_index is not None:
        # about a third of the positions ignored, plus at least one
        ignored = torch.rand(target_shape, generator=generator) < 0.3
        ignored.view(-1)[0] = True
        target[ignored] = ignore_index
    return target


def _probability_targets(shape, dtype, generator):
    target = torch.rand(shape, generator=generator, dtype=dtype)
    # some exact zeros, so zero-probability classes are exercised
    target[torch.rand(shape, generator=generator) < 0.3] = 0
    target[:, 0] += 0.1  # no all-zero row
    return target / target.sum(dim=1, keepdim=True)


def _loss_and_grads(loss_fn, logits, target, grad_output, **kwargs):
    """Loss and its gradient w.r.t. the logits (and w.r.t. float targets)."""
    logits = logits.detach().clone().requires_grad_(True)
    inputs = [logits]
    if target.is_floating_point():
        target = target.detach().clone().requires_grad_(True)
        inputs.append(target)
    loss = loss_fn(logits, target, **kwargs)
    grads = torch.autograd.grad(loss, inputs, grad_output if loss.dim() else None)
    return loss.detach(), grads


def _compare_with_torch(logits, target, dtype, reduction, **kwargs):
    generator = torch.Generator().manual_seed(1)
    grad_output = None
    if reduction == "none":  # a non-uniform upstream gradient tests more than sum()
        out_shape = (logits.shape[0],) + logits.shape[2:]
        grad_output = torch.rand(out_shape, generator=generator, dtype=dtype) + 0.5
    expected, expected_grads = _loss_and_grads(F.cross_entropy, logits, target, grad_output,
                                               reduction=reduction, **kwargs)
    actual, actual_grads = _loss_and_grads(logsumexp_cross_entropy, logits, target,
                                           grad_output, reduction=reduction, **kwargs)
    assert actual.dtype == dtype
    _assert_close(actual, expected, dtype)
    for actual_grad, expected_grad in zip(actual_grads, expected_grads):
        _assert_close(actual_grad, expected_grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("ignore_index", [None, -100, 1])  # 1: an ignored real class
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("shape", SHAPES)
def test_index_targets_match_torch(dtype, reduction, use_weight, ignore_index,
                                   label_smoothing, shape):
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(shape, generator=generator, dtype=dtype)
    target = _index_targets(shape, ignore_index, generator)
    kwargs = {"label_smoothing": label_smoothing}
    if use_weight:
        kwargs["weight"] = torch.rand(N_CLASSES, generator=generator, dtype=dtype) + 0.5
    if ignore_index is not None:
        kwargs["ignore_index"] = ignore_index
    _compare_with_torch(logits, target, dtype, reduction, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("use_ignore_index", [False, True])  # a negative one has no effect
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("shape", SHAPES)
def test_probability_targets_match_torch(dtype, reduction, use_weight, use_ignore_index,
                                         label_smoothing, shape):
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(shape, generator=generator, dtype=dtype)
    target = _probability_targets(shape, dtype, generator)
    kwargs = {"label_smoothing": label_smoothing}
    if use_weight:
        kwargs["weight"] = torch.rand(N_CLASSES, generator=generator, dtype=dtype) + 0.5
    if use_ignore_index:
        kwargs["ignore_index"] = -1
    _compare_with_torch(logits, target, dtype, reduction, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("probabilities", [False, True])
def test_unbatched_input_matches_torch(dtype, reduction, probabilities):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(N_CLASSES, generator=generator, dtype=dtype)
    if probabilities:
        target = _probability_targets((1, N_CLASSES), dtype, generator)[0]
    else:
        target = torch.tensor(3)
    weight = torch.rand(N_CLASSES, generator=generator, dtype=dtype) + 0.5
    _compare_with_torch(logits, target, dtype, reduction, weight=weight, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("use_weight", [False, True])
def test_all_targets_ignored_matches_torch(reduction, use_weight):
    logits = torch.randn(4, N_CLASSES, dtype=torch.float64)
    target = torch.full((4,), -100)
    weight = torch.rand(N_CLASSES, dtype=torch.float64) + 0.5 if use_weight else None
    for smoothing in (0.0, 0.1):
        expected = F.cross_entropy(logits, target, weight=weight, reduction=reduction,
                                   label_smoothing=smoothing)
        actual = logsumexp_cross_entropy(logits, target, weight=weight, reduction=reduction,
                                         label_smoothing=smoothing)
        torch.testing.assert_close(actual, expected, equal_nan=True)  # "mean": 0 / 0


def test_gradcheck_index_targets_with_weight_ignore_index_and_smoothing():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, N_CLASSES, 2, generator=generator, dtype=torch.float64)
    target = torch.tensor([[0, 4], [-1, 2], [3, -1]])
    weight = torch.rand(N_CLASSES, generator=generator, dtype=torch.float64) + 0.5
    for reduction in ("none", "mean"):
        assert torch.autograd.gradcheck(
            lambda x: logsumexp_cross_entropy(x, target, weight=weight, ignore_index=-1,
                                              reduction=reduction, label_smoothing=0.2),
            (logits.requires_grad_(True),))


def test_gradcheck_probability_targets():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, N_CLASSES, generator=generator, dtype=torch.float64)
    target = _probability_targets((4, N_CLASSES), torch.float64, generator)
    weight = torch.rand(N_CLASSES, generator=generator, dtype=torch.float64) + 0.5
    for smoothing in (0.0, 0.3):
        assert torch.autograd.gradcheck(
            lambda x, t: logsumexp_cross_entropy(x, t, weight=weight,
                                                 label_smoothing=smoothing),
            (logits.requires_grad_(True), target.requires_grad_(True)))


def _extreme_logits(dtype):
    """Logits a naive exp() would overflow/underflow on, and rows with some -inf."""
    logits = torch.randn(6, N_CLASSES, generator=torch.Generator().manual_seed(0), dtype=dtype)
    logits[0] = torch.tensor([1e4, 0.0, -1e4, 1.0, 2.0])
    logits[1] = torch.tensor([-1e4, -1e4 + 1, -1e4 - 2, -1e4, -1e4])  # all very negative
    logits[2] = torch.tensor([1e4, 1e4, 1e4 - 3, -1e4, 1e4])  # all very large
    logits[3, [1, 3]] = -INF
    logits[4] = torch.tensor([-INF, 1e4, -1e4, -INF, 0.0])
    logits[5] = logits[4]
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("use_weight", [False, True])
def test_extreme_logits_index_targets(dtype, reduction, label_smoothing, use_weight):
    logits = _extreme_logits(dtype)
    # No target on a -inf logit; the last row is ignored and has -inf at class 0.
    target = torch.tensor([2, 4, 3, 0, 2, -100])
    weight = torch.linspace(0.5, 1.5, N_CLASSES, dtype=dtype) if use_weight else None
    grad_output = None if reduction != "none" else torch.ones(6, dtype=dtype)
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    expected, (expected_grad,) = _loss_and_grads(F.cross_entropy, logits, target, grad_output,
                                                 **kwargs)
    actual, (actual_grad,) = _loss_and_grads(logsumexp_cross_entropy, logits, target,
                                             grad_output, **kwargs)
    # Smoothing puts weight on the -inf classes, so torch's loss is +inf there; the
    # gradient is still finite. assert_close also requires matching infinities.
    assert not expected.isnan().any()
    torch.testing.assert_close(actual, expected, atol=TOL[dtype], rtol=TOL[dtype])
    assert expected_grad.isfinite().all()
    torch.testing.assert_close(actual_grad, expected_grad, atol=TOL[dtype], rtol=TOL[dtype])
    if label_smoothing == 0:
        assert actual.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("use_weight", [False, True])
def test_extreme_logits_probability_targets(dtype, reduction, use_weight):
    logits = _extreme_logits(dtype)
    target = _probability_targets(logits.shape, dtype, torch.Generator().manual_seed(0))
    target[logits == -INF] = 0  # zero probability where the logit is -inf
    target = target / target.sum(dim=1, keepdim=True)
    weight = torch.linspace(0.5, 1.5, N_CLASSES, dtype=dtype) if use_weight else None
    grad_output = None if reduction != "none" else torch.ones(6, dtype=dtype)
    # torch computes 0 * -inf = NaN for the loss here (its gradient w.r.t. the logits is
    # finite); the limit p * log q -> 0 is what torch gives with a finite logit so
    # negative that its probability underflows to exactly 0.
    finite_logits = logits.nan_to_num(neginf=-1e30)
    expected, (expected_grad, _) = _loss_and_grads(
        F.cross_entropy, finite_logits, target, grad_output, weight=weight, reduction=reduction)
    _, (torch_grad, _) = _loss_and_grads(
        F.cross_entropy, logits, target, grad_output, weight=weight, reduction=reduction)
    actual, (actual_grad, target_grad) = _loss_and_grads(
        logsumexp_cross_entropy, logits, target, grad_output, weight=weight, reduction=reduction)
    assert actual.isfinite().all()
    _assert_close(actual, expected, dtype)
    _assert_close(actual_grad, expected_grad, dtype)
    _assert_close(actual_grad, torch_grad, dtype)
    assert target_grad.isfinite().all()


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_rows_without_a_softmax_do_not_leak(label_smoothing):
    # all -inf, and +inf rows: both non-finite like torch, but ignored they add 0 and the
    # other rows keep their values and gradients
    logits = torch.randn(4, N_CLASSES, dtype=torch.float64)
    logits[0] = -INF
    logits[1, 2] = INF
    for target in (torch.tensor([-100, -100, 3, 1]), torch.tensor([0, 1, 3, 1])):
        expected, (expected_grad,) = _loss_and_grads(
            F.cross_entropy, logits, target, torch.ones(4, dtype=torch.float64),
            reduction="none", label_smoothing=label_smoothing)
        actual, (actual_grad,) = _loss_and_grads(
            logsumexp_cross_entropy, logits, target, torch.ones(4, dtype=torch.float64),
            reduction="none", label_smoothing=label_smoothing)
        assert (actual.isfinite() == expected.isfinite()).all()
        torch.testing.assert_close(actual[expected.isfinite()], expected[expected.isfinite()])
        torch.testing.assert_close(actual_grad[2:], expected_grad[2:])


def test_plain_large_logits_would_overflow_without_the_trick():
    # guards the premise of the extreme-value tests: naive exp() overflows here
    assert torch.exp(torch.tensor(1e4)).isinf()
    logits = torch.tensor([[1e4, 0.0, -1e4]])
    loss = logsumexp_cross_entropy(logits, torch.tensor([1]))
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([1])))


def test_invalid_arguments_raise():
    logits = torch.randn(2, N_CLASSES)
    target = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="reduction"):
        logsumexp_cross_entropy(logits, target, reduction="average")
    with pytest.raises(ValueError, match="label_smoothing"):
        logsumexp_cross_entropy(logits, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="floating point"):
        logsumexp_cross_entropy(logits, torch.zeros(2, N_CLASSES, dtype=torch.long))
    with pytest.raises(RuntimeError):  # torch rejects it too
        F.cross_entropy(logits, torch.rand(2, N_CLASSES), ignore_index=0)
    with pytest.raises(ValueError, match="ignore_index"):
        logsumexp_cross_entropy(logits, torch.rand(2, N_CLASSES), ignore_index=0)


def test_does_not_use_torch_cross_entropy_building_blocks(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("logsumexp_cross_entropy must be written from basic ops")

    for module, name in [(F, "cross_entropy"), (F, "log_softmax"), (F, "nll_loss"),
                         (torch, "logsumexp"), (torch, "log_softmax"),
                         (torch.Tensor, "logsumexp"), (torch.Tensor, "log_softmax")]:
        monkeypatch.setattr(module, name, forbidden)
    logits = torch.randn(4, N_CLASSES, 3, requires_grad=True)
    logsumexp_cross_entropy(logits, torch.randint(0, N_CLASSES, (4, 3)),
                            label_smoothing=0.1).backward()
    logsumexp_cross_entropy(logits, torch.rand(4, N_CLASSES, 3)).backward()


def test_wrappers_match_torch():
    logits = torch.randn(4, N_CLASSES, dtype=torch.float64)
    target = torch.tensor([0, 3, 4, 1])
    weight = torch.rand(N_CLASSES, dtype=torch.float64)
    torch.testing.assert_close(cross_entropy(logits, target, weight=weight),
                               F.cross_entropy(logits, target, weight=weight))
    log_probs = F.log_softmax(logits, dim=1)
    torch.testing.assert_close(nll_loss(log_probs, target, reduction="sum"),
                               F.nll_loss(log_probs, target, reduction="sum"))


def test_losses_table():
    assert LOSSES["nll_loss"] is nll_loss
    assert LOSSES["cross_entropy"] is cross_entropy
    assert LOSSES["logsumexp_cross_entropy"] is logsumexp_cross_entropy
    assert set(LOSSES) == {"nll_loss", "cross_entropy", "logsumexp_cross_entropy"}
    assert all(callable(fn) for fn in LOSSES.values())
