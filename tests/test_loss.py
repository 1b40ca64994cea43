"""Tests for model/loss.py, with torch.nn.functional.cross_entropy as the reference."""
import itertools
import json
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import make_config, with_changes
from model.loss import LOSSES, check_cross_entropy, cross_entropy, logsumexp_cross_entropy, mse_loss, nll_loss

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
N_CLASSES = 5
SHAPES = [(6, N_CLASSES), (3, N_CLASSES, 2, 4)]  # (N, C) and (N, C, d1, d2)
INF = float("inf")


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


def _parity_cases():
    """The table: dicts of a name, logits, a target and keyword arguments, all valid input."""
    cases = []
    grid = itertools.product(SHAPES, [torch.float32, torch.float64], ["none", "mean", "sum"], [False, True],
                             [0.0, 0.1, 0.3])
    for shape, dtype, reduction, use_weight, smoothing in grid:
        generator = torch.Generator().manual_seed(0)
        logits = 3 * torch.randn(shape, generator=generator, dtype=dtype)
        weight = torch.rand(N_CLASSES, generator=generator, dtype=dtype) + 0.5 if use_weight else None
        common = {"reduction": reduction, "label_smoothing": smoothing, "weight": weight}
        about = f"{shape} {dtype} {reduction} weight={use_weight} smoothing={smoothing}"
        for ignore_index in (None, -100, 1):  # 1: an ignored real class
            kwargs = dict(common, **({} if ignore_index is None else {"ignore_index": ignore_index}))
            cases.append(dict(name=f"indices {about} ignore_index={ignore_index}", logits=logits,
                              target=_index_targets(shape, ignore_index, generator), kwargs=kwargs))
        for ignore_index in (None, -1):  # a negative ignore_index has no effect on probabilities
            kwargs = dict(common, **({} if ignore_index is None else {"ignore_index": ignore_index}))
            cases.append(dict(name=f"probabilities {about} ignore_index={ignore_index}", logits=logits,
                              target=_probability_targets(shape, dtype, generator), kwargs=kwargs))
    for dtype, reduction, probabilities in itertools.product([torch.float32, torch.float64], ["none", "mean", "sum"],
                                                             [False, True]):
        generator = torch.Generator().manual_seed(0)
        logits = torch.randn(N_CLASSES, generator=generator, dtype=dtype)
        target = _probability_targets((1, N_CLASSES), dtype, generator)[0] if probabilities else torch.tensor(3)
        weight = torch.rand(N_CLASSES, generator=generator, dtype=dtype) + 0.5
        cases.append(dict(name=f"unbatched {dtype} {reduction} probabilities={probabilities}", logits=logits,
                          target=target, kwargs={"weight": weight, "reduction": reduction, "label_smoothing": 0.1}))
    for reduction, use_weight, smoothing in itertools.product(["none", "mean", "sum"], [False, True], [0.0, 0.1]):
        weight = torch.rand(N_CLASSES, dtype=torch.float64) + 0.5 if use_weight else None
        cases.append(dict(name=f"all ignored {reduction} weight={use_weight} smoothing={smoothing}",
                          logits=torch.randn(4, N_CLASSES, dtype=torch.float64), target=torch.full((4,), -100),
                          kwargs={"weight": weight, "reduction": reduction, "label_smoothing": smoothing}))
    for dtype, reduction, smoothing, use_weight in itertools.product(
            [torch.float32, torch.float64], ["none", "mean", "sum"], [0.0, 0.1], [False, True]):
        # No target on a -inf logit; the last row is ignored and has -inf at class 0. With smoothing,
        # the -inf classes make torch's loss +inf (the gradient stays finite).
        weight = torch.linspace(0.5, 1.5, N_CLASSES, dtype=dtype) if use_weight else None
        cases.append(dict(name=f"extreme logits {dtype} {reduction} smoothing={smoothing} weight={use_weight}",
                          logits=_extreme_logits(dtype), target=torch.tensor([2, 4, 3, 0, 2, -100]),
                          kwargs={"weight": weight, "reduction": reduction, "label_smoothing": smoothing}))
    cases.append(dict(name="empty batch", logits=torch.randn(0, N_CLASSES), target=torch.zeros(0, dtype=torch.long),
                      kwargs={"label_smoothing": 0.1}))
    return cases


