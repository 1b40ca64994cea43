"""Epoch loss and metrics weighted by what each batch averages over (ignore_index, class weights)."""

import functools

import pytest
import torch
import torch.nn.functional as F

from model.loss import cross_entropy, logsumexp_cross_entropy, mse_loss, nll_loss
from model.metric import METRICS, accuracy, top_k_acc
from trainer.trainer import evaluate
from utils.metric_tracker import MetricTracker, batch_weights
from conftest import FixedLogits


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
    mark = resumed.mark()
    for t in (tracker, resumed):
        t.update([fn(output[5:], target[5:]) for fn in fns], 5, batch_weights(fns, output[5:], target[5:]))
    assert resumed.result() == tracker.result()
    assert resumed.result()["loss"] == pytest.approx(F.cross_entropy(output, target).item(), rel=1e-6)
    resumed.rollback(mark)
    assert resumed.result()["loss"] == pytest.approx(F.cross_entropy(output[:5], target[:5]).item(), rel=1e-6)
    old = MetricTracker(["loss"], "cpu")
    old.load_state_dict({"sums": torch.tensor([6.0], dtype=torch.float64), "count": 4})  # a checkpoint from before
    assert old.result()["loss"] == 1.5


# --------------------------------------------------------------------------- timm models by name


def _timm_config(tiny_config, **args):
    config = dict(tiny_config)
    config["arch"] = {"type": "timm.test_resnet", "args": {"num_classes": 3, "in_chans": 1, **args}}
    config["data_loader"] = {**tiny_config["data_loader"],
                             "args": {**tiny_config["data_loader"]["args"], "input_shape": [1, 16, 16], "num_samples": 96}}
    config["trainer"] = {**tiny_config["trainer"], "epochs": 1}
    return config


def test_a_timm_model_by_name_trains_and_evaluates(tiny_config):
    pytest.importorskip("timm")
    from trainer import run

    config = _timm_config(tiny_config)
    metrics = run.train(config, run_id="timm")
    assert metrics["epoch"] == 1 and metrics["loss"] == metrics["loss"]  # finite, not NaN
    folder = config_folder(config, "timm")
    scores = run.evaluate_checkpoint(folder / "model_best.pth", write=False, progress=False)
    assert scores["n_samples"] > 0 and 0 <= scores["accuracy"] <= 1


def config_folder(config, run_id):
    from pathlib import Path

    return Path(config["trainer"]["save_dir"]) / "models" / config["name"] / run_id


def test_an_unknown_timm_name_gets_a_did_you_mean(tiny_config):
    pytest.importorskip("timm")
    from trainer import build
    from utils.config import ConfigError, validate_config

    config = _timm_config(tiny_config)
    config["arch"]["type"] = "timm.resnet181"
    with pytest.raises(ConfigError, match=r"unknown timm model 'resnet181'; did you mean 'resnet18"):
        validate_config(config, build.registries())


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_path_loads_local_weights_that_fit_and_reports_the_rest(suffix, tmp_path):
    timm = pytest.importorskip("timm")
    from model.timm_models import timm_model

    source = timm.create_model("test_resnet", pretrained=False, num_classes=5, in_chans=1)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)
    model = timm_model("timm.test_resnet")(num_classes=3, in_chans=1, pretrained_path=str(path))
    own, theirs = model.state_dict(), source.state_dict()
    head = [k for k in own if own[k].shape != theirs[k].shape]
    assert head and all(k.startswith("head") or k.startswith("fc") for k in head)
    for key in own:
        if key not in head:
            assert torch.equal(own[key], theirs[key]), key
    assert "skipped for a different shape" in model.init_report and head[0] in model.init_report


def test_pretrained_path_missing_is_a_user_error(tmp_path):
    pytest.importorskip("timm")
    from model.timm_models import timm_model
    from utils.errors import UserError

    with pytest.raises(UserError, match="nothing is downloaded"):
        timm_model("timm.test_resnet")(num_classes=3, pretrained_path=str(tmp_path / "none.safetensors"))


def test_predict_and_export_a_timm_checkpoint_without_its_pretrained_file(tiny_config, tmp_path):
    timm = pytest.importorskip("timm")
    from trainer import export, run
    from trainer.predict import load_for_inference

    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3, in_chans=1).state_dict(), weights)
    config = _timm_config(tiny_config, pretrained_path=str(weights))
    run.train(config, run_id="pre")
    weights.unlink()  # gone: the checkpoint holds the weights
    ckpt = config_folder(config, "pre") / "model_best.pth"
    assert load_for_inference(ckpt).model.training is False
    _, info = export.export_checkpoint(ckpt, "torchscript", tmp_path / "m.pt")
    assert info["input_shape"] == ["batch", 1, 16, 16] and info["max_abs_diff"] <= export.ATOL


def test_mae_metric():
    output, target = torch.tensor([[1.0], [2.0], [5.0]]), torch.tensor([1.5, 2.0, 3.0])
    assert METRICS["mae"](output, target).item() == pytest.approx(2.5 / 3)
    assert METRICS["mae"](output.view(-1), target).item() == pytest.approx(2.5 / 3)
