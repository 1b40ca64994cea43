"""The data loaders a config can name in ``data_loader.type``: the ``DATA_LOADERS`` table.

Your own data: copy :class:`DigitsDataLoader` and the dataset it builds, and add the loader to ``DATA_LOADERS``.
A dataset gives ``(input, target)`` per index; one that fits in memory is best a ``TensorDataset`` (the fast
path). ``training=False`` is the held-out test split; other keywords go to :class:`BaseDataLoader`. MNIST,
CIFAR-10 and synthetic data are in data_loader/builtin.py (``BUILTIN``), image folders and tables are parts.
"""

import importlib.util
import os
from functools import lru_cache

import torch

from base.base_data_loader import BaseDataLoader, TensorDataset
from utils.errors import UserError


# The default config's data. Your own loader is a copy of this class with your dataset in it.
class DigitsDataLoader(BaseDataLoader):
    """scikit-learn's 1,797 handwritten 8x8 digits; 20% are held out as the test split."""

    options_from = BaseDataLoader  # its **options are checked against BaseDataLoader's arguments

    def __init__(self, batch_size=64, shuffle=True, validation_split=0.1, training=True, **options):
        dataset = DigitsDataset(train=training)
        super().__init__(dataset, batch_size, shuffle and training, validation_split if training else 0.0,
                         training=training, **options)


DATA_LOADERS = {
    "DigitsDataLoader": DigitsDataLoader,
}

# The other built-in loaders, by the module holding them: imported only when a config names one.
BUILTIN = {name: "data_loader.builtin" for name in ("MnistDataLoader", "Cifar10DataLoader", "SyntheticDataLoader")}


# mean and (population) std of all 1,797 images x 64 pixels after scaling the 0..16 pixel
# values to [0, 1]; computed once with  x = load_digits().data / 16; x.mean(), x.std()
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760

# The train/test split is a permutation from a generator with this seed; it never depends
# on the user's seed or on the global RNG, so the test set stays held out.
DIGITS_SPLIT_SEED = 0


@lru_cache(maxsize=1)
def digits_tensors():
    """All 1,797 digits as ``(images (1797, 1, 8, 8) float32, normalised; labels (1797,) int64)``, read once,
    from the CSV file scikit-learn ships: importing scikit-learn alone takes longer than the default's first epoch.
    """
    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if path is None or not os.path.isfile(path):  # another layout: ask scikit-learn itself
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels, labels = digits.data, digits.target
    else:
        table = np.loadtxt(path, delimiter=",")
        pixels, labels = table[:, :-1], table[:, -1]
    images = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return (images / 16.0 - DIGITS_MEAN) / DIGITS_STD, torch.as_tensor(labels, dtype=torch.int64)


class DigitsDataset(TensorDataset):
    """scikit-learn's handwritten digits: 1,797 real 8x8 images of 0-9, shape (1, 8, 8). The last
    ``round(test_fraction * 1797)`` indices of a fixed permutation are the test set, whatever the user's seed."""

    def __init__(self, train=True, test_fraction=0.2):
        if not isinstance(train, bool):
            raise UserError(f"DigitsDataset: train must be true or false, got {train!r}")
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
            raise UserError("DigitsDataset: test_fraction must be a number between 0 and 1 (exclusive),"
                            f" got {test_fraction!r}")
        self.train = train
        images, labels = digits_tensors()
        n = len(labels)
        n_test = round(test_fraction * n)
        if not 1 <= n_test <= n - 1:
            raise UserError(f"DigitsDataset: test_fraction {test_fraction} leaves an empty train or test set"
                            f" of the {n} images")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
        self.indices = order[: n - n_test] if train else order[n - n_test :]
        self._set(images[self.indices], labels[self.indices], num_classes=10)
