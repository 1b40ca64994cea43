"""The learning-rate finder (parts/lr_finder.py, tools/lr_find.py): the range test leaves everything it was given
as it was, suggests a tenth of the steepest descent (and that trains: the slow test), and the command prints a
suggestion and writes a plot whose words are apart."""

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


def test_suggest_is_a_tenth_of_the_steepest_descent():
    lrs = [10.0 ** (k / 10) for k in range(-60, 1)]
    losses = [1.0 / (1 + __import__("math").exp(k / 10 + 3)) for k in range(-60, 1)]  # falls fastest at lr 1e-3
    assert lr_finder.steepest(lrs, losses) == pytest.approx(1e-3, rel=0.3)
    assert lr_finder.suggest(lrs, losses) == pytest.approx(lr_finder.steepest(lrs, losses) / 10)
    assert lr_finder.suggest(lrs[:12], losses[:12]) is None
    # Past the minimum the loss diverges; a dip there (seen on config.json with one thread) is no descent to suggest.
    diverging = losses + [0.5, 2.0, 6.0, 2.5, 2.4]
    more = lrs + [10.0 ** (k / 10) for k in range(1, 6)]
    assert lr_finder.steepest(more, diverging) == pytest.approx(1e-3, rel=0.3)


def test_the_plot_keeps_its_words_apart(tmp_path):
    # The default font's space is 2 pixels wide: drawn as one string, the title read "lossagainst".
    import numpy as np
    from PIL import Image

    path = lr_finder.plot_png(tmp_path / "p.png", [1e-3, 1e-2], [1.0, 0.5], title="loss against learning rate")
    with Image.open(path) as image:
        ink = (np.asarray(image.convert("L"))[4:28] < 128).any(axis=0)  # the title's band: columns with ink
    first, last = np.flatnonzero(ink)[[0, -1]]
    gaps, run = [], 0
    for column in ink[first:last + 1]:
        gaps, run = (gaps + [run], 0) if column and run else (gaps, 0 if column else run + 1)
    assert sum(gap >= 5 for gap in gaps) == 3 and max(g for g in gaps if g < 5) <= 3  # 3 spaces, letters closer


@pytest.mark.slow
@pytest.mark.parametrize("name", ["config.json", "configs/csv.json"])
def test_the_suggestion_trains_at_least_as_well_as_the_configs_own_lr(name, example_data, tmp_path):
    # The rule's evidence: the shipped default and a shipped table config, each trained for its own epochs at its
    # own lr and at the finder's suggestion, scored on the test split (issue 21: the old suggestion, the steepest
    # point itself, reached 96.1% on config.json where its own lr reaches 99.2%).
    from utils.config import apply_overrides, load_config

    where = [f"data_loader.args.path={example_data / 'example_table.csv'}"] if "csv" in name else []
    config = apply_overrides(load_config(ROOT / name), [*where, "device=cpu", f"trainer.save_dir={tmp_path}",
                                                        "trainer.verbosity=0", "trainer.tensorboard=false"])
    suggestion, _, _ = lr_finder.find_lr(config, out=tmp_path / "plot.png")
    epochs = config["trainer"]["epochs"]
    scores = {}
    for label, lr in (("own", config["optimizer"]["args"]["lr"]), ("suggested", float(f"{suggestion:.3g}"))):
        run.train(apply_overrides(config, [f"optimizer.args.lr={lr}", f"trainer.save_period={epochs}",
                                           "trainer.early_stop=0"]), run_id=label)
        last = tmp_path / "models" / config["name"] / label / f"checkpoint-epoch{epochs}.pth"
        scores[label] = run.evaluate_checkpoint(last, write=False)
        print(f"{name}: lr {lr:.3g} ({label}): test accuracy {scores[label]['accuracy']:.4f},"
              f" loss {scores[label]['loss']:.4f}")
    assert scores["suggested"]["accuracy"] >= scores["own"]["accuracy"]


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
