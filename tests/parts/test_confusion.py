"""The confusion-matrix part (parts/confusion.py): counted over each validation, logged as a TensorBoard image.

What is checked: the image counts every validation sample and its diagonal is the validation
accuracy; the drawing shades by row share and names the classes; a matrix that could not be shown
or counted is one line before anything is written; off, the part is not imported. (Summed over 2
processes under torchrun: tests/parts/test_torchmetrics_distributed.py.)
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_config, with_changes
from parts import confusion
from parts.confusion import ConfusionMatrix, confusion_image
from trainer import run
from utils.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[2]


def test_confusion_matrix_image_counts_every_validation_sample(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing import event_accumulator

    drawn = []
    image = confusion.confusion_image
    monkeypatch.setattr(confusion, "confusion_image", lambda counts, names: drawn.append(counts) or image(counts, names))
    config = make_config(tmp_path / "saved", confusion_matrix=True, tensorboard=True, log_images=False)
    metrics = run.train(config, run_id="cm")
    assert len(drawn) == 2 and all(c.shape == (3, 3) and int(c.sum()) == 51 for c in drawn)  # 51 validation samples
    assert int(drawn[-1].trace()) / 51 == pytest.approx(metrics["val_accuracy"])  # the diagonal: the right answers
    assert "val_confusion_matrix" not in metrics  # taken out of the result, not logged as a number
    acc = event_accumulator.EventAccumulator(str(tmp_path / "saved/log/tiny/cm"), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("val/confusion_matrix")
    expected = image(torch.zeros(3, 3), None).shape
    assert len(images) == 2  # one per validation
    assert all((im.height, im.width) == tuple(expected[1:]) for im in images)
    assert images[0].encoded_image_string.startswith(b"\x89PNG")


def test_confusion_image_shades_by_row_share_and_names_the_classes():
    counts = torch.tensor([[9, 1], [0, 5]])
    named = confusion_image(counts, ["cat", "a_long_class_name"])
    plain = confusion_image(counts, None)
    assert named.shape[0] == 3 and named.shape[1] > plain.shape[1]  # room for the longer labels
    assert 0 <= float(named.min()) and float(named.max()) <= 1

    def cell_blue_share(img, row, col, n=2, cell=28):
        label = img.shape[1] - n * cell - 4
        y, x = label + row * cell + 2, label + col * cell + 2  # a corner of the cell, away from its text
        red, green, blue = img[:, y, x].tolist()
        return blue - red

    # the diagonal's shares (0.9, 1.0) are darker than the off-diagonal's (0.1, 0)
    assert cell_blue_share(plain, 0, 0) > cell_blue_share(plain, 0, 1) >= cell_blue_share(plain, 1, 0)
    assert cell_blue_share(plain, 1, 1) > cell_blue_share(plain, 0, 0)


def test_the_matrix_counts_pairs_leaves_ignored_targets_out_and_keeps_its_state():
    spec = ConfusionMatrix(ignore_index=-100)
    matrix = spec.new(torch.device("cpu"), sync=False)
    output = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    matrix.update(output, torch.tensor([0, 1, 2, -100]))
    matrix.update(output[:2], torch.tensor([1, 1]))
    expected = torch.tensor([[1, 0, 0], [1, 2, 0], [0, 1, 0]])
    assert torch.equal(matrix.compute(), expected)
    again = spec.new(torch.device("cpu"), sync=False)
    assert again.load_state_dict(matrix.state_dict()) and torch.equal(again.compute(), expected)
    assert not again.load_state_dict({"states": {}})  # another metric's state
    mark = matrix.mark()  # (trainer.trainer.EpochMetric's, through the state)
    matrix.update(output, torch.tensor([2, 2, 2, 2]))
    matrix.rollback(mark)
    assert torch.equal(matrix.compute(), expected)
    matrix.reset()
    assert matrix.compute().numel() == 0


@pytest.mark.parametrize("changes, message", [
    ({"data_loader__args__validation_split": 0.0, "trainer__monitor": "off"},
     "trainer.confusion_matrix: it is counted over the validation split"),
    ({"trainer__tensorboard": False}, "trainer.confusion_matrix: it is logged as a TensorBoard image"),
    ({"trainer__confusion_matrix": "yes"}, 'trainer.confusion_matrix: got "yes", expected true or false'),
    ({"metrics": ["accuracy", {"type": "torchmetrics.classification.MulticlassF1Score", "args": {"num_classes": 3},
                               "name": "confusion_matrix"}]},
     "metrics: the name 'confusion_matrix' is taken by trainer.confusion_matrix"),
], ids=["no-validation", "tensorboard-off", "not-a-boolean", "name-taken"])  # csv alone: test_csv_logger.py
def test_a_confusion_matrix_that_could_not_be_shown_is_one_line(tmp_path, changes, message):
    if "metrics" in changes:
        pytest.importorskip("parts.torchmetrics")
        pytest.importorskip("torchmetrics")
    config = with_changes(make_config(tmp_path / "saved", confusion_matrix=True, tensorboard=True), **changes)
    with pytest.raises(ConfigError, match=message) as err:
        run.train(config, run_id="cm")
    assert len(err.value.problems) == 1, err.value.problems
    assert not (tmp_path / "saved").exists()


def test_outputs_that_are_not_class_scores_are_one_line_in_the_dry_batch(tiny_config):
    from trainer.build import dry_batch
    from utils import parts as optional_parts

    config, _ = run.checked_config(with_changes(tiny_config, trainer__confusion_matrix=True, trainer__tensorboard=True))
    parts = run.build_parts(config, torch.device("cpu"))
    optional_parts.call_each(config, "prepare", config, parts)
    assert [type(fn) for fn in parts.valid_metric_fns] == [ConfusionMatrix]
    parts.model = torch.nn.Sequential(parts.model, torch.nn.Unflatten(1, (3, 1)))  # (N, 3, 1): no (N, C) scores
    parts.criterion, parts.metric_fns = (lambda output, target: output.mean()), []
    with pytest.raises(UserError, match=r"^trainer.confusion_matrix: needs class scores of shape \(N, C\) and"
                                        r" class-index targets, but the model gives \[16, 3, 1\] \(float32\)"):
        dry_batch(config, parts)
    parts.model = parts.model[0]
    dry_batch(config, parts)  # (N, C) scores: fine


def test_off_the_part_is_not_imported_and_old_configs_holding_false_still_check():
    code = ("import sys; sys.path.insert(0, '.'); from trainer import build;"
            " from utils.config import load_config, validate_config;"
            " c = load_config('config.json'); c['trainer']['confusion_matrix'] = False;"
            " c = validate_config(c, build.registries());"
            " print(c['trainer']['confusion_matrix'], sorted(m for m in sys.modules if m.startswith('parts')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False []"


def test_a_run_with_the_matrix_on_writes_the_same_checkpoint_as_one_without(tmp_path):
    """Counted in validation only: training, its values and its checkpoint are those of a run without it."""
    plain = run.train(make_config(tmp_path / "a", tensorboard=True), run_id="r")
    counted = run.train(make_config(tmp_path / "b", tensorboard=True, confusion_matrix=True), run_id="r")
    assert plain == counted
    a = torch.load(tmp_path / "a/models/tiny/r/model_best.pth", weights_only=True)
    b = torch.load(tmp_path / "b/models/tiny/r/model_best.pth", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert json.dumps(sorted(a)) == json.dumps(sorted(b))
