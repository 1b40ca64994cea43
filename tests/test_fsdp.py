"""``trainer.strategy: "fsdp"`` (trainer/fsdp.py) and its sharded checkpoints (utils/sharded.py), on 1, 2 and 3 gloo
processes on the CPU.

What is checked: FSDP reaches DDP's weights on the same data and global batch (also with accumulation and clipping,
and with a frozen layer unfrozen mid-run); a SIGTERM mid-epoch writes a sharded ``last.pth`` whose resume ends
bit-identical to the run left alone; a 2-process checkpoint resumes on 1 and on 3 processes and a 1-process one on
2, the weights after loading equal to the saved ones; a ``kill -9`` during a sharded save leaves the previous
checkpoint loadable and ``-r auto`` resumes it; ``test.py`` scores a sharded checkpoint as its consolidated .pth;
each process's shards hold at most 0.6x of DDP's bytes; config mistakes are one ``error:`` line, exit 2.

A torchrun launch costs 12-27 s here: one launch serves most tests (module-scoped fixtures), the rest are slow.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

NAME = "fsdp_tiny"
GLOBAL_BATCH = 12  # 6 on 2 processes, 4 on 3, 12 on 1
N_TRAIN, N_VALID = 216, 33  # 18 steps per epoch on 1, 2 or 3 processes; validation uneven over 2 (17, 16)
SIGTERM_AT = 25  # epoch 2, batch 7 of 18
BLOCKS = ["net.1", "net.4"]  # MLP(hidden [64]): Flatten, Linear, ReLU, Dropout, Linear

# Rank r writes <out>.rank<r>.json per job. A job's "sigterm_at": every process sends itself SIGTERM after that
# optimizer step (the run stops with a sharded last.pth: RunStopped, caught); "loaded": after a resume has loaded its
# checkpoint, the whole weights (a collective) go to that file (rank 0); "pause": the sharded save of that checkpoint
# name writes its shards, then (rank 0) creates the file "pause" names and waits there until killed.
DRIVER = """
import json, os, signal, sys, threading
sys.path.insert(0, {repo!r})
import torch
from base.base_hook import Hook
from base.base_trainer import RunStopped
from tests.conftest import add_hooks
from trainer import run as train
from utils import resume, sharded

rank = int(os.environ["RANK"])

class Term(Hook):
    def __init__(self, at):
        self.at = at

    def after_step(self, trainer, epoch, batch_idx):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)

_restore, _publish = resume.restore, sharded.publish

for job in json.load(open(sys.argv[1])):
    def restore(trainer, start, job=job):
        _restore(trainer, start)
        if job.get("loaded"):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
            if rank == 0:
                torch.save({{"model": full, "global_step": trainer.global_step}}, job["loaded"])

    def publish(tmp, path, job=job):
        if job.get("pause") and path.name == job["pause_at"] and job.setdefault("seen", 0) == job["pause_skip"]:
            open(job["pause"], "w").close()
            threading.Event().wait()
        if job.get("pause") and path.name == job["pause_at"]:
            job["seen"] += 1
        _publish(tmp, path)

    resume.restore, sharded.publish = restore, publish
    undo = add_hooks(Term(job["sigterm_at"])) if job.get("sigterm_at") else lambda: None
    try:
        metrics = train.train(job["config"], resume=job.get("resume"), run_id=job.get("run_id"))
        stopped = None
    except RunStopped as err:
        metrics, stopped = None, err.exit_code
    undo()
    with open(f"{{job['out']}}.rank{{rank}}.json", "w") as f:
        json.dump({{"metrics": metrics, "stopped": stopped}}, f)
