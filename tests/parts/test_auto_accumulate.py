"""``trainer.auto_accumulate`` in one process (parts/auto_accumulate.py): an out-of-memory error in a step switches
to a smaller batch and more accumulation and redoes the step, keeping the samples of every optimizer step and of
the epoch's running sums, recorded in the checkpoint, the config and the manifest; what cannot be redone is raised.
Under torchrun: tests/parts/test_oom_dist.py."""

import json
from pathlib import Path

import pytest
import torch

from conftest import with_changes
from model.builtin import MLP
from parts import auto_accumulate
from trainer import build, run
from utils.errors import ConfigError

NO_DROPOUT = {"input_size": 16, "hidden_sizes": [16], "num_classes": 3}


def load(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def run_dir(config, run_id):
    return Path(config["trainer"]["save_dir"]) / "models" / config["name"] / run_id


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
    assert auto_accumulate.smaller_batch(16) == (8, 2) and auto_accumulate.smaller_batch(9) == (3, 3)
    assert auto_accumulate.smaller_batch(7) == (1, 7) and auto_accumulate.smaller_batch(1) is None

    def in_step():
        def optimizer_step():
            raise torch.OutOfMemoryError("injected")
        try:
            optimizer_step()
        except torch.OutOfMemoryError as err:
            return err

    assert not auto_accumulate.recoverable(in_step())
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


def test_the_running_sums_are_copied_per_step_only_with_the_part(tiny_config):
    from types import SimpleNamespace

    from trainer.trainer import step_hooks
    from utils import parts

    hooks = auto_accumulate.hooks(None, None, SimpleNamespace(dist=SimpleNamespace(enabled=False)))
    assert step_hooks(hooks) == hooks and isinstance(hooks[0], auto_accumulate.RedoWindow)
    torchrun = auto_accumulate.hooks(None, None, SimpleNamespace(dist=SimpleNamespace(enabled=True)))
    assert step_hooks(torchrun) == []  # under torchrun an error in a step stops the run: no sums to keep
    assert "auto_accumulate" not in parts.used_by(run.checked_config(tiny_config)[0])


def test_bad_setting_is_one_line(tiny_config):
    with pytest.raises(ConfigError) as err:
        run.checked_config(with_changes(tiny_config, trainer__auto_accumulate="yes"))
    assert err.value.problems == ['trainer.auto_accumulate: got "yes", expected true or false']
