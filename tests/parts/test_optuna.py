"""Optuna studies through sweep.py: resumed from their study.db, trials pruned through their epoch reports, the plot."""

import json
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from test_sweep import trials_of, write_config
from parts.sweep import PLOT, PRUNED, Sweep, parse_random, plot_figure, sweep_command

LR = "optimizer.args.lr"


@pytest.mark.slow  # (make test's 5 minutes: run with make test-slow)
def test_a_study_resumes_from_its_database_and_prunes_through_the_epoch_reports(tmp_path, capsys, monkeypatch):
    path = write_config(tmp_path, tensorboard=True, test_after_train=False)  # 2 epochs
    folder = tmp_path / "saved/sweeps/o"
    folder.mkdir(parents=True)
    storage = f"sqlite:///{folder / 'study.db'}"
    # The first two trials fixed in advance (Optuna's enqueue_trial): a good learning rate, then one so small that
    # its first epoch is worse than the first trial's, which the median pruner (after 1 trial, no warm-up) stops.
    study = optuna.create_study(study_name="o", storage=storage, direction="minimize")
    study.enqueue_trial({LR: 0.1})
    study.enqueue_trial({LR: 1e-5})
    argv = ["-c", str(path), "--optuna", f"{LR}=loguniform:1e-5:0.5", "--pruner", "median:1:0", "--name", "o"]
    assert sweep_command([*argv, "--trials", "2"]) == 0
    out = capsys.readouterr().out
    first = trials_of(folder)
    assert [(t["id"], t["status"], t["params"]) for t in first] == [("trial-000", "done", {LR: 0.1}),
                                                                   ("trial-001", "pruned", {LR: 1e-5})]
    assert first[1]["result"]["ended_by"] == PRUNED and first[1]["result"]["epochs"] == 1  # stopped after epoch 1
    assert first[0]["result"]["ended_by"] is None
    # each trial's run was told its study and trial number by the config key the sweep part owns
    told = [json.loads((folder / "models/tiny" / t["id"] / "config.json").read_text())["trainer"]["optuna_trial"]
            for t in first]
    assert [(t["study"], t["trial"], t["pruner"]) for t in told] == [("o", 0, "median:1:0"), ("o", 1, "median:1:0")]
    assert f"Ended after epoch 1: {PRUNED}" in (folder / "log/tiny/trial-001/info.log").read_text()
    assert "trial-001" in out and "PRUNED after epoch 1" in out
    summary = (folder / "summary.md").read_text()
    assert "Pruned trials" in summary and "trial-001" in summary and "Failed" not in summary
    assert (folder / PLOT).read_bytes().startswith(b"\x89PNG") and f"Plot: {folder / PLOT}" in out
    # every trial's HParams record is under one TensorBoard root, which the sweep names
    assert f"tensorboard --logdir {folder / 'log'}" in out
    for trial in first:
        assert len(list((folder / "log/tiny" / trial["id"] / "hparams").glob("events.out.tfevents.*"))) == 1
    results = [folder / "models/tiny" / t["id"] / "result.json" for t in first]
    stamps = [p.stat().st_mtime_ns for p in results]

    # A larger --trials extends the study; Ctrl-C as its first new trial starts stops the sweep with its state saved.
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "run", ctrl_c)
    assert sweep_command([*argv, "--trials", "4"]) == 130
    monkeypatch.undo()
    stopped = trials_of(folder)
    assert [t["status"] for t in stopped] == ["done", "pruned", "interrupted"]
    assert optuna.load_study(study_name="o", storage=storage).trials[2].state == TrialState.RUNNING

    # The same command again: the interrupted trial runs under its own number and parameters, then one new trial.
    assert sweep_command([*argv, "--trials", "4"]) == 0
    trials = trials_of(folder)
    assert [t["number"] for t in trials] == [0, 1, 2, 3]
    assert trials[2]["params"] == stopped[2]["params"] and trials[3]["params"] != trials[2]["params"]
    assert all(t["status"] in ("done", "pruned") for t in trials)
    assert [p.stat().st_mtime_ns for p in results] == stamps  # the finished trials were not run again
    study = optuna.load_study(study_name="o", storage=storage)
    assert [(t.number, t.state) for t in study.trials[:2]] == [(0, TrialState.COMPLETE), (1, TrialState.PRUNED)]
    assert len(study.trials) == 4 and all(t.state.is_finished() for t in study.trials)
    assert [t.params[LR] for t in study.trials] == [t["params"][LR] for t in trials]
    # the study holds what the runs reported: each epoch's val_loss, and the best one as the trial's value
    assert list(study.trials[0].intermediate_values) == [1, 2] and list(study.trials[1].intermediate_values) == [1]
    assert study.trials[0].intermediate_values[2] == pytest.approx(trials[0]["result"]["final"]["val_loss"])
    assert study.trials[0].value == pytest.approx(trials[0]["result"]["best"])


