"""TensorBoard output of a real (tiny) run, read back the way a user sees it.

The event files are read with tensorboard's own readers (``EventAccumulator`` for the
view TensorBoard shows, ``event_file_loader`` for the raw records), and a real
``tensorboard`` server is started to check the scalars through its HTTP data API.

The tiny run: SyntheticDataLoader with 200 samples, of which 20% are the test split
and 20% of the rest validation, so 128 training samples in batches of 16 give
8 optimizer steps per epoch; 3 epochs are global steps 1..24.
"""

import copy
import glob
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing import event_accumulator, event_file_loader  # noqa: E402
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2  # noqa: E402

from logger.logger import TensorboardWriter, WriterContext, open_writer  # noqa: E402
from logger.writers import Writer, Writers  # noqa: E402
from trainer.run import train as main  # noqa: E402

LOG_EVERY = 2
STEPS_PER_EPOCH = 8  # 128 training samples / batch size 16
EPOCHS = 3
STEPPED_TAGS = ["train/loss", "train/grad_norm", "lr/group0", "epoch/loss", "epoch/val_loss", "epoch/accuracy",
                "epoch/val_accuracy", "epoch/epoch"]
LAYERS = ["net.1.weight", "net.1.bias", "net.4.weight", "net.4.bias"]  # MLP: Flatten, Linear, ReLU, Dropout, Linear


def make_config(save_dir, epochs=EPOCHS):
    return {
        "name": "tb",
        "seed": 0,
        "device": "cpu",
        "arch": {"type": "MLP", "args": {"input_size": 64, "hidden_sizes": [16], "num_classes": 3}},
        "data_loader": {
            "type": "SyntheticDataLoader",
            "args": {"num_samples": 200, "input_shape": [1, 8, 8], "num_classes": 3, "batch_size": 16,
                     "validation_split": 0.2},
        },
        "optimizer": {"type": "SGD", "args": {"lr": 0.1}},
        "loss": "cross_entropy",
        "metrics": ["accuracy"],
        "trainer": {
            "epochs": epochs,
            "save_dir": str(save_dir),
            "log_every_n_steps": LOG_EVERY,
            "histogram_every": 1,
            "activation_histograms": ["net.1"],
            "monitor": "min val_loss",
            "verbosity": 0,
        },
    }


def accumulate(log_dir):
    """What TensorBoard shows for the run folder (all event files, orphaned steps purged)."""
    guidance = {kind: 0 for kind in (event_accumulator.SCALARS, event_accumulator.IMAGES,
                                     event_accumulator.HISTOGRAMS, event_accumulator.COMPRESSED_HISTOGRAMS,
                                     event_accumulator.TENSORS, event_accumulator.AUDIO)}
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance=guidance)
    acc.Reload()
    return acc


def raw_summaries(log_dir):
    """Every summary value in every event file of ``log_dir``, in file order: ``[(step, tag, value_proto)]``."""
    files = sorted(glob.glob(os.path.join(str(log_dir), "events.out.tfevents.*")))
    assert files, f"no event files in {log_dir}"
    out = []
    for path in files:
        for event in event_file_loader.LegacyEventFileLoader(path).Load():
            if event.HasField("summary"):
                out.extend((event.step, value.tag, value) for value in event.summary.value)
    return out


def raw_scalar_steps(log_dir, tag):
    return [(step, value.simple_value) for step, t, value in raw_summaries(log_dir) if t == tag]


def steps_of(acc, tag):
    return [e.step for e in acc.Scalars(tag)]


def assert_strictly_increasing(steps, what):
    assert steps, f"{what}: no points"
    duplicates = sorted({s for s in steps if steps.count(s) > 1})
    assert all(a < b for a, b in zip(steps, steps[1:])), (
        f"{what}: steps are not strictly increasing: {steps} (duplicated: {duplicates})")


