"""The predict part (parts/predict.py, predict.py) on checkpoints of the own-data example configs (image folders, a CSV table)."""

import json
from pathlib import Path

import pytest
import torch

from conftest import example_config, make_config
from parts import predict
from trainer import build, run

ROOT = Path(__file__).resolve().parents[2]


def _train(name, example_data, save_dir):
    config = example_config(name, example_data, save_dir, "trainer.epochs=1")
    run.train(config, run_id="r")
    return save_dir / "models" / config["name"] / "r" / "model_best.pth"


@pytest.fixture(scope="module")
def image_ckpt(example_data, tmp_path_factory):
    pytest.importorskip("parts.image_folder")
    return _train("image_folder", example_data, tmp_path_factory.mktemp("img") / "saved")


@pytest.fixture(scope="module")
def csv_ckpt(example_data, tmp_path_factory):
    pytest.importorskip("parts.tables")
    return _train("csv", example_data, tmp_path_factory.mktemp("csv") / "saved")


def _test_split_predictions(ckpt):
    """The class index ``test.py``'s model and loader give each test sample, in the loader's order."""
    loaded = predict.load_for_inference(ckpt)
    loader = build.build_data_loader(loaded.config, training=False)
    with torch.no_grad():
        return loader, torch.cat([loaded.model(x).argmax(1) for x, _ in loader]).tolist()


def test_predict_images_equals_test_py_on_the_same_files(image_ckpt, example_data, tmp_path):
    Layout = pytest.importorskip("parts.image_folder").Layout  # (image_ckpt skips without that part)
    loader, expected = _test_split_predictions(image_ckpt)
    names = loader.class_names
    files = [path for path, _ in Layout(example_data / "example_images").splits["test"]]
    out = tmp_path / "p.csv"
    code = predict.predict_command(["-r", str(image_ckpt), str(example_data / "example_images/test"), "-o", str(out),
                                    "--top-k", "2"])
    assert code == 0
    lines = out.read_text().splitlines()
    header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]
    assert header == ["input", "row", "class", "probability", "top1_class", "top1_probability", "top2_class",
                      "top2_probability"]
    by_path = {row[0]: row for row in rows}
    assert len(by_path) == len(files) == 90
    assert [by_path[str(p)][2] for p in files] == [names[i] for i in expected]
    for row in rows:
        assert row[2] == row[4] and float(row[3]) >= float(row[5])


