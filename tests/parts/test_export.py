"""The export part (parts/export.py, export.py): exports checked against the eager model, their preprocessing, failures.

Export needs the predict part (utils/parts.py): it loads a checkpoint, and describes its inputs, as predict.py does.
"""

import ast
import json
import warnings
from pathlib import Path

import pytest
import torch

from test_predict import csv_ckpt, image_ckpt  # noqa: F401 (fixtures: export needs the predict part)
from parts import export, predict
from tests.test_parts import removed_with
from trainer import build, run
from utils import parts

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("fmt", ["torchscript", "exported_program", "onnx"])
def test_export_matches_the_eager_model_on_other_batch_sizes(fmt, image_ckpt, tmp_path, capsys):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"model{export.FORMATS[fmt]}"
    assert export.export_command(["-r", str(image_ckpt), "--format", fmt, "-o", str(out)]) == 0
    assert "checked on the test split" in capsys.readouterr().out
    info = json.loads(export.preprocess_path(out).read_text())
    assert info["class_names"] == ["circle", "square", "triangle"]
    assert info["input_shape"] == ["batch", 3, 32, 32] and info["image_size"] == [32, 32]
    stats = torch.load(image_ckpt, weights_only=True)["config"]["data_loader"]["args"]["feature_stats"]
    assert info["mean"] == stats["mean"] and info["std"] == stats["std"]  # normalize "auto": the training images' own
    # Every parameter a reimplementation needs: the resize filter by name (bicubic moves probabilities), and the
    # normalisation "auto" resolved into the eval transforms.
    assert info["resize_filter"] == "bilinear" and "bilinear" in info["resize"]
    assert {"type": "Normalize", "args": {"mean": stats["mean"], "std": stats["std"]}} in info["eval_transforms"]
    assert info["max_abs_diff"] <= export.ATOL
    # Independently of the export's own check: load the file and compare on a batch of 5 real images.
    loaded = predict.load_for_inference(image_ckpt)
    x = next(iter(build.build_data_loader(loaded.config, training=False)))[0][:5]
    with torch.no_grad():
        expected = loaded.model(x)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch deprecates TorchScript; the format is still offered
            got = torch.jit.load(str(out))(x)
    elif fmt == "exported_program":
        got = torch.export.load(str(out)).module()(x)
    else:
        import onnxruntime

        got = torch.from_numpy(onnxruntime.InferenceSession(str(out)).run(None, {"input": x.numpy()})[0])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_export_csv_model_and_default_path(csv_ckpt, tmp_path):
    output, info = export.export_checkpoint(csv_ckpt, "torchscript")
    assert output == csv_ckpt.with_name("model_best.torchscript.pt") and output.is_file()
    assert info["input_shape"] == ["batch", 4] and info["feature_names"] == ["x1", "x2", "x3", "x4"]
    assert set(info["feature_stats"]) == {"features", "mean", "std"}


def test_export_without_the_data_uses_the_configs_shape(csv_ckpt, tmp_path):
    out = tmp_path / "m.pt2"
    _, info = export.export_checkpoint(csv_ckpt, "exported_program", out,
                                       [f"data_loader.args.path={tmp_path / 'gone.csv'}"])
    assert info["checked_on"].startswith("random inputs of shape [4]")


class _BranchOnValue(torch.nn.Module):
    """A Python branch on a tensor's value: torch.export cannot capture it."""

    def forward(self, x):
        return x.flatten(1) if x.sum() > 0 else -x.flatten(1)


class _Eigh(torch.nn.Module):
    """``linalg_eigh`` has no ONNX translation."""

    def forward(self, x):
        v = x.flatten(1)[:, :4]
        return torch.linalg.eigh(v.unsqueeze(2) @ v.unsqueeze(1)).eigenvalues


@pytest.mark.parametrize("fmt,module,named", [("exported_program", _BranchOnValue, "(data-dependent control flow"),
                                              ("onnx", _Eigh, "(operator aten::linalg_eigh)")])
