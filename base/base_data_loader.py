"""Batching a dataset: a validation split, a reproducible data order, and a fast in-memory path.

The order of the samples is a pure function of ``(seed, epoch)``: each epoch draws a
permutation from a generator seeded with ``seed + epoch`` (as torch's
``DistributedSampler`` does), never from the global RNG. That is what makes a run
resumable mid-epoch (skip the batches already seen) and shardable over processes
(each process takes every ``world_size``-th index of the same permutation).

Augmentation (``transforms``) is an optional part, the one owning ``data_loader.args.transforms``
in utils/parts.py: without ``transforms`` the loader never asks for it. Given ``transforms``,
the part makes one pipeline per split (training batches get ``train``, the validation and
test splits ``eval``) and keeps its draws a function of the same ``(seed, epoch)`` and of a
batch's place in the epoch, so a resumed run replays them too. A pipeline offers the loader
``seeded(batch, seed, epoch, batch_number, rank)`` on the in-memory path, and
``keys(indices, seed, epoch)`` and ``samples(dataset)`` on the per-sample one. uint8 images
come out as float32 in [0, 1], by the pipeline or, without one, by the loader itself.

DataLoader workers ignore SIGINT and SIGTERM: a Ctrl-C, or a SIGTERM sent to the whole
process group (as Slurm does before preempting a job), must not kill them while the main
process finishes its step and writes its checkpoint. The main process stops them itself:
when their iterator is dropped, or at interpreter exit (multiprocessing's exit handler
stops daemonic workers with SIGTERM, which they now ignore).
"""

import atexit
import copy
import math
import signal
import weakref

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from utils import parts
from utils.errors import UserError

TRANSFORMS = "data_loader.args.transforms"  # the key of the part that augments (utils/parts.py)


def to_float(x):
    """uint8 images to float32 in [0, 1]; anything else unchanged."""
    return x.to(torch.float32).mul_(1.0 / 255.0) if x.dtype == torch.uint8 else x


def _collate_images(samples):
    # The per-sample path's batches of uint8 images without a pipeline (a module function: workers pickle it).
    batch = default_collate(samples)
    batch[0] = to_float(batch[0])
    return batch


def _worker_init(worker_id):
    # See the module docstring: the main process decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_LIVE_ITERATORS = weakref.WeakSet()
_WORKER_QUEUES = {}  # id(iterator) -> its index queues, held until its own shutdown has used them
_WORKERS = []  # every worker process started, for the last resort at exit
_EXIT_HOOK = []


def _track_workers(iterator):
    """Make sure ``iterator``'s workers stop although they ignore SIGTERM.

    torch stops workers by sending ``None`` down their index queues, and falls back on
    SIGTERM. An iterator freed by the cyclic garbage collector (one caught in an
    exception's traceback, say) has its queues closed by their own finalizers before its
    ``__del__`` sends anything: holding the queues here until then keeps that path working.
    At exit, live iterators are shut down and any worker still running is killed.
    """
    workers = getattr(iterator, "_workers", None)
    if not workers:
        return iterator
    if not _EXIT_HOOK:
        # Registered after torch's and multiprocessing's own exit handlers, so it runs before them
        # (atexit is last-in, first-out): multiprocessing's exit handler would wait forever on a worker
        # that ignores its SIGTERM.
        atexit.register(_stop_all_workers)
        _EXIT_HOOK.append(True)
    key = id(iterator)
    if key not in _WORKER_QUEUES:
        _WORKER_QUEUES[key] = list(iterator._index_queues)
        weakref.finalize(iterator, _WORKER_QUEUES.pop, key, None)
        _WORKERS[:] = [w for w in _WORKERS if w.is_alive()] + list(workers)
        _LIVE_ITERATORS.add(iterator)
    return iterator


