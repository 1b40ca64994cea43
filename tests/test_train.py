"""End to end: train, resume, evaluate; the files a run leaves; the command lines."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import run
from conftest import make_config, with_changes

ROOT = Path(__file__).resolve().parents[1]


def run_dir(config, kind="models"):
    folders = list((Path(config["trainer"]["save_dir"]) / kind / config["name"]).iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def test_train_resume_evaluate(tiny_config):
    metrics = run.train(tiny_config, run_id="r1")
    assert metrics["epoch"] == 2 and {"loss", "accuracy", "val_loss", "val_accuracy"} <= metrics.keys()
    folder = run_dir(tiny_config)
    assert folder.name == "r1"
    assert {"checkpoint-epoch1.pth", "checkpoint-epoch2.pth", "model_best.pth", "config.json", "manifest.json"} <= {
        p.name for p in folder.iterdir()}
    assert (run_dir(tiny_config, "log") / "info.log").read_text().count("val_loss") >= 2

    state = torch.load(folder / "checkpoint-epoch2.pth", weights_only=True, map_location="cpu")
    assert state["epoch"] == 2 and state["config"]["name"] == "tiny"
    assert set(state) >= {"model", "optimizer", "lr_scheduler", "monitor_best", "not_improved_count", "rng"}

    # Resume for a third epoch: same folder, epoch 3, the scheduler continued from where it was.
    tiny_config["trainer"]["epochs"] = 3
    resumed = run.train(tiny_config, resume=folder / "checkpoint-epoch2.pth")
    assert resumed["epoch"] == 3
    assert run_dir(tiny_config).name == "r1"
    third = torch.load(folder / "checkpoint-epoch3.pth", weights_only=True)
    assert third["lr_scheduler"]["last_epoch"] == 3
    assert third["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * 0.9**3)
    assert third["global_step"] == 3 * state["global_step"] // 2

    result = run.evaluate_checkpoint(folder / "model_best.pth")
    assert result["n_samples"] == 64 and 0 <= result["accuracy"] <= 1
    written = json.loads((folder / "model_best.test.json").read_text())
    assert written["loss"] == pytest.approx(result["loss"])


def test_monitor_saves_best_and_early_stops(tiny_config):
    # A learning rate of zero never improves: best at epoch 1, then early stopping after 1 more epoch.
    tiny_config["optimizer"] = {"type": "SGD", "args": {"lr": 0.0}}
    tiny_config["trainer"].update(epochs=10, early_stop=1, save_period=100)
    metrics = run.train(tiny_config)
    assert metrics["epoch"] == 3  # epoch 1 is the best; epochs 2 and 3 do not improve; 2 > early_stop
    best = torch.load(run_dir(tiny_config) / "model_best.pth", weights_only=True)
    assert best["epoch"] == 1


def test_default_config_learns_digits(tmp_path):
    """The shipped config.json reaches >= 95% on the held-out digits (the README's promise)."""
    config = json.loads((ROOT / "config.json").read_text())
    config["trainer"].update(save_dir=str(tmp_path), verbosity=0, tensorboard=False)
    run.train(config, run_id="default")
    result = run.evaluate_checkpoint(tmp_path / "models" / config["name"] / "default" / "model_best.pth")
    assert result["accuracy"] >= 0.95, result


def _cli(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_command_line_train_resume_test(tmp_path):
    config = make_config(tmp_path / "saved")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    out = _cli("train.py", "-c", path, "trainer.epochs=1", "--lr", "0.05", "--bs", "32", "--run-id", "try1")
    assert out.returncode == 0, out.stderr
    ckpt = tmp_path / "saved/models/tiny/try1/checkpoint-epoch1.pth"
    saved = torch.load(ckpt, weights_only=True)["config"]
    assert saved["optimizer"]["args"]["lr"] == 0.05 and saved["data_loader"]["args"]["batch_size"] == 32
    assert saved["trainer"]["epochs"] == 1

    out = _cli("train.py", "-r", ckpt, "trainer.epochs=2")
    assert out.returncode == 0, out.stderr
    assert (ckpt.parent / "checkpoint-epoch2.pth").is_file()
    out = _cli("test.py", "-r", ckpt.parent / "checkpoint-epoch2.pth")
    assert out.returncode == 0 and "accuracy" in out.stdout, out.stderr


def test_yaml_config_and_override_types(tmp_path):
    from utils.config import apply_overrides, load_config

    path = tmp_path / "c.yaml"
    path.write_text("name: y\ntrainer:\n  epochs: 2\n")
    config = apply_overrides(load_config(path), ["trainer.epochs=5", "optimizer.args.lr=0.01", "a.b=text", "x=null"])
    assert config == {"name": "y", "trainer": {"epochs": 5}, "optimizer": {"args": {"lr": 0.01}}, "a": {"b": "text"},
                      "x": None}


def test_model_printout_shows_parameter_count():
    from model.builtin import MLP

    text = str(MLP(input_size=4, hidden_sizes=[3], num_classes=2))
    assert "Trainable parameters: 23" in text  # 4*3+3 + 3*2+2


def test_steps_and_samples_per_second_go_to_tensorboard(tiny_config):
    from tensorboard.backend.event_processing import event_accumulator

    config = with_changes(tiny_config, trainer__tensorboard=True, trainer__log_every_n_steps=4)
    run.train(config, run_id="tb")
    acc = event_accumulator.EventAccumulator(str(Path(config["trainer"]["save_dir"]) / "log" / "tiny" / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("perf/steps_per_s")]
    assert steps == [4, 8, 12, 16, 20, 24]
    for s, n in zip(acc.Scalars("perf/steps_per_s"), acc.Scalars("perf/samples_per_s")):
        assert s.value > 0 and n.value == pytest.approx(16 * s.value, rel=1e-5)


def _with_hook(monkeypatch, hook):
    from trainer import trainer as trainer_module

    original = trainer_module.hooks_for
    monkeypatch.setattr(trainer_module, "hooks_for", lambda *args: [*original(*args), hook])


def _failing_forward(monkeypatch, at):
    """The ``at``-th training forward of the MLP raises (before drawing any random number)."""
    from model.builtin import MLP

    original, count = MLP.forward, [0]

    def forward(self, x):
        if self.training:
            count[0] += 1
            if count[0] == at:
                raise RuntimeError("injected")
        return original(self, x)

    monkeypatch.setattr(MLP, "forward", forward)


def test_a_hook_may_redo_an_epoch_after_an_error_and_runs_its_context_around_training(tiny_config, monkeypatch):
    """The moments base/base_hook.py's Hook offers a part: ``training`` around the whole of training, and ``on_train_error``,
    whose function runs once the error is let go and names the batch to go on from."""
    from base.base_hook import Hook

    class Recover(Hook):
        events = []

        def training(self, trainer):
            self.events.append("enter")
            return _Exit(self.events)

        def on_train_error(self, trainer, epoch, error):
            self.events.append(f"error at epoch {epoch}, batch {trainer.batch_in_epoch}: {error}")
            return lambda: self.events.append(sys.exc_info()[0]) or trainer.batch_in_epoch

    plain = run.train(tiny_config, run_id="plain")
    _with_hook(monkeypatch, Recover())
    _failing_forward(monkeypatch, at=18)  # epoch 2 (13 batches each), its 5th batch
    recovered = run.train(tiny_config, run_id="recovered")
    assert Recover.events == ["enter", "error at epoch 2, batch 4: injected", None, "exit"]
    assert recovered == plain  # the batch was redone: the same run, to the bit
    folder = Path(tiny_config["trainer"]["save_dir"]) / "models" / "tiny"
    a, b = (torch.load(folder / r / "checkpoint-epoch2.pth", weights_only=True) for r in ("plain", "recovered"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_an_error_no_hook_takes_propagates(tiny_config, monkeypatch):
    from base.base_hook import Hook

    events = []

    class Context(Hook):
        def training(self, trainer):
            return _Exit(events)

    _with_hook(monkeypatch, Context())
    _failing_forward(monkeypatch, at=3)
    with pytest.raises(RuntimeError, match="injected"):
        run.train(tiny_config)
    assert events == ["exit"]  # the context was left on the way out


class _Exit:
    def __init__(self, events):
        self.events = events

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.events.append("exit")
