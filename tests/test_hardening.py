"""Hostile inputs, one class per test (issue 11): each case is one clear line, never a traceback.

Every test tries several values of its class, not only the example the issue quotes, and
goes through the functions the entry points call (``load_config``, ``apply_overrides``,
``validate_config``, ``load_checkpoint``, ``atomic_write``), so it holds whatever the
command line around them looks like.
"""

import errno
import io
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

import utils.errors as errors
import utils.io as io_utils
from conftest import make_config, with_changes
from trainer.build import registries
from utils.config import apply_overrides, load_config, validate_config
from utils.errors import ConfigError, UserError


def one_line(err):
    """The single problem line of a UserError (and that it is one line)."""
    problems = err.value.problems
    assert len(problems) == 1, problems
    assert "\n" not in problems[0] and "Traceback" not in problems[0], problems[0]
    return problems[0]


def changed(config, dotted, value):
    """``with_changes`` for one ``a__b__0__c`` path, where a number indexes a list."""
    config = with_changes(config)
    node, *path = [config, *dotted.split("__")]
    for part in path[:-1]:
        node = node[int(part) if part.isdigit() else part]
    node[path[-1]] = value
    return config


def config_problem(config):
    with pytest.raises(ConfigError) as err:
        validate_config(config, registries())
    return one_line(err)


@pytest.fixture
def base(tmp_path):
    return make_config(tmp_path / "saved")


# --------------------------------------------------------------------------- item 4: values accepted silently


@pytest.mark.parametrize("dotted,value,key", [
    ("optimizer__args__lr", True, "optimizer.args.lr"),
    ("optimizer__args__momentum", False, "optimizer.args.momentum"),
    ("optimizer__args__lr", "0.01", "optimizer.args.lr"),
    ("lr_scheduler__args__gamma", True, "lr_scheduler.args.gamma"),
    ("lr_scheduler__args__step_size", "3", "lr_scheduler.args.step_size"),
    ("arch__args__dropout", True, "arch.args.dropout"),
    ("data_loader__args__noise", False, "data_loader.args.noise"),
    ("loss__args__label_smoothing", True, "loss.args.label_smoothing"),
    ("loss__args__ignore_index", "-100", "loss.args.ignore_index"),
    ("optimizer__param_groups__0__lr", True, "optimizer.param_groups[0].lr"),
    ("optimizer__param_groups__0__momentum", "0.5", "optimizer.param_groups[0].momentum"),
])
def test_a_number_is_never_a_boolean_or_a_string(base, dotted, value, key):
    base = with_changes(base, loss={"type": "logsumexp_cross_entropy", "args": {}},
                        optimizer__param_groups=[{"params": ["net.*"], "lr": 0.1}])
    line = config_problem(changed(base, dotted, value))
    assert line.startswith(f"{key}: got {json.dumps(value)}, expected a"), line
    assert line.endswith(("expected a number", "expected an integer")), line


@pytest.mark.parametrize("dotted,value,key", [
    ("data_loader__args__shuffle", "no", "data_loader.args.shuffle"),
    ("data_loader__args__drop_last", "yes", "data_loader.args.drop_last"),
    ("data_loader__args__in_memory", 0, "data_loader.args.in_memory"),
    ("optimizer__args__nesterov", "false", "optimizer.args.nesterov"),
    ("optimizer__args__maximize", 1, "optimizer.args.maximize"),
])
def test_a_boolean_is_never_a_string_or_a_number(base, dotted, value, key):
    line = config_problem(with_changes(base, **{dotted: value}))
    assert line == f"{key}: got {json.dumps(value)}, expected true or false", line


@pytest.mark.parametrize("text,key,line_no", [
    ('{"name": "a",\n "name": "b"}', "name", 2),
    ('{"optimizer": {"type": "SGD",\n  "args": {"lr": 0.1,\n           "lr": 0.2}}}', "optimizer.args.lr", 3),
    ('{"optimizer": {"param_groups": [{"params": ["a"],\n "lr": 1, "lr": 2}]}}', "optimizer.param_groups[].lr", 2),
    ('{"trainer": {"epochs": 1},\n\n "trainer": {"epochs": 2}}', "trainer", 3),
])
def test_duplicate_keys_in_json(tmp_path, text, key, line_no):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_config(path)
    line = one_line(err)
    assert f"line {line_no}: key {key!r} appears twice" in line and str(path) in line, line


