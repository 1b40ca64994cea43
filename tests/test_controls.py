"""Training controls, each tested by what it does to the weights or the step count."""

import re
from pathlib import Path

import pytest
import torch

from trainer import run
from base.base_trainer import RunStopped, seed_everything
from conftest import with_changes
from trainer import build


@pytest.fixture
def step_log():
    """Records every optimizer step as (parameters before, parameters after), for any optimizer."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    steps, before = [], {}

    def flat(opt):
        return torch.cat([p.detach().flatten().clone() for g in opt.param_groups for p in g["params"]])

    pre = register_optimizer_step_pre_hook(lambda opt, args, kwargs: before.__setitem__("p", flat(opt)))
    post = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.append((before["p"], flat(opt))))
    yield steps
    pre.remove()
    post.remove()


def final_state(config, name="checkpoint-epoch"):
    folder = next((Path(config["trainer"]["save_dir"]) / "models" / config["name"]).iterdir())
    path = max(folder.glob(f"{name}*.pth"), key=lambda p: int(re.findall(r"\d+", p.stem)[-1] or 0))
    return torch.load(path, weights_only=True)


def initial_weights(config):
    """The weights a run starts from: main() seeds, then builds the model first thing that draws random numbers."""
    seed_everything(config["seed"])
    return build.build_model(build_checked(config)).state_dict()


def build_checked(config):
    from utils.config import validate_config

    return validate_config(config, build.registries())


PLAIN_SGD = {"type": "SGD", "args": {"lr": 1.0}}


# ---------------------------------------------------------------- clipping


def test_clip_grad_norm_bounds_each_step(tiny_config, step_log):
    config = with_changes(tiny_config, optimizer=PLAIN_SGD, lr_scheduler=None, trainer__epochs=1,
                          trainer__clip_grad_norm=1e-3)
    run.train(config)
    moves = [torch.linalg.vector_norm(after - before).item() for before, after in step_log]
    assert len(moves) == 13 and max(moves)  # 205 training samples in batches of 16
    assert max(moves) <= 1e-3 * (1 + 1e-4)
    assert min(moves) > 0.5e-3  # the gradients were larger than the bound, so clipping really acted


def test_without_clipping_steps_are_larger(tiny_config, step_log):
    run.train(with_changes(tiny_config, optimizer=PLAIN_SGD, lr_scheduler=None, trainer__epochs=1))
    assert max(torch.linalg.vector_norm(a - b).item() for b, a in step_log) > 1e-2


def test_clip_grad_value_bounds_each_element(tiny_config, step_log):
    run.train(with_changes(tiny_config, optimizer=PLAIN_SGD, lr_scheduler=None, trainer__epochs=1,
                            trainer__clip_grad_value=1e-4))
    largest = max((a - b).abs().max().item() for b, a in step_log)
    # The weights are float32 near 0.2: a difference of two of them is exact only to their spacing (~1.5e-8).
    spacing = torch.finfo(torch.float32).eps * max(b.abs().max().item() for b, _ in step_log)
    assert 0.5e-4 < largest <= 1e-4 + 2 * spacing


# ---------------------------------------------------------------- freezing and parameter groups


def test_frozen_parameters_are_bit_identical_and_others_train(tiny_config):
    config = with_changes(tiny_config, trainer__freeze=["net.1.*"], optimizer__args={"lr": 0.1, "weight_decay": 0.1})
    start = initial_weights(config)
    run.train(config)
    end = final_state(config)["model"]
    assert torch.equal(end["net.1.weight"], start["net.1.weight"]) and torch.equal(end["net.1.bias"], start["net.1.bias"])
    assert not torch.equal(end["net.4.weight"], start["net.4.weight"])
    log = next((Path(config["trainer"]["save_dir"]) / "log").rglob("info.log")).read_text()
    assert "Parameters: 51 trainable, 272 frozen" in log


def test_unfreeze_at_epoch_and_resume_on_either_side(tiny_config):
    config = with_changes(tiny_config, trainer__freeze=["net.1.*"], trainer__unfreeze_at_epoch=2,
                          trainer__unfreeze_lr=0.05, trainer__epochs=3)
    start = initial_weights(config)
    run.train(config, run_id="full")
    folder = Path(config["trainer"]["save_dir"]) / "models/tiny/full"
    first = torch.load(folder / "checkpoint-epoch1.pth", weights_only=True)
    last = torch.load(folder / "checkpoint-epoch3.pth", weights_only=True)
    assert torch.equal(first["model"]["net.1.weight"], start["net.1.weight"])
    assert not torch.equal(last["model"]["net.1.weight"], start["net.1.weight"])
    assert [g["lr"] for g in last["optimizer"]["param_groups"]] == pytest.approx([0.1 * 0.9**3, 0.05 * 0.9**2])

    for resume_epoch in (1, 2):  # before and after the unfreeze
        run.train(config, resume=folder / f"checkpoint-epoch{resume_epoch}.pth", run_id=None)
        again = torch.load(folder / "checkpoint-epoch3.pth", weights_only=True)
        for key, value in last["model"].items():
            assert torch.equal(again["model"][key], value), (resume_epoch, key)


def test_param_groups_get_their_own_settings(tiny_config):
    config = with_changes(tiny_config, optimizer__param_groups=[{"params": ["net.1.*"], "lr": 0.01}], lr_scheduler=None,
                          trainer__epochs=1)
    run.train(config)
    groups = final_state(config)["optimizer"]["param_groups"]
    assert [(len(g["params"]), g["lr"]) for g in groups] == [(2, 0.1), (2, 0.01)]


def test_overlapping_param_groups_are_an_error(tiny_config):
    config = with_changes(tiny_config, optimizer__param_groups=[{"params": ["net.1.*"]}, {"params": ["*.weight"]}])
    with pytest.raises(build.ConfigError, match=r"param_groups\[1\]: parameter 'net.1.weight' is already in param_groups\[0\]"):
        run.train(config)
    assert not Path(config["trainer"]["save_dir"]).exists()


# ---------------------------------------------------------------- accumulation


def _no_noise(config, **changes):
    # Equivalence needs the same computation: no dropout, no momentum, no shuffle-dependent batch sizes.
    return with_changes(config, arch__args={"input_size": 16, "hidden_sizes": [16], "num_classes": 3},
                        optimizer=PLAIN_SGD | {"args": {"lr": 0.5}}, lr_scheduler=None, trainer__epochs=1,
                        trainer__monitor="off", **{"data_loader__args": {**config["data_loader"]["args"], "validation_split": 0},
                                                   **changes})


def test_accumulation_equals_one_large_batch(tiny_config, step_log):
    # 256 training samples: 32 batches of 8 in windows of 4, against 8 batches of 32 (plus a short tail below).
    args = {**tiny_config["data_loader"]["args"], "validation_split": 0}
    small = _no_noise(tiny_config, data_loader__args={**args, "batch_size": 8},
                      trainer__accumulate_grad_batches=4)
    run.train(small, run_id="small")
    small_state = final_state(small)
    large = _no_noise(tiny_config, data_loader__args={**args, "batch_size": 32})
    large["name"] = "large"
    run.train(large, run_id="large")
    large_state = final_state(large)
    assert small_state["global_step"] == large_state["global_step"] == 8
    for key, value in large_state["model"].items():
        torch.testing.assert_close(small_state["model"][key], value, rtol=1e-5, atol=1e-6)


def test_accumulation_short_tail_still_steps(tiny_config):
    # 256 samples in batches of 16 = 16 batches; windows of 5 -> 5, 5, 5 and a tail of 1: 4 steps.
    config = _no_noise(tiny_config, trainer__accumulate_grad_batches=5)
    run.train(config)
    assert final_state(config)["global_step"] == 4


# ---------------------------------------------------------------- steps, schedules


@pytest.mark.parametrize("accumulate,len_epoch,max_steps,epochs", [(1, None, 7, 5), (2, 5, 4, 9), (1, 3, 7, 100)])
def test_max_steps_is_exact(tiny_config, step_log, accumulate, len_epoch, max_steps, epochs):
    config = with_changes(tiny_config, trainer__accumulate_grad_batches=accumulate, trainer__len_epoch=len_epoch,
                          trainer__max_steps=max_steps, trainer__epochs=epochs)
    run.train(config)
    assert len(step_log) == max_steps
    assert final_state(config)["global_step"] == max_steps


def test_len_epoch_runs_exactly_that_many_batches_over_an_endless_loader(tiny_config, step_log):
    # 13 batches per pass over the data; 3 epochs of 7 batches = 21 batches, wrapping into a second pass.
    run.train(with_changes(tiny_config, trainer__len_epoch=7, trainer__epochs=3))
    assert len(step_log) == 21


def test_scheduler_steps_per_optimizer_step(tiny_config):
    config = with_changes(tiny_config, lr_scheduler={"type": "OneCycleLR", "interval": "step",
                                                     "args": {"max_lr": 0.5, "total_steps": 26}})
    run.train(config)
    state = final_state(config)
    assert state["lr_scheduler"]["last_epoch"] == state["global_step"] == 26  # 2 epochs of 13 steps
    reference = torch.optim.SGD([torch.zeros(1)], lr=0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=0.5, total_steps=26)
    for _ in range(26):
        reference.step()
        schedule.step()
    assert state["optimizer"]["param_groups"][0]["lr"] == reference.param_groups[0]["lr"]


# ---------------------------------------------------------------- non-finite loss, seeds


@pytest.fixture
def poisoned(monkeypatch):
    """One training sample becomes NaN: exactly one batch per epoch has a non-finite loss."""
    from data_loader import builtin

    original = builtin.SyntheticDataset.tensors

    def tensors(self):
        inputs, targets = original(self)
        inputs = inputs.clone()
        inputs[3] = float("nan")
        return inputs, targets

    monkeypatch.setattr(builtin.SyntheticDataset, "tensors", tensors)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tiny_config, poisoned):
    config = with_changes(tiny_config, data_loader__args={**tiny_config["data_loader"]["args"], "validation_split": 0},
                          trainer__monitor="off")
    with pytest.raises(RunStopped, match=r"non-finite \(nan\) at epoch 1, step \d+ \(batch \d+\)"):
        run.train(config)
    folder = next((Path(config["trainer"]["save_dir"]) / "models/tiny").iterdir())
    assert list(folder.glob("*.pth")) == []


def test_skip_nonfinite_skips_and_counts(tiny_config, poisoned, caplog):
    config = with_changes(tiny_config, data_loader__args={**tiny_config["data_loader"]["args"], "validation_split": 0},
                          trainer__monitor="off", trainer__skip_nonfinite=True)
    run.train(config)
    state = final_state(config)
    assert state["nonfinite_skips"] == 2  # one poisoned batch in each of the 2 epochs
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_same_seed_same_weights_other_seed_other_weights(tiny_config, tmp_path):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        config = with_changes(tiny_config, name=name, seed=seed, trainer__deterministic=True)
        run.train(config)
        runs.append(final_state(config)["model"])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])
    assert not torch.are_deterministic_algorithms_enabled()  # main() puts the global flag back


# ---------------------------------------------------------------- mixed precision and compile


def test_bf16_autocast_on_cpu_trains(tiny_config):
    metrics = run.train(with_changes(tiny_config, trainer__amp="bf16", trainer__epochs=3))
    assert metrics["val_accuracy"] > 0.5 and metrics["loss"] == metrics["loss"]


@pytest.mark.slow
def test_compile_saves_plain_keys(tiny_config):
    config = with_changes(tiny_config, trainer__compile=True, trainer__epochs=1)
    run.train(config)
    state = final_state(config)["model"]
    assert not any(k.startswith("_orig_mod.") for k in state)
    build.build_model(build_checked(config)).load_state_dict(state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cuda(tiny_config, amp):
    config = with_changes(tiny_config, device="cuda", trainer__amp=amp, trainer__clip_grad_norm=1.0)
    metrics = run.train(config)
    assert metrics["loss"] == metrics["loss"]
    if amp == "fp16":
        assert final_state(config)["scaler"]["scale"] > 0


def test_reduce_lr_on_plateau_steps_on_the_monitored_value(tiny_config):
    config = with_changes(tiny_config, trainer__epochs=3,
                          lr_scheduler={"type": "ReduceLROnPlateau", "args": {"mode": "min", "patience": 0}})
    metrics = run.train(config)
    state = final_state(config)
    log = next((Path(config["trainer"]["save_dir"]) / "log").rglob("info.log")).read_text()
    val_losses = [float(v) for v in re.findall(r"val_loss\s+: (\S+)", log)]
    assert state["lr_scheduler"]["best"] == pytest.approx(min(val_losses)) and metrics["epoch"] == 3


def test_arch_may_name_a_torchvision_model(tiny_config):
    from utils.config import ConfigError

    config = with_changes(tiny_config, arch={"type": "torchvision.models.resnet18", "args": {"num_classes": 3}})
    model = build.build_model(build_checked(config))
    assert isinstance(model, torch.nn.Module) and model.fc.out_features == 3
    with pytest.raises(ConfigError, match=r"unknown model 'torchvision.models.resnet81'.*torchvision.models.NAME"):
        build_checked(with_changes(tiny_config, arch={"type": "torchvision.models.resnet81"}))
