"""Tests for model/loss.py, with torch.nn.functional.cross_entropy as the reference."""
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.loss import LOSSES, cross_entropy, logsumexp_cross_entropy, mse_loss, nll_loss

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


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


def _p(*shape, dtype=torch.float32):
    return _probability_targets(shape, dtype, torch.Generator().manual_seed(1))


def _i(*values, dtype=torch.long):
    return torch.tensor(values, dtype=dtype)


T3 = _i(0, 1, 2)  # a valid target for (3, 4) logits
# id, input, target, keyword arguments. Built lazily: some cases would fail at build time.
# Mostly invalid input, plus the odd inputs torch accepts, which must be accepted too.
PARITY_CASES = [
    # batch and spatial sizes
    ("target batch shorter", lambda: (_x(3, 4), _i(0, 1), {})),
    ("target batch longer", lambda: (_x(3, 4), _i(0, 1, 2, 3), {})),
    ("target batch shorter, smoothing", lambda: (_x(3, 4), _i(0, 1), {"label_smoothing": 0.1})),
    ("0-dim target, batched input", lambda: (_x(3, 4), _i(1).reshape(()), {})),
    ("2-d target for (N, C)", lambda: (_x(3, 4), T3[:, None], {})),
    ("K-dim: wrong spatial size", lambda: (_x(2, 4, 3), torch.zeros(2, 2, dtype=torch.long), {})),
    ("K-dim: wrong batch", lambda: (_x(2, 4, 3), torch.zeros(3, 3, dtype=torch.long), {})),
    ("K-dim: target without spatial dims", lambda: (_x(2, 4, 3), torch.zeros(2, dtype=torch.long), {})),
    ("4-d: wrong spatial size", lambda: (_x(2, 4, 3, 3), torch.zeros(2, 3, 2, dtype=torch.long), {})),
    ("4-d: target of 4 dims", lambda: (_x(2, 4, 3, 3), torch.zeros(2, 3, 3, 1, dtype=torch.long), {})),
    ("5-d: wrong spatial size", lambda: (_x(2, 4, 1, 2, 3), torch.zeros(2, 1, 3, 2, dtype=torch.long), {})),
    ("float target, wrong batch", lambda: (_x(3, 4), _p(2, 4), {})),
    ("float target, wrong classes", lambda: (_x(3, 4), _p(3, 5), {})),
    ("K-dim float target, wrong spatial size", lambda: (_x(2, 4, 3), _p(2, 4, 2), {})),
    ("unbatched: target (1,) accepted", lambda: (_x(4), _i(3), {})),
    ("unbatched: target (1,) with weight, sum", lambda: (_x(4), _i(3), {"weight": _x(4).abs(), "reduction": "sum"})),
    ("unbatched: target (1,) and smoothing", lambda: (_x(4), _i(3), {"label_smoothing": 0.1})),
    ("unbatched: target (2,)", lambda: (_x(4), _i(1, 2), {})),
    ("unbatched: target (2,) and smoothing", lambda: (_x(4), _i(1, 2), {"label_smoothing": 0.1})),
    ("unbatched: int32 target (1,)", lambda: (_x(4), _i(1, dtype=torch.int32), {})),
    ("unbatched: float target (1,)", lambda: (_x(4), _i(1).float(), {})),
    ("unbatched: target (1, 1)", lambda: (_x(4), _i(1)[:, None], {})),
    ("unbatched: float target of the wrong size", lambda: (_x(4), _p(1, 5)[0], {})),
    ("0-dim logits, 1-d target", lambda: (_x(1)[0], _i(0), {})),
    ("0-dim logits, 0-dim index target", lambda: (_x(1)[0], _i(0)[0], {})),
    ("0-dim logits, 0-dim float target", lambda: (_x(1)[0], torch.tensor(1.0), {})),
    # class weights
    ("weight too short", lambda: (_x(3, 4), T3, {"weight": torch.rand(3)})),
    ("weight too long", lambda: (_x(3, 4), T3, {"weight": torch.rand(5)})),
    ("weight (1, C)", lambda: (_x(3, 4), T3, {"weight": torch.rand(1, 4)})),
    ("weight (C, 1)", lambda: (_x(3, 4), T3, {"weight": torch.rand(4, 1)})),
    ("weight 0-dim", lambda: (_x(3, 4), T3, {"weight": torch.tensor(1.0)})),
    ("weight too short, 4-d", lambda: (_x(2, 4, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long), {"weight": torch.rand(3)})),
    ("weight too short, probabilities", lambda: (_x(3, 4), _p(3, 4), {"weight": torch.rand(3)})),
    ("weight (C, 1), probabilities", lambda: (_x(3, 4), _p(3, 4), {"weight": torch.rand(4, 1)})),
    ("weight float64 for float32 logits", lambda: (_x(3, 4), T3, {"weight": torch.rand(4, dtype=torch.float64)})),
    ("weight float64, smoothing", lambda: (_x(3, 4), T3, {"weight": torch.rand(4, dtype=torch.float64), "label_smoothing": 0.1})),
    ("weight int64", lambda: (_x(3, 4), T3, {"weight": torch.ones(4, dtype=torch.long)})),
    ("weight float32 for float16 logits", lambda: (_x(3, 4).half(), T3, {"weight": torch.rand(4)})),
    ("weight float64, K-dim", lambda: (_x(2, 4, 3), torch.zeros(2, 3, dtype=torch.long), {"weight": torch.rand(4, dtype=torch.float64)})),
    ("weight float64, probabilities (accepted)", lambda: (_x(3, 4), _p(3, 4), {"weight": torch.rand(4, dtype=torch.float64)})),
    ("weight int64, probabilities (accepted)", lambda: (_x(3, 4), _p(3, 4), {"weight": torch.ones(4, dtype=torch.long)})),
    ("weight requiring grad", lambda: (_x(3, 4), T3, {"weight": torch.rand(4, requires_grad=True)})),
    ("weight requiring grad, probabilities (accepted)", lambda: (_x(3, 4), _p(3, 4), {"weight": torch.rand(4, requires_grad=True)})),
    ("weight a list", lambda: (_x(3, 4), T3, {"weight": [1.0] * 4})),
    # target dtypes
    ("int32 target", lambda: (_x(3, 4), T3.int(), {})),
    ("int16 target", lambda: (_x(3, 4), T3.short(), {})),
    ("int8 target", lambda: (_x(3, 4), T3.to(torch.int8), {})),
    ("bool target", lambda: (_x(3, 4), _i(1, 0, 1).bool(), {})),
    ("float target of index shape", lambda: (_x(3, 4), T3.float(), {})),
    ("int32 target, K-dim", lambda: (_x(2, 4, 3, 3), torch.zeros(2, 3, 3, dtype=torch.int32), {})),
    ("uint8 target (accepted)", lambda: (_x(3, 4), T3.to(torch.uint8), {})),
    ("uint8 target, smoothing and ignore_index (accepted)", lambda: (_x(3, 4), T3.to(torch.uint8), {"label_smoothing": 0.2, "ignore_index": 1})),
    ("uint8 target 156, ignore_index -100", lambda: (_x(2, 200), _i(156, 3, dtype=torch.uint8), {"reduction": "none"})),
    ("uint8 target, unbatched (accepted)", lambda: (_x(4), _i(2, dtype=torch.uint8)[0], {})),
    ("uint8 target, K-dim", lambda: (_x(2, 4, 3), torch.zeros(2, 3, dtype=torch.uint8), {})),
    ("uint8 target, 4-d", lambda: (_x(2, 4, 3, 3), torch.zeros(2, 3, 3, dtype=torch.uint8), {})),
    ("int64 probabilities", lambda: (_x(3, 4), torch.zeros(3, 4, dtype=torch.long), {})),
    ("bool probabilities", lambda: (_x(3, 4), _p(3, 4) > 0.2, {})),
    ("float16 probabilities (accepted)", lambda: (_x(3, 4), _p(3, 4).half(), {})),
    ("target a list", lambda: (_x(3, 4), [0, 1, 2], {})),
    # logits dtypes
    ("int64 logits", lambda: (_x(3, 4).long(), T3, {})),
    ("int64 logits, probabilities", lambda: (_x(3, 4).long(), _p(3, 4), {})),
    ("int64 logits, smoothing", lambda: (_x(3, 4).long(), T3, {"label_smoothing": 0.1})),
    ("int64 logits, short target", lambda: (_x(3, 4).long(), _i(0, 1), {})),
    ("int32 logits", lambda: (_x(3, 4).int(), T3, {})),
    ("bool logits", lambda: (_x(3, 4) > 0, T3, {})),
    ("complex logits", lambda: (_x(3, 4).to(torch.complex64), T3, {})),
    ("logits a list", lambda: ([[0.0, 1.0]], _i(0), {})),
    ("logits a NumPy array", lambda: (_x(3, 4).numpy(), T3, {})),
    # target values
    ("target above C - 1", lambda: (_x(3, 4), _i(0, 1, 4), {})),
    ("negative target", lambda: (_x(3, 4), _i(0, -1, 2), {})),
    ("target -100 with another ignore_index", lambda: (_x(3, 4), _i(0, -100, 2), {"ignore_index": 1})),
    ("target out of range, smoothing", lambda: (_x(3, 4), _i(0, 1, 4), {"label_smoothing": 0.1})),
    ("target out of range, weight", lambda: (_x(3, 4), _i(0, 1, 4), {"weight": torch.rand(4)})),
    ("target out of range, reduction none", lambda: (_x(3, 4), _i(0, 1, 4), {"reduction": "none"})),
    ("target out of range, K-dim", lambda: (_x(2, 4, 3), torch.full((2, 3), 4), {})),
    ("target out of range, 4-d", lambda: (_x(2, 4, 3, 3), torch.full((2, 3, 3), -2), {})),
    ("target out of range, unbatched", lambda: (_x(4), _i(4)[0], {})),
    ("uint8 target out of range", lambda: (_x(2, 4), _i(0, 9, dtype=torch.uint8), {})),
    ("negative target that is ignore_index (accepted)", lambda: (_x(3, 4), _i(0, -1, 2), {"ignore_index": -1})),
    ("no classes, a kept target", lambda: (_x(3, 0), torch.zeros(3, dtype=torch.long), {})),
    ("no classes, all ignored (accepted)", lambda: (_x(3, 0), torch.full((3,), -100), {})),
    ("no classes, all ignored, smoothing (accepted)", lambda: (_x(3, 0), torch.full((3,), -100), {"reduction": "none", "label_smoothing": 0.1})),
    ("no classes, probabilities (accepted)", lambda: (_x(3, 0), _x(3, 0), {})),
    ("no classes, probabilities, none (accepted)", lambda: (_x(3, 0), _x(3, 0), {"reduction": "none"})),
    ("empty batch (accepted)", lambda: (_x(0, 4), torch.zeros(0, dtype=torch.long), {"label_smoothing": 0.1})),
    ("empty batch, probabilities (accepted)", lambda: (_x(0, 4), _x(0, 4), {})),
    # ignore_index
    ("probabilities with ignore_index 0", lambda: (_x(3, 4), _p(3, 4), {"ignore_index": 0})),
    ("probabilities with ignore_index 3", lambda: (_x(3, 4), _p(3, 4), {"ignore_index": 3})),
    ("probabilities with ignore_index 100", lambda: (_x(3, 4), _p(3, 4), {"ignore_index": 100})),
    ("probabilities with ignore_index -1 (accepted)", lambda: (_x(3, 4), _p(3, 4), {"ignore_index": -1})),
    ("ignore_index a float", lambda: (_x(3, 4), T3, {"ignore_index": 1.0})),
    ("ignore_index a bool", lambda: (_x(3, 4), T3, {"ignore_index": True})),
    ("ignore_index a string", lambda: (_x(3, 4), T3, {"ignore_index": "1"})),
    ("ignore_index None", lambda: (_x(3, 4), T3, {"ignore_index": None})),
    ("ignore_index a float tensor", lambda: (_x(3, 4), T3, {"ignore_index": torch.tensor(1.0)})),
    ("ignore_index a 2-element tensor", lambda: (_x(3, 4), T3, {"ignore_index": _i(1, 2)})),
    ("ignore_index a 1-d NumPy array", lambda: (_x(3, 4), T3, {"ignore_index": np.array([1])})),
    ("ignore_index beyond int64", lambda: (_x(3, 4), T3, {"ignore_index": 2**70})),
    ("ignore_index an int tensor (accepted)", lambda: (_x(3, 4), T3, {"ignore_index": torch.tensor(1)})),
    ("ignore_index a (1,) uint8 tensor (accepted)", lambda: (_x(3, 4), T3, {"ignore_index": _i(1, dtype=torch.uint8)})),
    ("ignore_index a NumPy int (accepted)", lambda: (_x(3, 4), T3, {"ignore_index": np.int64(1)})),
    # label_smoothing
    ("label_smoothing 1.5", lambda: (_x(3, 4), T3, {"label_smoothing": 1.5})),
    ("label_smoothing just above 1", lambda: (_x(3, 4), T3, {"label_smoothing": 1 + 1e-12})),
    ("label_smoothing inf", lambda: (_x(3, 4), T3, {"label_smoothing": float("inf")})),
    ("label_smoothing 1.5, probabilities", lambda: (_x(3, 4), _p(3, 4), {"label_smoothing": 1.5})),
    ("label_smoothing 2 with int logits", lambda: (_x(3, 4).long(), T3, {"label_smoothing": 2.0})),
    ("label_smoothing 1 (accepted)", lambda: (_x(3, 4), T3, {"label_smoothing": 1.0})),
    ("label_smoothing -0.1 (accepted)", lambda: (_x(3, 4), T3, {"label_smoothing": -0.1})),
    ("label_smoothing -1.5 (accepted)", lambda: (_x(3, 4), T3, {"label_smoothing": -1.5})),
    ("label_smoothing -0.1, probabilities (accepted)", lambda: (_x(3, 4), _p(3, 4), {"label_smoothing": -0.1})),
    ("label_smoothing NaN (accepted)", lambda: (_x(3, 4), T3, {"label_smoothing": float("nan")})),
    ("label_smoothing True (accepted)", lambda: (_x(3, 4), T3, {"label_smoothing": True})),
    ("label_smoothing a 0-dim tensor (accepted)", lambda: (_x(3, 4), T3, {"label_smoothing": torch.tensor(0.1)})),
    ("label_smoothing a NumPy float (accepted)", lambda: (_x(3, 4), T3, {"label_smoothing": np.float32(0.1)})),
    ("label_smoothing a string", lambda: (_x(3, 4), T3, {"label_smoothing": "0.1"})),
    ("label_smoothing None", lambda: (_x(3, 4), T3, {"label_smoothing": None})),
    ("label_smoothing complex", lambda: (_x(3, 4), T3, {"label_smoothing": 0.1j})),
    ("label_smoothing a Fraction", lambda: (_x(3, 4), T3, {"label_smoothing": Fraction(1, 10)})),
    ("label_smoothing a (1,) tensor", lambda: (_x(3, 4), T3, {"label_smoothing": torch.tensor([0.1])})),
    # reduction
    ("reduction 'average'", lambda: (_x(3, 4), T3, {"reduction": "average"})),
    ("reduction None", lambda: (_x(3, 4), T3, {"reduction": None})),
    ("reduction 'average' with a bad target", lambda: (_x(3, 4), _i(0, 9), {"reduction": "average"})),
]


