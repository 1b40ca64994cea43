"""The CSV-table part (parts/tables.py) on files written here, with missing values and text columns. Every user
mistake must be one line of UserError naming the file, the line and the column."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_run_keeps_pinned
from parts.tables import CsvDataLoader
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


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


def test_the_example_config_builds_on_the_example_data(tmp_path):
    from tools import make_example_data
    from trainer import build
    from utils.config import validate_config

    out = make_example_data.main(["--out", str(tmp_path / "data")])
    config = json.loads((ROOT / "configs/csv.json").read_text())
    assert config["data_loader"]["args"]["path"] == "data/example_table.csv"
    config["data_loader"]["args"]["path"] = str(out / "example_table.csv")
    config = validate_config(config, build.registries())
    loader = build.build_data_loader(config)
    model = build.build_model(config)
    x, y = next(iter(loader))
    assert model(x).shape == (len(y), len(loader.class_names))


def test_a_run_keeps_its_classes_and_scaling_and_resumes_from_the_original_config(example_data, tmp_path):
    assert_run_keeps_pinned("csv", {"class_names", "feature_stats"}, example_data, tmp_path)
