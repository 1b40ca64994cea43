"""The torchmetrics part (parts/torchmetrics.py): torchmetrics metrics by name.

What is checked: a torchmetrics F1 (macro) and AUROC from ``evaluate`` and from a training run
equal torchmetrics computed directly over the whole epoch's outputs (uneven last batches, ignored
targets); a run resumed mid-epoch ends with bit-identical values; config mistakes are one line and
exit code 2 with nothing written, and naming no torchmetrics metric does not import torchmetrics
(nor the part). (2 processes under torchrun: tests/parts/test_torchmetrics_distributed.py.)
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FixedLogits, make_config, with_changes

torchmetrics = pytest.importorskip("torchmetrics")
from torchmetrics.classification import MulticlassAUROC, MulticlassF1Score  # noqa: E402

from base.base_trainer import RunStopped  # noqa: E402
from trainer import build, run  # noqa: E402
from utils.errors import ConfigError  # noqa: E402
from trainer.trainer import evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
F1 = {"type": "torchmetrics.classification.MulticlassF1Score", "args": {"num_classes": 3, "average": "macro"}}
AUROC = {"type": "torchmetrics.classification.MulticlassAUROC", "args": {"num_classes": 3}, "name": "auroc"}


def direct(outputs, targets):
    """F1 (macro) and AUROC of torchmetrics over all of ``outputs`` at once, ignoring targets of -100."""
    f1 = MulticlassF1Score(num_classes=3, average="macro", ignore_index=-100)
    auroc = MulticlassAUROC(num_classes=3, ignore_index=-100)
    return {"multiclass_f1_score": float(f1(outputs, targets)), "auroc": float(auroc(outputs, targets))}


def tm_config(save_dir, **trainer):
    """The tiny run with F1 and AUROC: 205 training samples in batches of 24 (8 of 24, one of 13), 51 validation
    samples (24, 24, 3)."""
    config = make_config(save_dir, **trainer)
    config["data_loader"]["args"]["batch_size"] = 24
    config["metrics"] = ["accuracy", F1, AUROC]
    return config


# --------------------------------------------------------------------------- equal to torchmetrics over the epoch


def test_evaluate_equals_torchmetrics_over_the_whole_epoch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(23, 3, generator=g) * 2
    target = torch.randint(0, 3, (23,), generator=g)
    target[[2, 9, 17]] = -100  # ignored, as by the loss
    loader = [(torch.arange(i, min(i + 5, 23)), target[i:i + 5]) for i in range(0, 23, 5)]  # 5, 5, 5, 5, 3
    config = {"metrics": ["accuracy", F1, AUROC], "loss": {"type": "cross_entropy", "args": {}}}
    result = evaluate(FixedLogits(logits), loader, torch.nn.functional.cross_entropy, build.build_metrics(config),
                      torch.device("cpu"))
    expected = direct(logits, target)
    assert result["multiclass_f1_score"] == expected["multiclass_f1_score"]
    assert result["auroc"] == expected["auroc"]
    # The batches' mean F1 would differ: the metric really is computed over the epoch.
    per_batch = [float(MulticlassF1Score(num_classes=3, ignore_index=-100)(logits[i:i + 5], target[i:i + 5]))
                 for i in range(0, 23, 5)]
    assert abs(sum(per_batch) / len(per_batch) - expected["multiclass_f1_score"]) > 1e-3
    kept = target != -100
    assert result["accuracy"] == pytest.approx((logits.argmax(1) == target)[kept].float().mean().item())


@pytest.fixture
def recorded(monkeypatch):
    """The (output, target) of every training batch (the loss's inputs while gradients are on)."""
    records = []
    build_loss = build.build_loss

    def recording(config, device=None):
        loss = build_loss(config, device)

        def record(output, target):
            if torch.is_grad_enabled():
                records.append((output.detach().clone(), target.clone()))
            return loss(output, target)

        return record

    monkeypatch.setattr(build, "build_loss", recording)
    return records


def _outputs(model, loader):
    model.eval()
    with torch.no_grad():
        pairs = [(model(data), target) for data, target in loader]
    return torch.cat([o for o, _ in pairs]), torch.cat([t for _, t in pairs])


def test_a_run_reports_torchmetrics_of_its_whole_epochs(tmp_path, recorded):
    config = tm_config(tmp_path / "saved", monitor="max val_auroc")
    metrics = run.train(config, run_id="r")
    per_epoch = len(recorded) // 2
    assert len(recorded) == 2 * per_epoch == 18  # 2 epochs of 9 batches (205 samples: the last batch holds 13)
    assert recorded[per_epoch - 1][1].shape[0] == 13 and recorded[0][1].shape[0] == 24
    outputs = torch.cat([o for o, _ in recorded[per_epoch:]])
    targets = torch.cat([t for _, t in recorded[per_epoch:]])
    expected = direct(outputs, targets)
    assert metrics["multiclass_f1_score"] == expected["multiclass_f1_score"]
    assert metrics["auroc"] == expected["auroc"]

    # Validation: the epoch-2 model over the held-out samples, batch by batch as the run saw them.
    state = torch.load(tmp_path / "saved/models/tiny/r/checkpoint-epoch2.pth", map_location="cpu", weights_only=True)
    model = build.build_model(state["config"])
    model.load_state_dict(state["model"])
    valid = build.build_data_loader(state["config"]).split_validation()
    assert [len(t) for _, t in valid] == [24, 24, 3]
    expected = direct(*_outputs(model, valid))
    assert metrics["val_multiclass_f1_score"] == expected["multiclass_f1_score"]
    assert metrics["val_auroc"] == expected["auroc"]
    # test.py scores them too, from the checkpoint's config
    scores = json.loads((tmp_path / "saved/models/tiny/r/model_best.test.json").read_text())
    assert 0 <= scores["auroc"] <= 1 and "multiclass_f1_score" in scores


def test_a_mid_epoch_resume_ends_with_the_same_values(tmp_path, interrupt_at_step):
    config = tm_config(tmp_path / "saved", epochs=2)
    whole = run.train(with_changes(config, name="whole"), run_id="w")
    interrupt_at_step(15)  # epoch 2, batch 6 of 9
    with pytest.raises(RunStopped):
        run.train(config, run_id="cut")
    last = torch.load(tmp_path / "saved/models/tiny/cut/last.pth", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["batch_in_epoch"]) == (1, 6)
    saved = last["train_epoch_metrics"]
    assert saved["auroc"]["states"]["preds"][0].shape == (6 * 24, 3)  # the 6 batches' scores, on the CPU
    assert saved["multiclass_f1_score"]["states"]["tp"].sum() > 0
    resumed = run.train(None, resume=tmp_path / "saved/models/tiny/cut/last.pth")
    for key in ("multiclass_f1_score", "auroc", "val_multiclass_f1_score", "val_auroc", "loss", "accuracy"):
        assert resumed[key] == whole[key], key  # bit-identical
    # Without the saved state the epoch's value would have covered only the batches after the resume.
    assert len({whole["auroc"], whole["val_auroc"], whole["multiclass_f1_score"]}) > 1


def _spec(entry, name):
    config = {"metrics": [entry], "loss": {"type": "cross_entropy", "args": {}}}
    (metric,) = build.build_metrics(config)
    assert metric.__name__ == name
    return metric


def test_mark_and_rollback_forget_the_batches_since_the_mark():
    """``trainer.auto_accumulate`` redoes a window after an out-of-memory error: the window's batches are forgotten."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(3)]
    for entry, name in ((F1, "multiclass_f1_score"), (AUROC, "auroc")):
        metric = _spec(entry, name).new(torch.device("cpu"), sync=False)
        metric.update(*batches[0])
        mark = metric.mark()
        metric.update(*batches[1])
        metric.rollback(mark)
        metric.update(*batches[2])
        reference = _spec(entry, name).new(torch.device("cpu"), sync=False)
        for output, target in (batches[0], batches[2]):
            reference.update(output, target)
        assert metric.compute() == reference.compute(), name


def test_a_saved_state_loads_into_the_same_metric_only():
    g = torch.Generator().manual_seed(2)
    output, target = torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g)
    metric = _spec(AUROC, "auroc").new(torch.device("cpu"), sync=False)
    metric.update(output, target)
    state = metric.state_dict()
    again = _spec(AUROC, "auroc").new(torch.device("cpu"), sync=False)
    assert again.load_state_dict(state) and again.compute() == metric.compute()
    empty = _spec(AUROC, "auroc").new(torch.device("cpu"), sync=False)
    assert empty.load_state_dict(state, own=False)  # another process's share: empty, in the saved dtype and shape
    assert [tuple(t.shape) for t in empty.metric.preds] == [(0, 3)] and empty.metric.preds[0].dtype == output.dtype
    other = _spec(dict(AUROC, args={"num_classes": 3, "average": "weighted"}), "auroc").new(torch.device("cpu"))
    assert not other.load_state_dict(state)  # other args: not loaded


# --------------------------------------------------------------------------- config mistakes


def _train_cli(tmp_path, capsys, *overrides):
    """``train.py -c config.json ...`` in this process (train.py's own code, without a second torch import)."""
    from types import SimpleNamespace

    from trainer import cli

    capsys.readouterr()
    code = cli.train_command(["-c", str(ROOT / "config.json"), f"trainer.save_dir={tmp_path / 'saved'}",
                              "trainer.monitor=off", *overrides])
    assert not (tmp_path / "saved").exists(), "something was written"
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


@pytest.mark.parametrize("entry, message", [
    ({"type": "torchmetrics.classification.MulticlassF1Scor", "args": {"num_classes": 10}},
     "error: metrics[0].type: unknown torchmetrics metric 'torchmetrics.classification.MulticlassF1Scor'; did you mean"
     " 'torchmetrics.classification.MulticlassF1Score'?"),
    ({"type": "torchmetrics.classification.MulticlassF1Score", "args": {"num_class": 10}},
     "error: metrics[0].args: MulticlassF1Score takes no argument 'num_class'; did you mean 'num_classes'?"),
    ({"type": "torchmetrics.classification.MulticlassF1Score", "args": {"num_classes": 10, "average": "macr"}},
     "error: metrics[0].args: torchmetrics.classification.MulticlassF1Score rejected its arguments: Expected"
     " argument `average`"),
], ids=["unknown-class", "unknown-arg", "bad-value"])
def test_a_torchmetrics_mistake_is_one_line_and_exit_2(tmp_path, capsys, entry, message):
    proc = _train_cli(tmp_path, capsys, f"metrics={json.dumps([entry])}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines
    assert lines[0].startswith(message), lines
    assert "Traceback" not in proc.stderr


def test_all_metric_mistakes_are_reported_at_once(tmp_path, capsys):
    entries = ["acuracy", {"type": "accuracy"}, {"type": "torchmetrics.MeanSquaredError", "nme": "x"},
               {"type": "torchmetrics.classification.MulticlassAUROC", "args": {"num_classes": 0}}]
    proc = _train_cli(tmp_path, capsys, f"metrics={json.dumps(entries)}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 4, lines
    assert "unknown metric 'acuracy'; did you mean 'accuracy'?" in lines[0]
    assert "metrics[1]: 'accuracy' is a built-in metric" in lines[1]
    assert "metrics[2].nme: unknown key; did you mean 'name'?" in lines[2]
    assert "metrics[3].args.num_classes: got 0, expected a positive integer" in lines[3]


def test_a_metric_giving_several_numbers_is_stopped_by_the_dry_batch(tmp_path, capsys):
    entry = {"type": "torchmetrics.classification.MulticlassF1Score", "args": {"num_classes": 10, "average": "none"}}
    proc = _train_cli(tmp_path, capsys, f"metrics={json.dumps([entry])}", "trainer.epochs=1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: metrics: multiclass_f1_score cannot take the model's output [32, 10] (float32) and the targets [32]"
        " (int64): multiclass_f1_score computes (10,) values, not one number (an average of \"none\"?)"]


def test_monitor_uses_the_short_name():
    from utils.config import ConfigError, validate_config

    config = tm_config("/nonexistent", monitor="max val_multiclass_f1_score")
    validate_config(config, build.registries())
    with pytest.raises(ConfigError, match="did you mean 'val_auroc'"):
        validate_config(with_changes(config, trainer__monitor="max val_aurok"), build.registries())


def test_built_in_metrics_do_not_import_torchmetrics():
    code = ("import sys; sys.path.insert(0, '.'); from trainer import build;"
            " from utils.config import load_config, validate_config;"
            " c = validate_config(load_config('config.json'), build.registries()); build.build_metrics(c);"
            " print(sorted(m for m in ('torchmetrics', 'parts.torchmetrics', 'matplotlib', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_fewer_validation_samples_than_processes_is_one_line_for_torchmetrics(tmp_path):
    """Under torchrun a torchmetrics metric gathers every process's validation share: each needs one sample."""
    from trainer.torchrun import check_launch
    from trainer.run import build_parts
    from utils.config import ConfigError, validate_config
    from utils.dist import DistInfo
    from trainer.trainer import EpochMetric

    config = make_config(tmp_path / "saved")
    config["metrics"] = ["accuracy", {"type": "torchmetrics.classification.MulticlassF1Score", "args": {"num_classes": 3}}]
    config["data_loader"]["args"]["validation_split"] = 3
    config = validate_config(config, build.registries())
    parts = build_parts(config, torch.device("cpu"))
    check_launch(config, parts, DistInfo(rank=0, world_size=3))  # one sample each: fine
    check_launch(config, parts, DistInfo())  # one process: nothing to check
    with pytest.raises(ConfigError, match="3 validation samples for 4 processes.*hold out at least 4 samples"):
        check_launch(config, parts, DistInfo(rank=0, world_size=4))
    parts.metric_fns = [fn for fn in parts.metric_fns if not isinstance(fn, EpochMetric)]
    check_launch(config, parts, DistInfo(rank=0, world_size=4))  # built-in metrics reduce sums: an empty share is fine


def test_a_mid_epoch_resume_with_changed_metric_args_does_not_load_the_old_state(tmp_path, interrupt_at_step, capsys):
    """F1 macro's state (per class) is not F1 micro's: a resume that changes the average starts the metric afresh,
    with a warning, instead of adding the new counts onto the old ones."""
    config = tm_config(tmp_path / "saved", epochs=2, verbosity=1)
    interrupt_at_step(15)  # epoch 2, batch 6 of 9
    with pytest.raises(RunStopped):
        run.train(config, run_id="cut")
    capsys.readouterr()
    micro = dict(F1, args={**F1["args"], "average": "micro"})
    changed = with_changes(config, metrics=["accuracy", micro, AUROC])
    resumed = run.train(changed, resume=tmp_path / "saved/models/tiny/cut/last.pth")
    out = capsys.readouterr().out
    assert "the checkpoint holds the state of another metric (changed args?) for multiclass_f1_score" in out
    assert "for auroc" not in out  # unchanged: its state is carried on
    assert 0 < resumed["multiclass_f1_score"] <= 1


@pytest.mark.parametrize("entry, message", [
    ({"type": "torchmetrics.classification.MulticlassROC", "args": {"num_classes": 10}},
     "metrics: multiclass_roc cannot take the model's output"),
], ids=["a-curve"])
def test_a_metric_that_gives_no_single_number_is_one_line(tmp_path, capsys, entry, message):
    proc = _train_cli(tmp_path, capsys, f"metrics={json.dumps([entry])}", "trainer.epochs=1")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "computes a tuple, not one number" in lines[0], lines


def test_a_metric_needing_a_missing_package_is_one_line(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity is installed: the metric can be built here")
    entry = {"type": "torchmetrics.image.MemorizationInformedFrechetInceptionDistance"}
    proc = _train_cli(tmp_path, capsys, f"metrics={json.dumps([entry])}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "metrics[0].type: " in lines[0] and "cannot be built here" in lines[0], lines


def test_regression_metrics_take_an_n_by_1_output_and_score_in_the_targets_units():
    from torchmetrics.regression import MeanAbsoluteError, R2Score

    stats = {"mean": 150.0, "std": 80.0}
    config = {"loss": {"type": "mse_loss", "args": {}}, "metrics": [
        {"type": "torchmetrics.regression.R2Score", "name": "r2"},
        {"type": "torchmetrics.regression.MeanAbsoluteError", "name": "mae", "args": {"target_stats": stats}}]}
    g = torch.Generator().manual_seed(0)
    output, target = torch.randn(30, 1, generator=g), torch.randn(30, generator=g)  # standardised numbers
    loader = [(torch.arange(i, min(i + 8, 30)), target[i:i + 8]) for i in range(0, 30, 8)]
    result = evaluate(FixedLogits(output), loader, lambda o, t: ((o.squeeze(1) - t) ** 2).mean(),
                      build.build_metrics(config), torch.device("cpu"))
    assert result["r2"] == pytest.approx(float(R2Score()(output.squeeze(1), target)), rel=1e-6)
    raw = float(MeanAbsoluteError()(output.squeeze(1) * 80 + 150, target * 80 + 150))
    assert result["mae"] == pytest.approx(raw, rel=1e-6) and result["mae"] > 10  # not the standardised MAE
