"""The pieces around the loop: metrics weighting, the MNIST config on generated files, new_project.py."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import new_project

from trainer import cli, run
from model.metric import accuracy, top_k_acc
from trainer.trainer import MetricTracker

ROOT = Path(__file__).resolve().parents[1]


def test_top_k_accuracy_against_a_direct_count():
    output = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(1))
    ranks = (output > output.gather(1, target[:, None])).sum(1)  # how many classes score above the target
    for k in (1, 3, 7):
        assert top_k_acc(output, target, k=k).item() == pytest.approx((ranks < k).float().mean().item())
    assert accuracy(output, target).item() == pytest.approx((ranks == 0).float().mean().item())


def test_epoch_metric_weights_a_short_last_batch_by_its_size():
    output = torch.tensor([[1.0, 0.0]] * 10)
    target = torch.tensor([0] * 8 + [1] * 2)  # 8 right, 2 wrong
    tracker = MetricTracker(["accuracy"], "cpu")
    for start in (0, 4, 8):  # batches of 4, 4 and a short 2 (all wrong)
        tracker.update([accuracy(output[start:start + 4], target[start:start + 4])], len(target[start:start + 4]))
    assert tracker.result()["accuracy"] == pytest.approx(0.8)  # a plain mean of batch means would say 2/3


def write_mnist(folder, n_train=96, n_test=40, seed=0):
    from data_loader.idx import write_idx

    rng = np.random.default_rng(seed)
    raw = Path(folder) / "MNIST" / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        # Learnable images: a bright column at the label's position.
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, :, 2 + 2 * label] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


def test_mnist_config_trains_on_generated_idx_files(tmp_path):
    write_mnist(tmp_path / "data")
    config = json.loads((ROOT / "configs/mnist.json").read_text())
    config["data_loader"]["args"].update(data_dir=str(tmp_path / "data"), download=False, batch_size=16)
    config["trainer"].update(save_dir=str(tmp_path / "saved"), epochs=3, verbosity=0, tensorboard=False)
    metrics = run.train(config, run_id="m")
    assert metrics["epoch"] == 3
    result = run.evaluate_checkpoint(tmp_path / "saved/models/Mnist_LeNet/m/model_best.pth")
    assert result["n_samples"] == 40 and result["accuracy"] > 0.5  # chance is 0.1


def test_new_project_copies_a_working_template(tmp_path):
    target = tmp_path / "my_project"
    out = subprocess.run([sys.executable, str(ROOT / "new_project.py"), str(target)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in ("train.py", "test.py", "config.json", "Makefile", "requirements.txt", "trainer/trainer.py",
                 "tests/conftest.py", ".ci/run", "new_project.py"):
        assert (target / name).is_file(), name
    assert not (target / ".venv").exists() and not (target / "saved").exists()
    history = subprocess.run(["git", "log", "--oneline"], cwd=target, capture_output=True, text=True).stdout
    assert len(history.splitlines()) == 1  # a repository of its own: the copy is its first commit
    # The copy validates its own default config.
    check = subprocess.run([sys.executable, "-c", "from utils.config import load_config, validate_config;"
                            "from trainer.build import registries;"
                            "validate_config(load_config('config.json'), registries())"], cwd=target,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    again = subprocess.run([sys.executable, str(ROOT / "new_project.py"), str(target)], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "already exists" in again.stderr


@pytest.mark.slow  # (make test's 5 minutes; tests/test_parts.py collects the minimal copy's tests)
def test_new_project_copy_collects_its_own_tests(tmp_path):
    # The copy's `make test` must at least import every test module: tests/test_template.py
    # imports new_project, which the copy once left out (ModuleNotFoundError). Collection
    # only: running the copy's whole suite would take minutes.
    target = tmp_path / "my_project"
    new_project.copy_template(target)
    assert not any((target / name).exists() for name in ("saved", "data", ".venv", ".git"))
    assert not [p for p in target.rglob("*") if p.name in ("__pycache__", ".pytest_cache") or p.suffix == ".pyc"]
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q"], cwd=target,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert "tests collected" in summary and "error" not in summary.lower(), summary
    assert "ERROR" not in out.stdout and "ModuleNotFoundError" not in out.stdout + out.stderr
    assert "tests/test_template.py::test_fused_optimizers_chosen_on_cuda_only_and_overridable" in out.stdout


def test_new_project_leaves_out_what_runs_and_installs_made(tmp_path):
    # A stand-in template holding what a run, an install and a test leave behind, plus
    # folders that share those names deeper down and belong to the code.
    template = tmp_path / "template"
    for path in ("train.py", "new_project.py", "saved/models/run/model_best.pth", "data/MNIST/raw/x",
                 ".venv/bin/python", ".git/HEAD", "__pycache__/train.cpython-311.pyc", "model/__pycache__/m.pyc",
                 "model/loss.pyc", ".pytest_cache/v", "benchmarks/results/r.json", "benchmarks/data.py",
                 "tests/data/fixture.csv", "model/saved/keep.txt"):
        (template / path).parent.mkdir(parents=True, exist_ok=True)
        (template / path).write_text("x")
    (template / "new_project.py").write_text((ROOT / "new_project.py").read_text())
    out = subprocess.run([sys.executable, str(template / "new_project.py"), str(tmp_path / "copy"), "--no-git"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    copied = sorted(p.relative_to(tmp_path / "copy").as_posix() for p in (tmp_path / "copy").rglob("*") if p.is_file())
    assert copied == ["benchmarks/data.py", "model/saved/keep.txt", "new_project.py", "tests/data/fixture.csv",
                      "train.py"]


def test_new_project_refuses_a_folder_inside_the_template():
    with pytest.raises(FileExistsError, match="inside the template"):
        new_project.copy_template(ROOT / "inner")


def test_dropping_a_loader_with_workers_releases_them_without_the_garbage_collector():
    import gc
    import time

    from base.base_data_loader import BaseDataLoader
    from data_loader.builtin import SyntheticDataset

    loader = BaseDataLoader(SyntheticDataset(64, (1, 4, 4), 3), batch_size=8, in_memory=False, num_workers=2)
    assert len(list(loader)) == 8
    workers = list(loader._loader._iterator._workers)  # persistent workers, kept between epochs
    assert all(w.is_alive() for w in workers)
    gc.disable()  # a reference cycle would keep them alive until a collection
    try:
        del loader
        deadline = time.time() + 5
        while any(w.is_alive() for w in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(w.is_alive() for w in workers)
    finally:
        gc.enable()


def test_fused_optimizers_chosen_on_cuda_only_and_overridable():
    from trainer.parameters import fast_optimizer_args

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fast_optimizer_args(torch.optim.Adam, {"lr": 1e-3}, cuda) == {"fused": True}
    assert fast_optimizer_args(torch.optim.Adam, {"lr": 1e-3}, cpu) == {}
    assert fast_optimizer_args(torch.optim.Adam, {"fused": False}, cuda) == {}
    assert fast_optimizer_args(torch.optim.Adam, {"foreach": True}, cuda) == {}
    assert fast_optimizer_args(torch.optim.LBFGS, {}, cuda) == {}  # no fused kernel offered


class _RandomPerItem(torch.utils.data.Dataset):
    """Draws from Python's, NumPy's and torch's RNG in __getitem__, as a random augmentation would."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        import random

        return torch.tensor([random.random(), float(np.random.rand()), torch.rand(1).item()]), i


