"""Fail before the first step, never lose a run: the dry batch, safe resumes, the command lines, the console."""

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch

from conftest import make_config, with_changes
from trainer import cli, evaluate_cli, run

ROOT = Path(__file__).resolve().parents[1]


def digits_config(save_dir, **changes):
    config = json.loads((ROOT / "config.json").read_text())
    config["trainer"].update(save_dir=str(save_dir), epochs=1, verbosity=0, tensorboard=False)
    return with_changes(config, **changes)


def run_cli(tmp_path, capsys, config, *extra, command=cli.train_command):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    code = command(["-c", str(path), *extra])
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line], captured.out


# --------------------------------------------------------------------------- the dry batch

MISMATCHES = {
    "rgb model on grayscale": (dict(arch={"type": "torchvision.models.resnet18", "args": {"num_classes": 10}}),
                               ["expects 3 input channels", "[32, 1, 8, 8]", "channels"]),
    "too few classes": (dict(arch={"type": "DigitsCNN", "args": {"num_classes": 5}}),
                        ["outputs 5 class scores", "arch.args.num_classes=10"]),
    "images too small": (dict(arch={"type": "LeNet", "args": {"num_classes": 10}}),
                         ["too small for LeNet", "[32, 1, 8, 8]"]),
    "mlp of the wrong size": (dict(arch={"type": "MLP", "args": {"input_size": 784, "num_classes": 10}}),
                              ["expects 784 input features", "has 64 values", "arch.args.input_size=64"]),
    "logits into nll_loss": (dict(loss="nll_loss"), ["nll_loss expects log-probabilities", "cross_entropy"]),
    "unreduced loss": (dict(loss={"type": "cross_entropy", "args": {"reduction": "none"}}),
                       ["not a single value", "reduction"]),
    "regression loss on class labels": (dict(loss="mse_loss"), ["mse_loss cannot take", "cross_entropy"]),
    "empty epoch": (dict(data_loader__args__batch_size=5000, data_loader__args__drop_last=True),
                    ["an epoch has 0 batches", "batch_size"]),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_model_and_data_that_do_not_fit_are_one_line_before_anything_is_written(case, tmp_path, capsys):
    changes, expected = MISMATCHES[case]
    save_dir = tmp_path / "saved"
    code, lines, _ = run_cli(tmp_path, capsys, digits_config(save_dir, **changes))
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in expected:
        assert fragment in lines[0], lines[0]
    assert not save_dir.exists()  # no run folder, no empty TensorBoard run


@pytest.mark.parametrize("outputs,classes", [(12, 10), (11, 10)])
def test_more_model_outputs_than_data_classes_is_a_warning_line(tmp_path, capsys, outputs, classes):
    """arch.args.num_classes above the data's class count trains (a model may keep room for more classes), with
    one warning line at the dry batch naming both numbers; a model that fits says nothing."""
    config = digits_config(tmp_path / "saved", arch__args__num_classes=outputs)
    code, err, _ = run_cli(tmp_path, capsys, config, "trainer.epochs=1")
    assert code == 0 and len(err) == 1, err
    assert err[0].startswith("warning: ") and f"outputs {outputs} class scores" in err[0], err
    assert f"the data has {classes} classes" in err[0] and f"arch.args.num_classes={classes}" in err[0], err
    code, err, _ = run_cli(tmp_path, capsys, digits_config(tmp_path / "saved"), "trainer.epochs=1")
    assert code == 0 and err == []


def test_the_dry_batch_does_not_change_the_run(tmp_path, monkeypatch):
    """Eval mode, no step, every RNG restored: the run ends with the same weights as without it."""
    import trainer.build

    config = make_config(tmp_path / "with")
    run.train(config, run_id="r")
    with_dry = torch.load(tmp_path / "with/models/tiny/r/checkpoint-epoch2.pth", weights_only=True)
    calls = []
    monkeypatch.setattr(trainer.build, "dry_batch", lambda *a: calls.append(a))
    run.train(make_config(tmp_path / "without"), run_id="r")
    without = torch.load(tmp_path / "without/models/tiny/r/checkpoint-epoch2.pth", weights_only=True)
    assert len(calls) == 1
    for key in with_dry["model"]:
        assert torch.equal(with_dry["model"][key], without["model"][key]), key


# --------------------------------------------------------------------------- safe resume


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.suffix == ".pth"}


