"""Tests for the datasets (the digits in data_loader/data_loaders.py, the others in data_loader/builtin.py),
data_loader.idx and BaseDataLoader: its worker processes, its paths without the optional parts, and what it says
when a config asks for a part whose files are gone (no network, no downloaded data)."""

import gzip
import io
import math
import os
import pickle
import signal
import struct
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from base.base_data_loader import BaseDataLoader, to_float
from conftest import with_changes
from data_loader import builtin as D
from data_loader.data_loaders import DIGITS_MEAN, DIGITS_STD, DigitsDataset
from data_loader.idx import read_idx, read_idx_header, write_idx
from utils import parts
from utils.errors import ConfigError, UserError

MNIST_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def assert_one_line(err: pytest.ExceptionInfo):
    text = str(err.value)
    assert text and "\n" not in text, text
    return text


def assert_consistent(ds):
    """dataset[i] == (inputs[i], int(targets[i])) and the declared attributes hold."""
    inputs, targets = ds.tensors()
    assert inputs.dtype == torch.float32 and targets.dtype == torch.int64
    assert len(ds) == len(inputs) == len(targets)
    assert tuple(inputs.shape[1:]) == tuple(ds.input_shape)
    assert int(targets.min()) >= 0 and int(targets.max()) < ds.num_classes
    for i in sorted({0, 1, len(ds) // 2, len(ds) - 1}):
        x, y = ds[i]
        assert type(y) is int
        assert x.dtype == torch.float32 and tuple(x.shape) == tuple(ds.input_shape)
        assert torch.equal(x, inputs[i]) and y == int(targets[i])


# ---------------------------------------------------------------------------
# import cost
# ---------------------------------------------------------------------------


def test_import_does_not_load_sklearn_or_torchvision():
    code = "import sys, data_loader.data_loaders, data_loader.builtin, data_loader.idx; print(sorted(m for m in ('sklearn', 'torchvision') if m in sys.modules))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_other_built_in_loaders_are_imported_only_when_a_config_names_one():
    code = (
        "import sys\n"
        "from trainer import build\n"
        "from utils.errors import ConfigError\n"
        "loaders = build.registries()['data_loader']\n"
        "loaders.get('DigitsDataLoader')\n"
        "try:\n"
        "    loaders.get('SyntheticDataLoadr', 'data_loader.type')\n"
        "except ConfigError as err:\n"
        "    print(err)\n"
        "print('data_loader.builtin' in sys.modules)\n"
        "from data_loader import builtin\n"
        "print(loaders.get('SyntheticDataLoader') is builtin.SyntheticDataLoader,"
        " loaders.get('MnistDataLoader') is builtin.MnistDataLoader)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    typo, imported, found = out.stdout.strip().splitlines()
    assert typo.startswith("data_loader.type: unknown data loader 'SyntheticDataLoadr'; did you mean 'SyntheticDataLoader'?")
    valid = typo.split(" valid: ")[1].split(", ")
    assert set(valid) == {"DigitsDataLoader", "MnistDataLoader", "Cifar10DataLoader", "SyntheticDataLoader",
                          *parts.PART_LOADERS}
    assert imported == "False" and found == "True True"


# ---------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------


def test_digits_split_is_fixed_disjoint_and_complete():
    torch.manual_seed(1)
    train1, test1 = DigitsDataset(train=True), DigitsDataset(train=False)
    torch.manual_seed(987654)
    torch.rand(17)  # advance the global RNG further
    train2, test2 = DigitsDataset(train=True), DigitsDataset(train=False)

    assert len(train1) + len(test1) == 1797
    assert len(test1) == round(0.2 * 1797)
    assert torch.equal(train1.indices, train2.indices) and torch.equal(test1.indices, test2.indices)
    assert torch.equal(train1.tensors()[0], train2.tensors()[0]) and torch.equal(test1.tensors()[1], test2.tensors()[1])
    train_idx, test_idx = set(train1.indices.tolist()), set(test1.indices.tolist())
    assert not train_idx & test_idx
    assert train_idx | test_idx == set(range(1797))


def test_digits_other_fraction():
    train, test = DigitsDataset(train=True, test_fraction=0.5), DigitsDataset(train=False, test_fraction=0.5)
    assert len(test) == round(0.5 * 1797) and len(train) == 1797 - len(test)


def test_digits_values_match_sklearn():
    from sklearn.datasets import load_digits

    digits = load_digits()
    for train in (True, False):
        ds = DigitsDataset(train=train)
        assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
        assert_consistent(ds)
        inputs, targets = ds.tensors()
        idx = ds.indices.numpy()
        raw = (inputs.numpy() * DIGITS_STD + DIGITS_MEAN) * 16
        np.testing.assert_allclose(raw.reshape(len(ds), 64), digits.data[idx], atol=1e-4)
        np.testing.assert_array_equal(targets.numpy(), digits.target[idx])
        assert set(targets.tolist()) == set(range(10))


def test_digits_normalised():
    inputs = torch.cat([DigitsDataset(train=True).tensors()[0], DigitsDataset(train=False).tensors()[0]])
    assert abs(inputs.mean().item()) < 0.01
    assert abs(inputs.std().item() - 1) < 0.01


@pytest.mark.parametrize(
    "kwargs", [{"test_fraction": 0}, {"test_fraction": 1}, {"test_fraction": -0.1}, {"test_fraction": "0.2"},
               {"test_fraction": True}, {"test_fraction": 1e-6}, {"train": "yes"}, {"train": 1}]
)
def test_digits_bad_arguments(kwargs):
    with pytest.raises(UserError) as err:
        DigitsDataset(**kwargs)
    assert_one_line(err)


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_write_idx_format(tmp_path, suffix):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(4, 3, 5), dtype=np.uint8)
    labels = rng.integers(0, 10, size=4, dtype=np.uint8)
    write_idx(tmp_path / ("im" + suffix), images)
    write_idx(tmp_path / ("lb" + suffix), labels)

    opener = gzip.open if suffix else open
    with opener(tmp_path / ("im" + suffix), "rb") as f:
        blob = f.read()
    assert blob[:4] == b"\x00\x00\x08\x03" and struct.unpack(">3I", blob[4:16]) == (4, 3, 5)
    assert blob[16:] == images.tobytes()
    with opener(tmp_path / ("lb" + suffix), "rb") as f:
        blob = f.read()
    assert blob[:8] == b"\x00\x00\x08\x01" + struct.pack(">I", 4) and blob[8:] == labels.tobytes()

    np.testing.assert_array_equal(read_idx(tmp_path / ("im" + suffix)), images)
    np.testing.assert_array_equal(read_idx(tmp_path / ("lb" + suffix)), labels)
    if not suffix:  # torchvision's own reader agrees
        np.testing.assert_array_equal(read_image_file(str(tmp_path / "im")).numpy(), images)
        np.testing.assert_array_equal(read_label_file(str(tmp_path / "lb")).numpy(), labels)


def test_write_idx_other_dtypes_big_endian(tmp_path):
    values = np.array([[1.5, -2.0], [3.25, 1e6]], dtype=np.float32)
    write_idx(tmp_path / "f", values)
    blob = (tmp_path / "f").read_bytes()
    assert blob[:4] == b"\x00\x00\x0d\x02" and blob[12:] == values.astype(">f4").tobytes()
    np.testing.assert_array_equal(read_idx(tmp_path / "f"), values)


@pytest.mark.parametrize("array", [np.zeros((2, 2), dtype=bool), np.zeros((2,), dtype=np.uint64), np.array(3, dtype=np.uint8)])
def test_write_idx_rejects(tmp_path, array):
    with pytest.raises(UserError) as err:
        write_idx(tmp_path / "x", array)
    assert_one_line(err)


def test_read_idx_header_damage(tmp_path):
    write_idx(tmp_path / "ok", np.zeros((3, 4, 4), dtype=np.uint8))
    assert read_idx_header(tmp_path / "ok")[1:] == ((3, 4, 4), 16)
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-1])
    (tmp_path / "long").write_bytes((tmp_path / "ok").read_bytes() + b"\x00")
    (tmp_path / "magic").write_bytes(b"\x12\x34\x56\x78" + (tmp_path / "ok").read_bytes()[4:])
    (tmp_path / "empty").write_bytes(b"")
    for name in ("short", "long", "magic", "empty"):
        with pytest.raises(UserError) as err:
            read_idx_header(tmp_path / name)
        assert str(tmp_path / name) in assert_one_line(err)


