"""Epoch loss and metrics weighted by what each batch averages over (ignore_index, class weights), and class
weights given as a list in the config."""

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from model.loss import cross_entropy, logsumexp_cross_entropy, mse_loss, nll_loss
from model.metric import METRICS, accuracy, top_k_acc
from trainer import build, run
from trainer.trainer import evaluate
from trainer.extras import roll_back, running_sums
from trainer.trainer import MetricTracker, batch_weights
from conftest import FixedLogits, make_config, with_changes

ROOT = Path(__file__).resolve().parents[1]


def _two_batches():
    """Two batches of 5; four targets of the first are ignored (-100)."""
    g = torch.Generator().manual_seed(3)
    output = torch.randn(10, 4, generator=g) * 3
    target = torch.randint(0, 4, (10,), generator=g)
    target[:4] = -100
    return output, target


def _evaluate(criterion, metric_fns, output, target, batch=5):
    loader = [(torch.arange(i, min(i + batch, len(target))), target[i:i + batch]) for i in range(0, len(target), batch)]
    return evaluate(FixedLogits(output), loader, criterion, metric_fns, torch.device("cpu"))


@pytest.mark.parametrize("loss", [logsumexp_cross_entropy, cross_entropy])
def test_epoch_loss_is_the_mean_over_the_kept_targets(loss):
    output, target = _two_batches()
    result = _evaluate(loss, [accuracy, top_k_acc], output, target)
    whole = F.cross_entropy(output, target).item()  # the mean over the 6 kept targets
    batch_means = [F.cross_entropy(output[i:i + 5], target[i:i + 5]).item() for i in (0, 5)]
    assert result["loss"] == pytest.approx(whole, rel=1e-6)
    assert abs(sum(batch_means) / 2 - whole) > 0.05  # sample-count weighting would have been visibly wrong here
    kept = target != -100
    assert result["accuracy"] == pytest.approx((output.argmax(1) == target)[kept].float().mean().item())
    top3 = (output.topk(3, 1).indices == target[:, None]).any(1)
    assert result["top_k_acc"] == pytest.approx(top3[kept].float().mean().item())


def test_class_weights_and_a_custom_ignore_index():
    output, target = _two_batches()
    target = target.masked_fill(target == -100, 3)  # class 3 is now the ignored one
    weight = torch.tensor([0.5, 2.0, 1.0, 4.0])
    loss = functools.partial(logsumexp_cross_entropy, weight=weight, ignore_index=3)
    result = _evaluate(loss, [], output, target, batch=3)  # uneven: 3, 3, 3, 1
    assert result["loss"] == pytest.approx(F.cross_entropy(output, target, weight=weight, ignore_index=3).item(), rel=1e-6)
    nll = functools.partial(nll_loss, weight=weight, ignore_index=3)
    result = _evaluate(nll, [], output.log_softmax(1), target, batch=4)
    assert result["loss"] == pytest.approx(F.nll_loss(output.log_softmax(1), target, weight=weight, ignore_index=3).item(), rel=1e-6)


def test_accuracy_leaves_ignored_targets_out():
    output = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    target = torch.tensor([0, -100, -100, 0])  # one right, one wrong, two ignored
    assert accuracy(output, target).item() == 0.5
    assert top_k_acc(output, target, k=1).item() == 0.5
    assert accuracy(output, torch.full((4,), -100)).item() == 0.0  # nothing kept: 0, not NaN
    assert accuracy(output, torch.tensor([0, 0, 1, 1])).item() == 1.0


def test_a_batch_with_every_target_ignored_adds_nothing():
    output, target = _two_batches()
    target[5:] = -100  # the second batch is all ignored: its loss is NaN (a mean over nothing)
    result = _evaluate(logsumexp_cross_entropy, [accuracy], output, target)
    assert result["loss"] == pytest.approx(F.cross_entropy(output[:5], target[:5]).item(), rel=1e-6)
    assert result["accuracy"] == pytest.approx(accuracy(output[:5], target[:5]).item())


