"""The own-data example configs as a user runs them: train, evaluate, resume; class names and scaling kept."""

import json

import pytest
import torch

from conftest import example_config
from trainer import cli, run


@pytest.mark.parametrize("name,pinned", [("image_folder", {"class_names"}), ("csv", {"class_names", "feature_stats"})])
def test_a_run_keeps_what_its_data_pinned_and_resumes_from_the_original_config(name, pinned, example_data, tmp_path):
    config = example_config(name, example_data, tmp_path / "saved", "trainer.epochs=2", "trainer.save_period=1")
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
