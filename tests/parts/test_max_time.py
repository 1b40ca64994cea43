"""The max_time part (parts/max_time.py): the duration's format, the stop with a resumable last.pth and exit 75,
a new budget per command, and no fresh budget for a round torchrun restarted after the budget ran out.

No test waits for wall-clock time: the budget is spent on a fake clock that advances one second per read,
so a budget of N seconds runs out at step N.
"""

import json
import types
from pathlib import Path

import pytest

import test_cluster as core  # the torchrun launcher and its driver
from conftest import assert_states_identical, make_config, with_changes
from parts.max_time import EXIT_OUT_OF_TIME, MaxTime, parse_duration, spent_in_this_launch
from test_cluster import WORLD, dist_config, gloo, load, models_dir, uninterrupted, write_config
from trainer import run
from trainer.cli import train_command


@pytest.fixture
def config(tmp_path):
    # Shuffling, a validation split, dropout, a scheduler, momentum: everything that can drift on resume.
    return make_config(tmp_path / "saved", epochs=3, save_period=1)


@pytest.fixture
def fake_clock(monkeypatch):
    """``parts.max_time``'s clock, advanced one second by each read: ``max_time`` of N seconds runs out at step N."""
    now = [1000.0]

    def monotonic():
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr("parts.max_time.time", types.SimpleNamespace(monotonic=monotonic))
    return now


@pytest.mark.parametrize("value, seconds", [("00:00:00:10", 10), ("01:02:03:04", 93784), ("0:23:59:59", 86399)])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["00:24:00:00", "00:00:60:00", "10:00", "00:00:00:00", "1d", 5])
def test_max_time_refuses_what_is_not_a_duration_in_one_line(tmp_path, config, value, capsys):
    code = train_command(["-c", write_config(tmp_path, config), f"trainer.max_time={json.dumps(value)}"])
    err = capsys.readouterr().err
    assert code == 2
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip()]
    assert "trainer.max_time" in err and "DD:HH:MM:SS" in err
    assert not Path(config["trainer"]["save_dir"]).exists()  # nothing written


def test_max_time_stops_with_a_resumable_checkpoint_and_its_own_exit_code(tmp_path, config, fake_clock, capsys):
    reference = uninterrupted(config)
    path = write_config(tmp_path, with_changes(config, trainer__max_time="00:00:00:15"))
    code = train_command(["-c", path, "--run-id", "timed", "-r", "auto"])
    assert code == EXIT_OUT_OF_TIME, capsys.readouterr().err
    assert code not in (0, 1, 2)
    folder = models_dir(config, "timed")
    last = load(folder / "last.pth")
    assert last["global_step"] == 15 and last["batch_in_epoch"] > 0  # the first step boundary past the budget: mid-epoch
    assert "out of time" in (Path(config["trainer"]["save_dir"]) / "log/tiny/timed/info.log").read_text()

    # The same command again: each run gets a new budget and continues where the last one stopped.
    assert train_command(["-c", path, "--run-id", "timed", "-r", "auto"]) == EXIT_OUT_OF_TIME
    assert load(folder / "last.pth")["global_step"] == 30
    assert train_command(["-c", path, "--run-id", "timed", "-r", "auto"]) == 0  # 9 steps left of 39: done
    assert_states_identical(reference, load(folder / "checkpoint-epoch3.pth"))
    capsys.readouterr()
    assert train_command(["-c", path, "--run-id", "timed", "-r", "auto"]) == 0  # and again: nothing to do
    assert "nothing to resume" in capsys.readouterr().err
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [Path(h["checkpoint"]).name for h in manifest["resume_history"]] == ["last.pth"] * 2
    assert sorted(p.name for p in folder.parent.iterdir()) == ["timed"]  # one run folder throughout


