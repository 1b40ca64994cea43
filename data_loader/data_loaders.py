"""The data loaders a config can name in ``data_loader.type``.

Each builds its dataset and hands it to :class:`BaseDataLoader`. ``training=False``
gives the held-out test split that ``test.py`` evaluates (no validation split, no
shuffling, the ``eval`` transforms). Any further keyword (``num_workers``, ``in_memory``,
``transforms``, ...) goes to :class:`BaseDataLoader`; see its docstring for the list.

Loaders of your own data (:class:`ImageFolderDataLoader`, :class:`CsvDataLoader`) offer
:meth:`~BaseDataLoader.data_args`: the class order and feature scaling to keep in the run's
config, so that evaluating the checkpoint later labels and scales the data the same way.
"""

import torch

from base.base_data_loader import BaseDataLoader
from data_loader import datasets
from utils.errors import UserError


class DigitsDataLoader(BaseDataLoader):
    """scikit-learn's 1,797 handwritten 8x8 digits; 20% are held out as the test split."""

    options_from = BaseDataLoader

    def __init__(self, batch_size=64, shuffle=True, validation_split=0.1, training=True, **options):
        dataset = datasets.DigitsDataset(train=training)
        super().__init__(dataset, batch_size, shuffle and training, validation_split if training else 0.0,
                         training=training, **options)


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


class ImageFolderDataLoader(BaseDataLoader):
    """Images in class folders: ``data_dir/<class name>/<images>``, or ``data_dir/{train,val,test}/<class name>/``.

    Without ``test/`` a ``test_split`` fraction (default 0.2) of each class is held out, the
    same files every time; without ``val/``, ``validation_split`` (default 0.1) as in every
    loader. Images become ``channels`` x ``image_size`` (RGB or grey; resized to cover and
    centre-cropped) uint8, batches float32 in [0, 1] before the transforms' ``Normalize``.
    ``in_memory``: null decodes a split once into memory (cached in ``cache_dir``, default
    ``data_dir/.cache``) when it needs at most a quarter of the RAM, else reads the files
    in DataLoader workers; true or false forces either. ``skip_unreadable`` leaves out
    damaged images with a warning instead of stopping. ``class_names`` fixes the class
    order (a saved run's); ``loader.class_names`` is the order used. See
    :mod:`data_loader.image_folder`.
    """

    options_from = BaseDataLoader

    def __init__(self, data_dir, batch_size=64, shuffle=True, validation_split=None, test_split=None, training=True,
                 image_size=None, channels=3, in_memory=None, cache_dir=None, skip_unreadable=False, class_names=None,
                 **options):
        from data_loader import image_folder
        from data_loader.augment import parse_transforms

        parse_transforms(options.get("transforms"))  # a config mistake shows before minutes of decoding
        layout = image_folder.Layout(data_dir, test_split, class_names)
        if layout.val_from_folder and validation_split not in (None, 0):
            raise UserError(f"data_loader.args.validation_split: {layout.root} has val/, which is the validation split:"
                            " remove validation_split")
        if training:
            files = layout.splits["train"] + layout.splits["val"]
        else:
            files = layout.splits["test"]
            if not files:
                raise UserError(f"data_loader.args.test_split: 0 holds out no test images from {layout.root};"
                                " set test_split > 0 or add a test/ folder")
        dataset = image_folder.load_split(files, "train" if training else "test", layout.root, layout.class_names,
                                          channels, image_size, cache_dir, in_memory, skip_unreadable)
        skipped = {path for path, _ in getattr(dataset, "skipped", [])}
        n_train = sum(1 for path, _ in layout.splits["train"] if path not in skipped) if training else len(dataset)
        split = 0.0 if layout.val_from_folder or not training else (0.1 if validation_split is None else validation_split)
        super().__init__(dataset, batch_size, shuffle and training, split, training=training, indices=list(range(n_train)),
                         **options)
        if training and layout.val_from_folder and len(dataset) > n_train:
            self.valid_idx = torch.arange(n_train, len(dataset))

    def data_args(self):
        return {"class_names": list(self.class_names)}


class CsvDataLoader(BaseDataLoader):
    """A CSV table: ``target`` column, numeric ``features`` (default: all other numeric columns), ``task``
    ``"classification"`` (class names from the target's values) or ``"regression"``.

    A ``test_split`` fraction (default 0.2; per class for classification) is held out, the
    same rows every time; ``validation_split`` as in every loader. With ``standardize``,
    each feature is scaled by the mean and standard deviation of the training rows only
    (neither validation nor test rows); ``loader.feature_stats`` holds them as plain lists.
    ``class_names`` and ``feature_stats`` given (a saved run's) are used instead of being
    derived. See :mod:`data_loader.tables`.
    """

    options_from = BaseDataLoader

    def __init__(self, path, target, features=None, task="classification", batch_size=64, shuffle=True,
                 validation_split=0.1, test_split=0.2, training=True, standardize=True, class_names=None,
                 feature_stats=None, delimiter=",", **options):
        from data_loader import image_folder, tables

        table = tables.Table(path, target, features, task, class_names, delimiter)
        fraction = image_folder.check_fraction(test_split, "test_split")
        if task == "classification":
            train_idx, test_idx = image_folder.stratified_split(table.targets, fraction)
        else:
            order = torch.randperm(len(table), generator=torch.Generator().manual_seed(image_folder.SPLIT_SEED))
            count = round(fraction * len(table))
            train_idx, test_idx = order[count:].sort().values, order[:count].sort().values
        if not training and len(test_idx) == 0:
            raise UserError(f"data_loader.args.test_split: {test_split!r} holds out no rows of {table.path}; set test_split > 0")
        inputs, stats = table.inputs, None
        if standardize:
            if feature_stats is not None:
                stats = tables.check_stats(feature_stats, table.feature_names)
            else:  # the rows that train: neither test nor validation rows inform the scaling
                fit_idx, _ = BaseDataLoader._split(train_idx, validation_split, options.get("seed", 0))
                stats = tables.fit_standardisation(table.inputs[fit_idx], table.feature_names)
            inputs = tables.standardise(inputs, stats)
        dataset = tables.TableDataset(inputs.to(torch.float32), table.targets, table.class_names, stats)
        indices = train_idx if training else test_idx
        super().__init__(dataset, batch_size, shuffle and training, validation_split if training else 0.0,
                         training=training, indices=indices.tolist(), **options)
        self.feature_names = table.feature_names

    def data_args(self):
        args = {}
        if self.class_names is not None:
            args["class_names"] = list(self.class_names)
        if self.feature_stats is not None:
            args["feature_stats"] = self.feature_stats
        return args


DATA_LOADERS = {
    "DigitsDataLoader": DigitsDataLoader,
    "MnistDataLoader": MnistDataLoader,
    "Cifar10DataLoader": Cifar10DataLoader,
    "SyntheticDataLoader": SyntheticDataLoader,
    "ImageFolderDataLoader": ImageFolderDataLoader,
    "CsvDataLoader": CsvDataLoader,
}
