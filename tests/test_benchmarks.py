"""The benchmark scripts' quick modes, and the correctness facts the benchmarks rely on.

Benchmarks are not timed tests: these check that each script runs and writes the JSON
it promises, that the in-memory fast path gives exactly the batches of the ordinary
DataLoader path, and that per-step logging does not change training.
"""

import importlib.util
import json
import math

import pytest
import torch

from base.base_data_loader import BaseDataLoader
from benchmarks import data as data_bench
from benchmarks import overhead as overhead_bench
from benchmarks import startup as startup_bench
from data_loader.builtin import SyntheticDataset
from data_loader.idx import write_idx


def positive(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def read_json(path):
    assert path.is_file(), path
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- the scripts' smoke modes


def check_overhead_workload(result, sides):
    assert {"description", "steps_per_epoch", "rounds", "step_time", "time_ratio", "chunk_time_ratio", "calls",
            "calls_ratio", "targets", "within_targets"} <= result.keys()
    assert set(result["step_time"]) == {"bare", "control", *sides}  # control: the bare loop through the harness
    for side in ["bare", "control", *sides]:
        for clock in ("wall", "cpu"):
            times = result["step_time"][side][clock]
            assert positive(times["median_s"]) and positive(times["min_s"]) and times["min_s"] <= times["median_s"]
    assert set(result["calls"]) == {"bare", *sides}
    for side in ["bare", *sides]:
        per_step = result["calls"][side]["per_step"]
        assert positive(per_step["call"]) and positive(per_step["c_call"])
        assert per_step["total"] == per_step["call"] + per_step["c_call"]
    for side in ["control", *sides]:
        ratio = result["time_ratio"][side]
        for clock in ("wall", "cpu"):
            assert all(positive(ratio[clock][k]) for k in ("median_of_paired", "of_medians", "of_minima"))
    for side in sides:
        assert positive(result["calls_ratio"][side])
        assert set(result["within_targets"][side]) == {"time", "time_cpu", "calls"}


def test_overhead_smoke(tmp_path, capsys):
    overhead_bench.main(["--smoke", "--out", str(tmp_path)])
    data = read_json(tmp_path / "overhead.json")
    assert data["benchmark"] == "overhead" and data["smoke"] is True
    workloads = data["workloads"]
    for name in ("mlp", "lenet"):
        check_overhead_workload(workloads[name], ["trainer", "trainer_no_tty"])
        assert workloads[name]["targets"]["time_ratio"] == {"mlp": 1.05, "lenet": 1.02}[name]
    if torch.cuda.is_available():  # --smoke runs the eager variant only
        check_overhead_workload(workloads["resnet18_eager"], ["trainer"])
    else:
        assert workloads["resnet18"] == {"skipped": "CUDA not available: ResNet-18 workload skipped"}
        assert "CUDA not available: ResNet-18 workload skipped" in capsys.readouterr().out


def test_overhead_ab_loggers_pairs_a_second_trainer(tmp_path, capsys):
    # --ab-loggers: a second Trainer (here with the CSV logger as well, where its part is in the project) timed in
    # the same rounds as the first.
    loggers = "tensorboard,csv" if importlib.util.find_spec("parts.csv_logger") else "tensorboard"
    overhead_bench.main(["--smoke", "--out", str(tmp_path), "--workloads", "mlp", "--ab-loggers", loggers])
    result = read_json(tmp_path / "overhead.json")["workloads"]["mlp"]
    check_overhead_workload(result, ["trainer", "trainer_no_tty", "trainer_b"])
    assert all(positive(result["b_over_a"][clock]) for clock in ("wall", "cpu"))
    assert f"Trainer with loggers {loggers} / Trainer with the default loggers" in capsys.readouterr().out


@pytest.mark.slow  # (make test's 5 minutes: run with make test-slow)
def test_overhead_resnet_workload_runs_on_cpu(tmp_path):
    # The CUDA workload's code (torchvision ResNet-18, bf16 autocast, channels_last, device-resident data),
    # run eagerly on the CPU so that it is exercised where there is no GPU.
    overhead_bench.main(["--smoke", "--out", str(tmp_path), "--workloads", "resnet18", "--resnet-on-cpu"])
    result = read_json(tmp_path / "overhead.json")["workloads"]["resnet18_eager"]
    check_overhead_workload(result, ["trainer"])
    assert result["device"] == "cpu"


def check_data_result(data, descriptions):
    assert data["benchmark"] == "data"
    assert set(data["datasets"]) == {"digits", "mnist"}
    for name, result in data["datasets"].items():
        assert descriptions[name] in result["description"]
        assert positive(result["samples_per_epoch"])
        assert set(result["paths"]) == {
            "torch DataLoader, 0 workers", "torch DataLoader, 2 workers",
            "BaseDataLoader in_memory=False, 0 workers", "BaseDataLoader in_memory=False, 2 workers",
            "BaseDataLoader in_memory=True",
        }
        for path in result["paths"].values():
            assert all(positive(path[k]) for k in ("samples_per_s", "best_samples_per_s", "epoch_s", "first_epoch_s",
                                                   "fast_path_speedup"))


def test_data_smoke(tmp_path):
    data_bench.main(["--smoke", "--out", str(tmp_path)])
    check_data_result(read_json(tmp_path / "data.json"), {"digits": "digits", "mnist": "synthetic"})


def test_data_reads_mnist_idx_files(tmp_path):
    # --mnist-dir with IDX files in MNIST's format (here made up, gzipped as on the MNIST site).
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8, generator=g).numpy()
    labels = torch.randint(0, 10, (300,), dtype=torch.uint8, generator=g).numpy()
    folder = tmp_path / "idx"
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels)
    dataset, description = data_bench.idx_mnist_dataset(folder)
    inputs, targets = dataset.tensors()
    assert inputs.shape == (300, 1, 28, 28) and inputs.dtype == torch.float32
    assert torch.equal(targets, torch.as_tensor(labels, dtype=torch.int64)) and "t10k-images" in description
    data_bench.main(["--smoke", "--out", str(tmp_path), "--mnist-dir", str(folder)])
    check_data_result(read_json(tmp_path / "data.json"), {"digits": "digits", "mnist": "real MNIST"})


