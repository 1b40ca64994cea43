"""The own-data example configs as a user runs them: train, evaluate, resume; class names and scaling kept."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import cli, run
from utils.config import apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("example")
    subprocess.run([sys.executable, "tools/make_example_data.py", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    return out


def _config(name, example_data, save_dir, **extra):
    overrides = [f"trainer.save_dir={save_dir}", "trainer.verbosity=0", "trainer.tensorboard=false", "device=cpu"]
    if name == "image_folder":
        overrides.append(f"data_loader.args.data_dir={example_data / 'example_images'}")
        overrides.append(f"data_loader.args.cache_dir={save_dir / 'cache'}")
    else:
        overrides.append(f"data_loader.args.path={example_data / 'example_table.csv'}")
    return apply_overrides(load_config(ROOT / f"configs/{name}.json"), overrides + [f"{k}={v}" for k, v in extra.items()])


@pytest.mark.parametrize("name,pinned", [("image_folder", {"class_names"}), ("csv", {"class_names", "feature_stats"})])
def test_a_run_keeps_what_its_data_pinned_and_resumes_from_the_original_config(name, pinned, example_data, tmp_path):
    config = _config(name, example_data, tmp_path / "saved", **{"trainer.epochs": 2, "trainer.save_period": 1})
    metrics = run.train(config, run_id="r")
    folder = tmp_path / "saved/models" / config["name"] / "r"
    saved_args = json.loads((folder / "config.json").read_text())["data_loader"]["args"]
    assert pinned <= set(saved_args)
    state = torch.load(folder / "checkpoint-epoch2.pth", weights_only=True)
    assert state["config"]["data_loader"]["args"]["class_names"] == saved_args["class_names"]
    assert len(saved_args["class_names"]) == 3
    assert metrics["epoch"] == 2
    scores = run.evaluate_checkpoint(folder / "model_best.pth")  # rebuilt from the checkpoint's own config
    assert scores["n_samples"] > 0 and 0 <= scores["accuracy"] <= 1
    # The user's own file does not list the pinned arguments: resuming with it is no change of the data.
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    assert cli.train_command(["-c", str(path), "-r", str(folder / "checkpoint-epoch2.pth"), "trainer.epochs=3"]) == 0
    assert (folder / "checkpoint-epoch3.pth").is_file()