PARITY_CASES = _parity_cases()


def test_matches_torch_in_value_and_gradient():
    """Every case of the table: accepted by the check, and the loss and its gradients (w.r.t. the logits, and
    w.r.t. probability targets) equal to F.cross_entropy's, NaN and inf included."""
    for case in PARITY_CASES:
        name, logits, target, kwargs = case["name"], case["logits"], case["target"], case["kwargs"]
        dtype = logits.dtype
        check_cross_entropy(logits, target, **kwargs)
        grad_output = None
        if kwargs.get("reduction") == "none":  # a non-uniform upstream gradient tests more than sum()
            out_shape = (logits.shape[0],) + logits.shape[2:] if logits.dim() > 1 else ()
            grad_output = torch.rand(out_shape, generator=torch.Generator().manual_seed(1), dtype=dtype) + 0.5
        expected, expected_grads = _loss_and_grads(F.cross_entropy, logits, target, grad_output, **kwargs)
        actual, actual_grads = _loss_and_grads(logsumexp_cross_entropy, logits, target, grad_output, **kwargs)
        assert actual.dtype == dtype and actual.shape == expected.shape, name
        tol = dict(atol=TOL[dtype], rtol=TOL[dtype], equal_nan=True)
        torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{name}, loss: {m}")
        for which, a, e in zip(("logits", "target"), actual_grads, expected_grads):
            torch.testing.assert_close(a, e, **tol, msg=lambda m: f"{name}, gradient w.r.t. the {which}: {m}")


def test_parity_table_covers_the_grid():
    # Guards the table itself: unique names (a failure names one case), and every kind of case in its number.
    names = [case["name"] for case in PARITY_CASES]
    assert len(names) == len(set(names))
    kinds = ["indices", "probabilities", "unbatched", "all ignored", "extreme logits", "empty batch"]
    assert [sum(name.startswith(kind) for name in names) for kind in kinds] == [216, 144, 12, 12, 24, 1]