def check_startup_result(data, with_accuracy):
    assert data["benchmark"] == "startup"
    assert positive(data["interpreter"]["python -c pass"]["median_s"])
    phases = data["first_step"]
    assert set(phases) == {label for label, _, _ in startup_bench.PHASES}
    assert all(positive(phase["median_s"]) for phase in phases.values())
    parts = sum(phases[label]["median_s"] for label, _, _ in startup_bench.PHASES[:-1])
    assert parts == pytest.approx(phases["total to first step"]["median_s"], rel=1e-6)
    if with_accuracy:
        run = data["time_to_accuracy"]["default threads"]
        assert run["epochs"] == 1 and 0 <= run["test_accuracy"] <= 1 and run["test_samples"] > 0
        assert positive(run["train_s"]) and positive(run["test_s"])
    else:
        assert data["time_to_accuracy"] == {}


def test_instructions_smoke(tmp_path):
    from benchmarks import instructions as instructions_bench

    instructions_bench.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "instructions.json").read_text())
    assert data["benchmark"] == "instructions" and data["sides_ran"] == ["bare", "trainer"]


def test_startup_smoke_first_step(tmp_path):
    startup_bench.main(["--smoke", "--no-accuracy", "--out", str(tmp_path)])
    check_startup_result(read_json(tmp_path / "startup.json"), with_accuracy=False)


@pytest.mark.slow
def test_startup_smoke(tmp_path):
    # Three fresh processes that import torch and train (train.py one epoch, test.py): over 10 s on 2 cores.
    startup_bench.main(["--smoke", "--out", str(tmp_path)])
    check_startup_result(read_json(tmp_path / "startup.json"), with_accuracy=True)


# --------------------------------------------------------------------------- the fast path gives the same batches