def only_run_folder(save_dir, kind):
    folders = [p for p in (Path(save_dir) / kind / "tb").iterdir() if p.is_dir()]
    assert len(folders) == 1, f"expected one run folder under {kind}/tb, got {folders}"
    return folders[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One 3-epoch run shared by the read-back tests: ``(log_dir, metrics, accumulator)``."""
    save_dir = tmp_path_factory.mktemp("tb_run")
    metrics = main(make_config(save_dir), run_id="r1")
    log_dir = save_dir / "log" / "tb" / "r1"
    assert log_dir.is_dir()
    return log_dir, metrics, accumulate(log_dir)


# --------------------------------------------------------------------------- event files


def test_scalar_tags_have_strictly_increasing_steps(trained_run):
    _, _, acc = trained_run
    scalars = acc.Tags()[event_accumulator.SCALARS]
    for tag in STEPPED_TAGS:
        assert tag in scalars, f"scalar {tag} missing; tags: {scalars}"
    for tag in STEPPED_TAGS:
        if tag == "lr/group0":
            continue  # see test_lr_logged_once_per_step (known duplicate at epoch ends)
        assert_strictly_increasing(steps_of(acc, tag), tag)
    last_step = EPOCHS * STEPS_PER_EPOCH
    epoch_steps = [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]
    for tag in ("epoch/loss", "epoch/val_loss", "epoch/accuracy", "epoch/val_accuracy", "epoch/epoch"):
        assert steps_of(acc, tag) == epoch_steps, tag
    assert [e.value for e in acc.Scalars("epoch/epoch")] == [1.0, 2.0, 3.0]
    assert steps_of(acc, "train/grad_norm") == steps_of(acc, "train/loss")
    assert max(steps_of(acc, "lr/group0")) == last_step
    assert all(math.isclose(e.value, 0.1, rel_tol=1e-6) for e in acc.Scalars("lr/group0"))


def test_train_loss_steps_are_multiples_of_log_every(trained_run):
    _, _, acc = trained_run
    steps = steps_of(acc, "train/loss")
    assert all(step % LOG_EVERY == 0 for step in steps), steps
    # every logging step of the run, none skipped
    assert steps == list(range(LOG_EVERY, EPOCHS * STEPS_PER_EPOCH + 1, LOG_EVERY))


def test_epoch_scalars_match_returned_metrics(trained_run):
    _, metrics, acc = trained_run
    assert metrics["epoch"] == EPOCHS
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        last = acc.Scalars(f"epoch/{key}")[-1].value  # stored as float32
        assert math.isclose(last, metrics[key], rel_tol=1e-6, abs_tol=1e-7), (key, last, metrics[key])
    # the hparams metrics are the same final values, in the run's hparams folder
    hparams = accumulate(trained_run[0] / "hparams")
    assert math.isclose(hparams.Scalars("hparam/loss")[-1].value, metrics["loss"], rel_tol=1e-6)
    assert "hparam/loss" not in acc.Tags()[event_accumulator.SCALARS]


def test_lr_logged_once_per_step(trained_run):
    """At most one lr/group0 point per step."""
    log_dir, _, acc = trained_run
    assert_strictly_increasing(steps_of(acc, "lr/group0"), "lr/group0")
    assert_strictly_increasing([s for s, _ in raw_scalar_steps(log_dir, "lr/group0")], "lr/group0 (raw)")


def test_image_and_histograms(trained_run):
    _, _, acc = trained_run
    tags = acc.Tags()
    assert "inputs" in tags[event_accumulator.IMAGES], tags[event_accumulator.IMAGES]
    images = acc.Images("inputs")
    assert [im.step for im in images] == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]  # once per epoch
    for im in images:
        assert im.width * im.height == 16 * 8 * 8, (im.width, im.height)  # a grid of the 16 8x8 inputs
        assert im.encoded_image_string.startswith(b"\x89PNG")

    histograms = tags[event_accumulator.HISTOGRAMS]
    expected = [f"params/{n}" for n in LAYERS] + [f"grads/{n}" for n in LAYERS] + ["activations/net.1"]
    missing = [t for t in expected if t not in histograms]
    assert not missing, f"histograms missing: {missing}; got {histograms}"
    for tag in expected:  # histogram_every=1: one per epoch
        assert [h.step for h in acc.Histograms(tag)] == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)], tag
    assert acc.Histograms("params/net.1.weight")[-1].histogram_value.num == 64 * 16
    assert acc.Histograms("grads/net.4.bias")[-1].histogram_value.num == 3
    # net.1 is the first Linear: its output for the epoch's last batch is 16 samples x 16 units
    assert acc.Histograms("activations/net.1")[-1].histogram_value.num == 16 * 16


def hparams_records(log_dir):
    """Every HParams session record under a run's log folder (its sub-folders included), as parsed protos."""
    starts = [plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content).session_start_info
              for folder in [log_dir, *(p for p in log_dir.rglob("*") if p.is_dir())]
              if glob.glob(os.path.join(str(folder), "events.out.tfevents.*"))
              for _, tag, value in raw_summaries(folder) if tag == "_hparams_/session_start_info"]
    return starts