def test_resuming_an_older_checkpoint_branches_instead_of_overwriting(tmp_path):
    config = make_config(tmp_path / "saved", epochs=3, monitor="min val_loss")
    run.train(config, run_id="a")
    folder = tmp_path / "saved/models/tiny/a"
    before = _digests(folder)
    run.train(with_changes(config, optimizer__args__lr=0.02), resume=folder / "checkpoint-epoch1.pth")
    assert _digests(folder) == before  # not one byte of the original run changed
    branch = tmp_path / "saved/models/tiny/a-from-checkpoint-epoch1"
    assert {"checkpoint-epoch2.pth", "checkpoint-epoch3.pth"} <= set(_digests(branch))
    assert (tmp_path / "saved/log/tiny/a-from-checkpoint-epoch1/info.log").is_file()
    branch_manifest = json.loads((branch / "manifest.json").read_text())
    assert branch_manifest["branched_from"]["run_dir"] == str(folder.resolve())
    assert "checkpoint-epoch3.pth" in branch_manifest["branched_from"]["newer_checkpoints"]
    origin = json.loads((folder / "manifest.json").read_text())
    assert origin["branches"][0]["run_dir"] == str(branch) and origin["branches"][0]["checkpoint"] == "checkpoint-epoch1.pth"
    log = (tmp_path / "saved/log/tiny/a-from-checkpoint-epoch1/info.log").read_text()
    assert "is not the newest checkpoint of its run" in log


def test_overwrite_resumes_in_place_and_the_newest_checkpoint_needs_no_flag(tmp_path):
    config = make_config(tmp_path / "saved", epochs=3)
    run.train(config, run_id="a")
    folder = tmp_path / "saved/models/tiny/a"
    run.train(with_changes(config, trainer__epochs=4), resume=folder / "checkpoint-epoch3.pth")  # the newest
    assert (folder / "checkpoint-epoch4.pth").is_file()
    before = _digests(folder)["checkpoint-epoch3.pth"]
    run.train(with_changes(config, trainer__epochs=3), resume=folder / "checkpoint-epoch2.pth", overwrite=True)
    assert _digests(folder)["checkpoint-epoch3.pth"] != before  # rewritten, as asked
    assert [p.name for p in (tmp_path / "saved/models/tiny").iterdir()] == ["a"]


def test_resume_with_another_run_id_continues_whole_in_that_folder(tmp_path):
    config = make_config(tmp_path / "saved", epochs=2)
    run.train(config, run_id="a")
    run.train(with_changes(config, trainer__epochs=3), resume=tmp_path / "saved/models/tiny/a/checkpoint-epoch2.pth",
              run_id="b")
    assert (tmp_path / "saved/models/tiny/b/checkpoint-epoch3.pth").is_file()
    assert (tmp_path / "saved/log/tiny/b/info.log").is_file()
    assert not (tmp_path / "saved/models/tiny/a/checkpoint-epoch3.pth").exists()


