"""The built-in data sets besides the default digits: MNIST, CIFAR-10 and seeded synthetic data.

Imported only when a config names one of their loaders (``BUILTIN`` in data_loader/data_loaders.py).
Each dataset is a :class:`~base.base_data_loader.TensorDataset`, held whole in memory: ``(image,
label)`` pairs, ``image`` a normalised float32 tensor of shape ``input_shape`` (C, H, W) and
``label`` an int in ``range(num_classes)``. Each loader builds its dataset and hands it to
:class:`BaseDataLoader`, as the digits loader in data_loader/data_loaders.py does.

torchvision is imported inside the constructors that need it, so that importing this module
stays cheap.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import math
import os
import pickle
import shutil
import socket
import tarfile
import zlib
from urllib.error import URLError

import torch

from base.base_data_loader import BaseDataLoader, TensorDataset
from utils.errors import UserError

# ---------------------------------------------------------------------------
# normalisation constants
# ---------------------------------------------------------------------------

# MNIST: the customary constants (mean and std of the 60,000 training images in [0, 1])
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# CIFAR-10: per-channel (R, G, B) mean and std of the 50,000 training images in [0, 1].
# (The also-common std (0.2023, 0.1994, 0.2010) is the mean of per-image stds, not the set's std.)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Socket timeout while torchvision downloads, so that a dead network fails instead of hanging.
DOWNLOAD_TIMEOUT_S = 60

# Errors a download or an archive extraction can end in (RecursionError is a RuntimeError).
_DOWNLOAD_ERRORS = (URLError, OSError, RuntimeError, ValueError, EOFError, http.client.HTTPException, tarfile.TarError, zlib.error)
# Errors torchvision's readers raise on damaged files (its IDX reader uses assert).
_READ_ERRORS = (RuntimeError, ValueError, TypeError, AssertionError, KeyError, IndexError, OSError, EOFError, pickle.UnpicklingError)

_MAX_ELEMENTS = 2**30  # 4 GiB of float32: a larger synthetic set is almost surely a config typo


# ---------------------------------------------------------------------------
# argument checks (UserError, never assert)
# ---------------------------------------------------------------------------


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_bool(owner: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{owner}: {name} must be true or false, got {value!r}")
    return value


def _check_int(owner: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise UserError(f"{owner}: {name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _check_dir(owner: str, value) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise UserError(f"data_loader.args.data_dir: got {value!r}, expected the folder {owner} reads (a non-empty"
                        " path; \"data/\" by default)")
    return os.path.expanduser(os.fspath(value))


def _folder(path: str) -> str:
    return os.path.join(path, "")  # with a trailing separator, as in messages


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


# ---------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _gunzip_missing(folder: str, names) -> None:
    """For each ``name`` missing in ``folder`` whose ``name.gz`` is there, unpack the .gz beside it."""
    for name in names:
        target = os.path.join(folder, name)
        packed = target + ".gz"
        if os.path.isfile(target) or not os.path.isfile(packed):
            continue
        partial = target + ".partial"
        try:
            with gzip.open(packed, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(partial, target)
        except (OSError, EOFError, zlib.error) as err:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise UserError(f"cannot unpack {packed} ({_one_line(err)}): replace it with the original file") from err


class MnistDataset(TensorDataset):
    """torchvision's MNIST (28x28 grey digits, shape (1, 28, 28)), converted to tensors once.

    torchvision reads ``<data_dir>/MNIST/raw/`` and needs all four unpacked files there
    (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
    t10k-labels-idx1-ubyte) whichever split is asked for. The gzipped files from the
    MNIST site (the same names + ``.gz``) may be put there instead: they are unpacked
    beside themselves on first use. Pixels are scaled to [0, 1] and normalised with
    :data:`MNIST_MEAN` / :data:`MNIST_STD`.
    """

    def __init__(self, data_dir: str = "data/", train: bool = True, download: bool = False):
        owner = "MnistDataset"
        root = _check_dir(owner, data_dir)
        self.train = _check_bool(owner, "train", train)
        download = _check_bool(owner, "download", download)
        raw = os.path.join(root, "MNIST", "raw")
        processed = os.path.join(root, "MNIST", "processed")
        wanted = ", ".join(name + ".gz" for name in MNIST_FILES)
        put_there = f"put {wanted} there (gzipped or unpacked)"

        from torchvision.datasets import MNIST

        # torchvision's older cache (processed/training.pt and test.pt) takes precedence over raw/
        legacy = all(os.path.isfile(os.path.join(processed, f)) for f in ("training.pt", "test.pt"))
        dataset = None
        if not legacy:
            _gunzip_missing(raw, MNIST_FILES)
            missing = [name for name in MNIST_FILES if not os.path.isfile(os.path.join(raw, name))]
            if missing and download:
                try:
                    with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                        dataset = MNIST(root=root, train=train, download=True)
                except _DOWNLOAD_ERRORS + _READ_ERRORS as err:
                    raise UserError(
                        f"MNIST download to {_folder(raw)} failed ({_one_line(err)}): {put_there} by hand"
                    ) from err
            elif missing:
                which = "" if len(missing) == len(MNIST_FILES) else f" (missing {', '.join(missing)})"
                raise UserError(
                    f"MNIST files not found in {_folder(raw)}{which}: {put_there} "
                    f"(or set data_loader.args.download=true on a machine with network access)"
                )
            else:
                self._check_files(raw)
        if dataset is None:
            try:
                dataset = MNIST(root=root, train=train, download=False)
            except _READ_ERRORS as err:
                where = processed if legacy else raw
                raise UserError(f"cannot read MNIST from {_folder(where)} ({_one_line(err)}): replace the files with the originals") from err

        images, labels = dataset.data, dataset.targets
        split_file = os.path.join(raw, MNIST_FILES[1] if train else MNIST_FILES[3])
        if images.dtype != torch.uint8 or images.dim() != 3 or len(images) != len(labels) or len(images) == 0:
            raise UserError(f"MNIST data in {_folder(raw)} is malformed (images {tuple(images.shape)}, labels {tuple(labels.shape)})")
        labels = labels.to(torch.int64)
        if labels.min() < 0 or labels.max() > 9:
            raise UserError(f"MNIST labels in {split_file} must be 0..9, found {int(labels.min())}..{int(labels.max())}")
        inputs = images.to(torch.float32).div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze_(1)
        self._set(inputs, labels, num_classes=10)

    def _check_files(self, raw: str) -> None:
        """Check the headers and sizes of the split's two files, for a clear message on damage."""
        from data_loader.idx import read_idx_header

        stem = "train" if self.train else "t10k"
        images_path = os.path.join(raw, f"{stem}-images-idx3-ubyte")
        labels_path = os.path.join(raw, f"{stem}-labels-idx1-ubyte")
        images_dtype, images_shape, _ = read_idx_header(images_path)
        labels_dtype, labels_shape, _ = read_idx_header(labels_path)
        if images_dtype.itemsize != 1 or images_dtype.kind != "u" or len(images_shape) != 3:
            raise UserError(f"{images_path} must hold uint8 images (N, H, W) (magic 0x00000803), found {images_dtype} {images_shape}")
        if labels_dtype.itemsize != 1 or labels_dtype.kind != "u" or len(labels_shape) != 1:
            raise UserError(f"{labels_path} must hold uint8 labels (N,) (magic 0x00000801), found {labels_dtype} {labels_shape}")
        if images_shape[0] != labels_shape[0]:
            raise UserError(f"{images_path} holds {images_shape[0]} images but {labels_path} holds {labels_shape[0]} labels")
        if images_shape[0] == 0:
            raise UserError(f"{images_path} holds no images")