def test_export_failure_is_one_line_naming_the_operator(fmt, module, named, tiny_config, tmp_path, monkeypatch, capsys):
    from trainer import build as build_module
    from utils.io import save_checkpoint

    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    ckpt = tmp_path / "m.pth"
    save_checkpoint({"model": module().state_dict(), "config": tiny_config}, ckpt)
    monkeypatch.setattr(build_module, "build_model", lambda config: module())
    out = tmp_path / "m.out"
    assert export.export_command(["-r", str(ckpt), "--format", fmt, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: MLP cannot be exported as {fmt}") and len(err.strip().splitlines()) == 1, err
    assert named in err, err
    assert not out.exists() and not export.preprocess_path(out).exists()


def test_export_mismatch_writes_nothing(image_ckpt, tmp_path, monkeypatch, capsys):
    def broken(model, x):  # an exporter whose program computes something else
        return b"bytes", lambda inputs: model(inputs) + 1e-2

    monkeypatch.setitem(export._EXPORTERS, "torchscript", broken)
    out = tmp_path / "m.pt"
    assert export.export_command(["-r", str(image_ckpt), "--format", "torchscript", "-o", str(out)]) == 2
    assert "differ from the model's by up to 0.01" in capsys.readouterr().err
    assert not out.exists()


def test_the_command_is_thin():
    text = (ROOT / "export.py").read_text()
    assert "from parts.export import export_command" in text and len(text.splitlines()) <= 20


def test_export_is_deleted_with_the_predict_part_it_imports():
    assert removed_with("predict") == ["predict", "export"] and removed_with("export") == ["export"]
    tree = ast.parse((ROOT / parts.PARTS["export"].files[0]).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    used = {name for name, part in parts.PARTS.items() for module in imported if module == part.module}
    assert used == {"predict"} and used <= set(parts.PARTS["export"].needs)


def test_predict_and_export_a_timm_checkpoint_without_its_pretrained_file(tiny_config, tmp_path):
    timm = pytest.importorskip("timm")
    pytest.importorskip("parts.timm_models")  # another part: its files may be deleted
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3, in_chans=1).state_dict(), weights)
    config = dict(tiny_config)
    config["arch"] = {"type": "timm.test_resnet", "args": {"num_classes": 3, "in_chans": 1, "pretrained_path": str(weights)}}
    config["data_loader"] = {**tiny_config["data_loader"],
                             "args": {**tiny_config["data_loader"]["args"], "input_shape": [1, 16, 16], "num_samples": 96}}
    config["trainer"] = {**tiny_config["trainer"], "epochs": 1}
    run.train(config, run_id="pre")
    weights.unlink()  # gone: the checkpoint holds the weights
    ckpt = Path(config["trainer"]["save_dir"]) / "models" / config["name"] / "pre" / "model_best.pth"
    assert predict.load_for_inference(ckpt).model.training is False
    _, info = export.export_checkpoint(ckpt, "torchscript", tmp_path / "m.pt")
    assert info["input_shape"] == ["batch", 1, 16, 16] and info["max_abs_diff"] <= export.ATOL


@pytest.mark.parametrize("case", ["checkpoint", "config", "symlink", "hard_link", "other_file", "sidecar",
                                  "default_is_checkpoint", "folder"])
def test_export_never_replaces_the_checkpoint_its_run_or_a_file_it_did_not_write(case, csv_ckpt, tmp_path, capsys):
    import os

    from test_predict import _copy_run

    ckpt = _copy_run(csv_ckpt, tmp_path)
    config = ckpt.parent / "config.json"
    notes = tmp_path / "notes.pt"
    notes.write_text("someone's file\n")
    if case == "default_is_checkpoint":  # model.pt2 exported as exported_program would be model.pt2 itself
        ckpt = ckpt.rename(ckpt.with_name("model.pt2"))
    if case == "symlink":
        os.symlink(ckpt, tmp_path / "link.pt")
    if case == "hard_link":
        os.link(config, tmp_path / "hard.pt")
    if case == "sidecar":  # the preprocessing file would replace someone's file
        (tmp_path / "m.pt.preprocess.json").write_text('{"mine": 1}')
    output = {"checkpoint": ckpt, "config": config, "symlink": tmp_path / "link.pt", "hard_link": tmp_path / "hard.pt",
              "other_file": notes, "sidecar": tmp_path / "m.pt", "default_is_checkpoint": None,
              "folder": tmp_path}[case]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    fmt = "exported_program" if case == "default_is_checkpoint" else "torchscript"
    assert export.export_command(["-r", str(ckpt), "--format", fmt, *(["-o", str(output)] if output else [])]) == 2
    err = capsys.readouterr().err
    label = {"default_is_checkpoint": "the default output", "sidecar": "the preprocessing file of -o"}.get(case, "-o")
    assert err.startswith(f"error: {label} ") and len(err.strip().splitlines()) == 1, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written or replaced
    # An earlier export (its .preprocess.json names it) is replaced as asked.
    out = tmp_path / "again.pt"
    for _ in range(2):
        assert export.export_command(["-r", str(ckpt), "--format", "torchscript", "-o", str(out)]) == 0
    assert json.loads(export.preprocess_path(out).read_text())["file"] == "again.pt"