def test_extreme_logits_need_the_max_subtracted():
    # the premise of the extreme-logit cases: naive exp() overflows there, torch's loss stays finite
    assert torch.exp(torch.tensor(1e4)).isinf()
    logits = _extreme_logits(torch.float32)
    target = torch.tensor([2, 4, 3, 0, 2, -100])
    assert F.cross_entropy(logits, target, reduction="none").isfinite().all()
    assert logsumexp_cross_entropy(logits, target, reduction="none").isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probability_targets_with_zero_probability_on_minus_inf_logits(dtype):
    # torch computes 0 * -inf = NaN for the loss here (its gradient w.r.t. the logits is finite); ours takes
    # the limit p * log q -> 0, which is torch's value for a logit so negative that its probability is 0.
    logits = _extreme_logits(dtype)
    target = _probability_targets(logits.shape, dtype, torch.Generator().manual_seed(0))
    target[logits == -INF] = 0
    target = target / target.sum(dim=1, keepdim=True)
    weight = torch.linspace(0.5, 1.5, N_CLASSES, dtype=dtype)
    for reduction in ("none", "mean", "sum"):
        grad_output = torch.ones(6, dtype=dtype) if reduction == "none" else None
        kwargs = dict(weight=weight, reduction=reduction)
        expected, (expected_grad, _) = _loss_and_grads(F.cross_entropy, logits.nan_to_num(neginf=-1e30), target,
                                                       grad_output, **kwargs)
        _, (torch_grad, _) = _loss_and_grads(F.cross_entropy, logits, target, grad_output, **kwargs)
        actual, (actual_grad, target_grad) = _loss_and_grads(logsumexp_cross_entropy, logits, target, grad_output,
                                                             **kwargs)
        assert actual.isfinite().all() and target_grad.isfinite().all(), reduction
        torch.testing.assert_close(actual, expected, atol=TOL[dtype], rtol=TOL[dtype])
        torch.testing.assert_close(actual_grad, expected_grad, atol=TOL[dtype], rtol=TOL[dtype])
        torch.testing.assert_close(actual_grad, torch_grad, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_rows_without_a_softmax_do_not_leak(label_smoothing):
    # all -inf, and +inf rows: both non-finite like torch, but ignored they add 0 and the
    # other rows keep their values and gradients
    logits = torch.randn(4, N_CLASSES, dtype=torch.float64)
    logits[0] = -INF
    logits[1, 2] = INF
    ones = torch.ones(4, dtype=torch.float64)
    for target in (torch.tensor([-100, -100, 3, 1]), torch.tensor([0, 1, 3, 1])):
        kwargs = dict(reduction="none", label_smoothing=label_smoothing)
        expected, (expected_grad,) = _loss_and_grads(F.cross_entropy, logits, target, ones, **kwargs)
        actual, (actual_grad,) = _loss_and_grads(logsumexp_cross_entropy, logits, target, ones, **kwargs)
        assert (actual.isfinite() == expected.isfinite()).all()
        torch.testing.assert_close(actual[expected.isfinite()], expected[expected.isfinite()])
        torch.testing.assert_close(actual_grad[2:], expected_grad[2:])


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
            lambda x, t: logsumexp_cross_entropy(x, t, weight=weight, label_smoothing=smoothing),
            (logits.requires_grad_(True), target.requires_grad_(True)))


