"""The CSV-table part (parts/tables.py) on files written here, with missing values and text columns. Every user
mistake must be one line of UserError naming the file, the line and the column."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_example_config_builds, assert_run_keeps_pinned
from parts.tables import CsvDataLoader
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
# The regression config scores with torchmetrics metrics: its tests need that part too.
needs_torchmetrics = pytest.mark.skipif(not (ROOT / "parts" / "torchmetrics.py").exists(),
                                        reason="the torchmetrics part is not in this project")


def one_line(info):
    text = str(info.value)
    assert text and "\n" not in text, text
    return text


def write_csv(path, rows, header=("a", "b", "city", "label")):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for row in rows:
            f.write(",".join(str(v) for v in row) + "\n")
    return str(path)


def table_rows(n=60):
    rng = np.random.default_rng(0)
    return [[f"{rng.normal(3, 2):.3f}", f"{rng.normal(-1, 5):.3f}", ["Oslo", "Lima"][i % 2], [10, 2, 33][i % 3]] for i in range(n)]


def test_csv_classification_features_classes_and_stats(tmp_path):
    path = write_csv(tmp_path / "t.csv", table_rows())
    train = CsvDataLoader(path, "label", batch_size=8, seed=3)
    assert train.feature_names == ["a", "b"]  # 'city' is text: not a default feature
    assert train.class_names == ["2", "10", "33"]  # numeric labels sorted as numbers
    raw = torch.tensor([[float(r[0]), float(r[1])] for r in table_rows()], dtype=torch.float64)
    # The statistics come from the training rows only: not the validation rows, not the test rows.
    fit = train.sampler.indices
    assert len(fit) == 60 - 12 - round(0.1 * 48)
    assert torch.allclose(torch.tensor(train.feature_stats["mean"], dtype=torch.float64), raw[fit].mean(0))
    assert torch.allclose(torch.tensor(train.feature_stats["std"], dtype=torch.float64), raw[fit].std(0, unbiased=False))
    assert not torch.allclose(torch.tensor(train.feature_stats["mean"], dtype=torch.float64), raw.mean(0))
    inputs, _ = train.dataset.tensors()
    assert torch.allclose(inputs[fit].mean(0), torch.zeros(2), atol=1e-5)
    json.dumps(train.data_args())  # plain values: storable in a config and a checkpoint
    # The test loader rebuilt from the saved arguments scales with the training statistics.
    test = CsvDataLoader(path, "label", training=False, seed=3, **train.data_args())
    assert torch.equal(test.dataset.tensors()[0], inputs) and len(test.sampler) == 12
    assert sorted(set(test.sampler.indices.tolist()) & set(train.sampler.indices.tolist())) == []


def test_csv_regression(tmp_path):
    rows = [[i, i * 0.5, "x", 2.0 * i + 1] for i in range(50)]
    path = write_csv(tmp_path / "r.csv", rows, header=("u", "v", "tag", "y"))
    loader = CsvDataLoader(path, "y", task="regression", features=["u", "v"], batch_size=64, validation_split=0,
                           standardize=False, shuffle=False)
    x, y = next(iter(loader))
    assert y.dtype == torch.float32 and torch.equal(y, 2 * x[:, 0] + 1) and loader.class_names is None
    assert len(loader.sampler) == 40 and "class_names" not in loader.data_args()


def bad_tables():
    good = table_rows(12)
    missing = [r[:] for r in good]
    missing[4][1] = "NA"
    text_feature = [r[:] for r in good]
    text_feature[6][0] = "seven"
    missing_label = [r[:] for r in good]
    missing_label[2][3] = ""
    return [
        ("missing value", missing, {}, "line 6, column 'b': missing value"),
        ("text in a named feature", text_feature, {"features": ["a", "b"]}, "line 8, column 'a': 'seven' is not a number"),
        ("text feature named", good, {"features": ["a", "city"]}, "column 'city'"),
        ("missing label", missing_label, {}, "line 4, column 'label': missing value"),
        ("unknown target", good, {"target": "lable"}, "did you mean 'label'"),
        ("unknown feature", good, {"features": ["a", "bb"]}, "no column 'bb'"),
        ("target as feature", good, {"features": ["a", "label"]}, "target column"),
        ("ragged row", good[:3] + [["1", "2"]], {}, "line 5: 2 values"),
        ("header only", [], {}, "no rows"),
        ("one class", [r[:3] + [7] for r in good], {}, "one class"),
        ("bad task", good, {"task": "ranking"}, "classification, regression"),
        ("no file", None, {}, "file not found"),
        ("bad feature_stats", good, {"feature_stats": {"features": ["a"], "mean": [0], "std": [1]}}, "feature_stats"),
    ]


@pytest.mark.parametrize("name,rows,args,expected", bad_tables(), ids=[c[0] for c in bad_tables()])
def test_bad_table_is_one_line(tmp_path, name, rows, args, expected):
    path = str(tmp_path / "missing.csv") if rows is None else write_csv(tmp_path / "t.csv", rows)
    args = {"path": path, "target": "label", **args}
    with pytest.raises(UserError) as info:
        CsvDataLoader(**args)
    assert expected in one_line(info)


def test_empty_csv_is_one_line(tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(UserError) as info:
        CsvDataLoader(str(tmp_path / "e.csv"), "label")
    assert "empty" in one_line(info)


# --------------------------------------------------------------------------- as a user runs it


def test_the_loader_is_found_by_its_name_through_the_parts_table():
    from trainer import build

    assert build.registries()["data_loader"].get("CsvDataLoader") is CsvDataLoader
    assert "CsvDataLoader" not in build.DATA_LOADERS  # not in the core's table


def test_the_example_config_builds_on_the_example_data(example_data, tmp_path):
    assert_example_config_builds("csv", "path", "data/example_table.csv", example_data, tmp_path / "saved")


def test_a_run_keeps_its_classes_and_scaling_and_resumes_from_the_original_config(example_data, tmp_path):
    assert_run_keeps_pinned("csv", {"class_names", "feature_stats"}, example_data, tmp_path)


# --------------------------------------------------------------------------- regression as a task


def regression_config(path, save_dir, *overrides, target="y", features=3):
    from utils.config import apply_overrides, load_config

    return apply_overrides(load_config(ROOT / "configs/csv_regression.json"),
                           [f"data_loader.args.path={path}", f"data_loader.args.target={target}",
                            f"arch.args.input_size={features}", f"trainer.save_dir={save_dir}", "trainer.verbosity=0",
                            "trainer.tensorboard=false", "device=cpu", *overrides])


def test_a_regression_target_is_standardised_with_the_training_rows(tmp_path):
    rows = [[i, (i * 7) % 11, "x", 3.0 * i + 100] for i in range(50)]
    path = write_csv(tmp_path / "r.csv", rows, header=("u", "v", "tag", "y"))
    train = CsvDataLoader(path, "y", task="regression", batch_size=8, seed=1)
    raw = torch.tensor([r[3] for r in rows], dtype=torch.float64)
    fit = train.sampler.indices
    target = train.feature_stats["target"]
    assert target["mean"] == pytest.approx(float(raw[fit].mean())) and target["mean"] != pytest.approx(float(raw.mean()))
    assert target["std"] == pytest.approx(float(raw[fit].std(unbiased=False)))
    _, y = train.dataset.tensors()
    torch.testing.assert_close(y.double(), (raw - target["mean"]) / target["std"], rtol=1e-6, atol=1e-6)
    json.dumps(train.data_args())
    test = CsvDataLoader(path, "y", task="regression", training=False, **train.data_args())
    assert torch.equal(test.dataset.tensors()[1], y)  # the test rows scaled with the training rows' numbers
    old = {k: v for k, v in train.feature_stats.items() if k != "target"}  # a run saved before targets were scaled
    assert torch.equal(CsvDataLoader(path, "y", task="regression", feature_stats=old).dataset.tensors()[1], raw.float())


@needs_torchmetrics
@pytest.mark.parametrize("overrides,expected", [
    (['metrics=["accuracy", "top_k_acc"]', "trainer.monitor=off"], "metrics: accuracy, top_k_acc score classes"),
    (['metrics=[{"type": "torchmetrics.classification.MulticlassAccuracy", "args": {"num_classes": 3}}]',
      "trainer.monitor=off"], "metrics: torchmetrics.classification.MulticlassAccuracy scores classes"),
    (['metrics=["mae"]'], 'the built-in "mae" would score the standardised target'),
    (["loss=cross_entropy"], "loss: cross_entropy is a classification loss"),
])
def test_a_regression_task_refuses_classification_metrics_in_one_line(example_data, tmp_path, capsys, overrides,
                                                                      expected):
    from trainer import cli

    config = regression_config(example_data / "example_regression.csv", tmp_path / "saved", *overrides)
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert cli.train_command(["-c", str(tmp_path / "c.json")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "saved").exists()  # nothing written


@needs_torchmetrics
def test_a_regression_run_keeps_its_target_scaling_and_resumes_from_the_original_config(example_data, tmp_path):
    from trainer import cli, run

    config = regression_config(example_data / "example_regression.csv", tmp_path / "saved", "trainer.epochs=2",
                               "trainer.save_period=1")
    run.train(config, run_id="r")
    folder = tmp_path / "saved/models" / config["name"] / "r"
    saved = json.loads((folder / "config.json").read_text())
    target = saved["data_loader"]["args"]["feature_stats"]["target"]
    assert all(m["args"]["target_stats"] == target for m in saved["metrics"])  # each metric scores in y's units
    (tmp_path / "c.json").write_text(json.dumps(config))  # the user's file: no scaling in it
    assert cli.train_command(["-c", str(tmp_path / "c.json"), "-r", str(folder / "checkpoint-epoch1.pth"),
                              "--overwrite"]) == 0  # a changed scaling would be refused, or logged as a change
    assert json.loads((folder / "config.json").read_text()) == saved


def write_diabetes(path):
    from sklearn.datasets import load_diabetes

    data = load_diabetes(scaled=False)  # bundled with scikit-learn: nothing is downloaded
    with open(path, "w") as f:
        f.write(",".join([*data.feature_names, "target"]) + "\n")
        for x, y in zip(data.data, data.target):
            f.write(",".join(f"{v:g}" for v in [*x, y]) + "\n")
    return path


@needs_torchmetrics
@pytest.mark.slow
def test_diabetes_regression_scores_in_the_targets_units_and_matches_a_linear_model(tmp_path):
    """configs/csv_regression.json on scikit-learn's diabetes table: its test MAE (in the target's units, as
    reported and as predict.py gives them) at most that of least squares fitted on the same training rows."""
    import importlib

    pytest.importorskip("sklearn")
    from trainer import run

    path = write_diabetes(tmp_path / "diabetes.csv")
    config = regression_config(path, tmp_path / "saved", target="target", features=10)
    run.train(config, run_id="d")
    folder = tmp_path / "saved/models" / config["name"] / "d"
    ours = json.loads((folder / "model_best.test.json").read_text())["mae"]
    # The linear model: closed-form least squares on the rows the run trained on, scored on the same test rows.
    raw = CsvDataLoader(str(path), "target", task="regression", standardize=False, seed=config["seed"])
    test_rows = CsvDataLoader(str(path), "target", task="regression", standardize=False, training=False).sampler.indices
    x, y = (t.double() for t in raw.dataset.tensors())
    x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    fit = torch.as_tensor(raw.sampler.indices)
    weights = torch.linalg.lstsq(x[fit], y[fit, None]).solution
    test_rows = torch.as_tensor(test_rows)
    linear = float((x[test_rows] @ weights).squeeze(1).sub(y[test_rows]).abs().mean())
    print(f"diabetes test MAE: ours {ours:.3f}, linear least squares {linear:.3f}")
    assert ours <= linear
    # predict.py gives the target's units: its MAE over the test rows is the reported one.
    if importlib.util.find_spec("parts.predict") is None:  # (the predict part was deleted)
        return
    predicting = importlib.import_module("parts.predict")
    loaded = predicting.load_for_inference(folder / "model_best.pth")
    predicted = torch.tensor([r["prediction"] for r in predicting.predict(loaded, [str(path)])], dtype=torch.float64)
    assert float((predicted[test_rows] - y[test_rows]).abs().mean()) == pytest.approx(ours, rel=1e-5)


# --------------------------------------------------------------------------- cells, headers, overflow (issue 24)


@pytest.mark.parametrize("cell", ["seven", "inf", "-Infinity", "1\x00", "1e999"])
def test_a_stray_cell_in_a_numeric_column_names_its_line_and_column(tmp_path, cell):
    rows = table_rows(12)
    rows[6][0] = cell  # was the column silently left out of the features (blamed on arch.args.input_size)
    with pytest.raises(UserError) as info:
        CsvDataLoader(write_csv(tmp_path / "t.csv", rows), "label")
    text = one_line(info)
    assert f"line 8, column 'a': {cell!r} is not a" in text and "11 of the column's 12 values" in text


def test_a_text_column_is_still_not_a_feature(tmp_path):
    rows = table_rows(12)
    for row in rows[:5]:
        row[2] = "7"  # a few numbers in a text column: still text
    assert CsvDataLoader(write_csv(tmp_path / "t.csv", rows), "label").feature_names == ["a", "b"]


@pytest.mark.parametrize("at, header", [(5, ("a", "b", "city", "label")), (12, (" a", "b ", "city", " label "))])
def test_a_repeated_header_row_is_named_as_such(tmp_path, at, header):
    rows = table_rows(12)
    rows.insert(at, list(header))
    with pytest.raises(UserError) as info:
        CsvDataLoader(write_csv(tmp_path / "t.csv", rows), "label")
    assert f"line {at + 2} repeats the first row" in one_line(info)


@pytest.mark.parametrize("scale, column, args, expected", [
    (1e308, "a", {}, "column 'a': its mean"),  # the sum overflows
    (1e200, "b", {}, "column 'b': its mean"),  # the squares overflow
    (1e39, "a", {"standardize": False}, "column 'a': beyond float32's range"),
    (1e39, "label", {"task": "regression"}, "column 'label': beyond float32's range"),
])
def test_features_that_overflow_are_refused_naming_the_column(tmp_path, scale, column, args, expected):
    rows = table_rows(40)
    i = ("a", "b", "city", "label").index(column)
    for k, row in enumerate(rows):
        row[i] = f"{(k % 7 - 3) * scale:.6g}" if scale < 1e300 else f"{(0.5 + k % 7 / 10) * scale:.6g}"
    with pytest.raises(UserError) as info:
        CsvDataLoader(write_csv(tmp_path / "t.csv", rows), "label", **args)
    text = one_line(info)
    assert expected in text and ("line" in text) == ("float32" in text)


@pytest.mark.parametrize("kind, named", [("fifo", "is a FIFO (a named pipe), not a regular file"),
                                         ("link to /dev/zero", "(a link to /dev/zero) is a character device"),
                                         ("folder", "is a folder, not a file"),
                                         ("dangling link", "which does not exist")])
def test_a_table_path_that_is_no_file_is_named_not_read(tmp_path, kind, named):
    """A FIFO (opening it would block) or a link to a device as ``path`` is named as what it is, not "not found"."""
    import os

    path = tmp_path / "t.csv"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero" if kind == "link to /dev/zero" else tmp_path / "gone")
    with pytest.raises(UserError) as info:
        CsvDataLoader(str(path), "label")
    text = one_line(info)
    assert text.startswith("data_loader.args.path: ") and str(path) in text and named in text, text