def test_hparams_plugin_data(trained_run):
    log_dir, metrics, _ = trained_run
    # one record, in <run>/hparams/ (a run of its own, rewritten at each end), none in the run's own event file
    assert [p.name for p in log_dir.iterdir() if p.is_dir()] == ["hparams"]
    assert not [tag for _, tag, _ in raw_summaries(log_dir) if tag.startswith("_hparams_")]
    assert len(glob.glob(str(log_dir / "hparams" / "events.out.tfevents.*"))) == 1
    acc = accumulate(log_dir / "hparams")
    content = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(content)
    assert acc.SummaryMetadata("_hparams_/experiment").plugin_data.plugin_name == "hparams"

    (start,) = hparams_records(log_dir)
    assert math.isclose(start.hparams["optimizer.args.lr"].number_value, 0.1)
    assert start.hparams["arch.type"].string_value == "MLP"
    assert start.hparams["trainer.log_every_n_steps"].number_value == LOG_EVERY
    assert json.loads(start.hparams["arch.args.hidden_sizes"].string_value) == [16]  # a list as its JSON text
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert {f"hparam/{k}" for k in metrics if k != "epoch"} | {"hparam/best_val_loss"} <= metric_tags
    for tag in metric_tags:  # each metric once, at the run's last step
        assert steps_of(acc, tag) == [EPOCHS * STEPS_PER_EPOCH], tag
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"]).session_end_info
    assert end.status == api_pb2.STATUS_SUCCESS


# --------------------------------------------------------------------------- resume


def test_resume_continues_the_same_tensorboard_run(tmp_path):
    config = make_config(tmp_path, epochs=2)
    first = main(config)
    assert first["epoch"] == 2
    checkpoint_dir = only_run_folder(tmp_path, "models")
    log_dir = only_run_folder(tmp_path, "log")
    checkpoint = checkpoint_dir / "checkpoint-epoch2.pth"
    assert checkpoint.is_file()
    files_before = set(log_dir.glob("events.out.tfevents.*"))
    (start,) = hparams_records(log_dir)
    assert start.hparams["trainer.epochs"].number_value == 2

    config3 = copy.deepcopy(config)
    config3["trainer"]["epochs"] = 3
    resumed = main(config3, resume=str(checkpoint))
    assert resumed["epoch"] == 3

    # no second run folder: the resumed run wrote into the same log and checkpoint folders
    assert only_run_folder(tmp_path, "log") == log_dir
    assert only_run_folder(tmp_path, "models") == checkpoint_dir
    assert (checkpoint_dir / "checkpoint-epoch3.pth").is_file()
    assert set(log_dir.glob("events.out.tfevents.*")) > files_before, "the resumed run wrote no event file"

    # raw records of all event files: exactly one epoch/loss point per epoch, steps increasing
    raw = raw_scalar_steps(log_dir, "epoch/loss")
    steps = [s for s, _ in raw]
    assert_strictly_increasing(steps, "epoch/loss (raw)")
    assert steps == [STEPS_PER_EPOCH * e for e in range(1, 4)]
    assert math.isclose(raw[-1][1], resumed["loss"], rel_tol=1e-6)
    assert math.isclose(raw[1][1], first["loss"], rel_tol=1e-6)
    train_steps = [s for s, _ in raw_scalar_steps(log_dir, "train/loss")]
    assert train_steps == list(range(LOG_EVERY, 3 * STEPS_PER_EPOCH + 1, LOG_EVERY))

    # and TensorBoard's own view of the folder agrees
    acc = accumulate(log_dir)
    assert steps_of(acc, "epoch/loss") == steps
    assert steps_of(acc, "epoch/epoch") == steps
    assert [e.value for e in acc.Scalars("epoch/epoch")] == [1.0, 2.0, 3.0]

    # one hparams record, replaced by the resume's: the final config and values, each value once
    (start,) = hparams_records(log_dir)
    assert start.hparams["trainer.epochs"].number_value == 3
    hparams = accumulate(log_dir / "hparams")
    assert [(e.step, e.value) for e in hparams.Scalars("hparam/loss")] == [(3 * STEPS_PER_EPOCH, pytest.approx(resumed["loss"], rel=1e-6))]
    best = min(e.value for e in acc.Scalars("epoch/val_loss"))
    assert hparams.Scalars("hparam/best_val_loss")[-1].value == pytest.approx(best, rel=1e-6)


