"""Datasets and the data loaders a config names in ``data_loader.type`` (the ``DATA_LOADERS`` table)."""