@pytest.mark.parametrize("text,key,line_no", [
    ("name: a\nname: b\n", "name", 2),
    ("optimizer:\n  type: SGD\n  args: {lr: 0.1, lr: 0.2}\n", "lr", 3),
    ("trainer:\n  epochs: 1\n  epochs: 2\n", "epochs", 3),
])
def test_duplicate_keys_in_yaml(tmp_path, text, key, line_no):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_config(path)
    line = one_line(err)
    assert f"at line {line_no}" in line and f"duplicate key {key!r}" in line, line


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    # (the anchor's key is not "base": that names a config to build on, utils/compose.py)
    path.write_text("shared: &b {lr: 0.1, momentum: 0.9}\nopt:\n  <<: *b\n  lr: 0.2\n")
    assert load_config(path)["opt"] == {"lr": 0.2, "momentum": 0.9}


# --------------------------------------------------------------------------- item 5: reading the config


@pytest.mark.parametrize("suffix,data,where", [
    (".json", b'{"name": "caf\xe9"}', "line 1, column 14"),
    (".json", b'{\n  "name": "x",\n  "seed": \xff\xfe1}', "line 3, column 11"),
    (".yaml", b"name: tiny\nsave_dir: /data/\x80\x81\n", "line 2, column 17"),
    (".json", b'\xfe\xff\x00{\x00}', "line 1, column 1"),  # UTF-16
])
def test_non_utf8_config_is_one_line(tmp_path, suffix, data, where):
    path = tmp_path / f"c{suffix}"
    path.write_bytes(data)
    with pytest.raises(UserError) as err:
        load_config(path)
    line = one_line(err)
    assert "not UTF-8 text" in line and where in line and str(path) in line, line


@pytest.mark.parametrize("text,want", [
    ("name: x\nseed: 2024-01-31\n", "seed: got a date (datetime.date(2024, 1, 31))"),
    ("name: x\nwhen: 2024-01-31 10:00:00\n", "when: got a timestamp"),
    ("name: x\nmetrics: !!set {accuracy, top_k_acc}\n", "metrics: got a set"),
    ("name: x\nblob: !!binary aGVsbG8=\n", "blob: got binary data"),
    ("name: x\ntrainer: {1: 2}\n", "trainer: key 1 is a int; keys must be strings"),
    ("name: x\noptimizer: {args: {lr: .nan}}\n", "optimizer.args.lr: got nan, expected a finite number"),
    ("name: x\noptimizer: {args: {lr: -.inf}}\n", "optimizer.args.lr: got -inf, expected a finite number"),
])
def test_yaml_values_that_json_cannot_hold(tmp_path, text, want):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_config(path)
    line = one_line(err)
    assert want in line and str(path) in line, line


LAUGHS = "name: x\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("case", ["json list", "json object", "yaml flow", "yaml alias loop", "yaml billion laughs",
                                  "override", "python dict"])
def test_absurd_nesting_is_one_line(tmp_path, base, case):
    depth = 200_000
    if case == "override":
        with pytest.raises(UserError) as err:
            apply_overrides(base, ["arch.args.x=" + "[" * depth + "]" * depth])
        assert "nested too deeply" in one_line(err)
        return
    if case == "python dict":
        config = with_changes(base, arch__args__x={})
        node = config["arch"]["args"]["x"]
        for _ in range(5_000):
            node["a"] = {}
            node = node["a"]
        assert "nested more than" in config_problem(config)
        return
    text = {
        "json list": '{"x": ' + "[" * depth + "]" * depth + "}",
        "json object": '{"x": ' + '{"a": ' * depth + "1" + "}" * depth + "}",
        "yaml flow": "x: " + "[" * 20_000 + "]" * 20_000 + "\n",
        "yaml alias loop": "x: &a\n  - *a\n",
        "yaml billion laughs": LAUGHS,
    }[case]
    path = tmp_path / ("c.yaml" if case.startswith("yaml") else "c.json")
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_config(path)
    line = one_line(err)
    assert "nested" in line or "contains itself" in line or "more than 100000 values" in line, line


