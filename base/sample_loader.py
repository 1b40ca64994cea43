"""The per-sample path of :class:`~base.base_data_loader.BaseDataLoader`: torch's ``DataLoader`` and its workers.

Taken for a dataset without ``tensors()``, for ``in_memory=false``, and for transforms without a
batched version; a default run (the digits, in memory) never imports this module. The batches hold
the same samples in the same order as on the in-memory path.

DataLoader workers ignore SIGINT and SIGTERM: a Ctrl-C, or a SIGTERM sent to the whole
process group (as Slurm does before preempting a job), must not kill them while the main
process finishes its step and writes its checkpoint. The main process stops them itself:
when their iterator is dropped, or at interpreter exit (multiprocessing's exit handler
stops daemonic workers with SIGTERM, which they now ignore).
"""

import atexit
import signal
import weakref

import torch
from torch.utils.data import DataLoader, default_collate


def _collate_images(samples):
    # Batches of uint8 images without a pipeline, to float32 in [0, 1] (a module function: workers pickle it).
    batch = default_collate(samples)
    if batch[0].dtype == torch.uint8:
        batch[0] = batch[0].to(torch.float32).mul_(1.0 / 255.0)
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


class _BatchIndices:
    """The batches of one epoch as lists of indices, from the loader's start batch on (a mid-epoch resume).

    With a pipeline, its ``keys`` (each index with its sample's seed, when the transforms are random).
    It holds its loader through a weak reference: a strong one would make a cycle (loader -> torch
    DataLoader -> this -> loader) that keeps worker processes alive until the garbage collector runs.
    """

    def __init__(self, loader):
        self._loader = weakref.ref(loader)

    def __iter__(self):
        loader = self._loader()
        size, sampler, pipeline = loader.batch_size, loader.sampler, loader._pipeline
        order = sampler.order(size, loader.start_batch, loader.drop_last)
        for start in range(0, len(order), size):
            batch = order[start : start + size].tolist()
            yield batch if pipeline is None else pipeline.keys(batch, loader.seed, sampler.epoch)

    def __len__(self):
        return len(self._loader())


def batches(loader):
    """An iterator over ``loader``'s batches for its current epoch, made by torch's DataLoader (built once)."""
    if loader._loader is None:
        extra = {}
        if loader.num_workers > 0:
            extra = {"persistent_workers": loader.persistent_workers, "worker_init_fn": _worker_init}
            if loader.prefetch_factor is not None:
                extra["prefetch_factor"] = loader.prefetch_factor
        dataset = loader.dataset
        if loader._pipeline is not None:
            dataset = loader._pipeline.samples(dataset)
        elif callable(getattr(dataset, "collate", None)):  # a dataset batching its own samples (non-tensor parts)
            extra["collate_fn"] = dataset.collate
        elif getattr(dataset, "uint8_images", False):
            extra["collate_fn"] = _collate_images
        loader._generator = torch.Generator()
        loader._loader = DataLoader(dataset, batch_sampler=_BatchIndices(loader), num_workers=loader.num_workers,
                                    pin_memory=loader.pin_memory, generator=loader._generator, **extra)
    # torch seeds Python, NumPy and torch in each worker from this generator: reseeding it per epoch
    # makes every worker's random draws a function of the seed and the epoch. (Transforms do not rely
    # on it: their draws are seeded per sample, which also holds from a mid-epoch start.)
    loader._generator.manual_seed(loader.seed + loader.sampler.epoch)
    return _track_workers(iter(loader._loader))
