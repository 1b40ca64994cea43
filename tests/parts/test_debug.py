"""The debug modes (parts/debug.py), each tested by its effect: fast_dev_run, limits on the training and validation
batches, overfit_batches, anomaly mode, and the command line's shortcuts for them."""

import json
from pathlib import Path

import pytest
import torch

from conftest import make_config, with_changes
from model.builtin import MLP
from parts import debug
from trainer import run
from utils.errors import ConfigError
from utils.resume import batch_split, check_resume_changes

NO_DROPOUT = {"input_size": 16, "hidden_sizes": [16], "num_classes": 3}


def load(path):
    return torch.load(path, weights_only=True, map_location="cpu")


@pytest.fixture
def forwards(monkeypatch):
    """Every batch the MLP sees, as ``(training, inputs)``."""
    seen, original = [], MLP.forward

    def forward(self, x):
        seen.append((self.training, x.detach().clone()))
        return original(self, x)

    monkeypatch.setattr(MLP, "forward", forward)
    return seen


def test_fast_dev_run_runs_n_batches_and_writes_nothing(tiny_config, steps, forwards, capsys, save_last_every):
    save_last_every(1)  # a mid-epoch last.pth after every step, which it must not write either
    config = with_changes(tiny_config, trainer__fast_dev_run=3, trainer__epochs=5, trainer__tensorboard=True,
                          trainer__verbosity=1)
    metrics = run.train(config)
    assert not Path(config["trainer"]["save_dir"]).exists()  # no folder, no checkpoint, no log, no events
    assert len(steps) == 3 and metrics["epoch"] == 1
    assert "val_loss" in metrics
    out = capsys.readouterr().out
    assert "fast_dev_run: 3 training and 3 validation batches, one epoch; nothing is written" in out
    assert "dry run: would write" in out and "checkpoint-epoch1.pth" in out and "last.pth" in out
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


def test_overfit_batches_turns_augmentation_and_shuffling_off(tiny_config):
    pytest.importorskip("parts.augment")  # another part: its files may be deleted
    flips = {"train": [{"type": "RandomHorizontalFlip", "args": {"p": 0.5}}]}
    args = {**tiny_config["data_loader"]["args"], "transforms": flips}

    def two_epochs(**changes):
        config = run.checked_config(with_changes(tiny_config, data_loader__args=args, **changes))[0]
        parts = run.build_parts(config, torch.device("cpu"))
        debug.prepare(config, parts)
        epochs = []
        for epoch in (1, 2):
            parts.data_loader.set_epoch(epoch)
            epochs.append([x for x, _ in list(parts.data_loader)[:2]])
        return parts, epochs

    parts, (first, second) = two_epochs(trainer__overfit_batches=2)
    assert len(parts.data_loader) == len(parts.valid_data_loader) == 2
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # the same batches, unflipped, unshuffled
    parts.valid_data_loader.set_epoch(1)
    assert all(torch.equal(a, b) for a, (b, _) in zip(first, parts.valid_data_loader))  # validation: the same
    _, (first, second) = two_epochs()
    assert not torch.equal(first[0], second[0])  # without it: another order and other flips each epoch


def test_detect_anomaly_names_the_backward_op_that_made_nan(tiny_config, monkeypatch):
    original = MLP.forward

    def forward(self, x):
        # The same finite output, with a NaN gradient: d sqrt(y)/dy at 0 is infinite, times the 0 from above is NaN.
        out = original(self, x)
        return out + (out * 0).abs().sqrt() * 0

    monkeypatch.setattr(MLP, "forward", forward)
    config = with_changes(tiny_config, trainer__detect_anomaly=True)
    # Anomaly mode warns with the forward call's traceback (what the user asked for), then raises naming the op.
    with pytest.raises(RuntimeError, match="SqrtBackward0"), pytest.warns(UserWarning, match="Error detected in SqrtBackward0"):
        run.train(config)
    assert not torch.is_anomaly_enabled()  # restored after the run
    # Without anomaly mode nothing names it: the NaN reaches the weights and the next loss stops the run.
    from base.base_trainer import RunStopped

    with pytest.raises(RunStopped, match="non-finite"):
        run.train(with_changes(config, trainer__detect_anomaly=False, trainer__save_dir=config["trainer"]["save_dir"] + "2"))