def _outcome(loss_fn, input, target, kwargs):
    try:
        return loss_fn(input, target, **kwargs), None
    except Exception as error:  # any type: comparing the types is the point
        return None, error


@pytest.mark.parametrize("case", [case for _, case in PARITY_CASES], ids=[name for name, _ in PARITY_CASES])
def test_invalid_input_is_rejected_like_torch(case):
    """Same accept/reject decision and exception type as F.cross_entropy, case by case."""
    input, target, kwargs = case()
    expected, expected_error = _outcome(F.cross_entropy, input, target, kwargs)
    actual, actual_error = _outcome(logsumexp_cross_entropy, input, target, kwargs)
    if expected_error is not None:
        assert actual_error is not None, f"torch raises {expected_error!r}; ours returned {actual}"
        assert type(actual_error) is type(expected_error), (
            f"torch raises {type(expected_error).__name__}: {expected_error}; "
            f"ours {type(actual_error).__name__}: {actual_error}")
        assert str(actual_error).strip(), "an exception without a message"
    else:
        assert actual_error is None, f"torch accepts this; ours raised {actual_error!r}"
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual.detach(), expected.detach(), equal_nan=True)


def test_parity_table_covers_both_outcomes():
    # Guards the table itself: mostly rejections, but some accepted oddities too.
    rejected = sum(_outcome(F.cross_entropy, *case())[1] is not None for _, case in PARITY_CASES)
    assert rejected >= 60 and len(PARITY_CASES) - rejected >= 20