def test_losses_without_a_target_count_keep_the_sample_count_fast_path():
    output, target = torch.randn(6, 1), torch.randn(6)
    assert batch_weights([mse_loss], output, target) is None
    probabilities = torch.softmax(torch.randn(6, 3), 1)
    assert batch_weights([cross_entropy], torch.randn(6, 3), probabilities) is None  # averages over positions
    assert batch_weights([functools.partial(cross_entropy, reduction="sum")], torch.randn(6, 3), target.long()) is None
    assert batch_weights([lambda o, t: o.mean()], output, target) is None


def test_tracker_state_round_trip_keeps_the_weights_and_reads_old_checkpoints():
    output, target = _two_batches()
    fns = [logsumexp_cross_entropy, accuracy]
    tracker = MetricTracker(["loss", "accuracy"], "cpu")
    tracker.update([fn(output[:5], target[:5]) for fn in fns], 5, batch_weights(fns, output[:5], target[:5]))
    state = tracker.state_dict()
    assert state["weights"].tolist() == [1.0, 1.0] and state["count"] == 5
    resumed = MetricTracker(["loss", "accuracy"], "cpu")
    resumed.load_state_dict(state)
    as_trainer = SimpleNamespace(train_metrics=resumed, epoch_metrics=[])
    mark = running_sums(as_trainer)
    for t in (tracker, resumed):
        t.update([fn(output[5:], target[5:]) for fn in fns], 5, batch_weights(fns, output[5:], target[5:]))
    assert resumed.result() == tracker.result()
    assert resumed.result()["loss"] == pytest.approx(F.cross_entropy(output, target).item(), rel=1e-6)
    roll_back(as_trainer, mark)
    assert resumed.result()["loss"] == pytest.approx(F.cross_entropy(output[:5], target[:5]).item(), rel=1e-6)
    old = MetricTracker(["loss"], "cpu")
    old.load_state_dict({"sums": torch.tensor([6.0], dtype=torch.float64), "count": 4})  # a checkpoint from before
    assert old.result()["loss"] == 1.5


# --------------------------------------------------------------------------- loss weight as a list


def test_a_weight_list_becomes_a_tensor_and_weights_the_loss(tmp_path):
    config = make_config(tmp_path / "saved")
    config["loss"] = {"type": "cross_entropy", "args": {"weight": [1, 2.5, 0.5]}}
    loss = build.build_loss(config, torch.device("cpu"))
    weight = loss.keywords["weight"]
    assert isinstance(weight, torch.Tensor) and weight.dtype == torch.float32 and weight.tolist() == [1, 2.5, 0.5]
    output, target = torch.randn(8, 3), torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])
    assert loss(output, target) == torch.nn.functional.cross_entropy(output, target, weight=weight)
    assert loss(output, target) != torch.nn.functional.cross_entropy(output, target)
    metrics = run.train(with_changes(config, trainer__epochs=1), run_id="w")  # was: a list reached F.cross_entropy
    assert metrics["loss"] == metrics["loss"]


def _train_cli(tmp_path, capsys, *overrides):
    """``train.py -c config.json ...`` in this process (train.py's own code, without a second torch import)."""
    from types import SimpleNamespace

    from trainer import cli

    capsys.readouterr()
    code = cli.train_command(["-c", str(ROOT / "config.json"), f"trainer.save_dir={tmp_path / 'saved'}",
                              "trainer.monitor=off", *overrides])
    assert not (tmp_path / "saved").exists(), "something was written"
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


@pytest.mark.parametrize("weight", [["a", 1, 1], [1, None, 1], []], ids=["a-string", "a-null", "empty"])
def test_a_weight_list_that_is_not_numbers_is_one_line(tmp_path, capsys, weight):
    loss = {"type": "cross_entropy", "args": {"weight": weight}}
    proc = _train_cli(tmp_path, capsys, f"loss={json.dumps(loss)}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: loss.args.weight: expected a list of numbers, one per class, got {json.dumps(weight)}"]


def test_mae_metric():
    output, target = torch.tensor([[1.0], [2.0], [5.0]]), torch.tensor([1.5, 2.0, 3.0])
    assert METRICS["mae"](output, target).item() == pytest.approx(2.5 / 3)
    assert METRICS["mae"](output.view(-1), target).item() == pytest.approx(2.5 / 3)
