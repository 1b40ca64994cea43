"""Sweeps: grids and seeded random search, seeds and folds summarised as mean ± std, failures and resumption."""

import csv
import json
import statistics

import pytest
import torch

from conftest import make_config
from parts.sweep import configurations, parse_grid, parse_random, sweep_command


def write_config(tmp_path, **trainer):
    config = make_config(tmp_path / "saved", **{"epochs": 2, **trainer})
    path = tmp_path / "base.json"
    path.write_text(json.dumps(config))
    return path


def trials_of(folder):
    return json.loads((folder / "sweep.json").read_text())["trials"]


def test_a_grid_runs_every_combination_and_a_crashing_trial_does_not_stop_it(tmp_path, capsys):
    path = write_config(tmp_path)
    code = sweep_command(["-c", str(path), "--grid", "optimizer.args.lr=0.1,1e30", "--grid", "trainer.epochs=1,2",
                          "--name", "g"])
    out = capsys.readouterr().out
    assert code == 0, out
    folder = tmp_path / "saved/sweeps/g"
    trials = trials_of(folder)
    assert [t["params"] for t in trials] == [{"optimizer.args.lr": 0.1, "trainer.epochs": 1},
                                             {"optimizer.args.lr": 0.1, "trainer.epochs": 2},
                                             {"optimizer.args.lr": 1e30, "trainer.epochs": 1},
                                             {"optimizer.args.lr": 1e30, "trainer.epochs": 2}]
    assert [t["status"] for t in trials] == ["done", "done", "failed", "failed"]
    assert all("non-finite" in t["reason"] for t in trials[2:])  # the reason a trial failed is kept
    with open(folder / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and json.loads(rows[0]["params"])["optimizer.args.lr"] == 0.1
    assert "Failed trials:" in (folder / "summary.md").read_text()
    assert out.count("FAILED") == 2 and "trial-001" in out


@pytest.mark.slow  # (make test's 5 minutes: run with make test-slow)
def test_an_interrupted_sweep_resumes_without_running_a_trial_twice(tmp_path, capsys):
    path = write_config(tmp_path, save_period=1)
    argv = ["-c", str(path), "--grid", "optimizer.args.lr=0.1,0.05", "--name", "r"]
    assert sweep_command(argv) == 0
    folder = tmp_path / "saved/sweeps/r"
    first = folder / "models/tiny/trial-000/result.json"
    stamp = first.stat().st_mtime_ns
    # As if the sweep had been stopped in trial-001's second epoch: its state says running, epoch 1 is saved.
    state = json.loads((folder / "sweep.json").read_text())
    state["trials"][1]["status"] = "running"
    del state["trials"][1]["result"]
    (folder / "sweep.json").write_text(json.dumps(state))
    interrupted = folder / "models/tiny/trial-001"
    for name in ("checkpoint-epoch2.pth", "result.json", "model_best.pth"):
        (interrupted / name).unlink(missing_ok=True)
    assert sweep_command(argv) == 0
    assert first.stat().st_mtime_ns == stamp  # the finished trial was not run again
    manifest = json.loads((interrupted / "manifest.json").read_text())
    assert len(manifest["resume_history"]) == 1 and manifest["resume_history"][0]["checkpoint"].endswith("checkpoint-epoch1.pth")
    assert [t["status"] for t in trials_of(folder)] == ["done", "done"]
    assert torch.load(interrupted / "checkpoint-epoch2.pth", weights_only=True)["epoch"] == 2


def test_a_sweep_folder_belongs_to_one_command(tmp_path, capsys):
    path = write_config(tmp_path, epochs=1)
    assert sweep_command(["-c", str(path), "--grid", "optimizer.args.lr=0.1", "--name", "x"]) == 0
    assert sweep_command(["-c", str(path), "--grid", "optimizer.args.lr=0.2", "--name", "x"]) == 2
    assert "holds a sweep of another command" in capsys.readouterr().err


@pytest.mark.slow  # (make test's 5 minutes: run with make test-slow)
def test_seeds_and_folds_are_summarised_as_mean_and_std_of_the_trials(tmp_path, capsys):
    path = write_config(tmp_path, epochs=1, test_after_train=False)
    assert sweep_command(["-c", str(path), "--seeds", "0,1", "--folds", "2", "--name", "sf"]) == 0
    folder = tmp_path / "saved/sweeps/sf"
    trials = trials_of(folder)
    assert [(t["seed"], t["fold"]) for t in trials] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    results = [json.loads((folder / "models/tiny" / t["id"] / "result.json").read_text()) for t in trials]
    configs = [json.loads((folder / "models/tiny" / t["id"] / "config.json").read_text()) for t in trials]
    assert [c["data_loader"]["args"]["fold"] for c in configs] == [[0, 2], [1, 2], [0, 2], [1, 2]]
    best = [r["best"] for r in results]
    with open(folder / "summary.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["n"] == "4"
    assert float(row["best_mean"]) == pytest.approx(statistics.fmean(best), rel=1e-5)
    assert float(row["best_std"]) == pytest.approx(statistics.stdev(best), rel=1e-5)
    accuracy = [r["final"]["val_accuracy"] for r in results]
    assert float(row["val_accuracy_mean"]) == pytest.approx(statistics.fmean(accuracy), rel=1e-5)


def test_random_search_is_seeded_and_stays_in_its_ranges():
    space = parse_random(["optimizer.args.lr=loguniform:1e-4:1e-1", "arch.args.width=choice:16,32,64",
                          "trainer.epochs=int:1:3", "optimizer.args.momentum=uniform:0.5:0.99"])
    first, again = configurations(space=space, trials=20, sweep_seed=3), configurations(space=space, trials=20, sweep_seed=3)
    assert first == again and configurations(space=space, trials=20, sweep_seed=4) != first
    for trial in first:
        assert 1e-4 <= trial["optimizer.args.lr"] <= 1e-1 and trial["arch.args.width"] in (16, 32, 64)
        assert trial["trainer.epochs"] in (1, 2, 3) and 0.5 <= trial["optimizer.args.momentum"] <= 0.99
    assert len({t["optimizer.args.lr"] for t in first}) == 20


@pytest.mark.parametrize("item", ["lr", "lr=", "lr=normal:0:1", "lr=loguniform:0:1", "lr=uniform:2:1", "lr=int:a:b"])
def test_bad_search_specs_are_one_line(item):
    from utils.errors import UserError

    with pytest.raises(UserError):
        parse_random([item]) if "=" in item and item.split("=")[1] else parse_grid([item])


def test_grid_values_may_be_lists(tmp_path):
    assert parse_grid(["arch.args.hidden_sizes=[16,16],[32]"]) == {"arch.args.hidden_sizes": [[16, 16], [32]]}


def test_a_typo_in_the_base_config_fails_the_sweep_before_any_trial(tmp_path, capsys):
    path = write_config(tmp_path)
    assert sweep_command(["-c", str(path), "trainer.epoch=3", "--grid", "optimizer.args.lr=0.1"]) == 2
    assert "trainer.epoch: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "saved").exists()


OPTUNA = ["--optuna", "optimizer.args.lr=uniform:0.01:0.1", "--trials", "2"]


@pytest.mark.parametrize("flags,named", [(["--random", "optimizer.args.lr=uniform:0:1", "--trials", "0"], "--trials"),
                                         (["--nproc", "0"], "--nproc"), (["--folds", "1"], "--folds"),
                                         (["--seeds", "a,b"], "--seeds"),
                                         (["--optuna", "optimizer.args.lr=uniform:0:1"], "--optuna needs --trials"),
                                         (["--optuna", "lr=normal:0:1", "--trials", "2"], "--optuna 'lr=normal:0:1'"),
                                         ([*OPTUNA, "--grid", "trainer.epochs=1,2"], "give one of"),
                                         ([*OPTUNA, "--pruner", "mean"], "--pruner 'mean'"),
                                         ([*OPTUNA, "--pruner", "median:a"], "--pruner"),
                                         ([*OPTUNA, "--seeds", "0,1"], "--optuna runs each trial once"),
                                         ([*OPTUNA, "--direction", "max"], "--direction max"),
                                         ([*OPTUNA, "trainer.monitor=off"], '--optuna: the study optimizes'),
                                         (["--grid", "trainer.epochs=1,2", "--pruner", "none"], "--pruner is for"),
                                         # a repeated key would drop the first; an empty value, a repeated one
                                         (["--grid", "trainer.epochs=1", "--grid", "trainer.epochs=2"],
                                          "--grid 'trainer.epochs=2': trainer.epochs is swept twice"),
                                         (["--random", "trainer.epochs=int:1:2", "--random", "trainer.epochs=int:2:3",
                                           "--trials", "2"], "--random 'trainer.epochs=int:2:3'"),
                                         (["--grid", "optimizer.args.lr=0.1,,0.2"],
                                          "--grid 'optimizer.args.lr=0.1,,0.2': value 2 is empty"),
                                         (["--grid", "optimizer.args.lr=0.1,"], "--grid 'optimizer.args.lr=0.1,'"),
                                         (["--grid", "trainer.epochs=1,1"], "--grid 'trainer.epochs=1,1': a value is"),
                                         (["--random", "arch.args.dropout=choice:0.1,,0.2", "--trials", "2"],
                                          "--random"),
                                         (["--random", "trainer.epochs=int:1.5:3", "--trials", "2"],
                                          "--random 'trainer.epochs=int:1.5:3': int takes whole-number bounds"),
                                         ([*OPTUNA[:1], "trainer.epochs=int:1:2.5", *OPTUNA[2:]], "--optuna"),
                                         (["--random", "optimizer.args.lr=uniform:0:inf", "--trials", "2"], "--random"),
                                         (["--seeds", ""], "--seeds: got ''"), (["--seeds", "0,,1"], "--seeds"),
                                         (["--seeds", "1,1"], "--seeds: got '1,1', which repeats"),
                                         (["--grid", "trainer.epochs=1,2", "--trials", "3"], "--trials is the number"),
                                         # a swept key also fixed by an override: the trial's value would win
                                         (["--grid", "optimizer.args.lr=0.1,0.2", "optimizer.args.lr=0.3"],
                                          "optimizer.args.lr: both swept and set by an override"),
                                         (["--seeds", "0,1", "seed=3"], "seed: both swept")])
def test_bad_sweep_flags_are_one_line_before_anything_is_written(flags, named, tmp_path, capsys):
    path = write_config(tmp_path)
    assert sweep_command(["-c", str(path), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {named}"), err
    assert not (tmp_path / "saved").exists()


def test_a_random_search_resumes_its_own_folder(tmp_path):
    path = write_config(tmp_path)
    space = parse_random(["optimizer.args.lr=loguniform:1e-4:1e-1", "arch.args.hidden_sizes=choice:[16],[8,8]"])
    from parts.sweep import Sweep

    first = Sweep(path, [], space=space, trials=3, name="again")
    first.save()
    again = Sweep(path, [], space=space, trials=3, name="again")  # the spec as sweep.json keeps it is the same
    assert again.state == json.loads((first.folder / "sweep.json").read_text())


def test_drawn_values_are_shown_short_and_kept_whole():
    from parts.sweep import short

    assert short("optimizer.args.lr=0.044303752452182654") == "optimizer.args.lr=0.0443"
    assert short("optimizer.args.lr=1e-05") == "optimizer.args.lr=1e-05"
    assert short("trainer.epochs=3") == "trainer.epochs=3"  # an int stays as written
    assert short("arch.type=MLP") == "arch.type=MLP"
    assert short('metrics=["accuracy"]') == 'metrics=["accuracy"]'


@pytest.mark.parametrize("flags", [["--grid", "optimizer.args.lrr=0.1,0.2", "--grid", "trainer.epochs=0,1"],
                                   ["--random", "trainer.epochs=int:-3:0", "--trials", "4"],
                                   ["--optuna", "optimizer.args.lrr=uniform:0.1:0.2", "--trials", "2"],
                                   ["--optuna", "trainer.epochs=int:0:2", "--trials", "2"]])
def test_every_trials_config_is_checked_before_the_first_trial(flags, tmp_path, capsys):
    # A typo'd key or a value no trial may take would fail every trial the same way, one after the other.
    path = write_config(tmp_path)
    assert sweep_command(["-c", str(path), *flags, "--name", "bad"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("error: ") for line in err), err
    if "optimizer.args.lrr=0.1,0.2" in flags:  # every problem at once, each naming the trials it is in
        assert len(err) == 2 and "SGD takes no argument 'lrr'" in err[1] and "[in trial-000 (" in err[1], err
        assert "and 2 more]" in err[1] and "trainer.epochs: got 0" in err[0], err
    assert not (tmp_path / "saved").exists()


def test_a_sweep_whose_trials_all_failed_exits_non_zero(tmp_path, capsys):
    path = write_config(tmp_path, epochs=1)
    assert sweep_command(["-c", str(path), "--grid", "optimizer.args.lr=1e30,1e31", "--name", "f"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: every trial failed (2 of 2); the first:") and "non-finite" in err, err
    assert "Failed trials:" in (tmp_path / "saved/sweeps/f/summary.md").read_text()  # the summary is written first


@pytest.mark.parametrize("state", ['{"spec": {"config": "x", "ove', "[]", '{"spec": {}, "trials": [1]}', None])
def test_a_damaged_sweep_json_is_one_line_saying_what_to_do(state, tmp_path, capsys):
    path = write_config(tmp_path, epochs=1)
    folder = tmp_path / "saved/sweeps/d"
    folder.mkdir(parents=True)
    if state is None:
        (folder / "sweep.json").mkdir()  # not even a file
    else:
        (folder / "sweep.json").write_text(state)
    assert sweep_command(["-c", str(path), "--grid", "optimizer.args.lr=0.1", "--name", "d"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {folder / 'sweep.json'} is damaged"), err
    assert "run the same command again" in err[0] and "--name" in err[0]
    assert sorted(p.name for p in folder.iterdir()) == ["sweep.json"]  # nothing else written


def test_a_sweep_run_from_another_folder_with_relative_paths(tmp_path, monkeypatch, capsys):
    # The trials ran in the project's folder: a relative -c and save_dir meant something else there.
    monkeypatch.chdir(tmp_path)
    config = make_config("saved", epochs=1, test_after_train=False)
    (tmp_path / "base.json").write_text(json.dumps(config))
    assert sweep_command(["-c", "base.json", "--grid", "optimizer.args.lr=0.1", "--name", "rel"]) == 0
    assert [t["status"] for t in trials_of(tmp_path / "saved/sweeps/rel")] == ["done"]
    assert (tmp_path / "saved/sweeps/rel/models/tiny/trial-000/result.json").is_file()


def test_a_trial_whose_loss_is_null_in_result_json_reads_as_nan():
    """result.json writes a non-finite value as null (utils/io.py write_json): the sweep reads it as NaN, which
    formats and ranks, instead of failing on None."""
    import math

    from parts.sweep import monitored_value

    assert math.isnan(monitored_value({"best": None, "final": {"val_loss": None}}))
    assert f"{monitored_value({'best': None, 'final': {'loss': None}}):.6g}" == "nan"
    assert monitored_value({"best": 0.25, "final": {}}) == 0.25


def test_a_sweep_over_a_config_built_on_a_base(tmp_path, capsys):
    """Each trial composes the config again (utils/compose.py): the child's change, the sweep's value and the
    base's keys all reach the trial's config.json."""
    write_config(tmp_path, epochs=1, test_after_train=False)  # base.json
    child = tmp_path / "exp.json"
    child.write_text(json.dumps({"base": "base.json", "name": "exp", "arch": {"args": {"hidden_sizes": [8]}}}))
    assert sweep_command(["-c", str(child), "--grid", "optimizer.args.lr=0.05", "--name", "c"]) == 0
    saved = json.loads((tmp_path / "saved/sweeps/c/models/exp/trial-000/config.json").read_text())
    assert saved["arch"]["args"]["hidden_sizes"] == [8] and saved["optimizer"]["args"] == {"lr": 0.05, "momentum": 0.9}
