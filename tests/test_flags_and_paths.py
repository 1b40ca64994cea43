"""Issue 24, item 7 and 5: a shortcut flag and its override together, control characters in run ids, ``~`` in paths,
and a stop signal during the test scoring after training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_config
from trainer import cli, evaluate_cli, run
from utils.config import validate_config

ROOT = Path(__file__).resolve().parents[1]


def run_cli(tmp_path, capsys, config, *extra, command=cli.train_command):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    code = command(["-c", str(path), *extra])
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line]


@pytest.mark.parametrize("flag, override", [
    (["--lr", "0.1"], "optimizer.args.lr=0.2"),
    (["--lr", "0.1"], "optimizer.args.lr=0.1"),  # the same value: still two ways to say one thing
    (["--bs", "8"], "data_loader.args.batch_size=16"),
    (["-d", "cpu"], "device=cpu"),
    (["--device", "cpu"], "device=auto"),
    (["--fast-dev-run", "1"], "trainer.fast_dev_run=2"),
])
def test_a_shortcut_and_the_override_of_its_key_are_one_error(tmp_path, capsys, flag, override):
    code, lines = run_cli(tmp_path, capsys, make_config(tmp_path / "saved", epochs=1), *flag, override)
    key = override.partition("=")[0]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert override in lines[0] and flag[0].lstrip("-")[:2] in lines[0] and f"both set {key}" in lines[0], lines
    assert not (tmp_path / "saved").exists()


def test_test_py_refuses_device_flag_and_override_together(tmp_path, capsys):
    assert evaluate_cli.test_command(["-r", str(tmp_path / "none.pth"), "-d", "cpu", "device=cpu"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "--device cpu and the override device=cpu both set device" in lines[0], lines


def test_a_shortcut_with_another_override_still_works(tmp_path, capsys):
    code, lines = run_cli(tmp_path, capsys, make_config(tmp_path / "saved", epochs=1), "--lr", "0.05",
                          "optimizer.args.momentum=0.5", "--run-id", "x")
    assert code == 0, lines
    saved = json.loads((tmp_path / "saved/models/tiny/x/config.json").read_text())
    assert saved["optimizer"]["args"] == {"lr": 0.05, "momentum": 0.5}


@pytest.mark.parametrize("run_id", ["a\nb", "a\tb", "job\r", "\x1b[31mred", "a\x7fb", "a\x85b", "a\x9bb"])
def test_a_run_id_with_a_control_character_is_one_line(tmp_path, capsys, run_id):
    code, lines = run_cli(tmp_path, capsys, make_config(tmp_path / "saved"), "--run-id", run_id)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --run-id:"), lines
    assert "control character" in lines[0], lines
    assert not (tmp_path / "saved").exists()


def test_a_name_with_a_control_character_is_one_line(tmp_path, capsys):
    config = make_config(tmp_path / "saved")
    config["name"] = "tiny\nrun"
    code, lines = run_cli(tmp_path, capsys, config)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: name:") and "control character" in lines[0]
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("save_dir, under", [("~/x", "x"), ("~", "."), ("~/deep/er/", "deep/er")])
def test_a_tilde_in_save_dir_is_the_home_folder_everywhere(tmp_path, capsys, monkeypatch, save_dir, under):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    config = make_config(save_dir, epochs=1, verbosity=1)
    code, lines = run_cli(tmp_path, capsys, config, "--run-id", "r")
    assert code == 0, lines
    folder = (home / under).resolve() / "models/tiny/r"
    assert (folder / "checkpoint-epoch1.pth").is_file()
    assert not any(cwd.iterdir()), list(cwd.iterdir())  # no folder named "~"
    saved = json.loads((folder / "config.json").read_text())
    assert saved["trainer"]["save_dir"] == os.path.expanduser(save_dir) and "~" not in saved["trainer"]["save_dir"]


def test_a_tilde_in_data_paths_is_expanded_where_the_config_is_checked(tmp_path, monkeypatch):
    from trainer.build import registries

    monkeypatch.setenv("HOME", str(tmp_path))
    config = make_config("saved/")
    config["data_loader"] = {"type": "MnistDataLoader", "args": {"data_dir": "~/data", "batch_size": 8}}
    checked = validate_config(config, registries())
    assert checked["data_loader"]["args"]["data_dir"] == str(tmp_path / "data")
    assert checked["trainer"]["save_dir"] == "saved/"  # no "~": unchanged, not even normalised


# --------------------------------------------------------------------------- a stop during the test scoring


def config_with_test_split(tmp_path):
    """Training of one short epoch, then a test split of 1,000 samples."""
    config = make_config(tmp_path / "saved", epochs=1, monitor="off")
    config["data_loader"]["args"].update(num_samples=2000, test_fraction=0.5)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    return path


# train.py whose final test scoring says it has started (a file) and then waits for the test's signal, whose handler
# raises inside the wait: the signal lands in the scoring however fast the machine is.
HELD_SCORING = (
    "import pathlib, runpy, sys, time\n"
    "import trainer.run\n"
    "marker = pathlib.Path(sys.argv[1])\n"
    "def held(*args, **kwargs):\n"
    "    marker.write_text('scoring')\n"
    "    deadline = time.monotonic() + 600\n"
    "    while time.monotonic() < deadline:\n"
    "        time.sleep(0.05)\n"
    "    raise SystemExit('no signal came')\n"
    "trainer.run.evaluate_checkpoint = held\n"
    "sys.argv = ['train.py', *sys.argv[2:]]\n"
    "runpy.run_path('train.py', run_name='__main__')\n"
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_stop_signal_during_the_test_scoring_says_training_is_complete(tmp_path, sig):
    path = config_with_test_split(tmp_path)
    command = [sys.executable, "train.py", "-c", str(path), "--run-id", "job"]
    scoring = tmp_path / "scoring"
    proc = subprocess.Popen([sys.executable, "-c", HELD_SCORING, str(scoring), *command[2:]], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "saved/models/tiny/job"
    result = folder / "result.json"
    deadline = time.time() + 300
    while not scoring.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)  # polling for the file
    assert proc.poll() is None and result.exists(), proc.communicate()  # result.json is written before the scoring
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (out, err)
    lines = [line for line in err.splitlines() if line]
    scored = folder / "checkpoint-epoch1.pth"
    assert len(lines) == 1 and "training is complete" in lines[0], lines
    assert f"score it with: python test.py -r {scored}" in lines[0], lines
    assert "Traceback" not in out + err
    written = json.loads(result.read_text())
    assert written["epochs"] == 1 and written["test"] is None and written["test_checkpoint"] == scored.name

    if sig == signal.SIGTERM:  # -r auto then scores the test split, as the run would have (once is enough)
        again = subprocess.run([*command, "-r", "auto"], cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert again.returncode == 0, again.stderr
        assert "training is complete; test split (1000 samples, checkpoint-epoch1.pth)" in again.stderr
        written = json.loads(result.read_text())
        assert written["test"]["n_samples"] == 1000 and written["test_checkpoint"] == scored.name
        assert json.loads(scored.with_suffix(".test.json").read_text())["loss"] == written["test"]["loss"]
        again = subprocess.run([*command, "-r", "auto"], cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert again.returncode == 0 and "nothing to resume" in again.stderr, again.stderr  # scored: done


def test_result_json_of_an_unscored_run_names_no_test_checkpoint(tmp_path):
    config = make_config(tmp_path / "saved", epochs=1, test_after_train=False)
    run.train(config, run_id="r")
    written = json.loads((tmp_path / "saved/models/tiny/r/result.json").read_text())
    assert written["test"] is None and written["test_checkpoint"] is None