"""


def tiny_config(save_dir, world=2, epochs=2, **trainer):
    """An MLP on 216 + 33 synthetic samples, 4x4 inputs, 3 classes; the global batch of 12 over ``world`` processes."""
    return {
        "name": NAME, "seed": 3, "device": "cpu",
        "arch": {"type": "MLP", "args": {"input_size": 16, "hidden_sizes": [64], "num_classes": 3}},
        "data_loader": {"type": "SyntheticDataLoader",
                        "args": {"num_samples": N_TRAIN + N_VALID + 40, "input_shape": [1, 4, 4], "num_classes": 3,
                                 "noise": 3.0, "test_fraction": 40 / (N_TRAIN + N_VALID + 40),
                                 "batch_size": GLOBAL_BATCH // world, "shuffle": True, "validation_split": N_VALID}},
        "optimizer": {"type": "Adam", "args": {"lr": 0.01}},
        "loss": "logsumexp_cross_entropy", "metrics": ["accuracy"],
        "trainer": {"epochs": epochs, "save_dir": str(save_dir), "save_period": 1, "verbosity": 1, "loggers": [],
                    "monitor": "min val_loss", "log_every_n_steps": 4, "test_after_train": False, **trainer},
    }


def fsdp(save_dir, world=2, **trainer):
    return tiny_config(save_dir, world, strategy="fsdp", fsdp_blocks=BLOCKS, **trainer)


def results(out, world=2):
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]


def run_dir(save_dir, run_id):
    return Path(save_dir) / "models" / NAME / run_id


def full(path):
    """A checkpoint's whole state: a .pth, or a sharded folder consolidated."""
    from utils import sharded

    return sharded.consolidate(path) if Path(path).is_dir() else torch.load(path, weights_only=True)


def assert_close_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=f"{key} differs")


ACCUM = {"accumulate_grad_batches": 2, "clip_grad_norm": 0.5}
UNFREEZE = {"freeze": ["net.1.*"], "unfreeze_at_epoch": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, torchrun):
    """Launch 1 (2 processes): DDP and FSDP, plain, with accumulation and clipping, with a layer unfrozen at epoch 2;
    an FSDP run stopped by SIGTERM mid-epoch. Launch 2: that run resumed."""
    tmp = tmp_path_factory.mktemp("fsdp")
    half = GLOBAL_BATCH // 4  # accumulation: half the per-process batch, two batches a step
    jobs = [
        {"config": tiny_config(tmp / "ddp"), "run_id": "ddp", "out": str(tmp / "ddp")},
        {"config": fsdp(tmp / "fsdp"), "run_id": "fsdp", "out": str(tmp / "fsdp")},
        {"config": tiny_config(tmp / "ddp_accum", **ACCUM), "run_id": "a", "out": str(tmp / "ddp_accum")},
        {"config": fsdp(tmp / "fsdp_accum", **ACCUM), "run_id": "a", "out": str(tmp / "fsdp_accum")},
        {"config": tiny_config(tmp / "ddp_unfreeze", **UNFREEZE), "run_id": "u", "out": str(tmp / "ddp_unfreeze")},
        {"config": fsdp(tmp / "fsdp_unfreeze", **UNFREEZE), "run_id": "u", "out": str(tmp / "fsdp_unfreeze")},
        {"config": fsdp(tmp / "term"), "run_id": "term", "sigterm_at": SIGTERM_AT, "out": str(tmp / "term")},
        {"config": fsdp(tmp / "fsdp_recompute", activation_checkpointing=True), "run_id": "r",
         "out": str(tmp / "fsdp_recompute")},
        {"config": fsdp(tmp / "fsdp_bf16", amp="bf16"), "run_id": "b", "out": str(tmp / "fsdp_bf16")},
    ]
    for job in jobs[2:4]:
        job["config"]["data_loader"]["args"]["batch_size"] = half
    first = torchrun.jobs(tmp, DRIVER, jobs, "first", check=True).output
    last = run_dir(tmp / "term", "term") / "last.pth"
    assert last.is_dir(), first[-4000:]
    resumed = torchrun.jobs(tmp, DRIVER, [
        {"config": fsdp(tmp / "term"), "resume": str(last), "out": str(tmp / "resumed")},
    ], "resume", check=True).output
    return {"tmp": tmp, "output": first, "resume_output": resumed}


# ---------------------------------------------------------------- FSDP trains as DDP does


