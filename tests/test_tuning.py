"""The tuning kit (issue 15), each part tested by its effect: debug modes, the model summary,
the learning-rate finder, the profiler, and out-of-memory recovery that keeps the global batch."""

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_config, with_changes
from model.model import MLP
from trainer import build, run, tuning
from utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = {"input_size": 16, "hidden_sizes": [16], "num_classes": 3}


def load(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def run_dir(config, run_id):
    return Path(config["trainer"]["save_dir"]) / "models" / config["name"] / run_id


@pytest.fixture
def steps():
    """The parameters after every optimizer step, as one flat tensor each."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    seen = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: seen.append(
        torch.cat([p.detach().flatten().clone() for g in opt.param_groups for p in g["params"]])))
    yield seen
    handle.remove()


@pytest.fixture
def forwards(monkeypatch):
    """Every batch the MLP sees, as ``(training, inputs)``."""
    seen, original = [], MLP.forward

    def forward(self, x):
        seen.append((self.training, x.detach().clone()))
        return original(self, x)

    monkeypatch.setattr(MLP, "forward", forward)
    return seen


# ---------------------------------------------------------------- debug modes


def test_fast_dev_run_runs_n_batches_and_writes_nothing(tiny_config, steps, forwards, capsys):
    config = with_changes(tiny_config, trainer__fast_dev_run=3, trainer__epochs=5, trainer__tensorboard=True,
                          trainer__verbosity=1, trainer__save_every_n_steps=1)
    metrics = run.train(config)
    assert not Path(config["trainer"]["save_dir"]).exists()  # no folder, no checkpoint, no log, no events
    assert len(steps) == 3 and metrics["epoch"] == 1
    assert "val_loss" in metrics
    out = capsys.readouterr().out
    assert "fast_dev_run: would write" in out and "checkpoint-epoch1.pth" in out and "last.pth" in out
    assert sum(1 for training, _ in forwards if training) == 3


def test_fast_dev_run_true_is_one_batch(tiny_config, steps):
    run.train(with_changes(tiny_config, trainer__fast_dev_run=True))
    assert len(steps) == 1


@pytest.mark.parametrize("limit,per_epoch", [(5, 5), (0.5, 6), (1.0, 13), (100, 13)])
def test_limit_train_batches_count_or_fraction(tiny_config, steps, limit, per_epoch):
    config = with_changes(tiny_config, trainer__limit_train_batches=limit)  # 13 batches per epoch, 2 epochs
    run.train(config)
    assert len(steps) == 2 * per_epoch
    folder = next((Path(config["trainer"]["save_dir"]) / "models" / "tiny").iterdir())
    assert load(folder / "checkpoint-epoch2.pth")["global_step"] == 2 * per_epoch


def _validation_batches(forwards):
    # Validation forwards run in eval mode after a training step; the dry batch and the summary run before any.
    first_train = next(i for i, (training, _) in enumerate(forwards) if training)
    return sum(1 for training, _ in forwards[first_train:] if not training)


@pytest.mark.parametrize("limit,per_epoch", [(None, 4), (2, 2), (0.5, 2), (1, 1)])
def test_limit_val_batches(tiny_config, forwards, limit, per_epoch):
    # 64 validation samples in batches of 16: 4 batches.
    run.train(with_changes(tiny_config, trainer__limit_val_batches=limit, trainer__test_after_train=False))
    assert _validation_batches(forwards) == 2 * per_epoch


def test_overfit_batches_reaches_full_accuracy_on_the_same_batches(tiny_config, forwards):
    config = with_changes(tiny_config, arch__args=NO_DROPOUT, trainer__overfit_batches=2, trainer__epochs=40,
                          lr_scheduler=None, trainer__test_after_train=False)
    metrics = run.train(config)
    assert metrics["accuracy"] == 1.0 and metrics["val_accuracy"] == 1.0
    train_batches = [x for training, x in forwards if training]
    assert len(train_batches) == 80  # 2 batches x 40 epochs
    for i, batch in enumerate(train_batches):  # the same two batches, in the same order, every epoch
        assert torch.equal(batch, train_batches[i % 2])
    assert len({tuple(row.tolist()) for x in train_batches[:2] for row in x.flatten(1)}) == 32


def test_detect_anomaly_names_the_backward_op_that_made_nan(tiny_config, monkeypatch):
    original = MLP.forward

    def forward(self, x):
        # The same finite output, with a NaN gradient: d sqrt(y)/dy at 0 is infinite, times the 0 from above is NaN.
        out = original(self, x)
        return out + (out * 0).abs().sqrt() * 0

    monkeypatch.setattr(MLP, "forward", forward)
    config = with_changes(tiny_config, trainer__detect_anomaly=True)
    with pytest.raises(RuntimeError, match="SqrtBackward0"):
        run.train(config)
    assert not torch.is_anomaly_enabled()  # restored after the run
    # Without anomaly mode nothing names it: the NaN reaches the weights and the next loss stops the run.
    from base.base_trainer import RunStopped

    with pytest.raises(RunStopped, match="non-finite"):
        run.train(with_changes(config, trainer__detect_anomaly=False, trainer__save_dir=config["trainer"]["save_dir"] + "2"))


@pytest.mark.parametrize("key,value,expected", [
    ("trainer.profile", {"active": 0}, "expected active to be a positive integer"),
    ("trainer.limit_train_batches", 1.5, "a fraction of them in (0, 1]"),
    ("trainer.fast_dev_run", -1, "true, false or a number of batches"),
    ("trainer.auto_accumulate", "yes", "true or false"),
])
def test_bad_settings_are_one_line_config_errors(tiny_config, key, value, expected):
    config = with_changes(tiny_config, **{key.replace(".", "__"): value})
    with pytest.raises(ConfigError) as err:
        run.checked_config(config)
    assert len(err.value.problems) == 1 and expected in err.value.problems[0]


def test_overfit_with_a_train_limit_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="limit_train_batches: set together with trainer.overfit_batches"):
        run.checked_config(with_changes(tiny_config, trainer__overfit_batches=2, trainer__limit_train_batches=3))


# ---------------------------------------------------------------- model summary


def test_summary_is_a_layer_table_and_the_count_is_printed_once(tiny_config, capsys):
    run.train(with_changes(tiny_config, trainer__verbosity=2, trainer__epochs=1))
    out = capsys.readouterr().out
    assert "layer  type     output shape  parameters  trainable" in out
    assert "net.1  Linear   [16, 16]             272  yes" in out
    assert out.count("323") == 1  # the total parameter count, once (BaseModel's printout is no longer logged)
    assert "Parameters: 323 trainable, 0 frozen" in out


def test_summary_lines_mark_frozen_layers_and_leave_rng_and_mode_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    data = torch.randn(5, 4)
    state = torch.random.get_rng_state()
    lines = tuning.summary_lines(model, data)
    assert torch.equal(torch.random.get_rng_state(), state) and model.training
    assert lines[1].split() == ["0", "Linear", "[5,", "3]", "15", "no"]
    assert lines[3].split() == ["2", "Linear", "[5,", "2]", "8", "yes"]


# ---------------------------------------------------------------- learning-rate finder


def test_lr_range_test_leaves_model_optimizer_and_rng_untouched(tiny_config):
    config = run.checked_config(tiny_config)[0]
    parts = run.build_parts(config, torch.device("cpu"))
    loss = parts.criterion(parts.model(torch.randn(4, 1, 4, 4)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    parts.optimizer.step()  # momentum buffers exist: the optimizer has state to disturb
    model_before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    opt_before = parts.optimizer.state_dict()
    opt_before = {k: (v.clone() if torch.is_tensor(v) else v) for s in opt_before["state"].values() for k, v in s.items()}
    rng = torch.random.get_rng_state()
    lrs, losses, suggestion = tuning.lr_range_test(parts.model, parts.optimizer, parts.criterion, parts.data_loader,
                                                   torch.device("cpu"), 1e-5, 10.0, 50)
    assert 20 <= len(lrs) <= 50 and lrs[0] == pytest.approx(1e-5)
    assert suggestion is not None and lrs[0] <= suggestion <= lrs[-1]
    for key, value in parts.model.state_dict().items():
        assert torch.equal(value, model_before[key])
    after = {k: v for s in parts.optimizer.state_dict()["state"].values() for k, v in s.items()}
    for key, value in opt_before.items():
        assert torch.equal(torch.as_tensor(after[key]), torch.as_tensor(value))
    assert parts.optimizer.param_groups[0]["lr"] == 0.1
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_suggest_picks_the_steepest_descent():
    lrs = [10.0 ** (k / 10) for k in range(-60, 1)]
    losses = [1.0 / (1 + __import__("math").exp(k / 10 + 3)) for k in range(-60, 1)]  # falls fastest at lr 1e-3
    assert tuning.suggest(lrs, losses) == pytest.approx(1e-3, rel=0.3)
    assert tuning.suggest(lrs[:12], losses[:12]) is None


def test_lr_find_command_prints_a_suggestion_and_writes_a_png(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import lr_find
    finally:
        sys.path.remove(str(ROOT / "tools"))
    config_path = tmp_path / "c.json"
    config_path.write_text(json.dumps(make_config(tmp_path / "saved")))
    out = tmp_path / "plot.png"
    assert lr_find.main(["-c", str(config_path), "--steps", "40", "--out", str(out), "optimizer.args.lr=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "Suggested learning rate: " in printed and "optimizer.args.lr=" in printed
    from PIL import Image

    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (720, 440)
    assert not (tmp_path / "saved").exists()  # only the plot is written


# ---------------------------------------------------------------- profiler, speed in TensorBoard


def test_profile_writes_a_chrome_trace_and_prints_top_ops(tiny_config, capsys):
    config = with_changes(tiny_config, trainer__profile={"wait": 1, "warmup": 1, "active": 2}, trainer__verbosity=1)
    run.train(config, run_id="prof")
    trace = Path(config["trainer"]["save_dir"]) / "log" / "tiny" / "prof" / "profile-trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)
    out = capsys.readouterr().out
    assert "Self CPU" in out and "aten::" in out and out.count("Profile of 2 steps") == 1


def test_profile_shorter_epoch_than_schedule_still_writes(tiny_config):
    config = with_changes(tiny_config, trainer__profile={"wait": 1, "warmup": 1, "active": 50}, trainer__epochs=1)
    run.train(config, run_id="prof")
    assert (Path(config["trainer"]["save_dir"]) / "log" / "tiny" / "prof" / "profile-trace.json").is_file()


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


# ---------------------------------------------------------------- out-of-memory recovery


@pytest.fixture
def oom_at(monkeypatch):
    """``oom_at(n)``: the n-th training forward of a batch of 16 raises torch.OutOfMemoryError, as CUDA would."""
    original = MLP.forward
    calls = {"n": 0, "at": None}

    def forward(self, x):
        if self.training and x.shape[0] == 16:
            calls["n"] += 1
            if calls["n"] == calls["at"]:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return original(self, x)

    monkeypatch.setattr(MLP, "forward", forward)
    return lambda n: calls.__setitem__("at", n)


def _oom_config(tiny_config, **changes):
    args = {**tiny_config["data_loader"]["args"], "validation_split": 0}  # 256 samples: 16 batches of 16
    return with_changes(tiny_config, **{"arch__args": NO_DROPOUT, "lr_scheduler": None, "trainer__monitor": "off",
                                        "trainer__auto_accumulate": True, "data_loader__args": args, **changes})


def _reference(tiny_config, epochs=2, accumulate=2):
    small = _oom_config(tiny_config, name="small", trainer__epochs=epochs, trainer__auto_accumulate=False,
                        trainer__accumulate_grad_batches=accumulate)
    small["data_loader"]["args"]["batch_size"] = 8
    run.train(small, run_id="small")
    return load(run_dir(small, "small") / f"checkpoint-epoch{epochs}.pth")


def test_oom_at_the_first_step_gives_the_small_batch_run_exactly(tiny_config, oom_at):
    oom_at(1)
    config = _oom_config(tiny_config)
    run.train(config, run_id="oom")
    state = load(run_dir(config, "oom") / "checkpoint-epoch2.pth")
    reference = _reference(tiny_config)
    assert state["global_step"] == reference["global_step"] == 32  # 2 epochs of 256 samples, 16 per step
    for key, value in reference["model"].items():
        assert torch.equal(state["model"][key], value), key
    assert state["config"]["data_loader"]["args"]["batch_size"] == 8
    assert state["config"]["trainer"]["accumulate_grad_batches"] == 2
    assert state["batch_changes"][0]["batch_size"] == [16, 8] and state["batch_changes"][0]["global_step"] == 0
    manifest = json.loads((run_dir(config, "oom") / "manifest.json").read_text())
    assert manifest["batch_changes"][0]["accumulate_grad_batches"] == [1, 2]
    assert manifest["config"]["data_loader"]["args"]["batch_size"] == 8


def test_oom_mid_epoch_keeps_the_global_batch_and_resume_continues_small(tiny_config, oom_at):
    # Windows of 2 batches of 16: 2 steps, then out of memory in the second batch of the third window, after
    # its first batch went into the running sums.
    oom_at(6)
    config = _oom_config(tiny_config, trainer__epochs=1, trainer__accumulate_grad_batches=2)
    metrics = run.train(config, run_id="oom")
    first = load(run_dir(config, "oom") / "checkpoint-epoch1.pth")
    assert first["global_step"] == 8 and first["batch_changes"][0]["global_step"] == 2
    assert first["batch_changes"][0]["accumulate_grad_batches"] == [2, 4]
    # The epoch's training loss counts each of the 256 samples once, though one window was redone.
    reference_one = _reference(tiny_config, epochs=1, accumulate=4)
    for key, value in reference_one["model"].items():
        torch.testing.assert_close(first["model"][key], value, rtol=1e-5, atol=1e-6)
    small_loss = reference_one["train_metrics"]
    assert first["train_metrics"]["count"] == small_loss["count"] == 256
    assert metrics["loss"] == pytest.approx(float(small_loss["sums"][0] / 256), rel=1e-5)
    # A resume continues with the smaller batch its checkpoint's config holds.
    run.train(with_changes(first["config"], trainer__epochs=2), resume=str(run_dir(config, "oom") / "checkpoint-epoch1.pth"))
    second = load(run_dir(config, "oom") / "checkpoint-epoch2.pth")
    assert second["global_step"] == 16 and second["config"]["data_loader"]["args"]["batch_size"] == 8
    assert second["config"]["trainer"]["accumulate_grad_batches"] == 4 and len(second["batch_changes"]) == 1
    # The resume rewrote the manifest: the switch is still in it.
    assert len(json.loads((run_dir(config, "oom") / "manifest.json").read_text())["batch_changes"]) == 1


def test_oom_with_a_batch_of_one_or_in_the_optimizer_step_is_raised(tiny_config, oom_at, monkeypatch):
    assert tuning.smaller_batch(16) == (8, 2) and tuning.smaller_batch(9) == (3, 3)
    assert tuning.smaller_batch(7) == (1, 7) and tuning.smaller_batch(1) is None

    def in_step():
        def _optimizer_step():
            raise torch.OutOfMemoryError("injected")
        try:
            _optimizer_step()
        except torch.OutOfMemoryError as err:
            return err

    assert not tuning.recoverable(in_step())
    config = _oom_config(tiny_config)
    config["data_loader"]["args"]["batch_size"] = 1
    oom_at(1)  # never reached at batch 1: raise from the loss instead

    def oom_loss(output, target):
        if torch.is_grad_enabled():
            raise torch.OutOfMemoryError("injected")
        return torch.nn.functional.cross_entropy(output, target)

    monkeypatch.setattr(build, "build_loss", lambda config, device=None: oom_loss)
    with pytest.raises(torch.OutOfMemoryError):
        run.train(config)


def test_debug_flags_are_overrides():
    from trainer import cli

    args = cli.parse(cli.train_parser(), ["-c", "x.json", "--fast-dev-run", "2", "trainer.epochs=3", "--detect-anomaly",
                                          "--overfit-batches", "4"])
    assert cli.overrides_of(args) == ["trainer.epochs=3", "trainer.fast_dev_run=2", "trainer.overfit_batches=4",
                                      "trainer.detect_anomaly=true"]
    assert cli.overrides_of(cli.parse(cli.train_parser(), ["-c", "x.json"])) == []


def test_fast_dev_run_from_the_command_line_writes_nothing(tmp_path, capsys):
    from trainer import cli

    config_path = tmp_path / "c.json"
    config_path.write_text(json.dumps(make_config(tmp_path / "saved", verbosity=1)))
    assert cli.train_command(["-c", str(config_path), "--fast-dev-run", "2"]) == 0
    assert not (tmp_path / "saved").exists()
    assert "fast_dev_run: 2 steps and validation ran; nothing was written" in capsys.readouterr().out