def _random_case(rng):
    """Logits, target and keyword arguments drawn around valid ones: sizes off by one or
    zero, other dtypes, weights of other lengths and dtypes, out-of-range and ignored targets.

    Leaves out three things torch does that are accidents of its C++ code rather than
    decisions: integer logits that are empty, a 0-dim target with a batch of 0 (torch reads
    a size the target does not have) and uint8 targets >= 128 out of range (torch fails
    to format its message, UnicodeDecodeError).
    """
    n_dims = rng.choice([1, 2, 2, 3, 4, 5])
    shape = [rng.choice([0, 1, 2, 3, 4]) if rng.random() < 0.2 else rng.choice([2, 3, 4]) for _ in range(n_dims)]
    n_classes = shape[1] if n_dims > 1 else shape[0]
    dtype = rng.choice([torch.float32] * 4 + [torch.float64, torch.float16, torch.long])
    if dtype == torch.long and 0 in shape:
        dtype = torch.float32
    logits = torch.randn(shape).to(dtype)
    if rng.random() < 0.3:  # probabilities, maybe of a neighbouring shape or dtype
        target_shape = list(shape)
        if rng.random() < 0.3:
            target_shape[rng.randrange(n_dims)] += 1
        target = torch.rand(target_shape).to(rng.choice([torch.float32] * 3 + [torch.float64, torch.long]))
    else:  # class indices
        target_shape = shape[:1] + shape[2:] if n_dims > 1 else rng.choice([[], [1]])
        if rng.random() < 0.3:
            change = rng.choice(["grow", "add", "drop"])
            if change == "grow" and target_shape:
                target_shape[rng.randrange(len(target_shape))] += 1
            elif change == "add":
                target_shape = target_shape + [1]
            elif target_shape and not (n_dims > 1 and len(target_shape) == 1 and shape[0] == 0):
                target_shape = target_shape[:-1]
        low = -1 if rng.random() < 0.3 else 0
        target = torch.randint(low, max(n_classes, 1) + 1 + low, target_shape)
        if rng.random() < 0.2 and target.numel():
            target.view(-1)[0] = -100
        if not (target < 0).any():
            target = target.to(rng.choice([torch.long] * 4 + [torch.uint8, torch.int32]))
    kwargs = {}
    if rng.random() < 0.3:
        weight_dtype = rng.choice([dtype, dtype, torch.float64]) if dtype.is_floating_point else torch.float32
        kwargs["weight"] = torch.rand(max(n_classes + rng.choice([0, 0, 0, 1, -1]), 0)).to(weight_dtype)
    if rng.random() < 0.3:
        kwargs["label_smoothing"] = rng.choice([0.0, 0.1, 1.0, 1.2, -0.1])
    if rng.random() < 0.2:
        kwargs["ignore_index"] = rng.choice([-1, 0, 1, -100])
    if rng.random() < 0.3:
        kwargs["reduction"] = rng.choice(["none", "sum", "mean"])
    return logits, target, kwargs