def test_resume_from_an_earlier_checkpoint_drops_the_orphaned_steps(tmp_path):
    """Resuming a finished 3-epoch run from epoch 2 rewrites steps 17..24: TensorBoard must show them once."""
    config = make_config(tmp_path, epochs=3)
    main(config)
    checkpoint_dir, log_dir = only_run_folder(tmp_path, "models"), only_run_folder(tmp_path, "log")
    resumed = main(copy.deepcopy(config), resume=str(checkpoint_dir / "checkpoint-epoch2.pth"), overwrite=True)  # in place
    assert only_run_folder(tmp_path, "log") == log_dir

    # the raw files hold epoch 3 twice; the purge_step record makes readers drop the first copy
    assert [s for s, _ in raw_scalar_steps(log_dir, "epoch/loss")] == [8, 16, 24, 24]
    acc = accumulate(log_dir)
    for tag in ("epoch/loss", "epoch/val_loss", "train/loss", "train/grad_norm"):
        assert_strictly_increasing(steps_of(acc, tag), tag)
    assert steps_of(acc, "epoch/loss") == [8, 16, 24]
    assert math.isclose(acc.Scalars("epoch/loss")[-1].value, resumed["loss"], rel_tol=1e-6)
    assert steps_of(acc, "train/loss") == list(range(LOG_EVERY, 3 * STEPS_PER_EPOCH + 1, LOG_EVERY))
    assert [h.step for h in acc.Histograms("activations/net.1")] == [8, 16, 24]


# --------------------------------------------------------------------------- the writer (logger/logger.py)


class Recorder(Writer):
    """A logger of one's own: it records what it is given, and keeps a run id in checkpoints."""

    def __init__(self, name):
        self.name, self.calls = name, []

    def add_scalar(self, tag, value, step):
        self.calls.append(("scalar", tag, value, step))

    def add_images(self, tag, images, step):
        self.calls.append(("images", tag, step))

    def add_hparams(self, hparams, metrics):
        self.calls.append(("hparams", hparams, metrics))

    def checkpoint_state(self):
        return {self.name: {"run_id": self.name + "-1"}}

    def run_ids(self):
        return {self.name: self.name + "-1"}


def test_writers_hand_each_call_to_every_logger():
    import torch

    one, two = Recorder("one"), Recorder("two")
    writer = Writers([one, two])
    assert writer and not Writers([])
    writer.add_scalar("train/loss", 0.5, 3)
    writer.add_scalars({"loss": 1.0}, 4, prefix="epoch/")
    writer.add_histogram("params/w", torch.zeros(3), 4)  # neither takes histograms: the base class does nothing
    writer.add_images("inputs", torch.zeros(1, 1, 2, 2), 4)
    writer.add_hparams({"lr": 0.1}, {"hparam/loss": 1.0})
    assert one.calls == two.calls == [("scalar", "train/loss", 0.5, 3), ("scalar", "epoch/loss", 1.0, 4),
                                      ("images", "inputs", 4), ("hparams", {"lr": 0.1}, {"hparam/loss": 1.0})]
    assert writer.checkpoint_state() == {"one": {"run_id": "one-1"}, "two": {"run_id": "two-1"}}
    assert writer.run_ids() == {"one": "one-1", "two": "two-1"}
    plain = Writers([Writer()])  # a logger keeping no run of its own: none of the optional methods, nothing kept
    assert plain.checkpoint_state() == {} and plain.run_ids() == {} and plain.finish("folder") is None
    writer.close()
    assert not writer


def test_the_writer_a_run_gets(tmp_path):
    context = WriterContext({"trainer": {"loggers": ["tensorboard"]}}, tmp_path, "r")
    writer = open_writer(context.config, context)
    assert isinstance(writer, TensorboardWriter) and writer  # one logger: itself, no fan-out in between
    writer.close()
    assert isinstance(open_writer(context.config, context, enabled=False), Writers)  # a process that does not log
    assert not open_writer(context.config, context, enabled=False)
    nothing = WriterContext({"trainer": {"loggers": []}}, tmp_path, "r")
    assert not open_writer(nothing.config, nothing)
    assert context.saved("mlflow") == {}
    assert WriterContext({}, tmp_path, "r", state={"trackers": {"mlflow": {"run_id": "x"}}}).saved("mlflow") == {"run_id": "x"}