@pytest.mark.parametrize("text,token,where", [
    ('{"optimizer": {"args": {"lr": NaN}}}', "NaN", "line 1, column 31"),
    ('{"trainer": {\n  "clip_grad_norm": Infinity}}', "Infinity", "line 2, column 21"),
    ('{"seed": -Infinity}', "-Infinity", "line 1, column 10"),
])
def test_json_nan_and_infinity_are_refused(tmp_path, text, token, where):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_config(path)
    line = one_line(err)
    assert f"{token} at {where} is not a finite number" in line, line


@pytest.mark.parametrize("override", ["optimizer.args.lr=NaN", "optimizer.args.lr=Infinity",
                                      "trainer.clip_grad_norm=-Infinity", "arch.args.hidden_sizes=[16, NaN]",
                                      "optimizer.args.lr=1e999"])
def test_override_nan_and_infinity_are_refused(base, override):
    with pytest.raises(UserError) as err:
        apply_overrides(base, [override])
    line = one_line(err)
    assert line.startswith(f"override {override!r}: ") and "finite number" in line, line


@pytest.mark.parametrize("where,value", [
    ("seed", 2**64), ("seed", 2**63), ("seed", 10**30), ("data_loader.args.data_seed", 2**64),
    ("data_loader.args.data_seed", -1),
])
def test_seed_outside_64_bits(base, where, value):
    config = with_changes(base, **{where.replace(".", "__"): value})
    assert config_problem(config) == f"{where}: got {value}, expected an integer from 0 to 2**63 - 1"


@pytest.mark.parametrize("where,value", [
    ("arch.args.num_classes", 0), ("arch.args.num_classes", -3), ("data_loader.args.num_classes", 0),
    ("arch.args.input_size", 0), ("data_loader.args.batch_size", 0), ("data_loader.args.num_samples", -5),
    ("lr_scheduler.args.step_size", 0), ("data_loader.args.prefetch_factor", 0),
    ("arch.args.hidden_sizes", [16, 0]), ("data_loader.args.num_workers", -1),
])
def test_counts_that_must_be_positive(base, where, value):
    line = config_problem(with_changes(base, **{where.replace(".", "__"): value}))
    assert line.startswith(f"{where}: got {json.dumps(value)}, expected a") and ("positive" in line or ">= 0" in line), line


# --------------------------------------------------------------------------- item 6: paths that escape save_dir


BAD_NAMES = ["../../x", "/tmp/abs", "a/b", "..", ".", "a\x00b", "x" * 256, "é" * 128, "a\\b", "", "ok\udcff"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=range(len(BAD_NAMES)))
def test_name_is_a_single_path_component(base, name):
    line = config_problem(with_changes(base, name=name))
    assert line.startswith("name: ") and ("got" in line or "UTF-8" in line), line


@pytest.mark.parametrize("name", BAD_NAMES, ids=range(len(BAD_NAMES)))
def test_check_path_component(name):
    from utils import config

    line = config.check_path_component(name, "--run-id")
    assert line and line.startswith("--run-id: got ") and "\n" not in line
    assert config.check_path_component("run-2024_01.a", "--run-id") is None
    assert config.check_path_component("é" * 127, "--run-id") is None  # 254 bytes


# --------------------------------------------------------------------------- item 11: messages


@pytest.mark.parametrize("where,value", [
    ("data_loader.args.validation_split", -0.1), ("data_loader.args.validation_split", -3),
    ("data_loader.args.validation_split", 1.0), ("data_loader.args.validation_split", "0.1"),
    ("data_loader.args.test_fraction", -0.2), ("data_loader.args.test_fraction", 1.5),
    ("data_loader.args.test_fraction", True),
])
def test_bad_fraction_is_reported_as_itself(base, where, value):
    line = config_problem(with_changes(base, **{where.replace(".", "__"): value}))  # one line: no monitor problem
    assert line.startswith(f"{where}: got {json.dumps(value)}, expected a"), line


