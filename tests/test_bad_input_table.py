"""Issue 24's table of kinds of bad input: one row per kind, each through the command line in process.

Every row must end with exactly one ``error:`` line on stderr naming the problem, its exit code (2, or a full disk's
28), no traceback, and no new file under the save dir (a start cut short leaves no half-made run folder). A row is
(name, how to make it, the words the error line must hold, the exit code); ``make(ctx)`` returns the command's
arguments and may monkeypatch (``ctx.monkeypatch``) or use a trained run's checkpoint (``ctx.checkpoint()``).
"""

import errno
import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from conftest import make_config
from trainer import cli, evaluate_cli
from utils import parts


class Ctx:
    def __init__(self, tmp_path, monkeypatch, trained):
        self.tmp_path, self.monkeypatch, self.trained = tmp_path, monkeypatch, trained
        self.save = tmp_path / "saved"
        self.config = make_config(self.save)

    def file(self, *overrides, config=None):
        """``-c FILE`` of the tiny config (or ``config``), with the overrides after it."""
        path = self.tmp_path / "c.json"
        path.write_text(json.dumps(config or self.config))
        return ["-c", str(path), *overrides]

    def checkpoint(self, change=None):
        """A copy of the trained run's checkpoint in the save dir, its state changed by ``change(state)``."""
        state = torch.load(self.trained, weights_only=True)
        if change:
            change(state)
        folder = self.save / "models/tiny/old"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(state, folder / "checkpoint-epoch1.pth")
        return folder / "checkpoint-epoch1.pth"


def _reshaped(state):
    key = next(iter(state["model"]))
    state["model"][key] = torch.zeros(3, 3)


def _extra_key(state):
    state["model"]["extra.weight"] = torch.zeros(2)


def _full_disk_at(name):
    """``os.open`` of the temporary file of ``name`` (utils/io.py's atomic_write) fails as on a full disk."""
    def make(ctx):
        import utils.io

        real = os.open

        def full(path, *args, **kwargs):
            if Path(path).name.startswith(f".{name}."):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, *args, **kwargs)

        ctx.monkeypatch.setattr(utils.io.os, "open", full)
        return ctx.file("--run-id", "full")
    return make


def _full_disk_mkdir(ctx):
    real = Path.mkdir

    def full(self, *args, **kwargs):
        if "models" in self.parts:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    ctx.monkeypatch.setattr(Path, "mkdir", full)
    return ctx.file()


def _dangling(where):
    def make(ctx):
        link = ctx.save / where if where else ctx.save
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ctx.tmp_path / "nowhere")
        return ctx.file("--run-id", "x")
    return make


def _damaged_only(ctx):
    folder = ctx.save / "models/tiny/d"
    folder.mkdir(parents=True)
    (folder / "checkpoint-epoch1.pth").write_bytes(b"not a checkpoint")
    return ctx.file("--run-id", "d", "-r", "auto")


def _optimizer_state(value):
    """A checkpoint whose first optimizer state tensor (SGD's momentum_buffer) is replaced by ``value(tensor)``."""
    def change(state):
        slots = state["optimizer"]["state"][0]
        slots["momentum_buffer"] = value(slots["momentum_buffer"])
    return change


def _one_more_group(state):
    state["optimizer"]["param_groups"].append(dict(state["optimizer"]["param_groups"][0], params=[99]))


def _read_only_run(ctx):
    """The checkpoint's run folder cannot be written (as root, chmod does not stop a write: os.access says so)."""
    checkpoint = ctx.checkpoint()
    real = os.access
    ctx.monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != checkpoint.parent and real(p, mode, **k))
    return ["-r", str(checkpoint), "trainer.epochs=2"]


def _override(*items):
    return lambda ctx: ctx.file(*items)


SCHEDULER = 'lr_scheduler={"type": "%s", "args": {"gamma": %s%s}}'

