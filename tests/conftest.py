"""Shared fixtures: one tiny CPU config that the end-to-end, resume and control tests build on."""

import copy

import pytest
import torch


def make_config(save_dir, **trainer):
    """A run that trains in well under a second: an MLP on 256 seeded synthetic samples."""
    return {
        "name": "tiny",
        "seed": 0,
        "device": "cpu",
        "arch": {"type": "MLP", "args": {"input_size": 16, "hidden_sizes": [16], "num_classes": 3, "dropout": 0.2}},
        "data_loader": {
            "type": "SyntheticDataLoader",
            "args": {"num_samples": 320, "input_shape": [1, 4, 4], "num_classes": 3, "batch_size": 16,
                     "validation_split": 0.2, "shuffle": True},
        },
        "optimizer": {"type": "SGD", "args": {"lr": 0.1, "momentum": 0.9}},
        "lr_scheduler": {"type": "StepLR", "args": {"step_size": 1, "gamma": 0.9}},
        "loss": "logsumexp_cross_entropy",
        "metrics": ["accuracy"],
        "trainer": {"epochs": 2, "save_dir": str(save_dir), "verbosity": 0, "monitor": "min val_loss",
                    "tensorboard": False, **trainer},
    }


@pytest.fixture
def tiny_config(tmp_path):
    return make_config(tmp_path / "saved")


@pytest.fixture(autouse=True)
def _one_thread():
    # Two cores: one intra-op thread keeps the tests' timings steady and results reproducible.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def with_changes(config, **dotted):
    """A copy of ``config`` with ``{"a__b": v}`` meaning ``config["a"]["b"] = v``."""
    config = copy.deepcopy(config)
    for key, value in dotted.items():
        node, *path = [config, *key.split("__")]
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return config
