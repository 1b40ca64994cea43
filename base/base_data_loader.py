"""Batching a dataset: a validation split, a reproducible data order, and a fast in-memory path.

The order of the samples is a pure function of ``(seed, epoch)``: each epoch draws a
permutation from a generator seeded with ``seed + epoch`` (as torch's
``DistributedSampler`` does), never from the global RNG. That is what makes a run
resumable mid-epoch (skip the batches already seen) and shardable over processes
(each process takes every ``world_size``-th index of the same permutation).
"""

import math
import weakref

import torch
from torch.utils.data import DataLoader, Sampler

from utils.errors import UserError


class EpochSampler(Sampler):
    """The indices of one process for one epoch, in an order fixed by ``(seed, epoch)``.

    With ``world_size > 1`` each process gets every ``world_size``-th index of the same
    permutation. ``pad=True`` (training) repeats indices so every process gets the same
    count, as ``DistributedSampler`` does; ``pad=False`` (evaluation) never counts a sample twice.
    """

    def __init__(self, indices, shuffle, seed, rank=0, world_size=1, pad=True):
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.rank, self.world_size, self.pad = rank, world_size, pad

    def set_epoch(self, epoch):
        self.epoch = epoch

    def order(self):
        indices = self.indices
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = indices[torch.randperm(len(indices), generator=generator)]
        if self.world_size > 1:
            if self.pad:
                total = math.ceil(len(indices) / self.world_size) * self.world_size
                indices = torch.cat([indices, indices[: total - len(indices)]])
            indices = indices[self.rank :: self.world_size]
        return indices

    def __iter__(self):
        return iter(self.order().tolist())

    def __len__(self):
        n = len(self.indices)
        if self.world_size == 1:
            return n
        if self.pad:
            return math.ceil(n / self.world_size)
        return len(range(self.rank, n, self.world_size))


class _BatchIndices:
    """The batches of one epoch as lists of indices, starting at a given batch (for a mid-epoch resume).

    It holds its loader through a weak reference: a strong one would make a cycle
    (loader -> torch DataLoader -> this -> loader) that keeps worker processes alive
    until the garbage collector happens to run.
    """

    def __init__(self, loader):
        self._loader = weakref.ref(loader)

    def __iter__(self):
        loader = self._loader()
        order, size = loader._epoch_order(), loader.batch_size
        for start in range(0, len(order), size):
            yield order[start : start + size].tolist()

    def __len__(self):
        return len(self._loader())