def test_workers_are_seeded_from_the_run_seed_and_epoch():
    from base.base_data_loader import BaseDataLoader

    def draws(seed, epoch):
        loader = BaseDataLoader(_RandomPerItem(), batch_size=4, shuffle=False, num_workers=2, seed=seed,
                                persistent_workers=False)
        loader.set_epoch(epoch)
        return torch.cat([x for x, _ in loader])

    first = draws(seed=3, epoch=1)
    assert torch.equal(first, draws(seed=3, epoch=1))  # reproducible
    assert not torch.equal(first, draws(seed=3, epoch=2))  # a new draw each epoch
    assert not torch.equal(first, draws(seed=4, epoch=1))  # and each seed
    assert len(set(first[:, 1].tolist())) == 16  # NumPy is seeded per worker, not copied from the parent


def test_cifar_resnet_shapes_and_depth_check():
    from model.builtin import CifarResNet

    model = CifarResNet(depth=20, num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # By hand: stem 464 + stages 14,016 + 51,648 + 205,696 (1x1 projection shortcuts) + fc 650.
    assert sum(p.numel() for p in model.parameters()) == 272_474
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth=21)


def test_unwritable_save_dir_is_one_line(tmp_path, capsys):
    from conftest import make_config

    blocker = tmp_path / "file"
    blocker.write_text("a file where the save folder should go")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(make_config(blocker / "saved")))
    assert cli.train_command(["-c", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: trainer.save_dir: cannot create the run folders")
