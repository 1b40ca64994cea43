"""The data loaders configs name in ``data_loader.type`` (the ``DATA_LOADERS`` table of data_loaders.py) and their datasets."""