# ---------------------------------------------------------------------------
# MNIST from generated IDX files
# ---------------------------------------------------------------------------


def make_mnist(root, n_train=50, n_test=20, suffix="", seed=0):
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, "MNIST", "raw")
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(os.path.join(raw, name + suffix), array)
    return raw, arrays


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_loads_generated_files(tmp_path, suffix):
    _, arrays = make_mnist(tmp_path, suffix=suffix)
    for train, stem in ((True, "train"), (False, "t10k")):
        ds = D.MnistDataset(str(tmp_path), train=train)
        images, labels = arrays[f"{stem}-images-idx3-ubyte"], arrays[f"{stem}-labels-idx1-ubyte"]
        assert len(ds) == len(images)
        assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
        assert_consistent(ds)
        inputs, targets = ds.tensors()
        pixels = (inputs.numpy()[:, 0] * D.MNIST_STD + D.MNIST_MEAN) * 255
        np.testing.assert_allclose(pixels, images.astype(np.float64), atol=1e-3)
        np.testing.assert_array_equal(targets.numpy(), labels.astype(np.int64))


def test_mnist_missing_files(tmp_path):
    with pytest.raises(UserError) as err:
        D.MnistDataset(str(tmp_path), train=True)
    text = assert_one_line(err)
    assert os.path.join(str(tmp_path), "MNIST", "raw") in text
    for name in MNIST_NAMES:
        assert name in text