def test_folder_given_as_a_file(tmp_path):
    with pytest.raises(UserError) as err:
        load_config(tmp_path)
    assert "is a folder, not a file" in one_line(err)
    with pytest.raises(UserError) as err:
        io_utils.load_checkpoint(tmp_path)
    assert "is a folder, not a file" in one_line(err)


class _Payload:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload,global_name", [
    (_Payload(os.system, "echo pwned"), "posix.system"),
    (_Payload(eval, "1+1"), "builtins.eval"),
    (_Payload(subprocess.Popen, ["true"]), "subprocess.Popen"),
    (_Payload(__import__("shutil").rmtree, "/nonexistent"), "shutil.rmtree"),
    (__import__("argparse").Namespace(lr=0.1), "argparse.Namespace"),
])
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_refused_pickle_names_the_blocked_global(tmp_path, payload, global_name, fmt):
    path = tmp_path / "evil.pth"
    torch.save({"model": payload, "config": {}, "epoch": 1}, path, _use_new_zipfile_serialization=fmt == "zip")
    with pytest.raises(UserError) as err:
        io_utils.load_checkpoint(path)
    line = one_line(err)
    assert global_name in line and "refused" in line and str(path) in line, line


# torch warns about the pickle protocol of the plain pickle written here on purpose, before refusing it.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_a_plain_pickle_is_refused_in_one_line(tmp_path, protocol):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"model": _Payload(os.system, "echo pwned")}, protocol=protocol))
    with pytest.raises(UserError) as err:
        io_utils.load_checkpoint(path)
    line = one_line(err)
    assert "was refused" in line and "posix.system" in line and str(path) in line, line


# --------------------------------------------------------------------------- item 7: malformed checkpoints


@pytest.fixture
def full_state():
    """A checkpoint as a training run writes it (see BaseTrainer.state_dict), without training."""
    from base.base_trainer import rng_state

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {
        "arch": "MLP", "config": make_config("saved"), "run_id": "r", "epoch": 1, "batch_in_epoch": 0,
        "global_step": 5, "world_size": 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "lr_scheduler": None, "monitor_best": 0.5, "not_improved_count": 0, "rng": rng_state(),
    }


def _drop(state, key):
    state.pop(key)
    return state


def _set(key, value):
    def change(state):
        state[key] = value
        return state
    return change


