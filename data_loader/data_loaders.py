"""The data loaders a config can name in ``data_loader.type``: the ``DATA_LOADERS`` table.

Your own data: copy :class:`DigitsDataLoader`. Put a ``torch.utils.data.Dataset`` in
data_loader/datasets.py (``__len__``, ``__getitem__`` returning ``(input, target)``, and
``tensors()`` returning all inputs and targets as two tensors if they fit in memory: the fast
path), build it in a loader here and hand it to :class:`BaseDataLoader`, then add the loader to
``DATA_LOADERS``. ``training=False`` gives the held-out test split that ``test.py`` evaluates
(no validation split, no shuffling). Any further keyword (``num_workers``, ``in_memory``,
``transforms``, ...) goes to :class:`BaseDataLoader`; see its docstring for the list. A
loader whose data fixes a class order or a feature scaling offers it with
:meth:`~BaseDataLoader.data_args`, to be kept in the run's config.

MNIST, CIFAR-10 and synthetic data are in data_loader/builtin.py; image folders and CSV
tables are optional parts (utils/parts.py), found by their names too.
"""

from base.base_data_loader import BaseDataLoader
from data_loader import datasets
from data_loader.builtin import LOADERS as BUILTIN


# The default config's data. Your own loader is a copy of this class with your dataset in it.
class DigitsDataLoader(BaseDataLoader):
    """scikit-learn's 1,797 handwritten 8x8 digits; 20% are held out as the test split."""

    options_from = BaseDataLoader  # its **options are checked against BaseDataLoader's arguments

    def __init__(self, batch_size=64, shuffle=True, validation_split=0.1, training=True, **options):
        dataset = datasets.DigitsDataset(train=training)
        super().__init__(dataset, batch_size, shuffle and training, validation_split if training else 0.0,
                         training=training, **options)


DATA_LOADERS = {
    "DigitsDataLoader": DigitsDataLoader,
    **BUILTIN,
}