class BaseDataLoader:
    """Iterates over a dataset in batches of ``(inputs, targets)``; splits off validation data.

    Args:
        dataset: a map-style dataset. If it has ``tensors()`` returning all inputs and
            targets as two tensors, and ``in_memory`` is true, batches are made by indexing
            those tensors (no per-sample ``__getitem__`` and collate): the same samples in
            the same order, much faster.
        batch_size: samples per batch, per process.
        shuffle: a new order each epoch, fixed by ``seed`` and the epoch number.
        validation_split: a fraction in (0, 1) or a count of samples held out for
            validation, chosen with a generator seeded by ``seed``.
        num_workers, pin_memory, persistent_workers, prefetch_factor: passed to
            ``torch.utils.data.DataLoader`` on the ordinary path. ``pin_memory=None`` pins
            when CUDA is available.
        in_memory: use the tensor path when the dataset offers ``tensors()``.
        device_resident: on the tensor path, keep the whole dataset on the training
            device (set by the trainer with :meth:`to`), so batches never cross the bus.
        drop_last: drop a last batch smaller than ``batch_size``.
        seed: the seed of the split and of the data order.
    """

    def __init__(self, dataset, batch_size=64, shuffle=True, validation_split=0.0, num_workers=0,
                 pin_memory=None, persistent_workers=None, prefetch_factor=None, in_memory=True,
                 device_resident=False, drop_last=False, seed=0, indices=None):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise UserError(f"data_loader.args.batch_size: got {batch_size!r}, expected a positive integer")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise UserError(f"data_loader.args.num_workers: got {num_workers!r}, expected an integer >= 0")
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.drop_last, self.seed = drop_last, seed
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers
        self.prefetch_factor = prefetch_factor
        self.in_memory = in_memory and hasattr(dataset, "tensors")
        self.device_resident = device_resident
        self._tensors = dataset.tensors() if self.in_memory else None
        self._device = None
        self.start_batch = 0

        all_indices = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices)
        train_idx, self.valid_idx = self._split(all_indices, validation_split, seed)
        self.sampler = EpochSampler(train_idx, shuffle, seed)
        self._loader = None

    @staticmethod
    def _split(indices, split, seed):
        n = len(indices)
        if split is None or split == 0:
            return indices, None
        if isinstance(split, bool) or not isinstance(split, (int, float)) or split < 0:
            raise UserError(f"data_loader.args.validation_split: got {split!r}, expected a fraction in [0, 1) or a sample count")
        count = int(split) if isinstance(split, int) else round(n * split)
        if isinstance(split, float) and split >= 1 or not 0 < count < n:
            raise UserError(
                f"data_loader.args.validation_split: {split!r} leaves {n - count} of {n} samples for training;"
                " use a fraction in (0, 1) or a count below the dataset size"
            )
        # Its own generator: the split is the same whatever else used the global RNG before.
        perm = indices[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
        return perm[count:], perm[:count]

    def split_validation(self):
        """A loader over the held-out samples (fixed order, no padding), or None when there are none."""
        if self.valid_idx is None:
            return None
        valid = BaseDataLoader.__new__(BaseDataLoader)
        valid.__dict__.update(self.__dict__)
        valid.shuffle, valid.drop_last, valid.valid_idx, valid._loader = False, False, None, None
        valid.start_batch = 0  # a resume position belongs to the training data
        valid.sampler = EpochSampler(self.valid_idx, shuffle=False, seed=self.seed, pad=False)
        return valid

    # ---- configuration by the trainer

    def shard(self, rank, world_size):
        """Read only this process's share (training pads to equal shares; evaluation does not)."""
        self.sampler.rank, self.sampler.world_size = rank, world_size
        self._loader = None

    def to(self, device):
        """On the in-memory path with ``device_resident``, move the whole dataset to ``device`` once."""
        if self.in_memory and self.device_resident:
            self._tensors = tuple(t.to(device) for t in self._tensors)
            self._device = torch.device(device)
        return self

    def set_epoch(self, epoch, start_batch=0):
        """Select the epoch's order and the first batch to yield (non-zero when resuming mid-epoch)."""
        self.sampler.set_epoch(epoch)
        self.start_batch = start_batch

    # ---- iteration

    def _epoch_order(self):
        order = self.sampler.order()
        usable = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        return order[self.start_batch * self.batch_size : usable]

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        if self.in_memory:
            return self._iter_tensors()
        if self._loader is None:
            self._loader = self._make_loader()
        # torch seeds Python, NumPy and torch in each worker from this generator: reseeding it per epoch
        # makes every worker's random draws (augmentations, say) a function of the seed and the epoch.
        self._generator.manual_seed(self.seed + self.sampler.epoch)
        return iter(self._loader)

    def _iter_tensors(self):
        inputs, targets = self._tensors
        order = self._epoch_order()
        if self._device is not None:
            order = order.to(self._device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield inputs[idx], targets[idx]

    def _make_loader(self):
        self._generator = torch.Generator()
        extra = {}
        if self.num_workers > 0:
            extra = {"persistent_workers": self.persistent_workers}
            if self.prefetch_factor is not None:
                extra["prefetch_factor"] = self.prefetch_factor
        return DataLoader(
            self.dataset, batch_sampler=_BatchIndices(self), num_workers=self.num_workers,
            pin_memory=self.pin_memory, generator=self._generator, **extra,
        )
