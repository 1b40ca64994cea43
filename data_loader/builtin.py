"""The built-in data sets besides the default digits: MNIST, CIFAR-10 and seeded synthetic data.

Each loader builds its dataset (data_loader/datasets.py) and hands it to :class:`BaseDataLoader`,
as the digits loader in data_loader/data_loaders.py does; they are in its ``DATA_LOADERS`` table.
"""

from base.base_data_loader import BaseDataLoader
from data_loader import datasets


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

    dataset_class = datasets.MnistDataset


class Cifar10DataLoader(_FilesDataLoader):
    """torchvision's CIFAR-10: 50,000 training and 10,000 test colour images of 32x32, read from ``data_dir``."""

    dataset_class = datasets.Cifar10Dataset


class SyntheticDataLoader(BaseDataLoader):
    """Seeded random classification data of any shape; the last ``test_fraction`` is the test split."""

    options_from = BaseDataLoader

    def __init__(self, num_samples=1024, input_shape=(1, 8, 8), num_classes=10, noise=1.0, data_seed=0,
                 test_fraction=0.2, batch_size=64, shuffle=True, validation_split=0.1, training=True, **options):
        dataset = datasets.SyntheticDataset(num_samples, input_shape, num_classes, seed=data_seed, noise=noise)
        n_test = round(num_samples * test_fraction)
        indices = range(num_samples - n_test) if training else range(num_samples - n_test, num_samples)
        super().__init__(dataset, batch_size, shuffle and training, validation_split if training else 0.0,
                         training=training, indices=list(indices), **options)


LOADERS = {
    "MnistDataLoader": MnistDataLoader,
    "Cifar10DataLoader": Cifar10DataLoader,
    "SyntheticDataLoader": SyntheticDataLoader,
}
