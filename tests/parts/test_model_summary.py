"""The model summary (parts/model_summary.py): a layer table with ``trainer.model_summary``, the parameter counts
(core) in every run, and a default run at verbosity 2 without the table or the part."""

import sys

import pytest
import torch

from conftest import with_changes
from parts.model_summary import summary_lines
from trainer import run
from utils.errors import ConfigError


def test_summary_is_a_layer_table_and_the_count_is_printed_once(tiny_config, capsys):
    run.train(with_changes(tiny_config, trainer__model_summary=True, trainer__verbosity=1, trainer__epochs=1))
    out = capsys.readouterr().out
    assert "layer  type     output shape  parameters  trainable" in out
    assert "net.1  Linear   [16, 16]             272  yes" in out
    assert out.count("323") == 1  # the total parameter count, once (BaseModel's printout is no longer logged)
    assert "Parameters: 323 trainable, 0 frozen" in out


def test_summary_lines_mark_frozen_layers_and_leave_rng_and_mode_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    data = torch.randn(5, 4)
    state = torch.random.get_rng_state()
    lines = summary_lines(model, data)
    assert torch.equal(torch.random.get_rng_state(), state) and model.training
    assert lines[1].split() == ["0", "Linear", "[5,", "3]", "15", "no"]
    assert lines[3].split() == ["2", "Linear", "[5,", "2]", "8", "yes"]


def test_a_default_run_prints_the_counts_without_the_table(tiny_config, capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "parts.model_summary")
    run.train(with_changes(tiny_config, trainer__verbosity=2, trainer__epochs=1))
    out = capsys.readouterr().out
    assert "Parameters: 323 trainable, 0 frozen" in out
    assert "Layers (output shapes of one batch)" not in out and "output shape" not in out
    assert "parts.model_summary" not in sys.modules  # the part is not loaded


def test_bad_setting_is_one_line(tiny_config):
    with pytest.raises(ConfigError) as err:
        run.checked_config(with_changes(tiny_config, trainer__model_summary="yes"))
    assert err.value.problems == ['trainer.model_summary: got "yes", expected true or false']
