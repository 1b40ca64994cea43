"""The step a config can replace (base/base_task.py) and batches of any structure: several inputs, dicts of tensors,
per-sample lists of dicts; several named losses, logged and averaged like the loss; exact mid-epoch resume."""

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import add_hooks, assert_states_identical, make_config, stopped_and_resumed, with_changes
from trainer import cli, run

# A user's file: a dataset of dict samples (two inputs, a target, and a per-sample dict that is no tensor), a model of
# two inputs, and a task returning two named losses. Written into the test's folder and named as "module:Name".
USER_FILE = '''
import torch
from torch.utils.data import Dataset

from base.base_data_loader import BaseDataLoader
from base.base_task import Task


class PairData(Dataset):
    """A dict per sample: an input ``x`` (4 numbers), a noisy copy of the label ``hint``, the label, and a dict."""

    def __init__(self, n=200, train=True):
        g = torch.Generator().manual_seed(0 if train else 1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x.sum(1) > 0).long()
        self.hint = torch.where(torch.rand(n, generator=g) < 0.8, self.y, 1 - self.y).float()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "hint": self.hint[i:i + 1], "label": self.y[i], "meta": {"index": i}}

    @staticmethod
    def collate(samples):
        """Tensors stacked; "meta" stays a list of dicts (one per sample), as detection targets do."""
        batch = {k: torch.stack([s[k] for s in samples]) for k in ("x", "hint", "label")}
        batch["meta"] = [s["meta"] for s in samples]
        return batch


class PairLoader(BaseDataLoader):
    def __init__(self, batch_size=16, shuffle=True, validation_split=0.2, num_workers=0, seed=0, training=True):
        super().__init__(PairData(train=training), batch_size, shuffle, validation_split, num_workers, seed=seed)


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 8)
        self.label = torch.nn.Linear(9, 2)
        self.reconstruct = torch.nn.Linear(9, 4)

    def forward(self, x, hint):
        h = torch.cat([torch.relu(self.body(x)), hint], dim=1)
        return self.label(h), self.reconstruct(h)


class PairTask(Task):
    loss_weights = {"label": 1.0, "recon": 0.5}

    def step(self, model, batch, criterion):
        assert isinstance(batch["meta"], list) and isinstance(batch["meta"][0], dict)
        logits, rebuilt = model(batch["x"], batch["hint"])
        losses = {"label": criterion(logits, batch["label"]),
                  "recon": torch.nn.functional.mse_loss(rebuilt, batch["x"])}
        return losses, logits, batch["label"]

    def inputs(self, batch):
        return batch["x"], batch["hint"]


def label_error(output, target):
    """The share of wrong labels: a metric function of the user's, named "pair_task:label_error"."""
    return (output.argmax(1) != target).float().mean()


class ThreeTuples(torch.utils.data.Dataset):
    def __init__(self, n=120):
        g = torch.Generator().manual_seed(2)
        self.a, self.b = torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)
        self.y = (self.a.sum(1) + self.b.sum(1) > 0).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.a[i], self.b[i], self.y[i]


class TupleLoader(BaseDataLoader):
    def __init__(self, batch_size=16, shuffle=True, validation_split=0.2, seed=0, training=True):
        super().__init__(ThreeTuples(), batch_size, shuffle, validation_split, 0, seed=seed)


class AddInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)

    def forward(self, a, b):
        return self.a(a) + self.b(b)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The user's file as the importable module ``pair_task`` (a fresh import per test)."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "pair_task.py").write_text(textwrap.dedent(USER_FILE))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "pair_task", raising=False)
    return "pair_task"


def pair_config(tmp_path, **trainer):
    config = make_config(tmp_path / "saved", **{"epochs": 3, **trainer})
    config.update(arch={"type": "pair_task:TwoInputs", "args": {}},
                  data_loader={"type": "pair_task:PairLoader", "args": {"batch_size": 16}},
                  task={"type": "pair_task:PairTask", "args": {}})
    return config


def checkpoint(config, run_id, name):
    return torch.load(Path(config["trainer"]["save_dir"]) / "models" / config["name"] / run_id / name,
                      weights_only=True)


def epoch_results(config, run_id):
    """Train; every epoch's result (from a hook's ``after_epoch``)."""
    from base.base_hook import Hook

    rows = []

    class Record(Hook):
        def after_epoch(self, trainer, epoch, result):
            rows.append(dict(result))

    undo = add_hooks(Record())
    try:
        run.train(config, run_id=run_id)
    finally:
        undo()
    return rows


def test_a_task_trains_dict_batches_with_two_named_losses_logged_and_averaged(tmp_path, user_module):
    config = pair_config(tmp_path, monitor="min val_loss_recon")
    rows = epoch_results(config, "a")
    first, last = rows[0], rows[-1]
    for key in ("loss_label", "loss_recon", "val_loss_label", "val_loss_recon"):
        assert key in first and key in last
    assert last["loss_recon"] < first["loss_recon"] and last["loss_label"] < first["loss_label"]
    # The loss is the weighted sum of the named ones, epoch means included (every batch weighs by its samples).
    for row in (first, last):
        assert row["val_loss"] == pytest.approx(row["val_loss_label"] + 0.5 * row["val_loss_recon"], rel=1e-5)
    # test.py scores with the same step: the named losses too.
    from trainer.run import evaluate_checkpoint

    folder = Path(config["trainer"]["save_dir"]) / "models/tiny/a"
    scores = evaluate_checkpoint(folder / "model_best.pth", write=False)
    assert {"loss", "loss_label", "loss_recon", "accuracy"} <= set(scores)
    assert scores["loss"] == pytest.approx(scores["loss_label"] + 0.5 * scores["loss_recon"], rel=1e-5)


def test_a_task_resumes_mid_epoch_bit_exactly(tmp_path, user_module, interrupt_at_step):
    config = pair_config(tmp_path)
    run.train(with_changes(config, name="whole"), run_id="w")
    reference = checkpoint(with_changes(config, name="whole"), "w", "checkpoint-epoch3.pth")
    # Stopped in epoch 2, batch 4 of 10.
    resumed = stopped_and_resumed(interrupt_at_step, config, 14, (1, 4, 14), "checkpoint-epoch3.pth")
    assert_states_identical(reference, resumed)


def test_the_default_step_takes_several_inputs_and_the_last_item_as_target(tmp_path, user_module):
    config = make_config(tmp_path / "saved", epochs=2)
    config.update(arch={"type": "pair_task:AddInputs", "args": {}},
                  data_loader={"type": "pair_task:TupleLoader", "args": {"batch_size": 16}})
    rows = epoch_results(config, "t")
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["val_accuracy"] > 0.6


@pytest.mark.parametrize("change, words", [
    ({"task": None}, "its batches are a dict, but the default step takes (inputs..., target)"),
    ({"task": {"type": "pair_task:PairTask", "args": {"loss_weights": {"label": 1.0}}}},
     "returned the losses ['label', 'recon'], but its loss_weights name ['label']"),
    ({"task": {"type": "pair_task:PairTsk"}}, "module pair_task has no 'PairTsk'; did you mean 'PairTask'?"),
    ({"task": {"type": "no_such_module:PairTask"}}, "task.type: no module 'no_such_module'"),
    ({"task": {"type": "PairTask"}}, "task.type: unknown task 'PairTask'; expected a class of your own as"),
    ({"task": {"type": "pair_task:PairTask", "args": {"loss_weights": [1, 2]}}},
     "task.args.loss_weights: got [1, 2], expected a mapping of loss names to numbers"),
    ({"task": {"type": "pair_task:PairTask", "args": {"weights": {}}}}, "task.args"),
])
def test_a_task_mistake_is_one_line_before_anything_is_written(tmp_path, user_module, capsys, change, words):
    config = {**pair_config(tmp_path), **change}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert cli.train_command(["-c", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not (tmp_path / "saved" / "models").exists()


def test_batches_of_any_structure_are_moved_to_the_device():
    from collections import namedtuple

    from base.base_task import to_device

    Pair = namedtuple("Pair", "a b")
    batch = {"x": torch.ones(2), "pair": Pair(torch.zeros(1), [torch.ones(1), "text"]), "n": 3,
             "meta": [{"boxes": torch.ones(2, 4)}]}
    moved = to_device(batch, torch.device("meta"))
    assert moved["x"].device.type == "meta" and moved["n"] == 3
    assert isinstance(moved["pair"], Pair) and moved["pair"].a.device.type == "meta"
    assert moved["pair"].b[0].device.type == "meta" and moved["pair"].b[1] == "text"
    assert moved["meta"][0]["boxes"].device.type == "meta"


@pytest.mark.parametrize("trainer", [{"accumulate_grad_batches": 3}, {"amp": "bf16"}, {"len_epoch": 7}],
                         ids=["accumulation", "bf16", "len_epoch"])
def test_a_task_trains_under_the_steps_options(tmp_path, user_module, trainer):
    """Accumulation (windows of 3 batches, the epoch's last shorter), bf16 autocast and epochs cut from an endless
    stream of dict batches: each trains, and its named losses are averaged like the loss."""
    rows = epoch_results(pair_config(tmp_path, **trainer), "o")
    assert len(rows) == 3 and rows[-1]["loss_recon"] < rows[0]["loss_recon"]
    for row in rows:
        tolerance = 2e-2 if "amp" in trainer else 1e-5  # bf16: the sum is of rounded values
        assert row["val_loss"] == pytest.approx(row["val_loss_label"] + 0.5 * row["val_loss_recon"], rel=tolerance)


def test_the_model_summary_part_reads_a_tasks_inputs(tmp_path, user_module):
    pytest.importorskip("parts.model_summary")
    config = pair_config(tmp_path, model_summary=True, epochs=1)
    run.train(config, run_id="s")
    log = (Path(config["trainer"]["save_dir"]) / "log/tiny/s/info.log").read_text()
    assert "Layers (output shapes of one batch):" in log and "no layer table" not in log
    assert "reconstruct" in log


def test_a_metric_function_of_the_users_is_named_module_colon_name(tmp_path, user_module, capsys):
    config = pair_config(tmp_path, monitor="min val_label_error", epochs=2)
    config["metrics"] = ["accuracy", "pair_task:label_error"]
    rows = epoch_results(config, "m")
    assert rows[-1]["val_label_error"] == pytest.approx(1 - rows[-1]["val_accuracy"], abs=1e-6)
    config["metrics"], config["trainer"]["monitor"] = ["pair_task:label_eror"], "min val_loss"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**config, "name": "bad"}))
    assert cli.train_command(["-c", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: metrics[0]: module pair_task has no 'label_eror'; did you mean 'label_error'?"], err