def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same_batches(fast, ordinary):
    assert len(fast) == len(ordinary) > 0
    for (x1, y1), (x2, y2) in zip(fast, ordinary):
        assert x1.dtype == x2.dtype and y1.dtype == y2.dtype == torch.int64
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_in_memory_path_yields_the_ordinary_paths_batches(num_workers):
    dataset = SyntheticDataset(203, (1, 5, 5), num_classes=4, seed=1)
    options = {"batch_size": 16, "shuffle": True, "validation_split": 0.2, "seed": 7}  # 41 held out, 162 train
    fast = BaseDataLoader(dataset, in_memory=True, **options)
    ordinary = BaseDataLoader(dataset, in_memory=False, num_workers=num_workers, **options)
    fast_valid, ordinary_valid = fast.split_validation(), ordinary.split_validation()  # as trainer.run.train does
    try:
        check_same_batches(dataset, fast, ordinary, fast_valid, ordinary_valid)
    finally:
        for loader in (ordinary, ordinary_valid):  # else the workers outlive the test (a reference cycle)
            data_bench.stop_workers(loader)


def check_same_batches(dataset, fast, ordinary, fast_valid, ordinary_valid):
    assert fast.in_memory and not ordinary.in_memory
    assert torch.equal(fast.sampler.indices, ordinary.sampler.indices)
    inputs, _ = dataset.tensors()
    train_inputs = inputs[fast.sampler.indices]
    epochs = []
    for epoch in (1, 2):
        fast.set_epoch(epoch)
        ordinary.set_epoch(epoch)
        fast_batches = batches(fast)
        assert_same_batches(fast_batches, batches(ordinary))
        assert len(fast_batches) == len(fast) == 11 and len(fast_batches[-1][1]) == 162 - 10 * 16
        # every training sample exactly once per epoch
        seen = torch.cat([x for x, _ in fast_batches]).flatten(1)
        assert torch.equal(seen[seen[:, 0].argsort()], train_inputs.flatten(1)[train_inputs.flatten(1)[:, 0].argsort()])
        epochs.append(fast_batches)
    first, second = epochs
    assert not torch.equal(first[0][0], second[0][0]), "shuffle gives each epoch its own order"

    # resuming mid-epoch: the same batches from there on, on both paths
    fast.set_epoch(2, start_batch=3)
    ordinary.set_epoch(2, start_batch=3)
    resumed = batches(fast)
    assert_same_batches(resumed, batches(ordinary))
    assert_same_batches(resumed, second[3:])

    # the held-out validation samples: the same on both paths
    assert_same_batches(batches(fast_valid), batches(ordinary_valid))
    assert sum(len(y) for _, y in batches(fast_valid)) == 41


# --------------------------------------------------------------------------- logging does not change training


def test_logging_every_step_does_not_change_the_weights(tmp_path):
    from conftest import make_config

    from trainer.run import train

    states = {}
    for every in (1, 1000):
        config = make_config(tmp_path / f"every{every}", tensorboard=True, log_every_n_steps=every, epochs=1,
                             verbosity=2)
        train(config, run_id="run")
        folder = tmp_path / f"every{every}" / "models" / config["name"] / "run"
        states[every] = torch.load(folder / "checkpoint-epoch1.pth", weights_only=True, map_location="cpu")
        assert list((tmp_path / f"every{every}" / "log" / config["name"] / "run").glob("events.out.tfevents.*"))
    logged, quiet = states[1], states[1000]
    assert logged["global_step"] == quiet["global_step"] > 1
    assert logged["model"].keys() == quiet["model"].keys()
    for name in logged["model"]:
        assert torch.equal(logged["model"][name], quiet["model"][name]), name
    assert torch.equal(logged["rng"]["torch"], quiet["rng"]["torch"])


def test_overhead_logger_flags_are_checked_first(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        overhead_bench.main(["--smoke", "--out", str(tmp_path), "--workloads", "mlp", "--ab-loggers", "tensorbord"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --ab-loggers: expected") and "did you mean 'tensorboard'" in err[0]
    assert not (tmp_path / "overhead.json").exists()