ROWS = [
    # item 1: a checkpoint whose tensors do not fit the model
    ("resume, a tensor of another shape", lambda c: ["-r", str(c.checkpoint(_reshaped)), "trainer.epochs=2"],
     ["weights do not fit", "size mismatch for net"], 2),
    ("resume, a key the model lacks", lambda c: ["-r", str(c.checkpoint(_extra_key)), "trainer.epochs=2"],
     ["weights do not fit", "extra.weight"], 2),
    # optimizer state that is not finite, or does not fit the optimizer the config builds; a read-only run folder
    ("resume, NaN in the optimizer state", lambda c: ["-r", str(c.checkpoint(_optimizer_state(
        lambda t: t.fill_(float("nan"))))), "trainer.epochs=2"], ["optimizer state 'momentum_buffer'", "holds NaN"], 2),
    ("resume, Inf in the optimizer state", lambda c: ["-r", str(c.checkpoint(_optimizer_state(
        lambda t: t.fill_(float("inf"))))), "trainer.epochs=2"], ["momentum_buffer", "holds an infinity"], 2),
    ("resume, optimizer state of another shape", lambda c: ["-r", str(c.checkpoint(_optimizer_state(
        lambda t: torch.zeros(7)))), "trainer.epochs=2"], ["optimizer state does not fit", "shape [7]"], 2),
    ("resume, another number of parameter groups", lambda c: ["-r", str(c.checkpoint(_one_more_group)),
                                                              "trainer.epochs=2"],
     ["optimizer state does not fit", "parameter groups"], 2),
    ("resume with another optimizer type", lambda c: ["-r", str(c.checkpoint()), "trainer.epochs=2",
                                                      'optimizer={"type": "Adam", "args": {"lr": 0.01}}'],
     ["cannot resume with a changed optimizer.type", "--init-from"], 2),
    ("resume with SGD's arguments for Adam", lambda c: ["-r", str(c.checkpoint()), "optimizer.type=Adam"],
     ["optimizer.args: Adam takes no argument 'momentum'"], 2),
    ("resume from a read-only run folder", _read_only_run, ["cannot resume in", "models/tiny/old", "read-only",
                                                            "trainer.save_dir="], 2),
    # item 2: what only the constructors refuse, a schedule that makes the learning rate negative, group keys
    ("Adam betas of one value", _override('optimizer={"type": "Adam", "args": {"lr": 0.01, "betas": [0.9]}}'),
     ["optimizer.args.betas:", "[0.9]"], 2),
    ("Adam betas out of range", _override('optimizer={"type": "Adam", "args": {"betas": [0.9, 1.5]}}'),
     ["optimizer.args.betas:", "beta"], 2),
    ("a param group's betas", _override('optimizer={"type": "Adam", "args": {}, "param_groups": [{"params": ["net.1.*"], "betas": [0.9]}]}'),
     ["optimizer.param_groups[0].betas:"], 2),
    ("ExponentialLR gamma < 0", _override(SCHEDULER % ("ExponentialLR", -0.5, "")),
     ["lr_scheduler.args.gamma:", "negative"], 2),
    ("StepLR gamma < 0 after 4 epochs", _override(SCHEDULER % ("StepLR", -0.5, ', "step_size": 4'),
                                                  "trainer.epochs=5"),
     ["lr_scheduler.args.gamma:", "negative at step 4"], 2),
    ("a param group's unknown key", _override('optimizer.param_groups=[{"params": ["net.1.*"], "lrr": 0.1}]'),
     ["optimizer.param_groups[0].lrr: unknown key", "did you mean 'lr'"], 2),
    # item 3: loss arguments out of range
    ("label_smoothing < 0", _override('loss={"type": "cross_entropy", "args": {"label_smoothing": -0.1}}'),
     ["loss.args.label_smoothing:", "from 0 to 1"], 2),
    ("label_smoothing > 1", _override('loss={"type": "cross_entropy", "args": {"label_smoothing": 1.5}}'),
     ["loss.args.label_smoothing:", "from 0 to 1"], 2),
    # item 4: loader booleans given as text or numbers, each loader
    *((f"{loader} {key}={value}", _override(f'data_loader={{"type": "{loader}", "args": {{"{key}": {value}}}}}'),
       [f"data_loader.args.{key}:", "true or false"], 2)
      for loader, key, value in [("SyntheticDataLoader", "shuffle", '"true"'),
                                 ("SyntheticDataLoader", "pin_memory", '"true"'),
                                 ("SyntheticDataLoader", "persistent_workers", "1"),
                                 ("SyntheticDataLoader", "drop_last", "1"),
                                 ("DigitsDataLoader", "pin_memory", "1"),
                                 ("DigitsDataLoader", "in_memory", '"yes"'),
                                 ("Cifar10DataLoader", "persistent_workers", '"true"'),
                                 ("Cifar10DataLoader", "download", '"false"')]),
    # item 6: metrics as a string
    ("metrics a string", _override('metrics="accuracy"'), ['metrics: got "accuracy"', '["accuracy"]'], 2),
    # item 7: an empty data_dir, a dangling symbolic link as save_dir or run folder
    ("CIFAR data_dir empty", _override('data_loader={"type": "Cifar10DataLoader", "args": {"data_dir": ""}}',
                                       "arch.args.input_size=3072", "arch.args.num_classes=10"),
     ["data_loader.args.data_dir: got ''", "non-empty"], 2),
    ("save_dir a dangling link", _dangling(""), ["is a symbolic link to", "nowhere", "does not exist"], 2),
    ("run folder a dangling link", _dangling("models/tiny/x"), ["tiny/x is a symbolic link to", "does not exist"], 2),
    # item 9: a full disk at the start: its own exit code, no half-made run folder
    ("full disk making the run folder", _full_disk_mkdir, ["no space left on the device"], 28),
    ("full disk writing config.json", _full_disk_at("config.json"), ["config.json", "no space left"], 28),
    ("full disk writing manifest.json", _full_disk_at("manifest.json"), ["manifest.json", "no space left"], 28),
    # representatives of the kinds fixed earlier
    ("an unknown key", _override("trainer.epoch=3"), ["trainer.epoch: unknown key", "did you mean 'epochs'"], 2),
    ("a negative learning rate", _override("optimizer.args.lr=-0.1"), ["optimizer.args.lr:", ">= 0"], 2),
    ("a string for a number", _override('optimizer.args.lr="0.1"'), ["optimizer.args.lr:", "a number"], 2),
    ("a shortcut and its override", _override("--lr", "0.1", "optimizer.args.lr=0.2"), ["give one of them"], 2),
    ("a run id with a newline", lambda c: c.file("--run-id", "a\nb"), ["--run-id", "control character"], 2),
    ("NaN in an override", _override("optimizer.args.lr=NaN"), ["not a finite number"], 2),
    ("a model that does not fit the classes", _override("arch.args.num_classes=2"), ["num_classes=3"], 2),
    ("-r auto over only damaged checkpoints", _damaged_only, ["checkpoint-epoch1.pth"], 2),
    ("a missing config file", lambda c: ["-c", str(c.tmp_path / "none.json")], ["config file not found"], 2),
    ("image_size not a size", _override('data_loader={"type": "ImageFolderDataLoader", "args": {"data_dir": "x",'
                                        ' "image_size": [32, 0], "validation_split": 0.1}}'),
     ["data_loader.args.image_size:", "[height, width]"], 2),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of a one-epoch tiny run, trained once for the module."""
    save = tmp_path_factory.mktemp("trained") / "saved"
    assert cli.train_command(["-c", _write(save.parent / "c.json", make_config(save)), "--run-id", "t",
                              "trainer.epochs=1"]) == 0
    return save / "models/tiny/t/checkpoint-epoch1.pth"


def _write(path, config):
    path.write_text(json.dumps(config))
    return str(path)


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")) if Path(folder).is_dir() else []


# The rows that use an optional part (utils/parts.py): skipped in a copy without it.
NEEDS_PART = {"image_size not a size": "image_folder"}
PARAMS = [pytest.param(*row, id=row[0], marks=pytest.mark.skipif(
    row[0] in NEEDS_PART and not parts.present(NEEDS_PART[row[0]]), reason="its part is deleted")) for row in ROWS]


@pytest.mark.parametrize("name,make,words,code", PARAMS)
def test_each_kind_of_bad_input_is_one_line(name, make, words, code, tmp_path, monkeypatch, trained, capsys):
    ctx = Ctx(tmp_path, monkeypatch, trained)
    argv = make(ctx)
    before = _files(ctx.save)
    assert cli.train_command(argv) == code
    monkeypatch.undo()  # (before looking at the files: Path.mkdir or os.open may be patched)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    # (empty parent folders may stay; a resume in place locks its folder: .lock is in every real run folder)
    assert set(_files(ctx.save)) - set(before) <= {"models", "models/tiny", "log", "log/tiny", "models/tiny/old/.lock"}, \
        _files(ctx.save)


def test_test_py_on_weights_that_do_not_fit_is_one_line(tmp_path, monkeypatch, trained, capsys):
    ctx = Ctx(tmp_path, monkeypatch, trained)
    checkpoint = ctx.checkpoint(_reshaped)
    before = _files(ctx.save)
    assert evaluate_cli.test_command(["-r", str(checkpoint)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "weights do not fit" in lines[0], lines
    assert _files(ctx.save) == before


@pytest.mark.skipif(not parts.present("image_folder"), reason="the image_folder part is deleted")
def test_image_size_as_a_pair_passes_the_core_check(tmp_path):
    from trainer.build import registries
    from utils.config import check_args

    loader = registries()["data_loader"].get("ImageFolderDataLoader")
    for good in (32, [32, 28]):
        assert check_args(loader, {"data_dir": "d", "image_size": good}, "data_loader.args") == []
    for bad in ([32], [32, 28, 3], [0, 28], "32", True):
        assert check_args(loader, {"data_dir": "d", "image_size": bad}, "data_loader.args") != []


@pytest.mark.parametrize("where", ["begin", "first step"])
def test_an_interrupted_start_leaves_no_run_folder(tmp_path, monkeypatch, capsys, where):
    """Ctrl-C (KeyboardInterrupt, raised in process: no timing) while writing config.json, or just before the first
    step: no half-made run folder, and the same command then runs."""
    import trainer.run
    import trainer.trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    target = (trainer.run, "write_json") if where == "begin" else (trainer.trainer.Trainer, "train")
    monkeypatch.setattr(*target, interrupted)
    ctx = Ctx(tmp_path, monkeypatch, None)
    argv = ctx.file("--run-id", "k", "trainer.epochs=1")
    assert cli.train_command(argv) == 130
    assert not (ctx.save / "models/tiny/k").exists() and not (ctx.save / "log/tiny/k").exists()
    monkeypatch.undo()
    assert cli.train_command(argv) == 0
    assert (ctx.save / "models/tiny/k/checkpoint-epoch1.pth").is_file()


def test_a_stop_during_the_last_validation_skips_the_test_scoring(tmp_path, monkeypatch, capsys):
    """SIGINT during the last epoch's validation: that epoch is saved, then the run stops with one line (training
    complete, how to score it) instead of scoring the test split; result.json names the checkpoint to score."""
    import trainer.run
    import trainer.trainer

    real, scored = trainer.trainer.Trainer.valid_epoch, []

    def valid_epoch(self, epoch):
        if epoch == self.epochs:
            os.kill(os.getpid(), signal.SIGINT)  # handled by the run's handler, as a Ctrl-C would be
        return real(self, epoch)

    monkeypatch.setattr(trainer.trainer.Trainer, "valid_epoch", valid_epoch)
    monkeypatch.setattr(trainer.run, "evaluate_checkpoint", lambda *a, **k: scored.append(a) or {})
    ctx = Ctx(tmp_path, monkeypatch, None)
    ctx.config["data_loader"]["args"].update(num_samples=400, test_fraction=0.2)
    assert cli.train_command(ctx.file("--run-id", "s")) == 130
    err = capsys.readouterr().err
    assert "SIGINT before the test scoring: training is complete" in err and "python test.py -r" in err, err
    assert scored == []
    folder = ctx.save / "models/tiny/s"
    assert (folder / "checkpoint-epoch2.pth").is_file()
    result = json.loads((folder / "result.json").read_text())
    assert result["test"] is None and result["test_checkpoint"] == "model_best.pth"


def test_a_stop_during_a_validation_stops_after_it_and_runs_no_step_of_the_next_epoch(tmp_path, monkeypatch, capsys):
    """SIGINT while epoch 1 of 3 is validated: the warning says the run stops after the validation and its
    checkpoint, and it does: last.pth is at the epoch's end (no step of epoch 2 ran), and a resume from it ends
    equal to the run that was never stopped."""
    import trainer.trainer

    real = trainer.trainer.evaluate

    def evaluate(*args, **kwargs):  # the signal arrives while the validation runs, as a Ctrl-C would
        if not stopped:
            stopped.append(os.kill(os.getpid(), signal.SIGINT))
        return real(*args, **kwargs)

    stopped = []
    monkeypatch.setattr(trainer.trainer, "evaluate", evaluate)
    ctx = Ctx(tmp_path, monkeypatch, None)
    ctx.config["trainer"].update(epochs=3, test_after_train=False, verbosity=1)
    assert cli.train_command(ctx.file("--run-id", "s")) == 130
    for thread in threading.enumerate():  # the warning is logged by a thread of its own (base/base_trainer.py)
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(timeout=120)
    out = "".join(capsys.readouterr())
    assert "SIGINT received: stopping after this validation and its checkpoint" in out, out
    folder = ctx.save / "models/tiny/s"
    last = torch.load(folder / "last.pth", weights_only=True)
    first = torch.load(folder / "checkpoint-epoch1.pth", weights_only=True)
    assert last["global_step"] == first["global_step"] > 1 and last["epoch"] == 1  # epoch 1's steps, no more
    assert cli.train_command(["-r", str(folder / "last.pth")]) == 0
    assert cli.train_command(ctx.file("--run-id", "whole")) == 0  # never stopped (stopped is not empty now)
    resumed = torch.load(folder / "checkpoint-epoch3.pth", weights_only=True)["model"]
    whole = torch.load(ctx.save / "models/tiny/whole/checkpoint-epoch3.pth", weights_only=True)["model"]
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_a_resume_with_another_save_dir_continues_there_checkpoints_and_logs_together(tmp_path, monkeypatch, trained,
                                                                                         capsys):
    """``-r RUN/checkpoint-epoch1.pth trainer.save_dir=ELSEWHERE`` (a full disk's advice): the run goes on under
    ELSEWHERE with its run id, checkpoints and logs there, and its manifest says where it came from; the original
    run folder keeps its files. In place (the run tree moved, resumed with its own config) the logs follow the
    checkpoint's run, not the save_dir its config names."""
    ctx = Ctx(tmp_path, monkeypatch, trained)
    checkpoint = ctx.checkpoint()
    before = _files(ctx.save)
    elsewhere = tmp_path / "elsewhere"
    assert cli.train_command(["-r", str(checkpoint), f"trainer.save_dir={elsewhere}", "trainer.epochs=2"]) == 0
    assert (elsewhere / "models/tiny/old/checkpoint-epoch2.pth").is_file()
    assert (elsewhere / "log/tiny/old/info.log").is_file()
    manifest = json.loads((elsewhere / "models/tiny/old/manifest.json").read_text())
    assert manifest["branched_from"]["run_dir"] == str(checkpoint.parent)
    assert set(_files(ctx.save)) - set(before) <= {"models/tiny/old/.lock"}, _files(ctx.save)
    # in place: the checkpoint's own config names another save_dir (the trained run's); the logs follow the checkpoint
    assert cli.train_command(["-r", str(checkpoint), "trainer.epochs=2"]) == 0
    assert (ctx.save / "models/tiny/old/checkpoint-epoch2.pth").is_file()
    assert (ctx.save / "log/tiny/old/info.log").is_file()
    assert not (trained.parents[3] / "log/tiny/old").exists()