def test_predict_probabilities_sum_to_one_and_json_lines(image_ckpt, example_data, capsys):
    folder = example_data / "example_images/test/triangle"
    code = predict.predict_command(["-r", str(image_ckpt), str(folder / "triangle_000.png"), str(folder), "--json",
                                    "--top-k", "5", "-d", "cpu"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 31 and rows[0]["input"] == rows[1]["input"]  # a file named twice is predicted twice
    for row in rows:
        assert len(row["top_k"]) == 3  # capped at the 3 classes
        assert {t["class"] for t in row["top_k"]} == {"circle", "square", "triangle"}
        assert sum(t["probability"] for t in row["top_k"]) == pytest.approx(1.0, abs=1e-5)
        assert row["class"] == row["top_k"][0]["class"] and row["probability"] == row["top_k"][0]["probability"]


def test_predict_skips_unreadable_images_and_reports_them(image_ckpt, example_data, tmp_path, capsys):
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub/broken.png").write_bytes(b"not an image")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    good = example_data / "example_images/test/circle/circle_000.png"
    (folder / "sub/good.png").write_bytes(good.read_bytes())
    code = predict.predict_command(["-r", str(image_ckpt), str(folder)])
    captured = capsys.readouterr()
    assert code == 0
    rows = captured.out.splitlines()[1:]
    assert len(rows) == 1 and rows[0].startswith(str(folder / "sub/good.png"))
    assert "skipped" in captured.err and "broken.png" in captured.err and "empty.jpg" in captured.err
    assert "Traceback" not in captured.err
    # Nothing readable at all: one error line, exit 2, no output file.
    out = tmp_path / "none.csv"
    assert predict.predict_command(["-r", str(image_ckpt), str(folder / "sub/broken.png"), "-o", str(out)]) == 2
    assert "error: no input could be read" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("case", ["missing", "csv_to_images", "wrong_channels"])
def test_predict_user_errors_are_one_line(case, image_ckpt, example_data, tmp_path, capsys):
    image = str(example_data / "example_images/test/circle/circle_000.png")
    argv = {
        "missing": [str(tmp_path / "nope.png")],
        "csv_to_images": [str(example_data / "example_table.csv")],
        # The run's transforms normalise 3 channels: grey images are the wrong channel count.
        "wrong_channels": [image, "data_loader.args.channels=1"],
    }[case]
    out = tmp_path / "out.csv"
    assert predict.predict_command(["-r", str(image_ckpt), *argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    if case == "wrong_channels":
        assert "(1, 32, 32) do not fit the model" in err


def test_predict_csv_rows_equal_test_py_and_skip_bad_rows(csv_ckpt, example_data, tmp_path, capsys):
    loader, expected = _test_split_predictions(csv_ckpt)
    names = loader.class_names
    out = tmp_path / "p.jsonl"
    assert predict.predict_command(["-r", str(csv_ckpt), str(example_data / "example_table.csv"), "-o", str(out),
                                    "--json"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(1, 301))
    by_row = {r["row"]: r["class"] for r in rows}
    test_rows = (loader.sampler.indices + 1).tolist()  # table index i is data row i + 1
    assert [by_row[i] for i in test_rows] == [names[i] for i in expected]
    # A table without the target column, columns in another order, one bad row: the rest is predicted.
    table = tmp_path / "new.csv"
    table.write_text("x4,x3,x2,x1\n2.0,1.0,0.0,0.0\n1,2,NA,3\n0.5,1.5,2.0,0.5\n")
    assert predict.predict_command(["-r", str(csv_ckpt), str(table), "--top-k", "1"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "input,row,class,probability,top1_class,top1_probability"
    assert [line.split(",")[1] for line in lines[1:]] == ["1", "3"]
    assert "row 2" in captured.err and "'x2'" in captured.err


def test_predict_csv_of_the_wrong_shape_is_one_line(csv_ckpt, tmp_path, capsys):
    table = tmp_path / "three.csv"
    table.write_text("x1,x2,x3\n1,2,3\n")
    assert predict.predict_command(["-r", str(csv_ckpt), str(table)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no column 'x4'" in err and len(err.strip().splitlines()) == 1
    # Without the saved scaling and with fewer features named, the model itself rejects the rows.
    assert predict.predict_command(["-r", str(csv_ckpt), str(table), "data_loader.args.feature_stats=null",
                                    "data_loader.args.standardize=false", 'data_loader.args.features=["x1","x2","x3"]']) == 2
    err = capsys.readouterr().err
    assert "inputs of shape (3,) do not fit the model" in err and len(err.strip().splitlines()) == 1


def test_the_command_is_thin():
    text = (ROOT / "predict.py").read_text()
    assert "from parts.predict import predict_command" in text and len(text.splitlines()) <= 20


def test_predict_uses_the_ema_weights_validation_scored(tmp_path):
    pytest.importorskip("parts.ema")
    config = make_config(tmp_path / "saved", epochs=1, ema={"decay": 0.9})
    run.train(config, run_id="e")
    ckpt = tmp_path / "saved/models/tiny/e/checkpoint-epoch1.pth"
    state = torch.load(ckpt, weights_only=True)
    averaged = state["ema"]["weights"]
    assert any(not torch.equal(averaged[k], state["model"][k]) for k in averaged)  # the two differ
    weights = predict.load_for_inference(ckpt).model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in averaged.items())


def _copy_run(ckpt, tmp_path):
    """A copy of ``ckpt``'s run folder (the checkpoint and its config.json): a test that fails must not damage the
    module's shared checkpoint."""
    import shutil

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in (ckpt.name, "config.json"):
        shutil.copy2(ckpt.parent / name, run_dir / name)
    return run_dir / ckpt.name


@pytest.mark.parametrize("case", ["checkpoint", "config", "input", "symlink", "hard_link", "other_file", "folder",
                                  "no_folder", "fifo"])
def test_predict_output_never_replaces_an_input_or_a_file_it_did_not_write(case, csv_ckpt, example_data, tmp_path,
                                                                             capsys):
    import os

    ckpt = _copy_run(csv_ckpt, tmp_path)
    table = tmp_path / "table.csv"
    table.write_bytes((example_data / "example_table.csv").read_bytes())
    notes = tmp_path / "notes.txt"
    notes.write_text("someone's notes\n")
    if case == "symlink":
        os.symlink(ckpt, tmp_path / "link.csv")
    if case == "hard_link":
        os.link(ckpt.parent / "config.json", tmp_path / "hard.csv")
    if case == "fifo":  # (a special file of the test's own: without the check, /dev/null itself would be replaced)
        os.mkfifo(tmp_path / "fifo.csv")
    output = {"checkpoint": ckpt, "config": ckpt.parent / "config.json", "input": table,
              "symlink": tmp_path / "link.csv",
              "hard_link": tmp_path / "hard.csv", "other_file": notes, "folder": tmp_path,
              "no_folder": tmp_path / "gone/p.csv", "fifo": tmp_path / "fifo.csv"}[case]
    before = {p: p.read_bytes() for p in (ckpt, ckpt.parent / "config.json", table, notes)}
    assert predict.predict_command(["-r", str(ckpt), str(table), "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: -o {output}") and len(err.strip().splitlines()) == 1, err
    assert "give -o a new file path" in err
    assert {p: p.read_bytes() for p in before} == before  # nothing replaced
    made = {"symlink": ["link.csv"], "hard_link": ["hard.csv"], "fifo": ["fifo.csv"]}.get(case, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", "table.csv", "notes.txt", *made])
    # An earlier output of predict.py, and an empty file, are replaced as asked.
    out = tmp_path / "p.csv"
    for _ in range(2):
        assert predict.predict_command(["-r", str(ckpt), str(table), "-o", str(out), "--top-k", "1"]) == 0
    jsonl = tmp_path / "p.jsonl"
    jsonl.touch()
    for _ in range(2):
        assert predict.predict_command(["-r", str(ckpt), str(table), "-o", str(jsonl), "--json"]) == 0
    assert len(out.read_text().splitlines()) == len(jsonl.read_text().splitlines()) + 1 == 301


@pytest.mark.parametrize("case", ["fifo", "device_link", "dangling_link"])
def test_predict_input_that_is_no_file_is_named_not_read(case, image_ckpt, tmp_path, capsys):
    import os

    path = tmp_path / "x.png"
    if case == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(path)  # reading it would wait forever
    else:
        os.symlink("/dev/zero" if case == "device_link" else tmp_path / "gone.png", path)
    assert predict.predict_command(["-r", str(image_ckpt), str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not found" not in err, err
    named = {"fifo": "is a named pipe (FIFO)", "device_link": "(a symbolic link to /dev/zero) is a character device",
             "dangling_link": "gone.png) does not exist"}[case]
    assert err.startswith(f"error: input {path}") and named in err, err