def test_mnist_one_file_missing(tmp_path):
    raw, _ = make_mnist(tmp_path)
    os.remove(os.path.join(raw, "t10k-labels-idx1-ubyte"))
    with pytest.raises(UserError) as err:  # torchvision needs all four files, even for the train split
        D.MnistDataset(str(tmp_path), train=True)
    assert "missing t10k-labels-idx1-ubyte" in assert_one_line(err)


@pytest.mark.parametrize(
    "name, damage",
    [
        ("train-images-idx3-ubyte", "truncate"),
        ("train-labels-idx1-ubyte", "garbage"),
        ("train-images-idx3-ubyte", "labels-header"),
        ("train-labels-idx1-ubyte", "empty"),
    ],
)
def test_mnist_damaged_file(tmp_path, name, damage):
    raw, _ = make_mnist(tmp_path)
    path = os.path.join(raw, name)
    blob = open(path, "rb").read()
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "garbage":
        blob = np.random.default_rng(3).integers(0, 256, size=len(blob), dtype=np.uint8).tobytes()
    elif damage == "labels-header":  # a 1-D file where images belong
        blob = open(os.path.join(raw, "train-labels-idx1-ubyte"), "rb").read()
    else:
        blob = b""
    with open(path, "wb") as f:
        f.write(blob)
    with pytest.raises(UserError) as err:
        D.MnistDataset(str(tmp_path), train=True)
    assert path in assert_one_line(err)


def test_mnist_count_mismatch_and_bad_labels(tmp_path):
    raw, _ = make_mnist(tmp_path)
    write_idx(os.path.join(raw, "t10k-labels-idx1-ubyte"), np.zeros(19, dtype=np.uint8))
    with pytest.raises(UserError) as err:
        D.MnistDataset(str(tmp_path), train=False)
    assert "t10k-labels-idx1-ubyte" in assert_one_line(err)

    write_idx(os.path.join(raw, "t10k-labels-idx1-ubyte"), np.full(20, 12, dtype=np.uint8))
    with pytest.raises(UserError) as err:
        D.MnistDataset(str(tmp_path), train=False)
    assert "0..9" in assert_one_line(err)


def test_mnist_damaged_gz(tmp_path):
    raw, _ = make_mnist(tmp_path, suffix=".gz")
    path = os.path.join(raw, "t10k-images-idx3-ubyte.gz")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(UserError) as err:
        D.MnistDataset(str(tmp_path), train=False)
    assert path in assert_one_line(err)
    assert not os.path.exists(os.path.join(raw, "t10k-images-idx3-ubyte"))


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("no network in this test")


def test_mnist_download_failure_is_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    with pytest.raises(UserError) as err:
        D.MnistDataset(str(tmp_path), download=True)
    text = assert_one_line(err)
    assert "no network in this test" in text and "train-images-idx3-ubyte.gz" in text


