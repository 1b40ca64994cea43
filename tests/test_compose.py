"""Experiment configs built on others (utils/compose.py): merge, replace, removal, chains; every mistake one line."""

import json
from pathlib import Path

import pytest
import torch

from conftest import make_config
from trainer import cli, evaluate_cli
from utils.config import apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(path, config):
    """``config`` written to ``path`` (JSON, or YAML for a .yaml name); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".yaml":
        import yaml

        path.write_text(yaml.safe_dump(config))
    else:
        path.write_text(json.dumps(config))
    return path


@pytest.fixture
def base(tmp_path):
    """The repo's config.json, saving under tmp_path, as ``configs/base.json``."""
    config = json.loads((ROOT / "config.json").read_text())
    config["trainer"]["save_dir"] = str(tmp_path / "saved")
    return write(tmp_path / "configs/base.json", config)


def test_nested_keys_merge_lists_replace_and_keys_are_removed(base, tmp_path):
    child = write(tmp_path / "configs/exp/wide.json", {
        "base": "../base.json",
        "name": "wide",
        "optimizer": {"args": {"lr": 0.01, "betas": [0.8, 0.9]}},  # inside args, a new key needs no "+"
        "metrics": ["accuracy"],
        "lr_scheduler": "__delete__",
        "trainer": {"epochs": 3, "early_stop": "__delete__", "+len_epoch": 4},
    })
    config, whole = load_config(child), json.loads(base.read_text())
    assert "base" not in config and config["name"] == "wide"
    assert config["optimizer"] == {"type": "Adam", "args": {"lr": 0.01, "weight_decay": 0.0001, "betas": [0.8, 0.9]}}
    assert config["metrics"] == ["accuracy"] and "lr_scheduler" not in config
    assert config["trainer"] == {**{k: v for k, v in whole["trainer"].items() if k != "early_stop"},
                                 "epochs": 3, "len_epoch": 4}
    assert config["data_loader"] == whole["data_loader"]  # what the child leaves alone is the base's


def test_a_chain_of_three_through_a_yaml_base_and_a_list_of_bases(base, tmp_path):
    middle = write(tmp_path / "configs/middle.yaml", {"base": "base.json", "trainer": {"epochs": 5, "verbosity": 0}})
    write(tmp_path / "configs/small_batch.json", {"data_loader": {"args": {"batch_size": 8}}, "seed": 7})
    top = write(tmp_path / "top.json", {"base": "configs/middle.yaml", "trainer": {"verbosity": 1}})
    config = load_config(top)
    assert config["trainer"]["epochs"] == 5 and config["trainer"]["verbosity"] == 1
    assert config["arch"] == json.loads(base.read_text())["arch"]
    both = write(tmp_path / "both.json", {"base": ["configs/middle.yaml", "configs/small_batch.json"], "seed": 1})
    config = load_config(both)  # merged in order, then the file's own keys
    assert config["data_loader"]["args"]["batch_size"] == 8 and config["seed"] == 1 and config["trainer"]["epochs"] == 5
    assert load_config(middle, bases=False)["base"] == "base.json"  # the raw file, for whoever wants it


def test_overrides_apply_after_composition(base, tmp_path):
    child = write(tmp_path / "child.json", {"base": "configs/base.json", "trainer": {"epochs": 3}})
    config = apply_overrides(load_config(child), ["trainer.epochs=1", "optimizer.args.lr=0.5"])
    assert config["trainer"]["epochs"] == 1 and config["optimizer"]["args"] == {"lr": 0.5, "weight_decay": 0.0001}


BAD = {
    "cycle": ({"a.json": {"base": "b.json"}, "b.json": {"base": "a.json"}},
              "configs whose bases form a cycle (a config cannot build on itself): a.json -> b.json -> a.json"),
    "missing base": ({"a.json": {"base": "sub/nope.json"}},
                     'a.json: base config not found: sub/nope.json ("base": "sub/nope.json")'),
    "base not a mapping": ({"a.json": {"base": "b.json"}, "b.json": [1, 2]},
                           "b.json: a config must be a mapping of keys to values, got list (the base of a.json)"),
    "base unparsable": ({"a.json": {"base": "b.json"}, "b.json": '{"name": '},
                        "b.json: not valid JSON at line 1, column 10"),
    "bad base key": ({"a.json": {"base": 3}}, 'a.json: "base" must be a path relative to this file'),
    "unknown key": ({"a.json": {"base": "configs/base.json", "trainer": {"epohcs": 2}}},
                    "a.json: trainer.epohcs: not a key of its base configs/base.json; did you mean 'epochs'?"
                    ' (to add a key the base lacks, write it "+epohcs")'),
    "removing what is not there": ({"a.json": {"base": "configs/base.json", "trainer": {"ema": "__delete__"}}},
                                   'a.json: trainer.ema: "__delete__" removes a key, but configs/base.json has no'
                                   " trainer.ema"),
    "adding what is there": ({"a.json": {"base": "configs/base.json", "+seed": 3}},
                             'a.json: +seed: configs/base.json already has seed; write "seed" to change it'),
}


@pytest.mark.parametrize("files,want", BAD.values(), ids=BAD)
def test_a_bad_composition_is_one_line_and_nothing_is_written(files, want, base, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the messages name the bases relative to the working folder
    for name, content in files.items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    assert cli.train_command(["-c", "a.json"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], lines
    assert not (tmp_path / "saved").exists()


def test_a_composed_run_resumes_and_tests_after_its_base_is_deleted(tmp_path):
    base = write(tmp_path / "base.json", make_config(tmp_path / "saved", epochs=3))
    child = write(tmp_path / "exp.json", {"base": "base.json", "name": "exp", "optimizer": {"args": {"lr": 0.05}}})
    assert cli.train_command(["-c", str(child), "trainer.epochs=1", "--run-id", "r"]) == 0
    folder = tmp_path / "saved/models/exp/r"
    saved = json.loads((folder / "config.json").read_text())
    assert "base" not in saved and saved["arch"]["type"] == "MLP" and saved["optimizer"]["args"]["lr"] == 0.05
    assert saved["trainer"]["epochs"] == 1  # the override, applied after composition
    base.unlink()
    child.unlink()
    assert cli.train_command(["-r", str(folder / "checkpoint-epoch1.pth"), "trainer.epochs=2"]) == 0
    assert torch.load(folder / "checkpoint-epoch2.pth", weights_only=True)["epoch"] == 2
    assert evaluate_cli.test_command(["-r", str(folder / "checkpoint-epoch2.pth")]) == 0


def test_the_shipped_experiments_are_their_examples_with_a_few_keys_changed():
    """configs/experiments/: each is its base (an example's config) with the keys it names changed, nothing else."""
    from utils.config import flatten, load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    experiments = sorted((root / "experiments").glob("*.json"))
    if not experiments:
        pytest.skip("no experiments shipped (their example parts were deleted)")
    for path in experiments:
        own = json.loads(path.read_text())
        base = flatten(load_config(path.parent / own["base"]))
        composed = flatten(load_config(path))
        changed = {key for key in set(base) | set(composed) if base.get(key) != composed.get(key)}
        assert changed == set(flatten({k: v for k, v in own.items() if k != "base"})), path.name
        assert len(changed) <= 4, path.name