@pytest.mark.parametrize("epochs", [1, 2])
def test_resume_with_nothing_left_to_train_is_an_error(tmp_path, epochs, capsys):
    config = make_config(tmp_path / "saved", epochs=2)
    run.train(config, run_id="a")
    ckpt = tmp_path / "saved/models/tiny/a/checkpoint-epoch2.pth"
    assert cli.train_command(["-r", str(ckpt), f"trainer.epochs={epochs}"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "has completed 2 of" in lines[0] and "trainer.epochs=3" in lines[0], lines


@pytest.mark.parametrize("run_id", ["../escape", "a/b", "..", "x" * 300])
def test_a_run_id_is_one_folder_name(tmp_path, capsys, run_id):
    code, lines, _ = run_cli(tmp_path, capsys, make_config(tmp_path / "saved"), "--run-id", run_id)
    assert code == 2 and len(lines) == 1 and "--run-id" in lines[0], lines
    assert not (tmp_path / "saved").exists() and not (tmp_path / "escape").exists()


# --------------------------------------------------------------------------- the command lines


def test_overrides_may_come_after_flags(tmp_path, capsys):
    config = make_config(tmp_path / "saved", epochs=3)
    other = tmp_path / "other"
    code, lines, _ = run_cli(tmp_path, capsys, config, "trainer.epochs=1", "--run-id", "x",
                             f"trainer.save_dir={other}", "-d", "cpu", "--lr", "0.05")
    assert code == 0, lines
    saved = json.loads((other / "models/tiny/x/config.json").read_text())
    assert saved["trainer"]["epochs"] == 1 and saved["device"] == "cpu" and saved["optimizer"]["args"]["lr"] == 0.05
    assert not (tmp_path / "saved").exists()


def test_device_flag_is_spelled_the_same_in_both_scripts(tmp_path, capsys):
    config = make_config(tmp_path / "saved", epochs=1)
    assert run_cli(tmp_path, capsys, config, "--device", "cpu", "--run-id", "d")[0] == 0
    ckpt = tmp_path / "saved/models/tiny/d/checkpoint-epoch1.pth"
    for flag in ("-d", "--device"):
        assert evaluate_cli.test_command(["-r", str(ckpt), flag, "cpu"]) == 0
    code = cli.train_command(["-c", str(tmp_path / "c.json"), "-d", "cuda:7"])
    err = capsys.readouterr().err
    assert code == 2 and 'device: "cuda:7" requested' in err


# --------------------------------------------------------------------------- the console


def test_log_lines_go_through_the_progress_bar(monkeypatch):
    """A message logged while a bar is on screen lifts the bar, prints on a clean line, and redraws it."""
    from tqdm import tqdm

    from logger.logger import close_logging, setup_logging

    screen = io.StringIO()
    monkeypatch.setattr("sys.stdout", screen)
    logger = setup_logging(None, verbosity=2)
    try:
        bar = tqdm(total=100, file=screen, desc="epoch 1", mininterval=0, ascii=True)
        bar.update(37)
        logger.info("epoch 1 batch 37/100 loss 0.5")
        bar.close()
    finally:
        close_logging()
    text = screen.getvalue()
    message_line = [line for line in text.replace("\r", "\n").split("\n") if "loss 0.5" in line]
    assert message_line == ["epoch 1 batch 37/100 loss 0.5"], repr(text)  # no fragment of the bar on its line


def test_the_end_of_a_run_says_time_best_epoch_checkpoints_and_test_scores(tmp_path, capsys):
    config = make_config(tmp_path / "saved", epochs=3, verbosity=1, monitor="max val_accuracy")
    code, lines, out = run_cli(tmp_path, capsys, config, "--run-id", "end")
    assert code == 0, lines
    folder = tmp_path / "saved/models/tiny/end"
    assert "Finished tiny/end in " in out and "3 epochs" in out
    assert "Best val_accuracy " in out and " at epoch " in out
    assert f"Checkpoints: {folder}" in out
    scores = json.loads((folder / "model_best.test.json").read_text())
    assert scores["n_samples"] == 64  # the synthetic loader's test split
    assert f"Test split (64 samples, model_best.pth): loss {scores['loss']:.6g}" in out


def test_test_after_train_can_be_turned_off(tmp_path, capsys):
    config = make_config(tmp_path / "saved", epochs=1, verbosity=1, test_after_train=False)
    code, _, out = run_cli(tmp_path, capsys, config, "--run-id", "off")
    assert code == 0 and "Finished tiny/off" in out and "Test split" not in out
    assert not list((tmp_path / "saved/models/tiny/off").glob("*.test.json"))


def test_an_empty_test_split_is_said_not_scored_as_zero(tmp_path, capsys):
    """No test split (test_fraction 0): the end block says so, result.json has no test scores, test.py exits 2."""
    config = make_config(tmp_path / "saved", epochs=1, verbosity=1)
    config["data_loader"]["args"]["test_fraction"] = 0.0
    code, _, out = run_cli(tmp_path, capsys, config, "--run-id", "empty")
    folder = tmp_path / "saved/models/tiny/empty"
    assert code == 0 and "Test split not scored: SyntheticDataLoader: the test split is empty (0 samples)" in out
    assert "Test split (0 samples" not in out
    assert json.loads((folder / "result.json").read_text())["test"] is None
    assert not list(folder.glob("*.test.json"))
    assert evaluate_cli.test_command(["-r", str(folder / "model_best.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the test split is empty" in err[0], err


def test_test_py_never_writes_its_scores_over_a_folder_or_through_a_link(tmp_path, capsys):
    """test.py's output is ``<checkpoint>.test.json``: a folder of that name is one line before scoring (it stays as
    it was); a link of that name to a file of the run is replaced by the scores, and the file it named is untouched."""
    config = make_config(tmp_path / "saved", epochs=1, test_after_train=False)
    run.train(config, run_id="t")
    ckpt = tmp_path / "saved/models/tiny/t/checkpoint-epoch1.pth"
    scores = ckpt.with_suffix(".test.json")
    (scores / "inside").mkdir(parents=True)
    assert evaluate_cli.test_command(["-r", str(ckpt)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {scores}") and "a folder" in err[0], err
    assert "Scored" not in captured.out and (scores / "inside").is_dir()
    (scores / "inside").rmdir()
    scores.rmdir()
    run_config = ckpt.parent / "config.json"
    before = run_config.read_bytes()
    scores.symlink_to("config.json")
    assert evaluate_cli.test_command(["-r", str(ckpt)]) == 0
    assert run_config.read_bytes() == before and not scores.is_symlink() and "loss" in json.loads(scores.read_text())


def test_a_write_that_meets_a_folder_of_its_name_is_one_line(tmp_path):
    """The same for every crash-safe write (scores, result.json, sweeps): the rename meets a folder, one line, exit 2."""
    from utils.errors import UserError
    from utils.io import write_json

    (tmp_path / "result.json" / "x").mkdir(parents=True)
    with pytest.raises(UserError) as err:
        write_json(tmp_path / "result.json", {"a": 1})
    assert err.value.exit_code == 2 and "a folder of that name is in the way" in str(err.value)
    assert (tmp_path / "result.json" / "x").is_dir() and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_test_py_says_what_it_scored_and_where_it_wrote(tmp_path, capsys):
    config = make_config(tmp_path / "saved", epochs=1, test_after_train=False)
    run.train(config, run_id="t")
    ckpt = tmp_path / "saved/models/tiny/t/checkpoint-epoch1.pth"
    assert evaluate_cli.test_command(["-r", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert f"Scored {ckpt}" in out and f"Written to {ckpt.with_suffix('.test.json')}" in out
    values = json.loads(ckpt.with_suffix(".test.json").read_text())
    loss_line = next(line for line in out.splitlines() if line.strip().startswith("loss"))
    assert loss_line.split(":")[1].strip() == f"{values['loss']:.6g}"  # 6 significant digits, not a raw float
    assert len(loss_line.split(":")[1].strip().replace(".", "").lstrip("0")) <= 6


def test_a_stop_is_said_once(tmp_path, capsys, monkeypatch):
    """A signal stop is logged (with the resume command) and the command line does not repeat it."""
    import signal

    import trainer.trainer
    from base.base_hook import Hook
    from trainer.trainer import hooks_for

    class TermAtEpoch2(Hook):
        def before_epoch(self, trainer, epoch):
            if epoch == 2:
                signal.raise_signal(signal.SIGTERM)  # as a cluster would: the handler asks the loop to stop

    monkeypatch.setattr(trainer.trainer, "hooks_for", lambda *a: [*hooks_for(*a), TermAtEpoch2()])
    config = make_config(tmp_path / "saved", epochs=5, verbosity=1, monitor="off")
    code, lines, out = run_cli(tmp_path, capsys, config, "--run-id", "s")
    assert code == 128 + signal.SIGTERM
    assert (tmp_path / "saved/models/tiny/s/last.pth").is_file()
    said = out + "\n".join(lines)
    assert said.count("Stopped by SIGTERM") == 1 and "Resume with: python train.py -r" in said
    assert not any(line.startswith("stopped:") for line in lines), lines


@pytest.mark.parametrize("argv", [["-c", "x.json", "--bs", "many"], ["-c", "x.json", "--no-such-flag"], []])
def test_a_command_line_mistake_is_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.train_command(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "--help" in err[0], err