# --------------------------------------------------------------------------- a real tensorboard server


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(base, path, **params):
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200, url
        return json.loads(response.read().decode())


def _post_json(base, path, body):
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read().decode())


def _start_tensorboard(logdir, out_path):
    """Start ``tensorboard`` on a free port; returns ``(process, base_url)`` once it answers."""
    deadline = time.monotonic() + 60
    for _attempt in range(3):  # another process may take the free port before tensorboard binds it
        port = _free_port()
        out = open(out_path, "ab")
        # --load_fast=false: the pure-Python data provider, no rustboard subprocess to clean up
        proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
             "--port", str(port), "--load_fast=false", "--reload_interval", "1"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        out.close()
        base = f"http://127.0.0.1:{port}"
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                _get_json(base, "/data/runs")
                return proc, base
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        if proc.poll() is None:  # deadline passed while it was still running
            return proc, None
    return proc, None


def _stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _poll(fetch, ready, deadline):
    """``fetch()`` until ``ready(result)`` or the deadline; returns the last result."""
    while True:
        result = fetch()
        if ready(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_tensorboard_server_serves_the_run(trained_run, tmp_path):
    log_dir, metrics, acc = trained_run
    logdir_root = log_dir.parent.parent  # <save_dir>/log: runs are named "<name>/<run_id>"
    run = "tb/r1"
    server_log = tmp_path / "tensorboard.out"
    proc, base = _start_tensorboard(logdir_root, server_log)
    try:
        output = server_log.read_text(errors="replace") if server_log.exists() else ""
        assert base is not None, f"tensorboard did not answer within 60 s (exit code {proc.poll()}):\n{output}"
        deadline = time.monotonic() + 60

        runs = _poll(lambda: _get_json(base, "/data/runs"), lambda r: run in r, deadline)
        assert sorted(runs) == [run, f"{run}/hparams"], runs  # the run, and its HParams record

        tags = _poll(lambda: _get_json(base, "/data/plugin/scalars/tags"),
                     lambda t: "epoch/loss" in t.get(run, {}), deadline)
        for tag in STEPPED_TAGS:
            assert tag in tags[run], f"{tag} not served; got {sorted(tags[run])}"

        expected_points = len(acc.Scalars("epoch/loss"))
        points = _poll(lambda: _get_json(base, "/data/plugin/scalars/scalars", run=run, tag="epoch/loss"),
                       lambda p: len(p) >= expected_points, deadline)
        # [[wall_time, step, value], ...] -- the same points as the event files
        assert [(step, value) for _, step, value in points] == [(e.step, e.value) for e in acc.Scalars("epoch/loss")]
        assert [step for _, step, _ in points] == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]
        assert math.isclose(points[-1][2], metrics["loss"], rel_tol=1e-6, abs_tol=1e-7)

        val = _get_json(base, "/data/plugin/scalars/scalars", run=run, tag="epoch/val_accuracy")
        assert math.isclose(val[-1][2], metrics["val_accuracy"], rel_tol=1e-6, abs_tol=1e-7)
        train_loss = _get_json(base, "/data/plugin/scalars/scalars", run=run, tag="train/loss")
        assert [step for _, step, _ in train_loss] == list(range(LOG_EVERY, EPOCHS * STEPS_PER_EPOCH + 1, LOG_EVERY))

        images = _get_json(base, "/data/plugin/images/tags")
        assert "inputs" in images[run], images
        histograms = _get_json(base, "/data/plugin/histograms/tags")
        assert {"activations/net.1", "params/net.1.weight", "grads/net.1.weight"} <= set(histograms[run]), histograms

        # the HParams tab: one session (the run's record), its config and final values
        request = {"experimentName": "", "startIndex": 0, "sliceSize": 10,
                   "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
                   "colParams": [{"metric": {"tag": "hparam/val_loss"}}, {"hparam": "optimizer.args.lr"}]}
        groups = _post_json(base, "/data/plugin/hparams/session_groups", request)["sessionGroups"]
        assert [[s["name"] for s in g["sessions"]] for g in groups] == [[f"{run}/hparams"]], groups
        assert groups[0]["hparams"]["optimizer.args.lr"] == pytest.approx(0.1)
        values = {m["name"]["tag"]: m["value"] for m in groups[0]["metricValues"]}
        assert values["hparam/val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-6)
    finally:
        _stop(proc)
    assert proc.poll() is not None