# ---------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta")


def cifar10_to_tensors(data, targets, where: str = "CIFAR-10 data"):
    """Convert CIFAR-10 uint8 images (N, 32, 32, 3) (HWC, as torchvision holds them) and labels.

    Returns ``(inputs, labels)``: float32 (N, 3, 32, 32) in [0, 1] normalised per channel
    with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`, and int64 labels.
    """
    images = torch.as_tensor(data)
    labels = torch.as_tensor(targets, dtype=torch.int64)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3 or len(images) != len(labels) or len(labels) == 0:
        raise UserError(f"CIFAR-10 data in {where} is malformed (images {tuple(images.shape)} {images.dtype}, labels {tuple(labels.shape)})")
    if labels.min() < 0 or labels.max() > 9:
        raise UserError(f"CIFAR-10 labels in {where} must be 0..9, found {int(labels.min())}..{int(labels.max())}")
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float32).view(1, 3, 1, 1)
    inputs = images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0).sub_(mean).div_(std)
    return inputs.contiguous(), labels


class Cifar10Dataset(TensorDataset):
    """torchvision's CIFAR-10 (32x32 colour images, shape (3, 32, 32)), converted to tensors once.

    torchvision reads ``<data_dir>/cifar-10-batches-py/`` (data_batch_1..5, test_batch,
    batches.meta, all seven checked against their md5 sums). The archive
    ``<data_dir>/cifar-10-python.tar.gz`` may be put there instead: it is unpacked on
    first use. Normalised per channel with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`.
    """

    def __init__(self, data_dir: str = "data/", train: bool = True, download: bool = False):
        owner = "Cifar10Dataset"
        root = _check_dir(owner, data_dir)
        self.train = _check_bool(owner, "train", train)
        download = _check_bool(owner, "download", download)
        folder = os.path.join(root, CIFAR10_FOLDER)
        archive = os.path.join(root, CIFAR10_ARCHIVE)
        put_there = (
            f"put the folder {CIFAR10_FOLDER}/ ({', '.join(CIFAR10_FILES)}) in {_folder(root)}, "
            f"or the archive {CIFAR10_ARCHIVE} there"
        )

        from torchvision.datasets import CIFAR10

        def missing_files():
            return [name for name in CIFAR10_FILES if not os.path.isfile(os.path.join(folder, name))]

        missing = missing_files()
        if missing and os.path.isfile(archive):
            self._extract(archive, root)
            missing = missing_files()
        dataset = None
        if missing and download:
            try:
                with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                    dataset = CIFAR10(root=root, train=train, download=True)
            except _DOWNLOAD_ERRORS + _READ_ERRORS as err:
                raise UserError(f"CIFAR-10 download to {_folder(root)} failed ({_one_line(err)}): {put_there} by hand") from err
        elif missing:
            which = "" if len(missing) == len(CIFAR10_FILES) else f" (missing {', '.join(missing)})"
            raise UserError(
                f"CIFAR-10 files not found in {_folder(folder)}{which}: {put_there} "
                f"(or set data_loader.args.download=true on a machine with network access)"
            )
        if dataset is None:
            try:
                dataset = CIFAR10(root=root, train=train, download=False)
            except _READ_ERRORS as err:
                bad = self._first_damaged(CIFAR10, folder)
                if bad is not None:
                    raise UserError(
                        f"CIFAR-10 file {bad} is damaged (md5 mismatch): replace it with the one from {CIFAR10_ARCHIVE}"
                    ) from err
                raise UserError(f"cannot read CIFAR-10 from {_folder(folder)} ({_one_line(err)})") from err

        inputs, labels = cifar10_to_tensors(dataset.data, dataset.targets, where=_folder(folder))
        self.classes = list(getattr(dataset, "classes", []))
        self._set(inputs, labels, num_classes=10)

    @staticmethod
    def _extract(archive: str, root: str) -> None:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(CIFAR10_FOLDER + "/")]
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(root, members=members, filter="data")
                else:  # pragma: no cover - Python without extraction filters
                    tar.extractall(root, members=[m for m in members if m.isfile() and ".." not in m.name.split("/")])
        except (OSError, EOFError, tarfile.TarError, zlib.error) as err:
            raise UserError(f"cannot unpack {archive} ({_one_line(err)}): replace it with the original archive") from err

    @staticmethod
    def _first_damaged(cifar_cls, folder: str):
        from torchvision.datasets.utils import check_integrity

        expected = list(cifar_cls.train_list) + list(cifar_cls.test_list) + [[cifar_cls.meta["filename"], cifar_cls.meta["md5"]]]
        for name, md5 in expected:
            path = os.path.join(folder, name)
            if not check_integrity(path, md5):
                return path
        return None


