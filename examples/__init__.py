"""Worked examples of tasks beyond image classification, each one file a user could have written: its data, its
model and its task (base/base_task.py), named in ``configs/examples/*.json`` as ``"examples.<file>:<Name>"``."""
