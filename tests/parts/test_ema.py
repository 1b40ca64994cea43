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


def _ema_config(tiny_config, ramp=False, **changes):
    return with_changes(tiny_config, trainer__ema={"decay": 0.8, "every_n_steps": 2, "warmup": 4, "ramp": ramp}, **changes)


@pytest.mark.parametrize("ramp", [False, True])
def test_ema_equals_a_reference_average_computed_by_hand(tiny_config, steps, ramp):
    config = _ema_config(tiny_config, ramp=ramp)
    run.train(config, run_id="ema")
    state = load(run_dir(config, "ema") / "checkpoint-epoch2.pth")
    assert len(steps) == 26 and state["ema"]["updates"] == 26
    average = None
    for k, weights in enumerate(steps, start=1):
        if k % 2:
            continue
        decay = min(0.8, (1 + k) / (10 + k)) if ramp else 0.8  # the ramp: 0.43 after step 6, 0.8 from step 35
        average = weights.clone() if k <= 4 else average * decay + weights * (1 - decay)
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
    whole = _ema_config(tiny_config, ramp=True, trainer__epochs=3)
    run.train(whole, run_id="whole")
    end = load(run_dir(whole, "whole") / "checkpoint-epoch3.pth")
    for resume_from in ("checkpoint-epoch1.pth", "last.pth"):
        source = run_dir(whole, "whole") / resume_from
        short = _ema_config(tiny_config, ramp=True, name="part", trainer__epochs=3)
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


def test_an_ema_state_without_its_step_count_continues_from_the_runs_steps(tiny_config):
    from parts.ema import EMA

    config = run.checked_config(tiny_config)[0]
    parts = run.build_parts(config, torch.device("cpu"))
    ema = EMA(parts.model, parts.optimizer, {"decay": 0.9, "every_n_steps": 1, "warmup": 0, "ramp": True, "buffers": True})
    old = {"model": parts.model.state_dict(), "global_step": 40, "ema": {"weights": dict(ema.weights)}}
    ema.load_state_dict(None, old)
    assert ema.updates == 40


def test_ema_says_which_weights_the_scores_are_of(tiny_config, capsys):
    quiet = with_changes(tiny_config, trainer__ema=True, trainer__epochs=1, trainer__verbosity=0)
    run.train(quiet, run_id="quiet")  # verbosity 0 shows the end block, and EMA's line in it
    shown = capsys.readouterr()
    assert "averaged weights'" in shown.out + shown.err and "Test split" in shown.out + shown.err
    config = with_changes(tiny_config, trainer__ema=True, trainer__epochs=1, trainer__verbosity=1)
    run.train(config, run_id="said")
    log = (Path(config["trainer"]["save_dir"]) / "log" / config["name"] / "said" / "info.log").read_text()
    start = log.find("EMA on (decay min(0.999, (1+n)/(10+n)) at step n): validation, model_best.pth and the test"
                     " score use the averaged weights")
    end = log.find("EMA: the validation values, model_best.pth and the test score below are the averaged weights'")
    assert 0 <= start < log.find("val_") and log.count("EMA") == 2 and end < log.find("Finished ") < log.find("Test split")


@pytest.mark.slow
def test_ema_does_not_hurt_the_shipped_default_run(tmp_path):
    """config.json with trainer.ema on (the defaults, ramp included) scores the test split as well as without it,
    within noise (one test sample of the digits' 360 is 0.28%)."""
    import json

    from utils.config import apply_overrides, load_config

    root = Path(__file__).resolve().parents[2]
    scores = {}
    for ema in ("false", "true"):
        config = apply_overrides(load_config(root / "config.json"),
                                 [f"trainer.save_dir={tmp_path}", "trainer.verbosity=0", "trainer.tensorboard=false",
                                  "device=cpu", f"trainer.ema={ema}"])
        run.train(config, run_id=f"ema_{ema}")
        scores[ema] = json.loads((run_dir(config, f"ema_{ema}") / "result.json").read_text())["test"]
    print(f"default config, test accuracy: EMA off {scores['false']['accuracy']:.4f},"
          f" EMA on {scores['true']['accuracy']:.4f}; test loss {scores['false']['loss']:.4f},"
          f" {scores['true']['loss']:.4f}")
    assert scores["true"]["accuracy"] >= scores["false"]["accuracy"] - 2 / scores["true"]["n_samples"]
