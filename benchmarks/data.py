"""Samples per second of the data path: the in-memory fast path against torch's DataLoader.

    python benchmarks/data.py                          # digits and MNIST-shaped synthetic data
    python benchmarks/data.py --mnist-dir ../shared/data/mnist-t10k   # real MNIST IDX files instead
    python benchmarks/data.py --smoke                  # tiny data, one round: checks it runs

For the default config's data (``DigitsDataLoader``: scikit-learn's digits, batch 32,
validation split 0.1) and the MNIST config's (batch 128, validation split 0.1), one
epoch of training batches is read, and nothing done with them, by:

* ``torch DataLoader``: a plain ``torch.utils.data.DataLoader(Subset(dataset, train
  indices), batch_size, shuffle=True)``: per-sample ``__getitem__`` and the default collate;
* ``BaseDataLoader in_memory=False``: the project's ordinary path (the same torch
  ``DataLoader`` with its own seeded sampler);
* ``BaseDataLoader in_memory=True``: the fast path (a batch is one index into the
  dataset's tensors);

the first two with 0 and 2 worker processes (persistent workers, so the figure is the
steady state; the first epoch, which starts the workers, is reported apart). Each path
is timed over whole epochs, repeated until a measurement lasts long enough, for several
rounds in a rotating order; the median is reported. One torch thread, as in
``overhead.py`` (repeatable timings on a small machine).

MNIST: the real 60,000-image training set is not something users' tests can rely on, so
by default the MNIST-shaped data is ``SyntheticDataset(60000, (1, 28, 28))``. With
``--mnist-dir DIR``, the IDX files in DIR (``train-*`` if present, else ``t10k-*``, gzipped
or not) are read with ``data_loader.idx.read_idx`` and normalised as ``MnistDataset`` does.

Augmentation (``augmentation`` in the results): CIFAR-shaped uint8 images (3x32x32,
10,000 of them; 512 with ``--smoke``) through 4-pixel padded random crop + horizontal
flip + normalise, as ``configs/cifar10.json`` trains, by

* ``per-sample v2, N workers``: the loader's per-sample path, ``torchvision.transforms.v2``
  on each image in ``__getitem__``, collated by torch's ``DataLoader`` (0 and 2 workers);
* ``batched fast path``: the in-memory path, each batch augmented at once;
* ``fast path, no augmentation``: the in-memory path with only the uint8 -> float conversion;

and, for scale, one ResNet-20 training step at batch 128 (the share augmentation adds to it).

Image folders (``image_folder``): a folder of PNG files (2,000 CIFAR-sized images; 64
with ``--smoke``) read by ``ImageFolderDataLoader``: the first construction decodes every
file and writes the cache, a second one reads the cache; images per second of each, and
of one epoch read from the files (``in_memory: false``, 0 workers).

Both come from optional parts (utils/parts.py): without the augment part's or the image-folder
part's files, that section is left out (``null`` in the results).

Time to first step and time to accuracy are in ``benchmarks/startup.py``.
Results: tables on stdout and ``benchmarks/results/data.json``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C

WORKER_COUNTS = (0, 2)


def _idx_path(folder: Path, stem: str):
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def idx_mnist_dataset(folder):
    """A TensorDataset of the MNIST IDX files in ``folder`` (the training files if there, else the t10k ones)."""
    import torch

    from base.base_data_loader import TensorDataset
    from data_loader.builtin import MNIST_MEAN, MNIST_STD
    from data_loader.idx import read_idx
    from utils.errors import UserError

    folder = Path(folder)
    for split in ("train", "t10k"):
        images = _idx_path(folder, f"{split}-images-idx3-ubyte")
        labels = _idx_path(folder, f"{split}-labels-idx1-ubyte")
        if images and labels:
            break
    else:
        raise UserError(f"--mnist-dir {folder}: no train-/t10k-images-idx3-ubyte[.gz] with its labels file there")

    class IdxMnist(TensorDataset):
        def __init__(self):
            x = torch.from_numpy(read_idx(images).copy())
            y = torch.from_numpy(read_idx(labels).astype("int64"))
            inputs = x.to(torch.float32).div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze_(1)
            self._set(inputs, y, num_classes=10)

    dataset = IdxMnist()
    return dataset, f"real MNIST from {images.name} ({len(dataset):,} images)"


def datasets_for(args):
    """``name -> (dataset, description, batch_size, validation_split)`` as the configs set them."""
    from data_loader.builtin import SyntheticDataset
    from data_loader.data_loaders import DigitsDataset

    out = {}
    digits = DigitsDataset(train=True)
    out["digits"] = (digits, f"scikit-learn digits, training split ({len(digits):,} 8x8 images)", 32, 0.1)
    if args.mnist_dir:
        mnist, description = idx_mnist_dataset(args.mnist_dir)
        if args.smoke:
            mnist._set(*(t[:1024] for t in mnist.tensors()), num_classes=10)
    else:
        n = 1024 if args.smoke else 60_000
        mnist = SyntheticDataset(n, (1, 28, 28), 10, seed=0)
        description = f"MNIST-shaped synthetic data ({n:,} samples of 1x28x28)"
    out["mnist"] = (mnist, description, 128, 0.1)
    return out


def make_paths(dataset, batch_size, split):
    """``path name -> (iterable over one epoch's batches, number of samples in an epoch, close)``."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from base.base_data_loader import BaseDataLoader

    paths = {}
    fast = BaseDataLoader(dataset, batch_size, shuffle=True, validation_split=split, in_memory=True, seed=0)
    train_indices = fast.sampler.indices.tolist()
    n = len(train_indices)
    for workers in WORKER_COUNTS:
        plain = DataLoader(Subset(dataset, train_indices), batch_size=batch_size, shuffle=True, num_workers=workers,
                           persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
        paths[f"torch DataLoader, {workers} workers"] = plain
        paths[f"BaseDataLoader in_memory=False, {workers} workers"] = BaseDataLoader(
            dataset, batch_size, shuffle=True, validation_split=split, in_memory=False, num_workers=workers, seed=0)
    paths["BaseDataLoader in_memory=True"] = fast
    return paths, n


class PathTimer:
    """Epochs of one path: ``first`` (the first epoch, which starts any workers) and timed repeats."""

    def __init__(self, loader):
        self.loader, self.epoch = loader, 0
        self.first_s = None

    def one_epoch(self):
        self.epoch += 1
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        batches = 0
        for _ in self.loader:
            batches += 1
        return batches

    def timed(self, min_seconds):
        """Whole epochs until ``min_seconds`` have passed; returns seconds per epoch."""
        epochs, t0 = 0, time.perf_counter()
        while True:
            self.one_epoch()
            epochs += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                return elapsed / epochs


def interleaved_epochs(paths, rounds, min_seconds, n, log, name):
    """Time each path's epochs over ``rounds`` rounds, each round starting with the next path (so a slow moment
    of the machine falls on every path alike); returns the timers (with ``first_s``, the first epoch's time)
    and each path's epoch times."""
    timers = {path: PathTimer(loader) for path, loader in paths.items()}
    for timer in timers.values():
        t0 = time.perf_counter()
        timer.one_epoch()
        timer.first_s = time.perf_counter() - t0
    samples = {path: [] for path in timers}
    names = list(timers)
    for r in range(rounds):
        for path in names[r % len(names):] + names[: r % len(names)]:
            samples[path].append(timers[path].timed(min_seconds))
        log(f"  {name} round {r + 1}/{rounds}: " + ", ".join(f"{p}: {n / samples[p][-1]:,.0f}/s" for p in names))
    return timers, samples


def bench_dataset(name, dataset, description, batch_size, split, rounds, min_seconds, log):
    paths, n = make_paths(dataset, batch_size, split)
    timers, samples = interleaved_epochs(paths, rounds, min_seconds, n, log, name)
    names = list(timers)
    fast_rate = n / statistics.median(samples["BaseDataLoader in_memory=True"])
    result = {
        "description": description,
        "batch_size": batch_size,
        "validation_split": split,
        "samples_per_epoch": n,
        "rounds": rounds,
        "paths": {},
    }
    for path in names:
        median_s = statistics.median(samples[path])
        result["paths"][path] = {
            "samples_per_s": n / median_s,
            "best_samples_per_s": n / min(samples[path]),
            "epoch_s": median_s,
            "first_epoch_s": timers[path].first_s,
            "epoch_s_samples": samples[path],
            "fast_path_speedup": fast_rate / (n / median_s),
        }
    for loader in paths.values():
        stop_workers(loader)
    return result


def stop_workers(loader):
    """Shut down a loader's persistent workers now.

    ``BaseDataLoader`` and its torch ``DataLoader`` form a reference cycle (through the
    batch sampler), so dropping the loader leaves its workers running until the cyclic
    garbage collector frees it, and the DataLoader's ``__del__`` then waits seconds for them.
    """
    inner = getattr(loader, "_loader", loader)  # BaseDataLoader keeps its torch DataLoader in _loader
    iterator = getattr(inner, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


# --------------------------------------------------------------------------- augmentation

CIFAR_AUGMENTATION = {
    "train": [{"type": "RandomCrop", "args": {"size": 32, "padding": 4}}, {"type": "RandomHorizontalFlip"},
              {"type": "Normalize", "args": {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}}],
}
AUGMENTATION_PATHS = ("per-sample v2, 0 workers", "per-sample v2, 2 workers", "batched fast path",
                      "fast path, no augmentation")


def cifar_shaped_images(n, seed=0):
    """``n`` random uint8 images of 3x32x32 with labels, as an in-memory image dataset."""
    import torch

    class Images(torch.utils.data.Dataset):
        uint8_images = True

        def __init__(self):
            generator = torch.Generator().manual_seed(seed)
            self.images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
            self.targets = torch.randint(0, 10, (n,), generator=generator)

        def tensors(self):
            return self.images, self.targets

        def __len__(self):
            return n

        def __getitem__(self, index):
            return self.images[index], int(self.targets[index])

    return Images()


def augmentation_paths(dataset, batch_size=128):
    from base.base_data_loader import BaseDataLoader

    common = {"batch_size": batch_size, "shuffle": True, "validation_split": 0.1, "seed": 0}
    paths = {}
    for workers in WORKER_COUNTS:
        paths[f"per-sample v2, {workers} workers"] = BaseDataLoader(
            dataset, in_memory=False, num_workers=workers, transforms=CIFAR_AUGMENTATION, **common)
    paths["batched fast path"] = BaseDataLoader(dataset, transforms=CIFAR_AUGMENTATION, **common)
    paths["fast path, no augmentation"] = BaseDataLoader(dataset, **common)
    return paths


def resnet20_step_s(batch_size, steps):
    """Seconds of one CPU training step of ResNet-20 on CIFAR-shaped inputs (the median of ``steps``)."""
    import torch

    from model.builtin import CifarResNet

    model = CifarResNet(depth=20)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def bench_augmentation(n, rounds, min_seconds, smoke, log):
    dataset = cifar_shaped_images(n)
    paths = augmentation_paths(dataset)
    samples_per_epoch = len(paths["batched fast path"].sampler)
    timers, samples = interleaved_epochs(paths, rounds, min_seconds, samples_per_epoch, log, "augmentation")
    names = list(timers)
    for loader in paths.values():
        stop_workers(loader)
    rates = {path: samples_per_epoch / statistics.median(samples[path]) for path in names}
    best_per_sample = max(rates[p] for p in names if p.startswith("per-sample"))
    batch = 128
    step_s = resnet20_step_s(16 if smoke else batch, 1 if smoke else 3) * (batch / 16 if smoke else 1)
    augment_s = batch / rates["batched fast path"] - batch / rates["fast path, no augmentation"]
    return {
        "description": f"{n:,} random uint8 CIFAR-shaped images (3x32x32), batch {batch}: "
                       "RandomCrop(32, padding=4) + RandomHorizontalFlip + Normalize",
        "samples_per_epoch": samples_per_epoch,
        "rounds": rounds,
        "paths": {
            path: {"samples_per_s": rates[path], "epoch_s_samples": samples[path], "first_epoch_s": timers[path].first_s}
            for path in names
        },
        "batched_vs_best_per_sample": rates["batched fast path"] / best_per_sample,
        "resnet20_step_s": step_s,
        "augmentation_s_per_batch": augment_s,
        "augmentation_share_of_step": augment_s / step_s,
    }


# --------------------------------------------------------------------------- image folders


def write_png_folder(root, n, classes=10, seed=0):
    """``n`` random 32x32 RGB PNG files in ``classes`` class folders under ``root``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = Path(root) / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        # Smooth images (noise blurred by upsampling) compress like photographs, unlike pure noise.
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((32, 32), Image.Resampling.BILINEAR).save(folder / f"{i:05d}.png")


def bench_image_folder(n, log):
    from utils import parts

    ImageFolderDataLoader = parts.provider("loaders", "ImageFolderDataLoader")

    root = Path(tempfile.mkdtemp(prefix="bench_image_folder_"))
    try:
        write_png_folder(root / "images", n)
        args = {"data_dir": str(root / "images"), "test_split": 0, "validation_split": 0, "batch_size": 128,
                "cache_dir": str(root / "cache")}
        t0 = time.perf_counter()
        ImageFolderDataLoader(**args)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached = ImageFolderDataLoader(**args)
        cached_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in cached:
            pass
        cached_epoch_s = time.perf_counter() - t0
        streamed = ImageFolderDataLoader(**args, in_memory=False, image_size=32)
        t0 = time.perf_counter()
        for _ in streamed:
            pass
        streamed_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "description": f"{n:,} PNG files of 32x32 RGB in 10 class folders",
        "images": n,
        "first_construction_s": first_s,
        "cached_construction_s": cached_s,
        "cached_epoch_s": cached_epoch_s,
        "streamed_epoch_s": streamed_s,
        "images_per_s": {
            "first epoch: decode and write the cache": n / first_s,
            "later runs: read the cache": n / cached_s,
            "cached epoch (in-memory fast path)": n / cached_epoch_s,
            "from the files (in_memory false, 0 workers)": n / streamed_s,
        },
    }
    log("  image folder: " + ", ".join(f"{k}: {v:,.0f}/s" for k, v in result["images_per_s"].items()))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="Samples per second of the data path.")
    parser.add_argument("--smoke", action="store_true", help="tiny data, one round")
    parser.add_argument("--out", help="folder for data.json (default benchmarks/results/)")
    parser.add_argument("--mnist-dir", help="a folder with MNIST IDX files (train-* or t10k-*, .gz or not)")
    parser.add_argument("--rounds", type=int, help="rounds per path (default 5; 1 with --smoke)")
    args = parser.parse_args(argv)

    import torch

    from utils import parts

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rounds = args.rounds or (1 if args.smoke else 5)
    min_seconds = 0.02 if args.smoke else 0.5
    out = sys.stdout

    def log(message):
        print(message, file=sys.stderr, flush=True)

    results = {}
    try:
        for name, (dataset, description, batch, split) in datasets_for(args).items():
            log(f"{name}: {description}, batch {batch}")
            results[name] = bench_dataset(name, dataset, description, batch, split, rounds, min_seconds, log)
        augmentation = folder = None
        if parts.present("augment"):
            log("augmentation: CIFAR-shaped images")
            augmentation = bench_augmentation(512 if args.smoke else 10_000, rounds, min_seconds, args.smoke, log)
        if parts.present("image_folder"):
            log("image folder: PNG files")
            folder = bench_image_folder(64 if args.smoke else 2_000, log)
    finally:
        torch.set_num_threads(threads)

    data = {
        "benchmark": "data",
        "smoke": args.smoke,
        "environment": {**C.environment(), "torch_threads": 1},
        "datasets": results,
        "augmentation": augmentation,
        "image_folder": folder,
    }
    path = C.write_results("data", data, args.out)

    rows = []
    for name, result in results.items():
        for i, (p, r) in enumerate(result["paths"].items()):
            rows.append([name if i == 0 else "", p, f"{r['samples_per_s']:,.0f}", f"{r['best_samples_per_s']:,.0f}",
                         f"{r['epoch_s'] * 1e3:.1f}", f"{r['first_epoch_s'] * 1e3:.1f}", f"{r['fast_path_speedup']:.1f}x"])
    print(C.table(["data", "path", "samples/s (median)", "samples/s (best)", "epoch ms", "first epoch ms",
                   "fast path is"], rows), file=out)
    for name, result in results.items():
        print(f"{name}: {result['description']}; batch {result['batch_size']}, {result['samples_per_epoch']:,} training"
              f" samples an epoch (validation split {result['validation_split']}), {result['rounds']} rounds", file=out)
    if augmentation is not None:
        rows = [[p, f"{r['samples_per_s']:,.0f}", f"{r['first_epoch_s'] * 1e3:.1f}"] for p, r in augmentation["paths"].items()]
        print("\n" + C.table(["augmentation path", "samples/s (median)", "first epoch ms"], rows), file=out)
        print(f"augmentation: {augmentation['description']}; batched fast path is "
              f"{augmentation['batched_vs_best_per_sample']:.1f}x the best per-sample path; it adds "
              f"{augmentation['augmentation_s_per_batch'] * 1e3:.2f} ms a batch, {augmentation['augmentation_share_of_step']:.2%}"
              f" of a ResNet-20 CPU training step ({augmentation['resnet20_step_s'] * 1e3:.0f} ms at batch 128)", file=out)
    if folder is not None:
        rows = [[k, f"{v:,.0f}"] for k, v in folder["images_per_s"].items()]
        print("\n" + C.table(["image folder", "images/s"], rows), file=out)
        print(f"image folder: {folder['description']}", file=out)
    print(f"results: {path}", file=out)
    return data


if __name__ == "__main__":
    main()
