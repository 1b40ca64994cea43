"""Configs: every shipped one is valid; every kind of mistake is one clear line, exit code 2, nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import cli, evaluate_cli, run
from conftest import make_config, with_changes
from trainer.build import registries
from utils import parts
from utils.config import load_config, validate_config
from utils.config_extra import saved_config
from utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted([ROOT / "config.json", *(p for p in (ROOT / "configs").rglob("*") if p.is_file())])  # examples/ too


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    config = load_config(path)
    gone = [name for name in parts.used_by(config) if not parts.present(name)]
    if gone:  # it uses an optional part whose files were deleted: one line per part, nothing else
        with pytest.raises(ConfigError) as info:
            validate_config(config, registries())
        problems = info.value.problems
        assert len(problems) == len(gone) and all(any(f"needs the {name} part" in p for p in problems) for name in gone)
        return
    config = validate_config(config, registries())
    assert config["trainer"]["epochs"] >= 1


@pytest.mark.parametrize("n_gpu,device,expected", [(0, "auto", "cpu"), (0, "cpu", "cpu"), (1, "auto", "auto"),
                                                   (1, "cpu", "cpu")])
def test_n_gpu_is_victoresques_key_for_the_device(tiny_config, n_gpu, device, expected):
    config = validate_config(with_changes(tiny_config, n_gpu=n_gpu, device=device), registries())
    assert config["device"] == expected


def run_cli(tmp_path, capsys, config, *extra):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config) if isinstance(config, dict) else config)
    code = cli.train_command(["-c", str(path), *extra])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


BAD = {
    "unknown top-level key": (dict(optimiser={}), ["optimiser: unknown key; did you mean 'optimizer'?"]),
    "unknown trainer key": (dict(trainer__epoch=3), ["trainer.epoch: unknown key; did you mean 'epochs'?"]),
    "unknown model": (dict(arch__type="MLPP"), ["arch.type: unknown model 'MLPP'; did you mean 'MLP'? valid: "]),
    "unknown optimizer": (dict(optimizer__type="Adm"), ["optimizer.type: unknown optimizer 'Adm'; did you mean 'Adam'?"]),
    "unknown scheduler": (dict(lr_scheduler__type="StepLr"), ["did you mean 'StepLR'?"]),
    "unknown loss": (dict(loss="cross_entropyy"), ["loss.type: unknown loss 'cross_entropyy'; did you mean 'cross_entropy'?"]),
    "unknown metric": (dict(metrics=["acuracy"]), ["metrics: unknown metric 'acuracy'; did you mean 'accuracy'?"]),
    "unknown data loader": (dict(data_loader__type="Digits"), ["data_loader.type: unknown data loader 'Digits'"]),
    "model arg not accepted": (dict(arch__args={"hidden_size": [3]}), ["arch.args: MLP takes no argument 'hidden_size'; did you mean 'hidden_sizes'?"]),
    "optimizer arg not accepted": (dict(optimizer__args={"lr": 0.1, "momentun": 0.9}), ["did you mean 'momentum'?"]),
    "loader arg not accepted": (dict(data_loader__args={"batch_sise": 4}), ["did you mean 'batch_size'?"]),
    "scheduler arg missing": (dict(lr_scheduler__args={}), ["lr_scheduler.args: StepLR needs argument 'step_size'"]),
    "wrong type": (dict(trainer__epochs="ten"), ['trainer.epochs: got "ten", expected a positive integer']),
    "wrong bool": (dict(trainer__tensorboard="yes"), ['trainer.tensorboard: got "yes", expected true or false']),
    "bad device": (dict(device="gpu"), ['device: got "gpu", expected "auto", "cpu", "cuda", "cuda:N" or "mps"']),
    "several GPUs by n_gpu": (dict(n_gpu=4), ["n_gpu: 4 GPUs are trained by torchrun, one process each: torchrun"
                                              " --nproc_per_node=4 train.py -c CONFIG (n_gpu may be 0, the CPU, or 1)"]),
    "n_gpu against device": (dict(n_gpu=0, device="cuda"), ['n_gpu: 0 (the CPU) and device "cuda" say different things']),
    "monitor typo": (dict(trainer__monitor="max val_acc"), ["trainer.monitor: 'val_acc' will not exist; did you mean 'val_accuracy'?"]),
    "monitor needs validation": (dict(trainer__monitor="min val_loss", data_loader__args={"validation_split": 0}),
                                 ["trainer.monitor: 'val_loss' needs validation data"]),
    "monitor format": (dict(trainer__monitor="lowest loss"), ["trainer.monitor: got"]),
    "bad optimizer value": (dict(optimizer__args={"lr": 0.1, "momentum": -1}),
                            ["optimizer.args: SGD rejected its arguments: Invalid momentum value"]),
    "negative lr": (dict(optimizer__args={"lr": -1}), ["optimizer.args.lr: got -1, expected a learning rate >= 0"]),
    "negative lr in a param group": (dict(optimizer__param_groups=[{"params": ["net.0.*"], "lr": -0.01}]),
                                     ["optimizer.param_groups[0].lr: got -0.01, expected a learning rate >= 0"]),
    "negative max_lr": (dict(lr_scheduler={"type": "OneCycleLR", "args": {"max_lr": [-0.1], "total_steps": 99}}),
                        ["lr_scheduler.args.max_lr: got [-0.1], expected a learning rate >= 0"]),
    "bad split": (dict(data_loader__args={"validation_split": 1.5}), ["data_loader.args.validation_split"]),
    "freeze matches nothing": (dict(trainer__freeze=["encoder.*"]), ["trainer.freeze: pattern 'encoder.*' matches no parameter; parameter names look like: net.1.weight"]),
    "fp16 on cpu": (dict(trainer__amp="fp16"), ['trainer.amp: "fp16" needs a CUDA device']),
    "missing required": (dict(arch=None), ["arch: missing (this key is required)"]),
    "section not an object": (dict(optimizer="SGD"), ['optimizer: expected {"type": NAME, "args": {...}}, got "SGD"']),
    "unknown logger": (dict(trainer__loggers=["mlflw"]), [
        'trainer.loggers: got ["mlflw"], expected a list of "tensorboard", "csv", "mlflow" or {"type": NAME, "args":'
        " {...}} ('mlflw' is none of them; did you mean 'mlflow'?)"]),
    "loggers not a list": (dict(trainer__loggers="tensorboard"), ['trainer.loggers: got "tensorboard", expected a list']),
    "tensorboard takes no args": (dict(trainer__loggers=[{"type": "tensorboard", "args": {"dir": "x"}}]),
                                  ["(tensorboard takes no args)"]),
    "tensorboard false, loggers name it": (dict(trainer__loggers=["tensorboard"]), [
        'trainer.tensorboard: false, but trainer.loggers ["tensorboard"] names "tensorboard"; the two say the same'
        " thing: keep trainer.loggers alone"]),
    "tensorboard true, loggers leave it out": (dict(trainer__tensorboard=True, trainer__loggers=[]), [
        'trainer.tensorboard: true, but trainer.loggers [] leaves "tensorboard" out']),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_config_is_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    changes, expected = BAD[case]
    config = with_changes(make_config(tmp_path / "saved"), **changes)
    if config.get("arch", 1) is None:
        del config["arch"]
    code, lines = run_cli(tmp_path, capsys, config)
    assert code == 2
    assert len(lines) == len(expected), lines
    for line, want in zip(lines, expected):
        assert line.startswith("error: ") and want in line, line
    assert not (tmp_path / "saved").exists()


def test_all_problems_reported_at_once(tmp_path, capsys):
    config = with_changes(make_config(tmp_path / "saved"), trainer__epoch=3, optimizer__type="Adm", metrics=["acc"])
    code, lines = run_cli(tmp_path, capsys, config)
    assert code == 2 and len(lines) == 3, lines
    assert [line.split(":")[1].strip() for line in lines] == ["trainer.epoch", "optimizer.type", "metrics"]


@pytest.mark.parametrize("trainer,loggers", [
    ({}, ["tensorboard"]),  # the default
    ({"tensorboard": True}, ["tensorboard"]),
    ({"tensorboard": False}, []),
    ({"tensorboard": True, "loggers": ["tensorboard"]}, ["tensorboard"]),  # a pair that agrees
    ({"tensorboard": False, "loggers": []}, []),
    ({"loggers": []}, []),
])
def test_trainer_tensorboard_is_resolved_into_loggers(trainer, loggers, tmp_path):
    config = make_config(tmp_path / "saved")
    del config["trainer"]["tensorboard"]
    config["trainer"].update(trainer)
    checked = validate_config(config, registries())["trainer"]
    assert checked["loggers"] == loggers and "tensorboard" not in checked  # the rest of the code reads loggers alone


def test_a_checkpoint_of_an_older_version_resumes_with_its_loggers(tmp_path):
    # Before trainer.tensorboard was an alias, a checkpoint's config held both keys, and TensorBoard was on where
    # both said so: "tensorboard": false beside the default loggers, say, which this version refuses in a config.
    config = make_config(tmp_path / "saved", epochs=1)
    run.train(config, run_id="old")
    folder = tmp_path / "saved/models/tiny/old"
    state = torch.load(folder / "checkpoint-epoch1.pth", weights_only=True)
    state["config"]["trainer"].update(tensorboard=False, loggers=["tensorboard"])
    torch.save(state, folder / "checkpoint-epoch1.pth")
    assert cli.train_command(["-r", str(folder / "checkpoint-epoch1.pth"), "trainer.epochs=2"]) == 0
    assert torch.load(folder / "checkpoint-epoch2.pth", weights_only=True)["epoch"] == 2
    assert json.loads((folder / "config.json").read_text())["trainer"]["loggers"] == []
    assert not list((tmp_path / "saved/log/tiny/old").glob("events.out.tfevents*"))
    assert saved_config({"trainer": {"tensorboard": True, "loggers": ["csv"]}}) == {"trainer": {"loggers": ["csv"]}}


def test_a_logger_whose_part_was_deleted_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "parts.csv_logger" else real(name, *a))
    code, lines = run_cli(tmp_path, capsys, make_config(tmp_path / "saved", loggers=["csv"]))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: trainer.loggers csv: needs the csv_logger part") and "parts/csv_logger.py" in lines[0]
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("text,want", [("{\"name\": ", "not valid JSON at line 1"), ("[1, 2]", "must be a mapping")])
def test_unparsable_config(tmp_path, capsys, text, want):
    code, lines = run_cli(tmp_path, capsys, text)
    assert code == 2 and len(lines) == 1 and want in lines[0]


def test_bad_override_and_missing_file(tmp_path, capsys):
    code, lines = run_cli(tmp_path, capsys, make_config(tmp_path / "saved"), "trainer.epochs")
    assert code == 2 and lines == ["error: override 'trainer.epochs' is not of the form key.path=VALUE (for example trainer.epochs=3)"]
    assert cli.train_command(["-c", str(tmp_path / "nope.json")]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("override,quoted", [
    ("metrics=[accuracy]", "'metrics=[\"accuracy\"]'"),
    ("metrics=[accuracy,top_k_acc]", "'metrics=[\"accuracy\",\"top_k_acc\"]'"),
    ("trainer.freeze=[net.0.*]", "'trainer.freeze=[\"net.0.*\"]'"),
    ("arch.args={input_size:16, num_classes:3, hidden_sizes:[8]}",
     "'arch.args={\"input_size\":16, \"num_classes\":3, \"hidden_sizes\":[8]}'"),
])
def test_a_list_override_whose_quotes_the_shell_dropped_says_to_quote_it(tmp_path, capsys, override, quoted):
    """``metrics=[accuracy]`` in a shell arrives as the text "[accuracy]": one line showing the override quoted, not a
    list of its characters (and the quoted override it shows is valid)."""
    code, lines = run_cli(tmp_path, capsys, make_config(tmp_path / "saved"), override)
    assert code == 2 and len(lines) == 1, lines
    assert "the shell dropped its quotes" in lines[0] and lines[0].endswith(quoted), lines[0]
    assert not (tmp_path / "saved").exists()
    from utils.config import apply_overrides

    fixed = apply_overrides(make_config(tmp_path / "saved"), [quoted.strip("'")])
    validate_config(fixed, registries())


def test_existing_run_id_is_refused(tmp_path, capsys):
    config = make_config(tmp_path / "saved", epochs=1)
    assert run_cli(tmp_path, capsys, config, "--run-id", "a")[0] == 0
    code, lines = run_cli(tmp_path, capsys, config, "--run-id", "a")
    assert code == 2 and "already exists" in lines[0]


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None, "truncated", "foreign"])
def test_missing_or_damaged_checkpoint(tmp_path, capsys, content):
    import torch

    path = tmp_path / "ckpt.pth"
    if content == "truncated":
        config = make_config(tmp_path / "saved", epochs=1)
        run.train(config, run_id="t")
        data = (tmp_path / "saved/models/tiny/t/checkpoint-epoch1.pth").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    elif content is not None:
        path.write_bytes(content)
    for command in (cli.train_command, evaluate_cli.test_command):
        assert command(["-r", str(path)]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], lines


def test_missing_dataset_is_one_line(tmp_path, capsys):
    config = json.loads((ROOT / "configs/mnist.json").read_text())
    config["data_loader"]["args"].update(data_dir=str(tmp_path / "data"), download=False)
    config["trainer"]["save_dir"] = str(tmp_path / "saved")
    code, lines = run_cli(tmp_path, capsys, config)
    assert code == 2 and len(lines) == 1
    assert "train-images-idx3-ubyte" in lines[0] and "t10k-labels-idx1-ubyte" in lines[0]
    assert not (tmp_path / "saved").exists()


def test_no_traceback_from_the_real_command(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(with_changes(make_config(tmp_path / "saved"), trainer__epoch=1)))
    out = subprocess.run([sys.executable, "train.py", "-c", str(path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: trainer.epoch: unknown key; did you mean 'epochs'? valid: " + ", ".join(
            __import__("utils.config").config.TRAINER_KEYS)]
    assert not (tmp_path / "saved").exists()