@pytest.mark.parametrize("kind", ["", "_accum", "_unfreeze"])
def test_fsdp_reaches_the_weights_of_ddp(runs, kind):
    tmp = runs["tmp"]
    run_id = {"": None, "_accum": "a", "_unfreeze": "u"}[kind]
    ddp = full(run_dir(tmp / f"ddp{kind}", run_id or "ddp") / "checkpoint-epoch2.pth")
    sharded = full(run_dir(tmp / f"fsdp{kind}", run_id or "fsdp") / "checkpoint-epoch2.pth")
    assert ddp["global_step"] == sharded["global_step"] == (36 if kind != "_accum" else 36)
    assert_close_weights(ddp["model"], sharded["model"])
    ddp_metrics, fsdp_metrics = results(tmp / f"ddp{kind}")[0]["metrics"], results(tmp / f"fsdp{kind}")[0]["metrics"]
    assert fsdp_metrics["val_loss"] == pytest.approx(ddp_metrics["val_loss"], rel=1e-4)


def test_activation_checkpointing_recomputes_exactly(runs):
    """Each block's activations recomputed in the backward pass (its dropout too, from the saved RNG state): the
    same weights as keeping them."""
    tmp = runs["tmp"]
    kept = full(run_dir(tmp / "fsdp", "fsdp") / "checkpoint-epoch2.pth")["model"]
    recomputed = full(run_dir(tmp / "fsdp_recompute", "r") / "checkpoint-epoch2.pth")["model"]
    assert_close_weights(kept, recomputed, atol=1e-6)


def test_activation_checkpointing_runs_a_blocks_forward_again_in_the_backward_pass():
    from trainer.fsdp import recompute_in_backward

    block, calls = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), []
    block[0].register_forward_hook(lambda *args: calls.append("forward"))
    recompute_in_backward(block)
    block(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert calls == ["forward", "forward"]  # once in the forward pass, once recomputed in the backward pass


def test_the_bf16_policy_computes_in_bf16_and_keeps_fp32_shards(runs):
    """trainer.amp "bf16": the gathered weights in bf16 for compute, the shards (and the checkpoint) in fp32; it
    trains to about the fp32 run's validation loss."""
    tmp = runs["tmp"]
    state = full(run_dir(tmp / "fsdp_bf16", "b") / "checkpoint-epoch2.pth")
    assert all(t.dtype == torch.float32 for t in state["model"].values())
    fp32 = full(run_dir(tmp / "fsdp", "fsdp") / "checkpoint-epoch2.pth")["model"]
    assert any(not torch.equal(state["model"][k], fp32[k]) for k in fp32)  # bf16 compute: not the fp32 run's steps
    bf16_loss, fp32_loss = (results(tmp / name)[0]["metrics"]["val_loss"] for name in ("fsdp_bf16", "fsdp"))
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.05)


def test_each_rank_reports_the_same_metrics(runs):
    a, b = results(runs["tmp"] / "fsdp")
    assert a["metrics"] == b["metrics"]


def test_the_start_of_the_run_says_what_each_process_holds(runs):
    out = runs["output"]
    assert "Per process (fsdp, 2 processes): parameters" in out and "(blocks net.1, net.4 and the root)" in out
    assert "Per process (ddp, 2 processes): parameters" in out


def test_a_sharded_checkpoint_is_a_folder_of_shards_metadata_and_the_run_state(runs):
    folder = run_dir(runs["tmp"] / "fsdp", "fsdp")
    for name in ("checkpoint-epoch1.pth", "checkpoint-epoch2.pth", "model_best.pth"):
        assert sorted(p.name for p in (folder / name).iterdir()) == [
            ".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.pth"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock"]  # no temporary folder


def test_shards_hold_at_most_0_6_of_ddp_bytes_per_process(runs):
    """Each process's weights and optimizer state, from the slices its shard file holds (DCP's metadata: each
    tensor's chunks and the file storing each), against the DDP checkpoint's tensors."""
    import math

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    tmp = runs["tmp"]
    ddp = torch.load(run_dir(tmp / "ddp", "ddp") / "checkpoint-epoch2.pth", weights_only=True)
    ddp_bytes = sum(t.nbytes for t in ddp["model"].values()) + sum(
        t.nbytes for slots in ddp["optimizer"]["state"].values() for t in slots.values() if t.dim() > 0)
    metadata = FileSystemReader(run_dir(tmp / "fsdp", "fsdp") / "checkpoint-epoch2.pth").read_metadata()
    per_file = {}
    for fqn, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata) or not item.size:  # (Adam's step count: a scalar)
            continue
        size = torch.empty((), dtype=item.properties.dtype).element_size()
        for chunk in item.chunks:
            file = metadata.storage_data[MetadataIndex(fqn, chunk.offsets)].relative_path
            per_file[file] = per_file.get(file, 0) + math.prod(chunk.sizes) * size
    assert sorted(per_file) == ["__0_0.distcp", "__1_0.distcp"]
    assert sum(per_file.values()) == ddp_bytes  # every byte of DDP's, once
    assert max(per_file.values()) <= 0.6 * ddp_bytes, (per_file, ddp_bytes)