def test_does_not_use_torch_cross_entropy_building_blocks(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("logsumexp_cross_entropy must be written from basic ops")

    for module, name in [(F, "cross_entropy"), (F, "log_softmax"), (F, "nll_loss"),
                         (torch, "logsumexp"), (torch, "log_softmax"),
                         (torch.Tensor, "logsumexp"), (torch.Tensor, "log_softmax")]:
        monkeypatch.setattr(module, name, forbidden)
    logits = torch.randn(4, N_CLASSES, 3, requires_grad=True)
    logsumexp_cross_entropy(logits, torch.randint(0, N_CLASSES, (4, 3)), label_smoothing=0.1).backward()
    logsumexp_cross_entropy(logits, torch.rand(4, N_CLASSES, 3)).backward()


def test_a_step_calls_no_python_function_but_the_loss():
    """The checks run once (the dry batch), not per step: one step of the loss is one Python call, the rest
    torch ops."""
    calls = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.endswith(("model/loss.py", "model\\loss.py")):
            calls.append(frame.f_code.co_name)

    logits, target = torch.randn(8, N_CLASSES, requires_grad=True), torch.tensor([0, 1, 2, 3, 4, -100, 0, 1])
    weight = torch.rand(N_CLASSES) + 0.5
    sys.setprofile(profile)
    try:
        logsumexp_cross_entropy(logits, target, weight=weight, label_smoothing=0.1)
    finally:
        sys.setprofile(None)
    assert calls == ["logsumexp_cross_entropy"]


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


T3 = torch.tensor([0, 1, 2])  # a valid target for (3, 4) logits
# name, output, target, keyword arguments, the fragments the message must hold: what is wrong, what is valid
INVALID = [
    ("target batch shorter", _x(3, 4), torch.tensor([0, 1]), {}, ["must have shape (3,)", "got (2,)"]),
    ("target batch longer", _x(3, 4), torch.tensor([0, 1, 2, 3]), {}, ["must have shape (3,)", "got (4,)"]),
    ("0-dim target, batched output", _x(3, 4), torch.tensor(1), {}, ["must have shape (3,)", "got ()"]),
    ("2-d target for (N, C)", _x(3, 4), T3[:, None], {}, ["must have shape (3,)", "got (3, 1)"]),
    ("K-dim: wrong spatial size", _x(2, 4, 3), torch.zeros(2, 2, dtype=torch.long), {}, ["(2, 3)", "got (2, 2)"]),
    ("K-dim: target without spatial dims", _x(2, 4, 3), torch.zeros(2, dtype=torch.long), {}, ["(2, 3)", "got (2,)"]),
    ("unbatched: target (1,)", _x(4), torch.tensor([3]), {}, ["must have shape ()", "got (1,)"]),
    ("probabilities of the wrong shape", _x(3, 4), torch.rand(3, 5), {}, ["output's shape (3, 4)", "got (3, 5)"]),
    ("float target of index shape", _x(3, 4), T3.float(), {}, ["class probabilities", "(3, 4)", "int64"]),
    ("int32 target", _x(3, 4), T3.int(), {}, ["int64", "torch.int32", ".long()"]),
    ("uint8 target", _x(3, 4), T3.to(torch.uint8), {}, ["int64", "torch.uint8"]),
    ("bool target", _x(3, 4), T3.bool(), {}, ["int64", "torch.bool"]),
    ("target a list", _x(3, 4), [0, 1, 2], {}, ["target must be a tensor", "list"]),
    ("target above C - 1", _x(3, 4), torch.tensor([0, 1, 4]), {}, ["target 4 is not a class", "0 to 3", "(-100)"]),
    ("negative target", _x(3, 4), torch.tensor([0, -1, 2]), {}, ["target -1 is not a class", "0 to 3"]),
    ("-100 with another ignore_index", _x(3, 4), torch.tensor([0, -100, 2]), {"ignore_index": 1},
     ["target -100 is not a class", "ignore_index (1)"]),
    ("out of range, K-dim", _x(2, 4, 3), torch.full((2, 3), 4), {}, ["target 4 is not a class", "0 to 3"]),
    ("out of range, unbatched", _x(4), torch.tensor(4), {}, ["target 4 is not a class", "0 to 3"]),
    ("weight too short", _x(3, 4), T3, {"weight": torch.rand(3)}, ["weight", "shape (4,)", "(3,)"]),
    ("weight too long, probabilities", _x(3, 4), torch.rand(3, 4), {"weight": torch.rand(5)}, ["shape (4,)", "(5,)"]),
    ("weight (C, 1)", _x(3, 4), T3, {"weight": torch.rand(4, 1)}, ["shape (4,)", "(4, 1)"]),
    ("weight int64", _x(3, 4), T3, {"weight": torch.ones(4, dtype=torch.long)}, ["floating-point", "torch.int64"]),
    ("weight a list", _x(3, 4), T3, {"weight": [1.0] * 4}, ["weight must be a floating-point tensor", "list"]),
    ("int64 logits", _x(3, 4).long(), T3, {}, ["floating-point logits", "torch.int64"]),
    ("0-dim logits", _x(1)[0], torch.tensor(0), {}, ["(N, C, ...) or (C,)", "shape ()"]),
    ("logits a list", [[0.0, 1.0]], torch.tensor([0]), {}, ["floating-point logits", "list"]),
    ("no classes", _x(3, 0), torch.full((3,), -100), {}, ["no classes"]),
    ("label_smoothing 1.5", _x(3, 4), T3, {"label_smoothing": 1.5}, ["label_smoothing", "from 0 to 1", "1.5"]),
    ("label_smoothing -0.1", _x(3, 4), T3, {"label_smoothing": -0.1}, ["from 0 to 1", "-0.1"]),
    ("label_smoothing NaN", _x(3, 4), T3, {"label_smoothing": float("nan")}, ["from 0 to 1", "nan"]),
    ("label_smoothing a string", _x(3, 4), T3, {"label_smoothing": "0.1"}, ["from 0 to 1", "'0.1'"]),
    ("ignore_index a float", _x(3, 4), T3, {"ignore_index": 1.0}, ["ignore_index must be an int", "1.0"]),
    ("ignore_index a bool", _x(3, 4), T3, {"ignore_index": True}, ["ignore_index must be an int", "True"]),
    ("ignore_index None", _x(3, 4), T3, {"ignore_index": None}, ["ignore_index must be an int", "None"]),
    ("reduction 'average'", _x(3, 4), T3, {"reduction": "average"}, ['"mean", "sum" or "none"', "'average'"]),
]


def test_invalid_arguments_are_one_error_naming_the_problem_and_what_is_valid():
    for name, output, target, kwargs, fragments in INVALID:
        with pytest.raises(ValueError) as error:
            check_cross_entropy(output, target, **kwargs)
        message = str(error.value)
        assert message.startswith("cross-entropy: ") and "\n" not in message, f"{name}: {message}"
        for fragment in fragments:
            assert fragment in message, f"{name}: {fragment!r} not in {message!r}"


def test_the_check_is_the_loss_attribute_and_accepts_what_configs_pass():
    assert logsumexp_cross_entropy.check is check_cross_entropy
    check_cross_entropy(_x(3, 4), torch.tensor([0, -100, 3]), weight=torch.rand(4), ignore_index=-100,
                        reduction="sum", label_smoothing=1)
    check_cross_entropy(_x(3, 4), torch.tensor([0, 255, 3]), ignore_index=255, label_smoothing=0)


class _OneBatch:
    """A loader of one batch, for the dry batch."""

    def __init__(self, data, target):
        self.batch, self.batch_size, self.sampler = (data, target), len(target), range(len(target))

    def __len__(self):
        return 1

    def __iter__(self):
        return iter([self.batch])

    def set_epoch(self, epoch, step):
        pass


def test_the_dry_batch_reports_a_bad_target_as_one_user_error():
    from trainer import build
    from utils.errors import UserError

    config = {"arch": {"type": "Linear"}, "data_loader": {"args": {}}, "loss": {"type": "logsumexp_cross_entropy"},
              "trainer": {"amp": None}}
    model = torch.nn.Linear(6, 4)
    loader = _OneBatch(torch.randn(8, 6), torch.randint(0, 4, (8,), dtype=torch.int32))
    parts = SimpleNamespace(data_loader=loader, valid_data_loader=None, model=model, device=torch.device("cpu"),
                            criterion=logsumexp_cross_entropy, metric_fns=[], valid_metric_fns=[], task=None)
    with pytest.raises(UserError) as error:
        build.dry_batch(config, parts)
    message = str(error.value)
    assert error.value.exit_code == 2 and "\n" not in message
    assert message.startswith("loss: logsumexp_cross_entropy cannot take the model's output [8, 4]"), message
    assert "class-index targets must be int64 (torch.long), got torch.int32" in message
    loader.batch = (loader.batch[0], loader.batch[1].long())
    build.dry_batch(config, parts)  # the same batch with int64 targets passes


def test_a_loss_argument_the_data_does_not_fit_is_one_error_line_before_the_run(tmp_path, capsys):
    from trainer import cli

    config = with_changes(make_config(tmp_path / "saved"),
                          loss={"type": "logsumexp_cross_entropy", "args": {"weight": [1.0, 2.0]}})
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    code = cli.train_command(["-c", str(path)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: loss: logsumexp_cross_entropy"), lines
    assert "weight must be a floating-point tensor of shape (3,), one value per class" in lines[0], lines[0]
    assert not (tmp_path / "saved").exists()


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
    assert LOSSES == {"nll_loss": nll_loss, "cross_entropy": cross_entropy,
                      "logsumexp_cross_entropy": logsumexp_cross_entropy, "mse_loss": mse_loss}


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