# ---------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------


class SyntheticDataset(TensorDataset):
    """A seeded, learnable classification set of any input shape and class count.

    Each class has a random prototype (standard normal, one value per input element);
    a sample is its class's prototype plus ``noise`` times standard normal noise,
    divided by ``sqrt(1 + noise**2)`` so that inputs have unit variance. Labels are
    ``i % num_classes`` shuffled, so the classes are balanced to within one sample.
    Everything comes from the dataset's own ``torch.Generator`` seeded with ``seed``:
    same arguments, same data; the global RNG is neither used nor advanced.
    """

    def __init__(self, num_samples: int = 1024, input_shape=(1, 8, 8), num_classes: int = 10, seed: int = 0, noise: float = 1.0):
        owner = "SyntheticDataset"
        num_samples = _check_int(owner, "num_samples", num_samples, 1)
        num_classes = _check_int(owner, "num_classes", num_classes, 2)
        seed = _check_int(owner, "seed", seed, 0)
        if seed >= 2**63:
            raise UserError(f"{owner}: seed must be below 2**63, got {seed}")
        if (
            not isinstance(input_shape, (list, tuple))
            or len(input_shape) == 0
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in input_shape)
        ):
            raise UserError(f"{owner}: input_shape must be a list of positive integers such as [1, 8, 8], got {input_shape!r}")
        input_shape = tuple(int(s) for s in input_shape)
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
            raise UserError(f"{owner}: noise must be a number >= 0, got {noise!r}")
        per_sample = math.prod(input_shape)
        if (num_samples + num_classes) * per_sample > _MAX_ELEMENTS:
            raise UserError(
                f"{owner}: {num_samples} samples of shape {list(input_shape)} would need more than "
                f"{_MAX_ELEMENTS * 4 // 2**30} GiB; reduce num_samples or input_shape"
            )
        self.seed = seed
        self.noise = float(noise)

        gen = torch.Generator().manual_seed(seed)
        prototypes = torch.randn(num_classes, per_sample, generator=gen)
        labels = (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=gen)]
        inputs = prototypes[labels] + self.noise * torch.randn(num_samples, per_sample, generator=gen)
        inputs /= math.sqrt(1.0 + self.noise**2)
        self._set(inputs.view(num_samples, *input_shape), labels.to(torch.int64), num_classes=num_classes)