def test_random_inputs_are_accepted_or_rejected_like_torch():
    rng = random.Random(0)
    for _ in range(1000):
        input, target, kwargs = _random_case(rng)
        expected, expected_error = _outcome(F.cross_entropy, input, target, kwargs)
        actual, actual_error = _outcome(logsumexp_cross_entropy, input, target, kwargs)
        case = f"input {input.dtype} {tuple(input.shape)}, target {target.dtype} {tuple(target.shape)}, {kwargs}"
        assert type(actual_error) is type(expected_error), f"{case}: torch {expected_error!r}, ours {actual_error!r}"
        if expected_error is None:
            assert actual.shape == expected.shape and actual.dtype == expected.dtype, case
            tol = 1e-2 if input.dtype == torch.float16 else 1e-5
            torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, equal_nan=True, msg=case)


@pytest.mark.parametrize("kwargs, target, error, message", [
    ({}, _i(0, 1), ValueError, r"batch_size \(3\).*batch_size \(2\)"),
    ({"weight": torch.rand(3)}, T3, RuntimeError, r"weight must have shape \(4,\)"),
    ({}, _i(0, 1, 4), IndexError, r"Target 4 is out of bounds.*\[0, 3\]"),
    ({}, T3.int(), RuntimeError, "target dtype int64.*torch.int32"),
    ({"label_smoothing": 1.5}, T3, RuntimeError, "label_smoothing must be between 0.0 and 1.0"),
    ({"ignore_index": 0}, _p(3, 4), RuntimeError, "ignore_index is not supported"),
    ({"weight": torch.rand(4, dtype=torch.float64)}, T3, RuntimeError, "weight dtype torch.float64"),
])
def test_invalid_input_messages_name_the_problem(kwargs, target, error, message):
    with pytest.raises(error, match=message):
        logsumexp_cross_entropy(_x(3, 4), target, **kwargs)