MALFORMED = {
    "only model, config, epoch": (lambda s: {k: s[k] for k in ("model", "config", "epoch")},
                                  "missing batch_in_epoch, global_step, optimizer, lr_scheduler, monitor_best,"
                                  " not_improved_count, rng"),
    "no optimizer": (lambda s: _drop(s, "optimizer"), "missing optimizer"),
    "model a list": (_set("model", [torch.zeros(2)]), "model is a list, expected a mapping"),
    "model of strings": (_set("model", {"weight": "x"}), "model should map parameter names to tensors, but 'weight' holds a str"),
    "config a list": (_set("config", [1, 2]), "config is a list, expected a mapping"),
    "epoch a string": (_set("epoch", "3"), "epoch is a str, expected an integer >= 0"),
    "negative step": (_set("global_step", -1), "global_step is a int, expected an integer >= 0"),
    "optimizer empty": (_set("optimizer", {}), "optimizer is a dict, expected an optimizer's state_dict()"),
    "rng a list": (_set("rng", []), "rng is a list, expected the random-number states"),
    "rng torch not tensor": (lambda s: {**s, "rng": {**s["rng"], "torch": [1]}}, "rng should hold torch's"),
    "mid-epoch without sums": (_set("batch_in_epoch", 3), "stopped mid-epoch but train_metrics"),
    "not a dict": (lambda s: [s], "it holds a list"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_checkpoint_names_what_is_wrong(tmp_path, full_state, case):
    change, want = MALFORMED[case]
    path = tmp_path / "c.pth"
    io_utils.save_checkpoint(full_state, path)
    assert io_utils.load_checkpoint(path, purpose="resume")["epoch"] == 1  # the unchanged one is fine
    torch.save(change(full_state), path)
    with pytest.raises(UserError) as err:
        io_utils.load_checkpoint(path, purpose="resume")
    line = one_line(err)
    assert want in line and str(path) in line, line


def test_weights_need_only_model_and_config(tmp_path, full_state):
    path = tmp_path / "w.pth"
    torch.save({"model": full_state["model"], "config": full_state["config"]}, path)
    assert io_utils.load_checkpoint(path, purpose="weights")["config"]["name"] == "tiny"
    with pytest.raises(UserError) as err:
        io_utils.load_checkpoint(path, purpose="resume")
    assert "missing epoch, batch_in_epoch" in one_line(err)
    torch.save({"model": [1], "config": {}}, path)
    with pytest.raises(UserError) as err:
        io_utils.load_checkpoint(path, purpose="weights")
    assert "model is a list" in one_line(err)


# --------------------------------------------------------------------------- item 2: disk full


def _failing_write(monkeypatch, err_no, stage):
    """Make the next atomic_write fail with ``err_no`` at ``stage`` (``write``, ``fsync`` or ``create``)."""
    error = OSError(err_no, os.strerror(err_no))
    if stage == "fsync":
        monkeypatch.setattr(io_utils.os, "fsync", lambda fd: (_ for _ in ()).throw(error))
    elif stage == "create":
        monkeypatch.setattr(io_utils.os, "open", lambda *args, **kw: (_ for _ in ()).throw(error))
    else:
        real_fdopen = os.fdopen

        class Full(io.RawIOBase):
            def __init__(self, f):
                self.f = f

            def write(self, data):
                self.f.write(bytes(data)[:10])  # part of it reaches the disk, then the disk is full
                raise error

            def fileno(self):
                return self.f.fileno()

            def close(self):
                self.f.close()
                super().close()

        monkeypatch.setattr(io_utils.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))


@pytest.mark.parametrize("stage", ["write", "fsync", "create"])
@pytest.mark.parametrize("err_no,kind,code", [
    (errno.ENOSPC, "DiskFullError", 28), (errno.EDQUOT, "DiskFullError", 28),
    (errno.EROFS, "WriteError", 73), (errno.EACCES, "WriteError", 73),
])
def test_a_failed_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, stage, err_no, kind, code):
    target = tmp_path / "model_best.pth"
    io_utils.save_checkpoint({"old": torch.ones(3)}, target)
    before = target.read_bytes()
    _failing_write(monkeypatch, err_no, stage)
    with pytest.raises(UserError) as err:
        io_utils.save_checkpoint({"new": torch.zeros(1000)}, target)
    line = one_line(err)
    assert type(err.value).__name__ == kind and err.value.exit_code == code
    assert str(target) in line
    if kind == "DiskFullError":
        assert str(tmp_path) in line and " free" in line and "needs about" in line, line
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_best.pth"]  # no temp file left


def test_exit_codes_are_documented():
    assert errors.UserError.exit_code == errors.ConfigError.exit_code == 2
    assert errors.DiskFullError.exit_code == 28 and issubclass(errors.DiskFullError, errors.WriteError)
    assert errors.WriteError.exit_code == 73 and issubclass(errors.WriteError, UserError)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, where mounting is allowed (root on Linux); skipped elsewhere."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.parametrize("size_kib", [900, 1200, 4096])
def test_disk_full_on_a_real_small_disk(small_disk, size_kib):
    target = small_disk / "checkpoint-epoch1.pth"
    io_utils.save_checkpoint({"w": torch.ones(60_000)}, target)  # about 240 KiB
    before = target.read_bytes()
    io_utils.write_json(small_disk / "config.json", {"a": 1})
    with pytest.raises(errors.DiskFullError) as err:
        io_utils.save_checkpoint({"w": torch.zeros(size_kib * 256)}, target)
    line = one_line(err)
    assert str(small_disk) in line and " free" in line and ("MiB" in line or "KiB" in line), line
    assert err.value.exit_code == 28
    assert target.read_bytes() == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["checkpoint-epoch1.pth", "config.json"]
    with pytest.raises(errors.DiskFullError):
        io_utils.write_json(small_disk / "config.json", {"big": "x" * 2_000_000})
    assert json.loads((small_disk / "config.json").read_text()) == {"a": 1}


