"""``trainer.auto_accumulate`` under torchrun (parts/auto_accumulate.py): all processes switch together.

2 CPU processes (gloo) launched by torchrun run ``train.py``'s command line through a driver
that makes the MLP's training forward raise ``torch.OutOfMemoryError`` on one chosen process,
at a chosen count of batches of a chosen size (the first training forward of a run is the
memory check's). What is checked:

- an out-of-memory error in the memory check on one process switches both to half the batch
  and twice the accumulation, and the run ends with the weights of a run started that way,
  bit for bit (the same operations on the same data in the same order; the check changes nothing);
- the switch is in the checkpoint (config, ``batch_changes``), the manifest and the log, and a
  resume continues with the smaller batch on both processes;
- without an out-of-memory error the check leaves the run bit-identical to a run without
  ``auto_accumulate`` (with dropout on: the check restores the RNG);
- a batch of 1 that does not fit stops both processes with one message and exit code 12;
- an out-of-memory error later in the run stops both processes (exit code 12, no hang, no new
  checkpoint) with a message whose resume command works.
"""

import json

import pytest
import torch

NAME = "oom_dist"
WORLD = 2
BATCH = 16  # per process: 112 training samples per process, 7 batches of 16 (14 of 8) per epoch
EXIT_OUT_OF_MEMORY = 12

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

# Each job is one train.py command line; rank r writes <out>.rank<r>.json with the exit code and the batch
# size of every training forward this process ran. The process exits with the last job's code. A job's
# "save_last_every": a resumable last.pth every that many optimizer steps (conftest's save_last_hook).
DRIVER = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
from model.builtin import MLP
from tests.conftest import add_hooks, save_last_hook
from trainer.cli import train_command

rank = int(os.environ["RANK"])
original = MLP.forward
job, seen = {{}}, []


def forward(self, x):
    if self.training:
        seen.append(x.shape[0])
        oom = job.get("oom")
        if oom and rank == oom["rank"] and oom["batch"] in (None, x.shape[0]):
            count = sum(1 for b in seen if oom["batch"] in (None, b))
            if oom["at"] in (None, count):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
    return original(self, x)


MLP.forward = forward
code = 0
for job in json.load(open(sys.argv[1])):
    del seen[:]
    undo = add_hooks(save_last_hook(job["save_last_every"])) if job.get("save_last_every") else lambda: None
    code = train_command(job["argv"])
    undo()
    with open(job["out"] + f".rank{{rank}}.json", "w") as f:
        json.dump({{"code": code, "batches": list(seen)}}, f)
