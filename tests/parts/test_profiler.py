"""The profiler (parts/profiler.py): a Chrome trace in the run's log folder and the top operators printed; a dry run
is not profiled."""

import json
from pathlib import Path

import pytest

from conftest import with_changes
from trainer import run
from utils.errors import ConfigError


def test_profile_writes_a_chrome_trace_and_prints_top_ops(tiny_config, capsys):
    config = with_changes(tiny_config, trainer__profile={"wait": 1, "warmup": 1, "active": 2}, trainer__verbosity=1)
    run.train(config, run_id="prof")
    trace = Path(config["trainer"]["save_dir"]) / "log" / "tiny" / "prof" / "profile-trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)
    out = capsys.readouterr().out
    assert "Self CPU" in out and "aten::" in out and out.count("Profile of 2 steps") == 1


def test_profile_shorter_epoch_than_schedule_still_writes(tiny_config):
    config = with_changes(tiny_config, trainer__profile={"wait": 1, "warmup": 1, "active": 50}, trainer__epochs=1)
    run.train(config, run_id="prof")
    assert (Path(config["trainer"]["save_dir"]) / "log" / "tiny" / "prof" / "profile-trace.json").is_file()


def test_a_dry_run_is_not_profiled(tiny_config, capsys):
    pytest.importorskip("parts.debug")
    config = with_changes(tiny_config, trainer__profile=True, trainer__verbosity=1)
    run.train(with_changes(config, trainer__fast_dev_run=2))
    assert "Profile of" not in capsys.readouterr().out
    assert not Path(config["trainer"]["save_dir"]).exists()


@pytest.mark.parametrize("value,expected", [
    ({"active": 0}, "trainer.profile: got {\"active\": 0}, expected active to be a positive integer"),
    ({"wiat": 1}, "did you mean 'wait'"),
    ("yes", "trainer.profile: got \"yes\", expected true, false, null or a mapping with keys wait, warmup, active"),
])
def test_bad_settings_are_one_line_config_errors(tiny_config, value, expected):
    with pytest.raises(ConfigError) as err:
        run.checked_config(with_changes(tiny_config, trainer__profile=value))
    assert len(err.value.problems) == 1 and expected in err.value.problems[0]