@pytest.mark.parametrize("key,value,expected", [
    ("trainer.limit_train_batches", 1.5, "a fraction of them in (0, 1]"),
    ("trainer.limit_val_batches", -2, "a number of batches (an integer > 0)"),
    ("trainer.fast_dev_run", -1, "true, false or a number of batches"),
    ("trainer.overfit_batches", 0.5, "an integer >= 0"),
    ("trainer.detect_anomaly", "yes", "true or false"),
])
def test_bad_settings_are_one_line_config_errors(tiny_config, key, value, expected):
    config = with_changes(tiny_config, **{key.replace(".", "__"): value})
    with pytest.raises(ConfigError) as err:
        run.checked_config(config)
    assert len(err.value.problems) == 1 and expected in err.value.problems[0]


def test_overfit_with_a_train_limit_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="limit_train_batches: set together with trainer.overfit_batches"):
        run.checked_config(with_changes(tiny_config, trainer__overfit_batches=2, trainer__limit_train_batches=3))


def test_limit_train_batches_is_len_epoch_by_another_name(tiny_config, steps):
    """One knob for the batches of an epoch: a limit of 5 trains exactly as trainer.len_epoch=5 does (epochs go on
    through the data), and a fraction is resolved to its count of one pass."""
    runs = {}
    for label, changes in {"limit": {"trainer__limit_train_batches": 5}, "len_epoch": {"trainer__len_epoch": 5},
                           "fraction": {"trainer__limit_train_batches": 5 / 13}, "pass": {}}.items():
        del steps[:]
        run.train(with_changes(tiny_config, trainer__epochs=3, trainer__save_dir=f"{tiny_config['trainer']['save_dir']}"
                               f"/{label}", **changes))
        runs[label] = [s.clone() for s in steps]
    assert len(runs["limit"]) == 15 and len(runs["pass"]) == 39
    for a, b, c in zip(runs["limit"], runs["len_epoch"], runs["fraction"]):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert all(torch.equal(a, b) for a, b in zip(runs["limit"][:5], runs["pass"][:5]))  # the pass's first batches


def test_limit_train_batches_is_fixed_in_the_middle_of_an_epoch_and_scaled_by_a_batch_split(tiny_config):
    saved = run.checked_config(with_changes(tiny_config, trainer__limit_train_batches=6))[0]
    assert check_resume_changes(saved, with_changes(saved, trainer__limit_train_batches=4), mid_epoch=False)
    with pytest.raises(ConfigError, match="cannot resume with a changed trainer.limit_train_batches"):
        check_resume_changes(saved, with_changes(saved, trainer__limit_train_batches=4), mid_epoch=True)
    split = with_changes(saved, data_loader__args={**saved["data_loader"]["args"], "batch_size": 8},
                         trainer__accumulate_grad_batches=2)
    assert batch_split(saved, with_changes(split, trainer__limit_train_batches=12)) == 2
    assert batch_split(saved, split) is None  # 6 batches of 8: half the samples an epoch
    check_resume_changes(saved, with_changes(split, trainer__limit_train_batches=12), mid_epoch=True)  # allowed


def test_limited_counts_and_fractions():
    assert debug.limited(None, 13) == 13 and debug.limited(5, 13) == 5 and debug.limited(100, 13) == 13
    assert debug.limited(0.5, 13) == 6 and debug.limited(0.01, 13) == 1 and debug.limited(1.0, 13) == 13


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
    out = capsys.readouterr().out
    assert "fast_dev_run: 2 training and 2 validation batches" in out
    assert "dry run: 2 steps and validation ran; nothing was written" in out