def test_integer_logits_message():
    with pytest.raises(NotImplementedError, match="torch.int64 logits.*floating point"):
        logsumexp_cross_entropy(_x(3, 4).long(), T3)


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
    assert LOSSES["mse_loss"] is mse_loss
    assert set(LOSSES) == {"nll_loss", "cross_entropy", "logsumexp_cross_entropy", "mse_loss"}
    assert all(callable(fn) for fn in LOSSES.values())


@pytest.mark.parametrize("output_shape", [(6, 1), (6,)])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float64, torch.long])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_mse_loss_takes_a_one_unit_output_and_any_real_target(output_shape, target_dtype, reduction):
    output = torch.randn(output_shape, requires_grad=True)
    target = torch.arange(6).to(target_dtype)
    loss = mse_loss(output, target, reduction=reduction)
    expected = (output.detach().reshape(6) - target.float()) ** 2
    expected = {"none": expected, "mean": expected.mean(), "sum": expected.sum()}[reduction]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), expected)
    loss.sum().backward()
    assert output.grad.shape == output.shape


@pytest.mark.parametrize("output_shape, target_shape", [
    ((6, 2), (6,)),   # two outputs per sample
    ((5, 1), (6,)),   # wrong batch
    ((6,), (6, 1)),   # a target with the extra dimension is not squeezed
    ((6, 1, 1), (6,)),
])
def test_mse_loss_rejects_mismatched_shapes_instead_of_broadcasting(output_shape, target_shape):
    with pytest.raises(ValueError, match="does not match target shape"):
        mse_loss(torch.randn(output_shape), torch.randn(target_shape))