def test_mnist_download_skipped_when_files_present(tmp_path, monkeypatch):
    make_mnist(tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    assert len(D.MnistDataset(str(tmp_path), train=False, download=True)) == 20


@pytest.mark.parametrize("kwargs", [{"data_dir": 3}, {"train": "false"}, {"download": "true"}, {"download": None}])
def test_mnist_bad_arguments(tmp_path, kwargs):
    kwargs.setdefault("data_dir", str(tmp_path))
    with pytest.raises(UserError) as err:
        D.MnistDataset(**kwargs)
    assert_one_line(err)


# ---------------------------------------------------------------------------
# CIFAR-10 (torchvision checks the md5 of every batch file, so only the error
# paths and the conversion can be tested without the real files)
# ---------------------------------------------------------------------------

CIFAR_NAMES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta")


def test_cifar_missing_files(tmp_path):
    with pytest.raises(UserError) as err:
        D.Cifar10Dataset(str(tmp_path), train=True)
    text = assert_one_line(err)
    assert os.path.join(str(tmp_path), "cifar-10-batches-py") in text and "cifar-10-python.tar.gz" in text
    for name in CIFAR_NAMES:
        assert name in text


def test_cifar_fake_archive_is_unpacked_then_rejected_by_md5(tmp_path):
    rng = np.random.default_rng(0)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name in CIFAR_NAMES:
            if name == "batches.meta":
                entry = {"label_names": [f"class{i}" for i in range(10)]}
            else:
                entry = {"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
            blob = pickle.dumps(entry)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(UserError) as err:
        D.Cifar10Dataset(str(tmp_path), train=False)
    text = assert_one_line(err)
    assert "damaged" in text and os.path.join("cifar-10-batches-py", "data_batch_1") in text
    assert all((tmp_path / "cifar-10-batches-py" / name).is_file() for name in CIFAR_NAMES)


def test_cifar_damaged_archive(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tar archive at all" * 10)
    with pytest.raises(UserError) as err:
        D.Cifar10Dataset(str(tmp_path))
    assert "cifar-10-python.tar.gz" in assert_one_line(err)


def test_cifar_download_failure_is_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    with pytest.raises(UserError) as err:
        D.Cifar10Dataset(str(tmp_path), download=True)
    assert "no network in this test" in assert_one_line(err)


def test_cifar_conversion():
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)  # HWC, as torchvision holds it
    targets = [0, 9, 3, 3, 1, 2]
    inputs, labels = D.cifar10_to_tensors(data, targets)
    assert inputs.shape == (6, 3, 32, 32) and inputs.dtype == torch.float32 and inputs.is_contiguous()
    assert labels.dtype == torch.int64 and labels.tolist() == targets
    for c in range(3):
        back = (inputs[:, c].numpy() * D.CIFAR10_STD[c] + D.CIFAR10_MEAN[c]) * 255
        np.testing.assert_allclose(back, data[..., c].astype(np.float64), atol=1e-3)
    with pytest.raises(UserError):
        D.cifar10_to_tensors(data, [0, 1, 2, 3, 4, 10])


@pytest.mark.parametrize("kwargs", [{"data_dir": None}, {"train": 0}, {"download": "no"}])
def test_cifar_bad_arguments(tmp_path, kwargs):
    kwargs.setdefault("data_dir", str(tmp_path))
    with pytest.raises(UserError) as err:
        D.Cifar10Dataset(**kwargs)
    assert_one_line(err)


# ---------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------


def test_synthetic_seeded():
    a, b = D.SyntheticDataset(num_samples=200, seed=3), D.SyntheticDataset(num_samples=200, seed=3)
    c = D.SyntheticDataset(num_samples=200, seed=4)
    assert torch.equal(a.tensors()[0], b.tensors()[0]) and torch.equal(a.tensors()[1], b.tensors()[1])
    assert not torch.equal(a.tensors()[0], c.tensors()[0])
    assert not torch.equal(a.tensors()[1], c.tensors()[1])


def test_synthetic_leaves_global_rng_alone():
    torch.manual_seed(11)
    state = torch.get_rng_state()
    first = D.SyntheticDataset(num_samples=64, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(12)
    second = D.SyntheticDataset(num_samples=64, seed=0)
    assert torch.equal(first.tensors()[0], second.tensors()[0])


def test_synthetic_shape_and_classes():
    ds = D.SyntheticDataset(num_samples=100, input_shape=[3, 5, 7], num_classes=3, seed=1)  # a list, as from JSON
    assert ds.input_shape == (3, 5, 7) and ds.num_classes == 3 and len(ds) == 100
    assert_consistent(ds)
    counts = torch.bincount(ds.tensors()[1], minlength=3)
    assert counts.sum() == 100 and counts.max() - counts.min() <= 1
    flat = D.SyntheticDataset(num_samples=10, input_shape=(12,), num_classes=2)
    assert flat.tensors()[0].shape == (10, 12)


def test_synthetic_is_learnable():
    ds = D.SyntheticDataset(num_samples=600, input_shape=(1, 8, 8), num_classes=10, seed=2, noise=1.0)
    x, y = ds.tensors()
    x = x.flatten(1)
    train_x, train_y, test_x, test_y = x[:400], y[:400], x[400:], y[400:]
    centroids = torch.stack([train_x[train_y == k].mean(0) for k in range(10)])
    predicted = torch.cdist(test_x, centroids).argmin(1)
    assert (predicted == test_y).float().mean().item() > 0.9
    assert abs(x.mean().item()) < 0.2 and 0.7 < x.std().item() < 1.3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 1}, {"num_classes": 2.5}, {"num_classes": "10"}, {"num_samples": 0}, {"num_samples": True},
        {"input_shape": [1, 0, 8]}, {"input_shape": "1,8,8"}, {"input_shape": []}, {"input_shape": [1.5, 2]},
        {"input_shape": None}, {"seed": -1}, {"seed": 1.0}, {"noise": -1}, {"noise": math.nan}, {"noise": "1"},
        {"num_samples": 10**6, "input_shape": [3, 224, 224]},
    ],
)
def test_synthetic_bad_arguments(kwargs):
    with pytest.raises(UserError) as err:
        D.SyntheticDataset(**kwargs)
    assert_one_line(err)