# ---------------------------------------------------------------- resume on the same number of processes


def test_sigterm_mid_epoch_writes_a_sharded_last_pth_and_stops_every_rank(runs):
    assert [r["stopped"] for r in results(runs["tmp"] / "term")] == [143, 143]
    state = full(run_dir(runs["tmp"] / "term", "term") / "last.pth")
    # (under torchrun the processes agree on a stop every log_every_n_steps steps: after step 28, not 25)
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == (1, 10, 28)


def test_mid_epoch_resume_ends_bit_identical_to_the_run_left_alone(runs):
    from conftest import assert_states_identical

    tmp = runs["tmp"]
    alone = full(run_dir(tmp / "fsdp", "fsdp") / "checkpoint-epoch2.pth")
    resumed = full(run_dir(tmp / "term", "term") / "checkpoint-epoch2.pth")
    assert_states_identical(alone, resumed)
    assert results(tmp / "resumed")[0]["metrics"] == results(tmp / "fsdp")[0]["metrics"]


# ---------------------------------------------------------------- one process reads it: test.py, consolidation


def test_test_py_scores_a_sharded_checkpoint_as_its_consolidated_pth(runs, tmp_path):
    from trainer.run import evaluate_checkpoint

    folder = run_dir(runs["tmp"] / "fsdp", "fsdp") / "model_best.pth"
    out = tmp_path / "best.pth"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "consolidate.py"), str(folder), "-o", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    from_folder = evaluate_checkpoint(folder, write=False, progress=False)
    from_file = evaluate_checkpoint(out, write=False, progress=False)
    assert from_folder == from_file and from_folder["n_samples"] == 40
    plain = torch.load(out, weights_only=True)  # an ordinary .pth: positions, as optimizer.state_dict() has them
    assert sorted(plain["optimizer"]["state"]) == [0, 1, 2, 3] and plain["model"]["net.1.weight"].shape == (64, 16)


def test_consolidate_refuses_what_is_no_sharded_checkpoint(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("consolidate", REPO / "tools" / "consolidate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- crash safety of the folder's publication


def _fake_checkpoint(folder, marker):
    folder.mkdir(parents=True)
    (folder / ".metadata").write_text(marker)
    (folder / "trainer.pth").write_text(marker)
    return folder


def test_a_replaced_checkpoint_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    from utils import sharded

    old = _fake_checkpoint(tmp_path / ".last.pth.0123abcd.old", "old")  # killed between the two renames
    _fake_checkpoint(tmp_path / ".last.pth.0123abcd.tmp", "new")
    _fake_checkpoint(tmp_path / ".checkpoint-epoch3.pth.89abcdef.tmp", "half")  # killed mid-write
    sharded.recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]
    assert (tmp_path / "last.pth" / ".metadata").read_text() == "old" and not old.exists()


def test_publishing_replaces_a_checkpoint_and_leaves_nothing_aside(tmp_path):
    from utils import sharded

    _fake_checkpoint(tmp_path / "last.pth", "old")
    sharded.publish(_fake_checkpoint(tmp_path / ".last.pth.0123abcd.tmp", "new"), tmp_path / "last.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]
    assert (tmp_path / "last.pth" / "trainer.pth").read_text() == "new"
    sharded.remove(tmp_path / "last.pth")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- config mistakes: one line, exit 2, nothing written


def test_fsdp_without_torchrun_is_one_error_line_and_writes_nothing(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(fsdp(tmp_path / "saved")))
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "-c", str(config)], capture_output=True,
                          text=True, cwd=REPO, env=env)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: trainer.strategy:") and "torchrun" in lines[0]
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("trainer, expected", [
    ({"strategy": "fsdp", "amp": "fp16"}, 'trainer.amp: "fp16"'),
    ({"strategy": "fsdp", "compile": True}, "trainer.compile:"),
    ({"strategy": "fsdp", "skip_nonfinite": True}, "trainer.skip_nonfinite:"),
    ({"fsdp_blocks": ["net.1"]}, "trainer.fsdp_blocks: applies to a sharded model only"),
    ({"activation_checkpointing": True}, "trainer.activation_checkpointing: applies to a sharded model only"),
    ({"strategy": "zero3"}, "trainer.strategy:"),
])
def test_a_feature_that_cannot_work_sharded_is_one_config_error(tmp_path, trainer, expected):
    from trainer.build import registries
    from utils.config import validate_config
    from utils.errors import ConfigError

    config = tiny_config(tmp_path)
    config["trainer"].update(trainer)
    with pytest.raises(ConfigError) as err:
        validate_config(config, registries())
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(expected), err.value.problems