def test_the_plot_has_a_panel_per_key_and_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    path = write_config(tmp_path)
    space = parse_random([f"{LR}=loguniform:1e-4:1e-1", "arch.args.hidden_sizes=choice:[16],[8,8]"])
    sweep = Sweep(path, [], space=space, trials=3, name="p")
    results = [{"best": best, "final": {"val_loss": best}, "monitor": "val_loss", "ended_by": None}
               for best in (0.9, 0.7, 1.1)]
    for trial, result, status in zip(sweep.state["trials"], results, ("done", "done", "pruned")):
        trial.update(status=status, result=result)

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert sweep.plot() == "Plot skipped: matplotlib is not installed (pip install matplotlib)"
    assert not (sweep.folder / PLOT).exists()
    monkeypatch.undo()

    assert sweep.plot() == f"Plot: {sweep.folder / PLOT}"
    assert (sweep.folder / PLOT).read_bytes().startswith(b"\x89PNG")
    from matplotlib.figure import Figure

    lr_axis, sizes_axis = plot_figure(Figure, sweep.state["trials"], sweep.swept, "best val_loss").axes[:2]
    assert lr_axis.get_xscale() == "log" and sizes_axis.get_xscale() == "linear"
    assert lr_axis.get_xlabel() == LR and lr_axis.get_ylabel() == "best val_loss"
    done, pruned = lr_axis.collections
    assert sorted(done.get_offsets()[:, 1].tolist()) == [0.7, 0.9] and pruned.get_offsets()[:, 1].tolist() == [1.1]


def test_a_study_without_optuna_installed_is_one_line(tmp_path, capsys, monkeypatch):
    path = write_config(tmp_path)
    monkeypatch.setitem(sys.modules, "optuna", None)
    assert sweep_command(["-c", str(path), "--optuna", f"{LR}=uniform:0.01:0.1", "--trials", "2"]) == 2
    assert capsys.readouterr().err.strip() == "error: --optuna needs the optuna package: pip install optuna"
    assert not (tmp_path / "saved").exists()


def test_a_study_of_the_other_direction_is_one_line(tmp_path, capsys):
    """A study keeps the direction it was made with; the sweep refuses one that does not follow trainer.monitor."""
    path = write_config(tmp_path)  # trainer.monitor "min val_loss"
    folder = tmp_path / "saved/sweeps/o"
    folder.mkdir(parents=True)
    optuna.create_study(study_name="o", storage=f"sqlite:///{folder / 'study.db'}", direction="maximize")
    argv = ["-c", str(path), "--optuna", f"{LR}=loguniform:1e-5:0.5", "--trials", "1", "--name", "o"]
    assert sweep_command(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the study there is to maximize, but trainer.monitor is 'min val_loss'" in err[0], err
    assert not (folder / "models").exists()  # no trial ran


def test_the_monitor_is_part_of_what_names_a_study_folder(tmp_path):
    path = write_config(tmp_path)
    space = parse_random([f"{LR}=loguniform:1e-5:0.5"], "--optuna")
    from parts.sweep import OptunaSweep

    low = OptunaSweep(str(path), [], space, 2)
    assert write_config(tmp_path, monitor="max val_accuracy") == path  # the same file, edited
    high = OptunaSweep(str(path), [], space, 2)
    assert low.folder != high.folder and (low.direction, high.direction) == ("minimize", "maximize")
