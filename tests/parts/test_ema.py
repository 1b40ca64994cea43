"""The EMA part (parts/ema.py): the average by hand, what validation and test.py score, exact resume."""

from pathlib import Path

import pytest
import torch

from conftest import make_config, with_changes
from model.builtin import MLP
from trainer import build, run
from utils.errors import ConfigError


def load(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def run_dir(config, run_id):
    return Path(config["trainer"]["save_dir"]) / "models" / config["name"] / run_id


@pytest.mark.parametrize("value,expected", [
    ({"decay": 1.5}, "trainer.ema: got {\"decay\": 1.5}, expected decay to be a number in [0, 1)"),
    ({"decy": 0.9}, "did you mean 'decay'"),
])
def test_bad_settings_are_one_line_config_errors(tiny_config, value, expected):
    with pytest.raises(ConfigError) as err:
        run.checked_config(with_changes(tiny_config, trainer__ema=value))
    assert len(err.value.problems) == 1 and expected in err.value.problems[0]


def test_checkpoints_are_scored_with_the_average(tmp_path):
    config = make_config(tmp_path / "saved", epochs=1, ema={"decay": 0.9})
    run.train(config, run_id="e")
    ckpt = tmp_path / "saved/models/tiny/e/checkpoint-epoch1.pth"
    state = torch.load(ckpt, weights_only=True)
    averaged = state["ema"]["weights"]
    assert any(not torch.equal(averaged[k], state["model"][k]) for k in averaged)  # the two differ
    weights = build.trained_model(ckpt)[0].state_dict()
    assert all(torch.equal(weights[k], v) for k, v in averaged.items())


def _ema_config(tiny_config, **changes):
    return with_changes(tiny_config, trainer__ema={"decay": 0.8, "every_n_steps": 2, "warmup": 4}, **changes)


def test_ema_equals_a_reference_average_computed_by_hand(tiny_config, steps):
    config = _ema_config(tiny_config)
    run.train(config, run_id="ema")
    state = load(run_dir(config, "ema") / "checkpoint-epoch2.pth")
    assert len(steps) == 26 and state["ema"]["updates"] == 26
    average = None
    for k, weights in enumerate(steps, start=1):
        if k % 2:
            continue
        average = weights.clone() if k <= 4 else average * 0.8 + weights * 0.2
    names = [name for name, _ in MLP(**config["arch"]["args"]).named_parameters()]
    got = torch.cat([state["ema"]["weights"][name].flatten() for name in names])
    torch.testing.assert_close(got, average, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(got, steps[-1])  # an average, not the last weights


def test_ema_weights_are_what_validation_and_test_score(tiny_config):
    config = _ema_config(tiny_config, trainer__test_after_train=False)
    metrics = run.train(config, run_id="ema")
    path = run_dir(config, "ema") / "checkpoint-epoch2.pth"
    state = load(path)

    def score(weights, training=True):
        checked = run.checked_config(state["config"])[0]
        loader = build.build_data_loader(checked, training=training)
        loader = loader.split_validation() if training else loader
        model = build.build_model(checked)
        model.load_state_dict(weights)
        from trainer.trainer import evaluate

        return evaluate(model, loader, build.build_loss(checked), build.build_metrics(checked), torch.device("cpu"))

    assert score(state["ema"]["weights"])["loss"] == pytest.approx(metrics["val_loss"], rel=1e-12)
    assert score(state["model"])["loss"] != pytest.approx(metrics["val_loss"], rel=1e-6)
    tested = run.evaluate_checkpoint(path, write=False, progress=False)
    assert tested["loss"] == pytest.approx(score(state["ema"]["weights"], training=False)["loss"], rel=1e-12)


def test_ema_resumes_bit_exactly_at_an_epoch_and_mid_epoch(tiny_config, save_last_every):
    save_last_every(7)
    whole = _ema_config(tiny_config, trainer__epochs=3)
    run.train(whole, run_id="whole")
    end = load(run_dir(whole, "whole") / "checkpoint-epoch3.pth")
    for resume_from in ("checkpoint-epoch1.pth", "last.pth"):
        source = run_dir(whole, "whole") / resume_from
        short = _ema_config(tiny_config, name="part", trainer__epochs=3)
        if resume_from == "last.pth":  # a last.pth of step 7 (mid-epoch 1) from a run that stopped there
            run.train(with_changes(short, trainer__max_steps=7), run_id=resume_from)
        else:
            run.train(with_changes(short, trainer__epochs=1), run_id=resume_from)
        source = run_dir(short, resume_from) / resume_from
        assert load(source)["global_step"] in (7, 13)
        run.train(short, resume=str(source))
        resumed = load(run_dir(short, resume_from) / "checkpoint-epoch3.pth")
        for key, value in end["model"].items():
            assert torch.equal(value, resumed["model"][key]), key
        for key, value in end["ema"]["weights"].items():
            assert torch.equal(value, resumed["ema"]["weights"][key]), (resume_from, key)
        assert resumed["ema"]["updates"] == end["ema"]["updates"] == 39


def test_ema_swap_leaves_the_training_weights_bit_identical(tiny_config):
    from parts.ema import EMA

    config = run.checked_config(tiny_config)[0]
    parts = run.build_parts(config, torch.device("cpu"))
    ema = EMA(parts.model, parts.optimizer, {"decay": 0.5, "every_n_steps": 1, "warmup": 0, "buffers": True})
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    ema.weights["net.1.weight"].add_(1.0)
    with ema.swapped_in():
        assert torch.equal(parts.model.state_dict()["net.1.weight"], before["net.1.weight"] + 1)
    for key, value in parts.model.state_dict().items():
        assert torch.equal(value, before[key])


def test_ema_averages_batch_norm_buffers_and_copies_counters():
    from parts.ema import EMA

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, optimizer, {"decay": 0.5, "every_n_steps": 1, "warmup": 0, "buffers": True})
    start = model[1].running_mean.clone()
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    torch.testing.assert_close(ema.weights["1.running_mean"], (start + model[1].running_mean) / 2)
    assert ema.weights["1.num_batches_tracked"] == 1
    without = EMA(model, optimizer, {"decay": 0.5, "every_n_steps": 1, "warmup": 0, "buffers": False})
    assert "1.running_mean" not in without.weights and "1.weight" in without.weights