@pytest.mark.parametrize("blocks, expected", [
    (["net.9"], "trainer.fsdp_blocks: 'net.9' names no module"),
])
def test_an_unknown_block_is_one_config_error(blocks, expected):
    from model.builtin import MLP
    from trainer.fsdp import choose_blocks
    from utils.errors import ConfigError

    model = MLP(16, [64], 3)
    with pytest.raises(ConfigError) as err:
        choose_blocks(model, blocks)
    assert err.value.problems[0].startswith(expected)
    assert choose_blocks(model, ["net.*"]) == ["net.0", "net.1", "net.2", "net.3", "net.4"]
    assert choose_blocks(model, 100) == ["net.1", "net.4"] and choose_blocks(model, None) == []


def test_the_default_run_does_not_import_the_sharding_modules():
    code = ("import sys; sys.path.insert(0, '.'); import train, trainer.run, base.base_trainer, utils.io;"
            " print([m for m in ('trainer.fsdp', 'utils.sharded', 'torch.distributed.fsdp') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip() == "[]", done.stderr


# ---------------------------------------------------------------- another number of processes (slow)


@pytest.fixture(scope="module")
def resharded(runs, torchrun):
    """The 2-process FSDP run's checkpoint-epoch1 resumed on 1 process (its global batch on one) and on 3; a
    1-process FSDP run's checkpoint-epoch1 resumed on 2. Each records the whole weights right after loading."""
    tmp = runs["tmp"]
    two = run_dir(tmp / "fsdp", "fsdp") / "checkpoint-epoch1.pth"
    one_out = torchrun.jobs(tmp, DRIVER, [
        {"config": fsdp(tmp / "to1", world=1), "resume": str(two), "run_id": "to1", "loaded": str(tmp / "to1.pt"),
         "out": str(tmp / "to1")},
        {"config": fsdp(tmp / "one", world=1, epochs=1), "run_id": "one", "out": str(tmp / "one")},
    ], "to1", check=True, nproc=1).output
    one = run_dir(tmp / "one", "one") / "checkpoint-epoch1.pth"
    two_out = torchrun.jobs(tmp, DRIVER, [
        {"config": fsdp(tmp / "one", world=2), "resume": str(one), "run_id": "to2", "loaded": str(tmp / "to2.pt"),
         "out": str(tmp / "to2")},
        {"config": fsdp(tmp / "ddp2fsdp"), "resume": str(run_dir(tmp / "ddp", "ddp") / "checkpoint-epoch1.pth"),
         "run_id": "ddp2fsdp", "loaded": str(tmp / "ddp2fsdp.pt"), "out": str(tmp / "ddp2fsdp")},
        {"config": tiny_config(tmp / "fsdp2ddp"), "resume": str(two), "run_id": "fsdp2ddp",
         "loaded": str(tmp / "fsdp2ddp.pt"), "out": str(tmp / "fsdp2ddp")},
    ], "to2", check=True).output
    three_out = torchrun.jobs(tmp, DRIVER, [
        {"config": fsdp(tmp / "to3", world=3), "resume": str(two), "run_id": "to3", "loaded": str(tmp / "to3.pt"),
         "out": str(tmp / "to3")},
    ], "to3", check=True, nproc=3).output
    return {"tmp": tmp, "two": two, "one": one, "output": one_out + two_out + three_out}


@pytest.mark.slow
@pytest.mark.parametrize("target, world", [("to1", 1), ("to3", 3), ("to2", 2)])
def test_a_checkpoint_resumes_on_another_number_of_processes(resharded, target, world):
    tmp = resharded["tmp"]
    source = full(resharded["one"] if target == "to2" else resharded["two"])
    loaded = torch.load(tmp / f"{target}.pt", weights_only=True)
    assert loaded["global_step"] == source["global_step"] == 18
    for key, value in source["model"].items():  # the weights after loading: the saved ones, exactly
        assert torch.equal(loaded["model"][key], value), key
    save_dir = tmp / ("one" if target == "to2" else target)
    after = full(run_dir(save_dir, target) / "checkpoint-epoch2.pth")
    assert after["global_step"] == 36 and after["world_size"] == world  # the same 18 steps of 12 samples an epoch
    assert all(r["metrics"]["epoch"] == 2 for r in results(tmp / target, world))


@pytest.mark.slow
@pytest.mark.parametrize("target, source", [("ddp2fsdp", ("ddp", "ddp")), ("fsdp2ddp", ("fsdp", "fsdp"))])
def test_a_checkpoint_resumes_under_the_other_strategy(resharded, target, source):
    """A DDP run's .pth resumed under "fsdp" (whole tensors cut into shards), and a sharded folder under "ddp"."""
    tmp = resharded["tmp"]
    saved = full(run_dir(tmp / source[0], source[1]) / "checkpoint-epoch1.pth")
    loaded = torch.load(tmp / f"{target}.pt", weights_only=True)
    for key, value in saved["model"].items():
        assert torch.equal(loaded["model"][key], value), key
    after = full(run_dir(tmp / target, target) / "checkpoint-epoch2.pth")
    assert after["global_step"] == 36 and after["config"]["trainer"]["strategy"] == target.split("2")[1]


@pytest.mark.slow
def test_kill_9_during_a_sharded_save_leaves_the_previous_checkpoint_to_resume(runs, torchrun):
    """Epoch 1 writes model_best and checkpoint-epoch1; epoch 2's write of model_best is held once its shards are
    written (before its folder replaces the old one), and the launch is killed with SIGKILL there. The old
    model_best loads, nothing under a checkpoint's name is half-written, and ``-r auto`` resumes epoch 1's state and
    ends as the run left alone does."""
    import time

    from conftest import assert_states_identical, kill_tree

    tmp = runs["tmp"]
    pause = tmp / "paused"
    spec = tmp / "kill.jobs.json"
    spec.write_text(json.dumps([{"config": fsdp(tmp / "kill"), "run_id": "kill", "pause": str(pause),
                                 "pause_at": "model_best.pth", "pause_skip": 1, "out": str(tmp / "kill")}]))
    with torchrun.start(tmp, DRIVER, spec, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        deadline = time.monotonic() + torchrun.timeout
        while not pause.exists():  # (polling a file the paused writer creates; no timing is assumed)
            assert proc.poll() is None, "the launch ended before the save was held"
            assert time.monotonic() < deadline, "the save was never held"
            time.sleep(0.1)
        kill_tree(proc.pid)
        proc.wait()
    folder = run_dir(tmp / "kill", "kill")
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".pth")) == [
        "checkpoint-epoch1.pth", "model_best.pth"]
    hidden = [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert len(hidden) == 1 and hidden[0].startswith(".model_best.pth.") and hidden[0].endswith(".tmp")
    from utils.io import load_checkpoint

    assert load_checkpoint(folder / "model_best.pth")["global_step"] == 18  # the previous one, whole
    assert load_checkpoint(folder / "model_best.pth", purpose="weights")["model"]["net.1.weight"].shape == (64, 16)
    torchrun.jobs(tmp, DRIVER, [{"config": fsdp(tmp / "kill"), "resume": "auto", "run_id": "kill",
                                 "out": str(tmp / "kill_resumed")}], "auto", check=True)
    assert not [p for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock"]  # cleaned up
    assert_states_identical(full(run_dir(tmp / "fsdp", "fsdp") / "checkpoint-epoch2.pth"),
                            full(folder / "checkpoint-epoch2.pth"))