def test_digits_read_without_scikit_learn_match_scikit_learn():
    from sklearn.datasets import load_digits

    from data_loader.data_loaders import digits_tensors

    images, labels = digits_tensors()
    digits = load_digits()
    expected = (torch.as_tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0 - DIGITS_MEAN) / DIGITS_STD
    assert torch.equal(images, expected) and np.array_equal(labels.numpy(), digits.target)


# ---------------------------------------------------------------------------
# worker processes
# ---------------------------------------------------------------------------


class WorkerPids(torch.utils.data.Dataset):
    """Each sample is the pid of the process that read it."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        return torch.tensor(os.getpid()), index


def test_workers_ignore_sigterm_and_sigint():
    # Slurm sends SIGTERM to the whole process group: the workers must keep serving while the main
    # process finishes its step and writes its checkpoint.
    loader = BaseDataLoader(WorkerPids(), 4, shuffle=False, num_workers=2)
    batches = iter(loader)
    first = {int(next(batches)[0][0]) for _ in range(2)}  # batch 0 from worker 0, batch 1 from worker 1
    assert len(first) == 2 and os.getpid() not in first
    for pid in first:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
    # A worker killed by either signal makes the next batches fail ("DataLoader worker exited unexpectedly").
    later = {int(x[0]) for x, _ in batches}
    loader.set_epoch(1)
    later |= {int(x[0]) for x, _ in loader}
    assert later == first


WORKERS_AT_EXIT = """
import gc, sys
sys.path.insert(0, sys.argv[1])
from base.base_data_loader import BaseDataLoader
from data_loader.builtin import SyntheticDataset

def loader():
    data = BaseDataLoader(SyntheticDataset(64, (1, 2, 2), 2), 4, in_memory=False, num_workers=2)
    next(iter(data))
    return data

# Freed by the cyclic garbage collector (as a loader caught in an exception's traceback is):
# its workers must still receive torch's stop message, since they ignore torch's SIGTERM fallback.
cycle = [loader()]
cycle.append(cycle)
workers = list(cycle[0]._loader._iterator._workers)
del cycle
gc.collect()
for w in workers:
    w.join(timeout=10)