# ---------------------------------------------------------------------------
# the loaders
# ---------------------------------------------------------------------------


class _FilesDataLoader(BaseDataLoader):
    """A torchvision dataset read from files in ``data_dir`` (downloaded there when ``download`` is true)."""

    options_from = BaseDataLoader
    dataset_class = None

    def __init__(self, data_dir="data/", batch_size=128, shuffle=True, validation_split=0.1, training=True,
                 download=False, **options):
        dataset = self.dataset_class(data_dir, train=training, download=download)
        super().__init__(dataset, batch_size, shuffle and training, validation_split if training else 0.0,
                         training=training, **options)


class MnistDataLoader(_FilesDataLoader):
    """torchvision's MNIST: 60,000 training and 10,000 test images of 28x28, read from ``data_dir``."""

    dataset_class = MnistDataset


class Cifar10DataLoader(_FilesDataLoader):
    """torchvision's CIFAR-10: 50,000 training and 10,000 test colour images of 32x32, read from ``data_dir``."""

    dataset_class = Cifar10Dataset


class SyntheticDataLoader(BaseDataLoader):
    """Seeded random classification data of any shape; the last ``test_fraction`` is the test split."""

    options_from = BaseDataLoader

    def __init__(self, num_samples=1024, input_shape=(1, 8, 8), num_classes=10, noise=1.0, data_seed=0,
                 test_fraction=0.2, batch_size=64, shuffle=True, validation_split=0.1, training=True, **options):
        dataset = SyntheticDataset(num_samples, input_shape, num_classes, seed=data_seed, noise=noise)
        n_test = round(num_samples * test_fraction)
        indices = range(num_samples - n_test) if training else range(num_samples - n_test, num_samples)
        super().__init__(dataset, batch_size, shuffle and training, validation_split if training else 0.0,
                         training=training, indices=list(indices), **options)