sys.exit(code)
"""


def config(save_dir, batch_size=BATCH, epochs=2, **trainer):
    """A run of a second: an MLP with dropout on 224 + 32 synthetic samples, 4x4 inputs, 3 classes."""
    return {
        "name": NAME,
        "seed": 3,
        "device": "cpu",
        "arch": {"type": "MLP", "args": {"input_size": 16, "hidden_sizes": [8], "num_classes": 3, "dropout": 0.2}},
        "data_loader": {
            "type": "SyntheticDataLoader",
            "args": {"num_samples": 256, "input_shape": [1, 4, 4], "num_classes": 3, "noise": 3.0,
                     "test_fraction": 0.0, "batch_size": batch_size, "shuffle": True, "validation_split": 32},
        },
        "optimizer": {"type": "SGD", "args": {"lr": 0.1, "momentum": 0.9}},
        "lr_scheduler": None,
        "loss": "logsumexp_cross_entropy",
        "metrics": ["accuracy"],
        "trainer": {"epochs": epochs, "save_dir": str(save_dir), "save_period": 1, "verbosity": 1,
                    "tensorboard": False, "monitor": "off", "test_after_train": False, **trainer},
    }


def job(tmp, label, argv=None, cfg=None, run_id=None, oom=None, save_last_every=None):
    if cfg is not None:
        path = tmp / f"{label}.json"
        path.write_text(json.dumps(cfg))
        argv = ["-c", str(path), "--run-id", run_id or label, *(argv or [])]
    return {"argv": argv, "out": str(tmp / label), "oom": oom, "save_last_every": save_last_every}


def results(tmp, label):
    return [json.loads((tmp / f"{label}.rank{r}.json").read_text()) for r in range(WORLD)]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def run_dir(tmp, run_id):
    return tmp / "models" / NAME / run_id


def assert_identical(a, b):
    """Bit for bit: on the CPU the runs compared do the same operations on the same data in the same order."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs by {(a[key] - b[key]).abs().max().item()}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, torchrun):
    """One launch: the memory check of process 1 runs out of memory (1 epoch), that run resumed to epoch 2, the
    run started with half the batch and twice the accumulation, a run with and one without the check, and the
    first one's mid-epoch ``last.pth`` resumed with an out-of-memory error in process 0's check."""
    tmp = tmp_path_factory.mktemp("oom_dist")
    first = run_dir(tmp, "switch") / "checkpoint-epoch1.pth"
    output = torchrun.jobs(tmp, DRIVER, [
        job(tmp, "switch", cfg=config(tmp, epochs=1, auto_accumulate=True), oom={"rank": 1, "batch": BATCH, "at": 1}),
        job(tmp, "resumed", argv=["-r", str(first), "trainer.epochs=2"]),
        job(tmp, "reference", cfg=config(tmp, batch_size=BATCH // 2, accumulate_grad_batches=2)),
        job(tmp, "checked", cfg=config(tmp, auto_accumulate=True), save_last_every=10),
        job(tmp, "plain", cfg=config(tmp)),
        # last.pth of step 10 (epoch 2, batch 3 of 7), resumed into a new folder; process 0's check runs out.
        job(tmp, "midway", argv=["-r", str(run_dir(tmp, "checked") / "last.pth")],
            oom={"rank": 0, "batch": BATCH, "at": 1}),
    ], "runs", check=True).output
    return {"tmp": tmp, "output": output}


def test_out_of_memory_in_one_process_switches_every_process(runs):
    tmp = runs["tmp"]
    rank0, rank1 = results(tmp, "switch")
    assert rank0["code"] == rank1["code"] == 0
    # Process 1 ran out in its check with 16; process 0's passed; both checked 8, then trained 14 batches of 8.
    assert rank1["batches"] == [16] + [8] * 15, rank1["batches"]
    assert rank0["batches"] == [16] + [8] * 15, rank0["batches"]
    assert "on process 1 of 2 in the memory check before epoch 1, step 1 with a batch of 16 per process:" \
           " continuing with batches of 8 and accumulate_grad_batches 2" in runs["output"]


def test_the_switched_run_is_the_run_started_small(runs):
    tmp = runs["tmp"]
    assert_identical(load(run_dir(tmp, "switch") / "checkpoint-epoch1.pth")["model"],
                     load(run_dir(tmp, "reference") / "checkpoint-epoch1.pth")["model"])


def test_checkpoint_manifest_and_config_record_the_switch(runs):
    folder = run_dir(runs["tmp"], "switch")
    state = load(folder / "checkpoint-epoch1.pth")
    assert state["config"]["data_loader"]["args"]["batch_size"] == 8
    assert state["config"]["trainer"]["accumulate_grad_batches"] == 2
    assert state["global_step"] == 7 and state["world_size"] == WORLD
    (change,) = state["batch_changes"]
    assert change["batch_size"] == [16, 8] and change["accumulate_grad_batches"] == [1, 2]
    assert change["epoch"] == 1 and change["global_step"] == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["batch_changes"][0]["batch_size"] == [16, 8]
    assert json.loads((folder / "config.json").read_text())["data_loader"]["args"]["batch_size"] == 8


def test_a_resume_continues_with_the_smaller_batch_on_every_process(runs):
    tmp = runs["tmp"]
    for rank in results(tmp, "resumed"):
        assert rank["code"] == 0 and rank["batches"] == [8] * 15, rank  # the check, then 14 batches of 8
    state = load(run_dir(tmp, "switch") / "checkpoint-epoch2.pth")
    assert len(state["batch_changes"]) == 1 and state["config"]["data_loader"]["args"]["batch_size"] == 8
    assert_identical(state["model"], load(run_dir(tmp, "reference") / "checkpoint-epoch2.pth")["model"])


def test_the_memory_check_changes_nothing(runs):
    tmp = runs["tmp"]
    checked, plain = results(tmp, "checked"), results(tmp, "plain")
    for with_check, without in zip(checked, plain):
        assert with_check["batches"] == [16] + without["batches"] == [16] * 15  # one forward more: the check
    for epoch in (1, 2):
        assert_identical(load(run_dir(tmp, "checked") / f"checkpoint-epoch{epoch}.pth")["model"],
                         load(run_dir(tmp, "plain") / f"checkpoint-epoch{epoch}.pth")["model"])


def test_a_mid_epoch_resume_switches_and_goes_on_from_the_same_sample(runs):
    """Batch 3 of 16 samples done becomes batch 6 of 8; the rest of the epoch is the same samples, in halves."""
    tmp = runs["tmp"]
    for rank in results(tmp, "midway"):
        assert rank["code"] == 0 and rank["batches"] == [16] + [8] * 9, rank  # both checks, 8 batches left
    folder = run_dir(tmp, "checked-from-last")
    state = load(folder / "checkpoint-epoch2.pth")
    assert state["global_step"] == 14 and state["batch_changes"][0]["global_step"] == 10
    # Rank 0's running count: both processes' 2 x 3 x 16 samples before last.pth, then its own 8 batches of 8
    # (restarting at batch 3 of 8 samples instead of 6 would give 96 + 11 x 8).
    assert state["train_metrics"]["count"] == 2 * 3 * 16 + 8 * 8
    # Two half batches average to the full batch's gradient up to rounding: the weights agree to float precision.
    for key, value in load(run_dir(tmp, "plain") / "checkpoint-epoch2.pth")["model"].items():
        torch.testing.assert_close(state["model"][key], value, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, torchrun):
    """One launch: a batch of 1 that does not fit on process 0, then a run whose process 1 runs out of memory in the
    second batch of epoch 2 (its 10th forward of 16: the check, 7 in epoch 1, then 2)."""
    tmp = tmp_path_factory.mktemp("oom_dist_stop")
    launch = torchrun.jobs(tmp, DRIVER, [
        job(tmp, "tiny", cfg=config(tmp, batch_size=4, auto_accumulate=True), oom={"rank": 0, "batch": None, "at": None}),
        job(tmp, "late", cfg=config(tmp, auto_accumulate=True), oom={"rank": 1, "batch": BATCH, "at": 10}),
    ], "stop")
    return {"tmp": tmp, "code": launch.returncode, "output": launch.output}


def test_a_batch_of_one_that_does_not_fit_stops_every_process(stopped):
    tmp, output = stopped["tmp"], stopped["output"]
    for rank in results(tmp, "tiny"):
        assert rank["code"] == EXIT_OUT_OF_MEMORY, output[-6000:]
    assert output.count("with a batch of 1 sample per process, in the memory check") == 1, output[-6000:]
    assert not list(run_dir(tmp, "tiny").glob("*.pth"))
    changes = json.loads((run_dir(tmp, "tiny") / "manifest.json").read_text())["batch_changes"]
    assert [c["batch_size"] for c in changes] == [[4, 2], [2, 1]]


def test_out_of_memory_later_stops_every_process_without_saving(stopped):
    tmp, output = stopped["tmp"], stopped["output"]
    assert stopped["code"] != 0, output[-6000:]
    rank0, rank1 = results(tmp, "late")
    assert rank1["code"] == EXIT_OUT_OF_MEMORY and rank0["code"] == EXIT_OUT_OF_MEMORY, output[-6000:]
    assert rank1["batches"][-1] == 16 and len(rank1["batches"]) == 10
    folder = run_dir(tmp, "late")
    assert sorted(p.name for p in folder.glob("*.pth")) == ["checkpoint-epoch1.pth"]
    assert "out of memory on process 1 at epoch 2, step 9, with a batch of 16" in output
    assert "another process stopped: out of memory on process 1" in output  # process 0's own message
    command = f"python train.py -r {folder / 'checkpoint-epoch1.pth'} data_loader.args.batch_size=8" \
              " trainer.accumulate_grad_batches=2"
    assert command in output, output[-6000:]


def test_the_resume_command_of_the_message_works(stopped, torchrun):
    tmp = stopped["tmp"]
    argv = f"-r {run_dir(tmp, 'late') / 'checkpoint-epoch1.pth'} data_loader.args.batch_size=8" \
           " trainer.accumulate_grad_batches=2"
    torchrun.jobs(tmp, DRIVER, [job(tmp, "advised", argv=argv.split())], "advised", check=True)
    for rank in results(tmp, "advised"):
        assert rank["batches"] == [8] * 15
    state = load(run_dir(tmp, "late") / "checkpoint-epoch2.pth")
    assert state["epoch"] == 2 and state["config"]["data_loader"]["args"]["batch_size"] == 8


@pytest.mark.slow  # (make test's 5 minutes: run with make test-slow)
def test_torchrun_restarts_do_not_train_into_the_same_error_again(tmp_path, torchrun):
    """With --max-restarts, torchrun restarts the processes that stopped for memory; -r auto would resume the same
    checkpoint with the same batch and run out at the same step. The restarted rounds stop at once instead."""
    cfg = config(tmp_path, auto_accumulate=True)
    launch = torchrun.jobs(tmp_path, DRIVER, [job(tmp_path, "again", argv=["-r", "auto"], cfg=cfg,
                                                  oom={"rank": 1, "batch": BATCH, "at": 10})], "again",
                           torchrun_args=["--max-restarts=2"])
    output = launch.output
    assert launch.returncode != 0, output[-6000:]
    assert output.count("another process stopped: out of memory") == 1, output[-6000:]  # one round trained
    # rounds 1 and 2: each process stops before training, with the first round's message
    assert output.count("an earlier round of this torchrun launch stopped: out of memory on process 1") == 4, \
        output[-6000:]
    for rank in results(tmp_path, "again"):  # the last round's processes: no training forward, exit 12
        assert rank == {"code": EXIT_OUT_OF_MEMORY, "batches": []}, rank
    assert sorted(p.name for p in run_dir(tmp_path, "again").glob("*.pth")) == ["checkpoint-epoch1.pth"]


# ---------------------------------------------------------------- the memory check's parts, in this process


class _Batches:
    """Two batches of 6 samples of 4 features, as a loader gives them (``set_epoch``, iteration)."""

    def __init__(self):
        self.data = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
        self.epochs = []

    def set_epoch(self, epoch, start_batch=0):
        self.epochs.append((epoch, start_batch))

    def __iter__(self):
        return iter([(self.data[:6], torch.zeros(6, dtype=torch.long)), (self.data[6:], torch.ones(6, dtype=torch.long))])


def _probe_trainer(model):
    import contextlib
    from types import SimpleNamespace

    from trainer.trainer import default_step

    return SimpleNamespace(model=model, forward_model=model, data_loader=_Batches(), device=torch.device("cpu"),
                           optimizer=torch.optim.Adam(model.parameters()), autocast=contextlib.nullcontext(),
                           criterion=torch.nn.functional.cross_entropy, step=default_step,
                           no_sync=lambda last_in_window: contextlib.nullcontext())


def test_the_memory_check_puts_back_rng_buffers_and_gradients():
    from parts.auto_accumulate import out_of_memory_in_probe

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 3))
    trainer = _probe_trainer(model)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    assert out_of_memory_in_probe(trainer, epoch=4) is False
    assert torch.equal(torch.rand(3), expected_draw)  # the dropout masks' draws were given back
    for key, value in model.state_dict().items():  # batch-norm statistics and counter as before
        assert torch.equal(value, buffers[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert trainer.data_loader.epochs == [(4, 0)]  # the first batch of the epoch about to be trained


def test_the_memory_check_reports_out_of_memory_and_still_puts_back():
    from parts.auto_accumulate import out_of_memory_in_probe

    class Fails(torch.nn.Module):
        def forward(self, x):
            raise torch.OutOfMemoryError("injected")

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), Fails())
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    assert out_of_memory_in_probe(_probe_trainer(model), epoch=1) is True
    for key, value in model.state_dict().items():  # the batch norm ran before the error: its statistics are back
        assert torch.equal(value, buffers[key]), key


def test_optimizer_state_bytes_is_what_the_first_step_makes():
    from parts.auto_accumulate import optimizer_state_bytes

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    params = sum(p.numel() for p in model.parameters()) * 4  # float32
    assert optimizer_state_bytes(torch.optim.Adam(model.parameters())) == 2 * params
    assert optimizer_state_bytes(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)) == params
    assert optimizer_state_bytes(torch.optim.SGD(model.parameters(), lr=0.1)) == 0
    model[0].weight.requires_grad_(False)  # frozen: no gradient, no state
    frozen = params - model[0].weight.numel() * 4
    assert optimizer_state_bytes(torch.optim.AdamW(model.parameters())) == 2 * frozen
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == 0  # the state exists already: the check runs beside it
    assert all(p.device.type == "cpu" for p in model.parameters())