print("collected workers alive:", [w.is_alive() for w in workers])
# Alive at exit: multiprocessing's exit handler would wait forever for workers that ignore SIGTERM.
kept = loader()
"""


def test_workers_stop_when_collected_and_at_exit(tmp_path):
    script = tmp_path / "workers_at_exit.py"
    script.write_text(WORKERS_AT_EXIT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, str(script), root], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "collected workers alive: [False, False]" in out.stdout


# ---------------------------------------------------------------- data_loader.args.fold (K-fold cross-validation)


def test_folds_partition_the_training_data_the_same_way_for_every_seed():
    from data_loader.builtin import SyntheticDataLoader

    loaders = {(seed, k): SyntheticDataLoader(num_samples=100, input_shape=(4,), num_classes=2, seed=seed, fold=[k, 3])
               for seed in (0, 7) for k in range(3)}
    valid = {key: set(loader.valid_idx.tolist()) for key, loader in loaders.items()}
    for seed in (0, 7):
        folds = [valid[(seed, k)] for k in range(3)]
        assert sum(map(len, folds)) == 80 and set().union(*folds) == set(range(80))  # disjoint, covering
        for k in range(3):
            train = set(loaders[(seed, k)].sampler.indices.tolist())
            assert not train & folds[k] and train | folds[k] == set(range(80))
    assert all(valid[(0, k)] == valid[(7, k)] for k in range(3))


@pytest.mark.parametrize("fold", [[3, 3], [0, 1], "0/3", [-1, 3]])
def test_a_bad_fold_is_one_line(fold):
    from data_loader.builtin import SyntheticDataLoader
    from utils.errors import UserError

    with pytest.raises(UserError, match=r"data_loader.args.fold: .*expected \[k, K\]"):
        SyntheticDataLoader(num_samples=50, input_shape=(4,), fold=fold)


# ---------------------------------------------------------------------------
# without the optional parts
# ---------------------------------------------------------------------------


def test_no_transforms_leaves_the_fast_path_untouched():
    loader = BaseDataLoader(D.SyntheticDataset(40, (3, 8, 8), 2), 8)
    assert loader.in_memory and loader._pipeline is None and loader.split_validation() is None


class Uint8Images(torch.utils.data.Dataset):
    """uint8 images, as an image folder's datasets hold them."""

    uint8_images = True

    def __init__(self, n=20):
        self.images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        self.targets = torch.arange(n) % 2

    def tensors(self):
        return self.images, self.targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], int(self.targets[index])


@pytest.mark.parametrize("args", [{}, {"in_memory": False}, {"in_memory": False, "num_workers": 2}],
                         ids=["in memory", "per sample", "workers"])
def test_uint8_images_without_transforms_come_out_as_floats_in_0_1(args):
    dataset = Uint8Images()
    loader = BaseDataLoader(dataset, 8, shuffle=False, **args)
    assert loader._pipeline is None
    x = torch.cat([x for x, _ in loader])
    assert x.dtype == torch.float32 and torch.equal(x, to_float(dataset.images.clone()))


def _files_gone(monkeypatch, name):
    """As if part ``name``'s files were deleted: its row stays, its module is not there."""
    import dataclasses

    monkeypatch.setitem(parts.PARTS, name, dataclasses.replace(parts.PARTS[name], module="parts._deleted"))


def test_transforms_without_their_part_are_one_line(tiny_config, monkeypatch):
    from trainer import build, run

    name = parts.KEY_OWNERS.get("data_loader.args.transforms")
    if name is None:
        pytest.skip("no part owns data_loader.args.transforms")
    _files_gone(monkeypatch, name)
    spec = {"train": [{"type": "RandomHorizontalFlip"}]}
    with pytest.raises(ConfigError) as info:
        BaseDataLoader(D.SyntheticDataset(40, (3, 8, 8), 2), 8, transforms=spec)
    assert len(info.value.problems) == 1 and f"needs the {name} part" in info.value.problems[0]
    with pytest.raises(ConfigError) as info:
        run.checked_config(with_changes(tiny_config, data_loader__args={**tiny_config["data_loader"]["args"], "transforms": spec}))
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith("data_loader.args.transforms: needs the")
    for off in (None, {}):  # off: the part is not asked for (older checkpoints' configs hold such values)
        config = run.checked_config(with_changes(tiny_config, data_loader__args={**tiny_config["data_loader"]["args"],
                                                                                 "transforms": off}))[0]
        assert next(iter(build.build_data_loader(config)))[0].dtype == torch.float32


def test_a_loader_without_its_part_is_one_line(tiny_config, monkeypatch):
    from trainer import build, run

    if not parts.PART_LOADERS:
        pytest.skip("no part provides a data loader")
    loader = parts.PART_LOADERS[0]
    owner = next(name for name, part in parts.PARTS.items() if loader in part.loaders)
    _files_gone(monkeypatch, owner)
    config = with_changes(tiny_config, data_loader={"type": loader, "args": {}})
    with pytest.raises(ConfigError) as info:
        run.checked_config(config)
    assert info.value.problems == [f"data_loader.type {loader}: needs the {owner} part ({parts.PARTS[owner].about}),"
                                   f" whose files are not in this project ({parts.PARTS[owner].files[0]}); restore them,"
                                   " or remove the setting"]
    with pytest.raises(ConfigError) as info:  # a typo still lists the parts' loaders with the core's
        build.registries()["data_loader"].get(loader + "x", "data_loader.type")
    assert f"did you mean {loader!r}" in str(info.value) and "DigitsDataLoader" in str(info.value)

