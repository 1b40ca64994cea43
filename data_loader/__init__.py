"""The data loaders configs name in ``data_loader.type`` and their datasets: the default digits and the
``DATA_LOADERS`` table in data_loaders.py; MNIST, CIFAR-10 and synthetic data in builtin.py, imported when named."""
