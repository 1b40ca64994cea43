"""The learning-rate finder (parts/lr_finder.py, tools/lr_find.py): the range test leaves everything it was given
as it was, suggests the steepest descent, and the command prints a suggestion and writes a plot."""

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_config
from parts import lr_finder
from trainer import run

ROOT = Path(__file__).resolve().parents[2]


def test_lr_range_test_leaves_model_optimizer_and_rng_untouched(tiny_config):
    config = run.checked_config(tiny_config)[0]
    parts = run.build_parts(config, torch.device("cpu"))
    loss = parts.criterion(parts.model(torch.randn(4, 1, 4, 4)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    parts.optimizer.step()  # momentum buffers exist: the optimizer has state to disturb
    model_before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    opt_before = parts.optimizer.state_dict()
    opt_before = {k: (v.clone() if torch.is_tensor(v) else v) for s in opt_before["state"].values() for k, v in s.items()}
    rng = torch.random.get_rng_state()
    lrs, losses, suggestion = lr_finder.lr_range_test(parts.model, parts.optimizer, parts.criterion,
                                                      parts.data_loader, torch.device("cpu"), 1e-5, 10.0, 50)
    assert 20 <= len(lrs) <= 50 and lrs[0] == pytest.approx(1e-5)
    assert suggestion is not None and lrs[0] <= suggestion <= lrs[-1]
    for key, value in parts.model.state_dict().items():
        assert torch.equal(value, model_before[key])
    after = {k: v for s in parts.optimizer.state_dict()["state"].values() for k, v in s.items()}
    for key, value in opt_before.items():
        assert torch.equal(torch.as_tensor(after[key]), torch.as_tensor(value))
    assert parts.optimizer.param_groups[0]["lr"] == 0.1
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_suggest_picks_the_steepest_descent():
    lrs = [10.0 ** (k / 10) for k in range(-60, 1)]
    losses = [1.0 / (1 + __import__("math").exp(k / 10 + 3)) for k in range(-60, 1)]  # falls fastest at lr 1e-3
    assert lr_finder.suggest(lrs, losses) == pytest.approx(1e-3, rel=0.3)
    assert lr_finder.suggest(lrs[:12], losses[:12]) is None


def test_lr_find_command_prints_a_suggestion_and_writes_a_png(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import lr_find
    finally:
        sys.path.remove(str(ROOT / "tools"))
    config_path = tmp_path / "c.json"
    config_path.write_text(json.dumps(make_config(tmp_path / "saved")))
    out = tmp_path / "plot.png"
    assert lr_find.main(["-c", str(config_path), "--steps", "40", "--out", str(out), "optimizer.args.lr=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "Suggested learning rate: " in printed and "optimizer.args.lr=" in printed
    from PIL import Image

    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (720, 440)
    assert not (tmp_path / "saved").exists()  # only the plot is written