def test_max_time_off_adds_no_step_hook(config):
    from trainer.trainer import hooks_for, step_hooks

    parts = types.SimpleNamespace(frozen=[], model=None, optimizer=None, task=None)
    fake_run = types.SimpleNamespace(dist=types.SimpleNamespace(is_main=True), writer=None)
    checked = run.checked_config(config)[0]
    assert step_hooks(hooks_for(checked, parts, fake_run)) == []
    timed = run.checked_config(with_changes(config, trainer__max_time="00:01:00:00"))[0]
    assert [type(h) for h in step_hooks(hooks_for(timed, parts, fake_run))] == [MaxTime]


# ---------------------------------------------------------------- under torchrun (2 CPU processes, gloo)

# The workers' driver (tests/test_cluster.py's), with parts.max_time's clock advanced one second per read.
FAKE_CLOCK_DRIVER = """
import types
from parts import max_time as timed
fake_now = [1000.0]
def fake_monotonic():
    fake_now[0] += 1.0
    return fake_now[0]
timed.time = types.SimpleNamespace(monotonic=fake_monotonic)
""" + core.DRIVER


@gloo
@pytest.mark.slow  # ~35 s: four rounds of torchrun workers
def test_torchrun_does_not_train_on_after_max_time_ran_out(tmp_path, torchrun):
    """Out of time under torchrun: the workers stop at step 15 with last.pth and exit 75, which torchrun takes for
    a failure and restarts. The restarted rounds must not train on with a fresh budget: each stops at once (75),
    without writing anything, until torchrun gives up; the launch ends. The same command again (a new launch,
    as a requeued job is) continues from step 15 with a new budget."""
    config = dist_config(tmp_path / "saved", max_time="00:00:00:15", epochs=3)  # 42 steps in all
    proc = torchrun(tmp_path, FAKE_CLOCK_DRIVER, *core.train_args(tmp_path, config, "timed"),
                    torchrun_args=["--max-restarts=2"])
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    folder = tmp_path / "saved" / "models" / "dist_tiny" / "timed"
    assert load(folder / "last.pth")["global_step"] == 15
    stopped_by = load(folder / "last.pth")["stopped_by"]
    assert stopped_by["exit_code"] == EXIT_OUT_OF_TIME and stopped_by["torchrun_round"] == 0
    assert output.count("out of time: trainer.max_time ran out earlier in this torchrun launch (round 0)") == 2 * WORLD
    assert "Resumed after" not in output  # the restarted rounds trained nothing
    assert json.loads((folder / "manifest.json").read_text())["resume_history"] == []  # and wrote nothing

    again = torchrun(tmp_path, FAKE_CLOCK_DRIVER, *core.train_args(tmp_path, config, "timed"),
                     torchrun_args=["--max-restarts=0"])
    said = again.stdout + again.stderr
    assert "Resumed after step 15: continuing at epoch 2, batch 2 of 14" in said, said[-4000:]
    assert load(folder / "last.pth")["global_step"] == 30


def test_spent_in_this_launch_needs_the_same_launch_and_a_later_round():
    state = {"stopped_by": {"exit_code": EXIT_OUT_OF_TIME, "torchrun_run_id": "job7", "torchrun_round": 0}}
    assert spent_in_this_launch(state, {"TORCHELASTIC_RUN_ID": "job7", "TORCHELASTIC_RESTART_COUNT": "1"})
    assert not spent_in_this_launch(state, {"TORCHELASTIC_RUN_ID": "job7", "TORCHELASTIC_RESTART_COUNT": "0"})  # requeued
    assert not spent_in_this_launch(state, {"TORCHELASTIC_RUN_ID": "other", "TORCHELASTIC_RESTART_COUNT": "1"})
    assert not spent_in_this_launch(state, {})  # plain python train.py
    assert not spent_in_this_launch({"stopped_by": None}, {"TORCHELASTIC_RUN_ID": "job7", "TORCHELASTIC_RESTART_COUNT": "1"})
    # Stopped by a signal in that round (SIGTERM: 143), not by the budget: a restarted round trains on.
    by_signal = {"stopped_by": {"exit_code": 143, "torchrun_run_id": "job7", "torchrun_round": 0}}
    assert not spent_in_this_launch(by_signal, {"TORCHELASTIC_RUN_ID": "job7", "TORCHELASTIC_RESTART_COUNT": "1"})
