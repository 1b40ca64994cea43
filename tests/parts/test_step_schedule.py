"""The step schedule part (parts/step_schedule.py): a resumable last.pth and validation every N optimizer steps.

The tiny run (conftest's, 3 epochs): 13 optimizer steps an epoch (208 samples in batches of 16).
"""

import signal
from pathlib import Path

import pytest

from conftest import assert_states_identical, make_config, with_changes
from base.base_trainer import RunStopped
from test_cluster import load, models_dir, signal_at_step, snapshot, uninterrupted, write_config
from trainer import run
from trainer.cli import train_command
from utils import parts


@pytest.fixture
def config(tmp_path):
    # Shuffling, a validation split, dropout, a scheduler, momentum: everything that can drift on resume.
    return make_config(tmp_path / "saved", epochs=3, save_period=1)


# ---------------------------------------------------------------- the keys


@pytest.mark.parametrize("key", ["val_every_n_steps", "save_every_n_steps"])
@pytest.mark.parametrize("value", ["-1", "2.5", '"4"', "true"])
def test_the_keys_are_checked_by_the_part_in_one_line_before_anything_is_written(tmp_path, config, capsys, key, value):
    code = train_command(["-c", write_config(tmp_path, config), f"trainer.{key}={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: trainer.{key}: got "), err
    assert not Path(config["trainer"]["save_dir"]).exists()


def test_null_or_zero_is_off_and_needs_no_part(config):
    """An old checkpoint's config holds both keys as null: it resumes whether or not this part is there."""
    for off in (None, 0):
        checked = run.checked_config(with_changes(config, trainer__val_every_n_steps=off,
                                                  trainer__save_every_n_steps=off))[0]
        assert "step_schedule" not in parts.used_by(checked)
    assert "step_schedule" not in parts.used_by(run.checked_config(config)[0])
    on = run.checked_config(with_changes(config, trainer__save_every_n_steps=5))[0]
    assert parts.used_by(on) == ["step_schedule"] and on["trainer"]["val_every_n_steps"] is None  # filled in


# ---------------------------------------------------------------- trainer.save_every_n_steps


def test_save_every_n_steps_writes_a_resumable_last_checkpoint(config):
    config = with_changes(config, trainer__save_every_n_steps=5, trainer__epochs=1)
    run.train(config, run_id="s")
    last = load(Path(config["trainer"]["save_dir"]) / "models/tiny/s/last.pth")
    assert last["global_step"] == 10 and last["batch_in_epoch"] == 10


def test_fast_dev_run_writes_no_step_checkpoint_but_says_it_would(config, capsys):
    pytest.importorskip("parts.debug")  # another part: its files may be deleted
    run.train(with_changes(config, trainer__fast_dev_run=3, trainer__verbosity=1, trainer__save_every_n_steps=1))
    assert not Path(config["trainer"]["save_dir"]).exists()
    out = capsys.readouterr().out
    assert "dry run: would write" in out and "last.pth" in out


# ---------------------------------------------------------------- trainer.val_every_n_steps


def test_validation_by_step_writes_a_mid_epoch_best_model_that_resumes_exactly(config):
    by_step = with_changes(config, trainer__val_every_n_steps=6, trainer__verbosity=1)
    reference = uninterrupted(by_step)
    log = (Path(config["trainer"]["save_dir"]) / "log/whole/w/info.log").read_text()
    # validations at steps 6, 12, ..., 36 (13 steps an epoch: none at an epoch's last step)
    steps = [int(line.split("step ")[1].split()[0]) for line in log.splitlines() if "(epoch" in line and ": val_loss" in line]
    assert steps == [6, 12, 18, 24, 30, 36]

    # The first validation always improves (on infinity): stopped by SIGTERM at step 7, model_best.pth is step 6's.
    with signal_at_step(signal.SIGTERM, 7), pytest.raises(RunStopped):
        run.train(by_step, run_id="v")
    best = models_dir(config, "v") / "model_best.pth"
    state = load(best)
    assert (state["global_step"], state["batch_in_epoch"], state["epoch"]) == (6, 6, 0)
    run.train(by_step, resume=best, overwrite=True)  # the rest of the run is the uninterrupted one's
    assert_states_identical(reference, load(models_dir(config, "v") / "checkpoint-epoch3.pth"))


def test_validation_by_step_early_stops_by_validations(config):
    # "max val_loss" while the loss falls: the first validation improves on -inf, the next two do not (one allowed).
    stopped = with_changes(config, trainer__val_every_n_steps=4, trainer__early_stop=1, trainer__monitor="max val_loss",
                           trainer__verbosity=1)
    run.train(stopped, run_id="es")
    log = (Path(config["trainer"]["save_dir"]) / "log/tiny/es/info.log").read_text()
    assert "didn't improve for 1 validations" in log
    state = load(models_dir(config, "es") / "checkpoint-epoch1.pth")
    assert state["global_step"] == 12  # stopped after the third validation, not at the epoch's end
    assert not (models_dir(config, "es") / "checkpoint-epoch2.pth").exists()


def test_an_early_stop_by_step_validation_is_the_end_of_the_run_too(tmp_path, config, capsys):
    stopping = with_changes(config, trainer__val_every_n_steps=4, trainer__early_stop=1,
                            trainer__monitor="max val_loss", trainer__save_every_n_steps=12)
    path = write_config(tmp_path, stopping)
    assert train_command(["-c", path, "--run-id", "es", "-r", "auto"]) == 0
    folder = models_dir(config, "es")
    assert load(folder / "checkpoint-epoch1.pth")["stopped_early"] is True
    assert load(folder / "last.pth")["stopped_early"] is True  # written at the same step, 12, mid-epoch
    assert load(folder / "last.pth")["early_stop_counts"] == "validations"
    before = snapshot(folder)
    capsys.readouterr()
    assert train_command(["-c", path, "--run-id", "es", "-r", "auto"]) == 0
    err = capsys.readouterr().err
    assert "nothing to resume: the run stopped early at epoch 1, step 12" in err and "1 validations" in err, err
    assert snapshot(folder) == before
