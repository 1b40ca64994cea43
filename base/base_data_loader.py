"""Batching a dataset: a validation split, a reproducible data order, and a fast in-memory path.

The order of the samples is a pure function of ``(seed, epoch)`` (a permutation from a generator seeded with
``seed + epoch``, never the global RNG): a run resumes mid-epoch by skipping the batches seen, and each of
``world_size`` processes takes every ``world_size``-th index of the same permutation.

A dataset offering its samples as two tensors (``tensors()``) is batched by indexing them: no per-sample
``__getitem__``, no collate. Any other goes through torch's ``DataLoader`` (base/sample_loader.py) in the
same order. Augmentation is the part owning ``data_loader.args.transforms``; its pipelines draw from
``(seed, epoch)`` and a batch's place in the epoch, so a resumed run replays them.
"""

import math
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from utils import parts
from utils.errors import ConfigError, UserError

TRANSFORMS = "data_loader.args.transforms"  # the key of the part that augments (utils/parts.py)


def to_float(x):
    """uint8 images to float32 in [0, 1]; anything else unchanged."""
    return x.to(torch.float32).mul_(1.0 / 255.0) if x.dtype == torch.uint8 else x


@dataclass(eq=False)
class EpochSampler:
    """The indices (an int64 tensor) one process reads in one epoch, in an order fixed by ``(seed, epoch)``.

    ``pad=True`` (training) repeats indices so every process gets as many, as ``DistributedSampler`` does;
    ``pad=False`` (evaluation) never counts a sample twice.
    """

    indices: torch.Tensor
    shuffle: bool
    seed: int
    rank: int = 0
    world_size: int = 1
    pad: bool = True
    epoch: int = 0

    def order(self, batch_size=1, start_batch=0, drop_last=False):
        """This process's indices for the epoch from batch ``start_batch`` on (a mid-epoch resume starts later);
        with ``drop_last``, whole batches only."""
        indices = self.indices
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = indices[torch.randperm(len(indices), generator=generator)]
        if self.world_size > 1:
            if self.pad:
                total = math.ceil(len(indices) / self.world_size) * self.world_size
                indices = torch.cat([indices, indices[: total - len(indices)]])
            indices = indices[self.rank :: self.world_size]
        usable = len(indices) - len(indices) % batch_size if drop_last else len(indices)
        return indices[start_batch * batch_size : usable]

    def __len__(self):
        n = len(self.indices)
        if self.world_size == 1:
            return n
        return math.ceil(n / self.world_size) if self.pad else len(range(self.rank, n, self.world_size))


class TensorDataset(Dataset):
    """A dataset held as two tensors: float32 ``inputs`` (N, *input_shape) and int64 ``targets`` (N,), offered
    whole by :meth:`tensors` to :class:`BaseDataLoader`'s fast path. Subclasses build them and call :meth:`_set`."""

    def _set(self, inputs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> None:
        if inputs.dtype != torch.float32 or targets.dtype != torch.int64 or len(inputs) != len(targets):
            raise TypeError("internal: inputs must be float32 and targets int64 of the same length")
        self._inputs = inputs.contiguous()
        self._targets = targets.contiguous()
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in inputs.shape[1:])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole dataset as ``(inputs, targets)``: the dataset's own tensors, not copies (do not modify them)."""
        return self._inputs, self._targets

    def __len__(self) -> int:
        return len(self._targets)

    def __getitem__(self, index):
        return self._inputs[index], int(self._targets[index])

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(samples={len(self)}, input_shape={self.input_shape}, num_classes={self.num_classes})"