# --------------------------------------------------------------------------- item 9: permissions and leftovers


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077, 0o027])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        io_utils.write_json(tmp_path / "config.json", {"a": 1})
        io_utils.save_checkpoint({"x": torch.ones(1)}, tmp_path / "last.pth")
        io_utils.write_json(tmp_path / "config.json", {"a": 2})  # replacing a file, too
    finally:
        os.umask(old)
    for name in ("config.json", "last.pth"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_a_temporary_name_already_taken_is_drawn_again(tmp_path, monkeypatch):
    """atomic_write's temporary file is created with O_EXCL under a random name: a name some file already has
    (a leftover of a killed write, say) makes it draw another, and that file is left alone."""
    names = iter(["aaaa0000", "aaaa0000", "bbbb1111"])
    monkeypatch.setattr(io_utils.secrets, "token_hex", lambda n: next(names))
    taken = tmp_path / ".config.json.aaaa0000.tmp"
    taken.write_text("someone else's")
    io_utils.write_json(tmp_path / "config.json", {"a": 1})
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}
    assert taken.read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == [taken.name, "config.json"]
    monkeypatch.setattr(io_utils.secrets, "token_hex", lambda n: "aaaa0000")  # every name taken: the save fails
    with pytest.raises(FileExistsError):
        io_utils.write_json(tmp_path / "config.json", {"a": 2})
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1} and taken.read_text() == "someone else's"


@pytest.mark.parametrize("target", ["last.pth", "checkpoint-epoch12.pth", "manifest.json", "model_best.pth"])
def test_lock_folder_removes_stale_temp_files(tmp_path, target, monkeypatch):
    # A real leftover: the name atomic_write gives its temporary file, kept by a write killed half-way.
    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(io_utils.os, "replace", killed)
    monkeypatch.setattr(io_utils.os, "unlink", lambda p: None)  # as if killed before the clean-up ran
    with pytest.raises(KeyboardInterrupt):
        io_utils.save_checkpoint({"x": torch.ones(1)}, tmp_path / target)
    monkeypatch.undo()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{target}.") and leftovers[0].endswith(".tmp")
    keep = [target, "notes.tmp", ".hidden", f".{target}.tmp", f".{target}.abc.tmp", "x.pth.a1b2c3d4.tmp"]
    for name in keep:
        (tmp_path / name).write_text("keep")
    (tmp_path / f".{target}.k3y_9Abc.tmp").mkdir()  # a folder of that shape is not ours
    lock = io_utils.lock_folder(tmp_path)  # the one writer of the folder now: the leftovers are stale
    lock.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, f".{target}.k3y_9Abc.tmp", ".lock"])


@pytest.mark.parametrize("kind", ["fifo", "link to fifo", "link to /dev/null", "/dev/null", "link to /dev/urandom",
                                  "dangling link"])
def test_a_special_file_as_checkpoint_is_named_and_never_opened(tmp_path, kind, capsys):
    """A FIFO (or a device, or a link to one) given as a checkpoint is named as what it is, not "not found", and never
    opened: opening a FIFO with no writer would hang, a device would be read without end."""
    from trainer import cli, evaluate_cli

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    path = {"fifo": fifo, "/dev/null": "/dev/null"}.get(kind, tmp_path / "link.pth")
    if kind.startswith("link") or kind == "dangling link":
        os.symlink({"link to fifo": fifo, "link to /dev/null": "/dev/null",
                    "link to /dev/urandom": "/dev/urandom"}.get(kind, tmp_path / "gone"), path)
    want = {"fifo": "is a FIFO (a named pipe), not a checkpoint file", "link to fifo": "is a FIFO",
            "link to /dev/null": "(a link to /dev/null) is a character device", "/dev/null": "is a character device",
            "link to /dev/urandom": "(a link to /dev/urandom) is a character device",
            "dangling link": "checkpoint not found"}[kind]
    with pytest.raises(UserError) as err:
        io_utils.load_checkpoint(path)
    assert want in one_line(err), one_line(err)
    for command in (cli.train_command, evaluate_cli.test_command):
        assert command(["-r", str(path)]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line]
        assert len(lines) == 1 and want in lines[0], lines
