"""The timm part (parts/timm_models.py): timm models by name, trained, evaluated, predicted and exported; local
pretrained weights loaded by name and shape, nothing downloaded; an unknown name gets a did-you-mean."""

import pytest
import torch

timm = pytest.importorskip("timm")

from parts.timm_models import model as timm_model  # noqa: E402


def _timm_config(tiny_config, **args):
    config = dict(tiny_config)
    config["arch"] = {"type": "timm.test_resnet", "args": {"num_classes": 3, "in_chans": 1, **args}}
    config["data_loader"] = {**tiny_config["data_loader"],
                             "args": {**tiny_config["data_loader"]["args"], "input_shape": [1, 16, 16], "num_samples": 96}}
    config["trainer"] = {**tiny_config["trainer"], "epochs": 1}
    return config


def test_a_timm_model_by_name_trains_and_evaluates(tiny_config):
    from trainer import run

    config = _timm_config(tiny_config)
    metrics = run.train(config, run_id="timm")
    assert metrics["epoch"] == 1 and metrics["loss"] == metrics["loss"]  # finite, not NaN
    folder = config_folder(config, "timm")
    scores = run.evaluate_checkpoint(folder / "model_best.pth", write=False, progress=False)
    assert scores["n_samples"] > 0 and 0 <= scores["accuracy"] <= 1


def config_folder(config, run_id):
    from pathlib import Path

    return Path(config["trainer"]["save_dir"]) / "models" / config["name"] / run_id


def test_an_unknown_timm_name_gets_a_did_you_mean(tiny_config):
    from trainer import build
    from utils.config import ConfigError, validate_config

    config = _timm_config(tiny_config)
    config["arch"]["type"] = "timm.resnet181"
    with pytest.raises(ConfigError, match=r"unknown timm model 'resnet181'; did you mean 'resnet18"):
        validate_config(config, build.registries())


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_path_loads_local_weights_that_fit_and_reports_the_rest(suffix, tmp_path):
    source = timm.create_model("test_resnet", pretrained=False, num_classes=5, in_chans=1)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)
    model = timm_model("timm.test_resnet")(num_classes=3, in_chans=1, pretrained_path=str(path))
    own, theirs = model.state_dict(), source.state_dict()
    head = [k for k in own if own[k].shape != theirs[k].shape]
    assert head and all(k.startswith("head") or k.startswith("fc") for k in head)
    for key in own:
        if key not in head:
            assert torch.equal(own[key], theirs[key]), key
    assert "skipped for a different shape" in model.init_report and head[0] in model.init_report


def test_pretrained_path_missing_is_a_user_error(tmp_path):
    from utils.errors import UserError

    with pytest.raises(UserError, match="nothing is downloaded"):
        timm_model("timm.test_resnet")(num_classes=3, pretrained_path=str(tmp_path / "none.safetensors"))