class BaseDataLoader:
    """Iterates over a dataset in batches of ``(inputs, targets)``; splits off validation data.

    Args:
        dataset: a map-style dataset; with ``tensors()`` and ``in_memory``, batches index those two tensors.
            uint8 inputs come out as float32 in [0, 1]. Its ``class_names`` and ``feature_stats``, if any,
            become the loader's.
        batch_size: samples per batch, per process.
        shuffle: a new order each epoch, fixed by ``seed`` and the epoch number.
        validation_split: a fraction in (0, 1) or a count of samples held out for validation.
        num_workers, pin_memory, persistent_workers, prefetch_factor: for torch's ``DataLoader`` on the
            per-sample path. ``pin_memory=None`` pins when CUDA is available.
        in_memory: use the tensor path when the dataset offers ``tensors()``.
        device_resident: on the tensor path, keep the whole dataset on the training device (:meth:`to`).
        drop_last: drop a last batch smaller than ``batch_size``.
        seed: the seed of the split, of the data order and of the augmentation.
        transforms: ``{"train": [...], "eval": [...]}`` for the part owning this key (utils/parts.py).
        training: the training data (its validation split gets ``eval`` transforms); False: the test split.
        indices: the samples of ``dataset`` to use (default: all).
        fold: ``[k, K]``: validate on fold k of K instead of ``validation_split`` (folds fixed whatever the seed).
    """

    def __init__(self, dataset, batch_size=64, shuffle=True, validation_split=0.0, num_workers=0,
                 pin_memory: bool | None = None, persistent_workers: bool | None = None, prefetch_factor=None,
                 in_memory=True, device_resident=False, drop_last=False, seed=0, transforms=None, training=True,
                 indices=None, fold=None):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise UserError(f"data_loader.args.batch_size: got {batch_size!r}, expected a positive integer")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise UserError(f"data_loader.args.num_workers: got {num_workers!r}, expected an integer >= 0")
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.drop_last, self.seed, self.device_resident = drop_last, seed, device_resident
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers
        self.class_names = getattr(dataset, "class_names", None)
        self.feature_stats = getattr(dataset, "feature_stats", None)
        self.in_memory = bool(in_memory) and hasattr(dataset, "tensors")
        self._pipelines = {"train": None, "eval": None}  # None: the batches as they are
        if transforms:
            augment = self.transforms_part(transforms)
            self.in_memory, self._pipelines = augment.pipelines(dataset, transforms, self.in_memory, num_workers)
        self._pipeline = self._pipelines["train" if training else "eval"]
        self._tensors = dataset.tensors() if self.in_memory else None
        self._holds, self.start_batch = {}, 0  # (_holds: holds_target's answers)

        all_indices = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices, dtype=torch.int64)
        if fold is not None and training:
            from base.splits import fold_split

            train_idx, self.valid_idx = fold_split(all_indices, fold)
        else:
            train_idx, self.valid_idx = self.split_indices(all_indices, validation_split, seed)
        self.sampler = EpochSampler(train_idx, shuffle, seed)
        self._loader = None  # the per-sample path's torch DataLoader, made when first needed

    @staticmethod
    def transforms_part(transforms):
        """The module of the part that makes ``transforms`` into pipelines (imported now); None for no
        ``transforms``. A loader may ask it to check ``transforms`` before slow work."""
        if transforms in parts.OFF:
            return None
        if TRANSFORMS not in parts.KEY_OWNERS:
            raise ConfigError(f"{TRANSFORMS}: no part of this project reads this setting; remove it")
        return parts.load(parts.KEY_OWNERS[TRANSFORMS])

    def data_args(self):
        """Arguments that pin this data's class order and feature scaling, for the saved config's
        ``data_loader.args`` (so evaluation rebuilds the same data)."""
        return {}

    @staticmethod
    def split_indices(indices, split, seed):
        """``(kept, held_out)`` of ``indices``: ``split`` (a fraction, or a count) held out by a permutation seeded
        with ``seed``."""
        n = len(indices)
        if split is None or split == 0:
            return indices, None
        if isinstance(split, bool) or not isinstance(split, (int, float)) or split < 0:
            raise UserError(f"data_loader.args.validation_split: got {split!r}, expected a fraction in [0, 1) or a"
                            " sample count")
        count = int(split) if isinstance(split, int) else round(n * split)
        if isinstance(split, float) and split >= 1 or not 0 < count < n:
            raise UserError(f"data_loader.args.validation_split: {split!r} leaves {n - count} of {n} samples for"
                            " training; use a fraction in (0, 1) or a count below the dataset size")
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
        valid._pipeline = self._pipelines["eval"]  # held-out data never sees random augmentation
        valid.sampler = EpochSampler(self.valid_idx, shuffle=False, seed=self.seed, pad=False)
        return valid

    def set_batch_size(self, batch_size):
        """Batches of ``batch_size`` from the next pass on (a per-sample loader is built anew then)."""
        self.batch_size, self._loader = batch_size, None

    def holds_target(self, value):
        """Whether some target equals ``value`` (an ``ignore_index``), known from a 1-d integer ``tensors()[1]``,
        else None. Asked once per run: with False the trainer counts no ignored targets per batch."""
        if value not in self._holds:  # (the validation loader shares this dict: same dataset)
            tensors = self._tensors or (self.dataset.tensors() if hasattr(self.dataset, "tensors") else None)
            targets = None if tensors is None else tensors[1]
            known = (isinstance(targets, torch.Tensor) and targets.dim() == 1 and not targets.is_floating_point()
                     and not targets.is_complex())
            self._holds[value] = bool((targets == value).any()) if known else None
        return self._holds[value]

    def shard(self, rank, world_size):
        """Read only this process's share (training pads to equal shares; evaluation does not)."""
        self.sampler.rank, self.sampler.world_size = rank, world_size
        self._loader = None

    def to(self, device):
        """On the in-memory path with ``device_resident``, move the whole dataset to ``device`` once."""
        if self.in_memory and self.device_resident:
            self._tensors = tuple(t.to(device) for t in self._tensors)
        return self

    def set_epoch(self, epoch, start_batch=0):
        """Select the epoch's order and the first batch to yield (non-zero when resuming mid-epoch)."""
        self.sampler.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        if not self.in_memory:  # sample by sample, through torch's DataLoader and its workers
            from base.sample_loader import batches

            yield from batches(self)
            return
        inputs, targets = self._tensors
        size, pipeline, uint8 = self.batch_size, self._pipeline, inputs.dtype == torch.uint8
        order = self.sampler.order(size, self.start_batch, self.drop_last).to(inputs.device)  # (once an epoch)
        for batch, start in enumerate(range(0, len(order), size), start=self.start_batch):
            idx = order[start : start + size]
            x = inputs[idx]
            if pipeline is not None:  # a batch's draws depend on its place in the epoch only
                x = pipeline.seeded(x, self.seed, self.sampler.epoch, batch, self.sampler.rank)
            elif uint8:
                x = to_float(x)
            yield x, targets[idx]