def _stop_all_workers():
    for iterator in list(_LIVE_ITERATORS):
        iterator._shutdown_workers()
    for worker in _WORKERS:
        if worker.is_alive():
            worker.kill()  # SIGKILL: the last resort for a worker whose queue can no longer reach it
            worker.join(timeout=1)


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

    With a pipeline, its ``keys`` (each index with its sample's seed, when the transforms are random).

    It holds its loader through a weak reference: a strong one would make a cycle
    (loader -> torch DataLoader -> this -> loader) that keeps worker processes alive
    until the garbage collector happens to run.
    """

    def __init__(self, loader):
        self._loader = weakref.ref(loader)

    def __iter__(self):
        loader = self._loader()
        order, size = loader._epoch_order(), loader.batch_size
        pipeline, seed, epoch = loader._pipeline, loader.seed, loader.sampler.epoch
        for start in range(0, len(order), size):
            batch = order[start : start + size].tolist()
            yield batch if pipeline is None else pipeline.keys(batch, seed, epoch)

    def __len__(self):
        return len(self._loader())


def check_fraction(value, name):
    """``data_loader.args.NAME`` as a fraction in [0, 1), or one line saying what it should be."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise UserError(f"data_loader.args.{name}: got {value!r}, expected a fraction in [0, 1)")
    return float(value)


def stratified_split(labels, fraction, seed=0):
    """Indices ``(kept, held_out)``: ``round(fraction * count)`` of each label held out (at least one kept),
    chosen by a permutation seeded with ``seed``; both sorted. The image-folder and table parts hold their test
    split out with it, with a fixed seed, so that the same samples are held out on every run."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).view(-1)
        members = members[torch.randperm(len(members), generator=generator)]
        count = min(round(fraction * len(members)), len(members) - 1)
        held.append(members[:count])
        kept.append(members[count:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


class TensorDataset(Dataset):
    """A dataset held as two tensors: float32 ``inputs`` (N, *input_shape) and int64 ``targets`` (N,).

    ``dataset[i] == (inputs[i], int(targets[i]))``, and :meth:`tensors` offers both whole to
    :class:`BaseDataLoader`'s fast path. Subclasses build the tensors and call :meth:`_set`.
    """

    num_classes: int
    input_shape: tuple

    def _set(self, inputs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> None:
        if inputs.dtype != torch.float32 or targets.dtype != torch.int64 or len(inputs) != len(targets):
            raise TypeError("internal: inputs must be float32 and targets int64 of the same length")
        self._inputs = inputs.contiguous()
        self._targets = targets.contiguous()
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in inputs.shape[1:])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole dataset as ``(inputs, targets)``: float32 normalised inputs, int64 targets.

        These are the dataset's own tensors, not copies: do not modify them in place.
        """
        return self._inputs, self._targets

    def __len__(self) -> int:
        return len(self._targets)

    def __getitem__(self, index):
        return self._inputs[index], int(self._targets[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(samples={len(self)}, input_shape={self.input_shape}, num_classes={self.num_classes})"


class BaseDataLoader:
    """Iterates over a dataset in batches of ``(inputs, targets)``; splits off validation data.

    Args:
        dataset: a map-style dataset. If it has ``tensors()`` returning all inputs and
            targets as two tensors, and ``in_memory`` is true, batches are made by indexing
            those tensors (no per-sample ``__getitem__`` and collate): the same samples in
            the same order, much faster. uint8 inputs (images: ``tensors()``'s, or on the
            per-sample path a dataset's with ``uint8_images = True``) come out as float32 in
            [0, 1]. Its ``class_names`` and ``feature_stats``, if it has them, are offered as the
            loader's.
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
        seed: the seed of the split, of the data order and of the augmentation.
        transforms: ``{"train": [...], "eval": [...]}`` of ``{"type": NAME, "args": {...}}``
            naming ``torchvision.transforms.v2`` classes, made into pipelines by the part
            owning this key (utils/parts.py): it takes the per-sample path (and workers) for
            transforms that have no batched version. Raises ConfigError for a bad spec, and
            when the part's files are not in the project.
        training: the training data (``train`` transforms; ``eval`` for its validation
            split). False: the test split (``eval`` transforms).
        fold: ``[k, K]``: K-fold cross-validation, validating on fold k of K (replaces
            ``validation_split``; the folds are the same whatever ``seed`` is).

    Attributes:
        class_names: the class names (a list of str) when the dataset has them, else None.
        feature_stats: the feature standardisation of a table, else None.
    """

    def __init__(self, dataset, batch_size=64, shuffle=True, validation_split=0.0, num_workers=0,
                 pin_memory=None, persistent_workers=None, prefetch_factor=None, in_memory=True,
                 device_resident=False, drop_last=False, seed=0, transforms=None, training=True, indices=None,
                 fold=None):
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
        self.class_names = getattr(dataset, "class_names", None)
        self.feature_stats = getattr(dataset, "feature_stats", None)
        self.in_memory = bool(in_memory) and hasattr(dataset, "tensors")
        self._pipelines = {"train": None, "eval": None}  # None: the batches as they are
        augment = self.transforms_part(transforms)
        if augment is not None:
            self.in_memory, self._pipelines = augment.pipelines(dataset, transforms, self.in_memory, num_workers)
        self._pipeline = self._pipelines["train" if training else "eval"]
        self.device_resident = device_resident
        self._tensors = dataset.tensors() if self.in_memory else None
        self._holds = {}  # holds_target's answers
        self._device = None
        self.start_batch = 0

        all_indices = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices)
        if fold is not None and training:
            train_idx, self.valid_idx = self._fold(all_indices, fold)
        else:
            train_idx, self.valid_idx = self.split_indices(all_indices, validation_split, seed)
        self.sampler = EpochSampler(train_idx, shuffle, seed)
        self._loader = None

    @staticmethod
    def transforms_part(transforms):
        """The module of the part that makes ``transforms`` into pipelines; None when ``transforms`` is
        null or empty. A loader may ask it to check ``transforms`` before slow work."""
        return parts.owner(TRANSFORMS, transforms)

    def data_args(self):
        """Constructor arguments that pin this data's class order and feature scaling (for
        ``data_loader.args`` of the saved config, so evaluation rebuilds the same); ``{}`` when none."""
        return {}

    @staticmethod
    def _fold(indices, fold):
        """K-fold cross-validation: validate on fold ``k`` of ``K``, train on the rest.

        The folds come from one permutation seeded with 0, not with ``seed``: the same folds
        for every configuration and every seed of a sweep, so their scores compare.
        """
        ok = (isinstance(fold, (list, tuple)) and len(fold) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                       for v in fold) and fold[1] >= 2 and 0 <= fold[0] < fold[1])
        if not ok:
            raise UserError(f"data_loader.args.fold: got {fold!r}, expected [k, K] with K >= 2 and 0 <= k < K"
                            " (validate on fold k of K)")
        k, count = fold
        if len(indices) < count:
            raise UserError(f"data_loader.args.fold: {count} folds of {len(indices)} samples leave a fold empty")
        perm = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(0))]
        bounds = [round(i * len(indices) / count) for i in range(count + 1)]
        valid = perm[bounds[k]:bounds[k + 1]]
        return torch.cat([perm[: bounds[k]], perm[bounds[k + 1]:]]), valid

    @staticmethod
    def split_indices(indices, split, seed):
        """``(kept, held_out)`` of ``indices``: ``split`` (a fraction, or a count) held out by a permutation seeded
        with ``seed``."""
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
        valid._pipeline = self._pipelines["eval"]  # held-out data never sees random augmentation
        valid.sampler = EpochSampler(self.valid_idx, shuffle=False, seed=self.seed, pad=False)
        return valid

    def set_batch_size(self, batch_size):
        """Batches of ``batch_size`` from the next pass on (a per-sample loader is built anew then)."""
        self.batch_size, self._loader = batch_size, None

    def fix_to(self, indices):
        """Train on the samples ``indices`` alone, in that order, without random augmentation; returns a loader
        that validates on the same samples (what overfitting a few batches needs)."""
        self.sampler = EpochSampler(indices, shuffle=False, seed=self.seed)
        self.shuffle, self._pipeline, self._loader = False, self._pipelines["eval"], None
        valid = copy.copy(self)
        valid.sampler = EpochSampler(indices, shuffle=False, seed=self.seed, pad=False)
        valid.drop_last, valid.valid_idx, valid.start_batch = False, None, 0
        return valid

    def holds_target(self, value):
        """Whether some target of this data equals ``value`` (an ``ignore_index``, say); None when not known.

        Known when the dataset offers its targets as one 1-d integer tensor (``tensors()``):
        asked once per run, never per step, and kept. With the answer False the trainer skips
        counting the ignored targets of every batch (see :func:`trainer.trainer.weighing`).
        """
        if value not in self._holds:  # (the validation loader shares this dict: same dataset)
            tensors = self._tensors if self._tensors is not None else (
                self.dataset.tensors() if hasattr(self.dataset, "tensors") else None)
            targets = None if tensors is None else tensors[1]
            known = (isinstance(targets, torch.Tensor) and targets.dim() == 1 and not targets.is_floating_point()
                     and not targets.is_complex())
            self._holds[value] = bool((targets == value).any()) if known else None
        return self._holds[value]

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
        # makes every worker's random draws a function of the seed and the epoch. (Transforms do not rely
        # on it: their draws are seeded per sample, which also holds from a mid-epoch start.)
        self._generator.manual_seed(self.seed + self.sampler.epoch)
        return _track_workers(iter(self._loader))

    def _iter_tensors(self):
        inputs, targets = self._tensors
        order = self._epoch_order()
        if self._device is not None:
            order = order.to(self._device)
        pipeline = self._pipeline
        if pipeline is not None:  # a batch's draws depend on its place in the epoch only
            seed, epoch, rank = self.seed, self.sampler.epoch, self.sampler.rank
            for batch, start in enumerate(range(0, len(order), self.batch_size), start=self.start_batch):
                idx = order[start : start + self.batch_size]
                yield pipeline.seeded(inputs[idx], seed, epoch, batch, rank), targets[idx]
        elif inputs.dtype == torch.uint8:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                yield to_float(inputs[idx]), targets[idx]
        else:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                yield inputs[idx], targets[idx]

    def _make_loader(self):
        self._generator = torch.Generator()
        extra = {}
        if self.num_workers > 0:
            extra = {"persistent_workers": self.persistent_workers, "worker_init_fn": _worker_init}
            if self.prefetch_factor is not None:
                extra["prefetch_factor"] = self.prefetch_factor
        dataset = self.dataset
        if self._pipeline is not None:
            dataset = self._pipeline.samples(dataset)
        elif getattr(dataset, "uint8_images", False):
            extra["collate_fn"] = _collate_images
        return DataLoader(
            dataset, batch_sampler=_BatchIndices(self), num_workers=self.num_workers,
            pin_memory=self.pin_memory, generator=self._generator, **extra,
        )
