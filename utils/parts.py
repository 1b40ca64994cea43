"""The optional parts of the project, in one table.

A part is a feature a default run does not need: an EMA of the weights, a sweep, an image-folder
loader, a CSV logger. Each lives in its own files under ``parts/`` (and its command, tests and
configs beside the core's), owns its config keys (their defaults and checks are in its module),
and can be deleted: the core never imports a part. It reads this table, and imports a part's
module only when a config uses the part (names one of its keys, loaders, models, metrics or
loggers). Deleting a part's files leaves its row here harmless: a config that still uses it gets
one line saying the part is not in this project.

What a part's module may define (each is optional; the core calls what is there):

- ``check(config) -> list[str]``: check the part's keys in the completed config, fill in their
  defaults, and return one line per problem (``"trainer.ema.decay: got 2, expected ..."``).
- ``prepare(config, parts)``: change the built components before the run starts (debug modes).
- ``hooks(config, parts, run) -> list``: the :class:`trainer.hooks.Hook` objects it adds to a run.
- ``LOADERS`` / ``MODELS`` / ``METRICS``: ``{name: class}`` for the names in ``loaders``;
  ``model(name)`` / ``metric(name)`` for the prefixes in ``archs`` / ``metrics`` (None if unknown).
- ``writer(name, settings, context)``: a logger for ``trainer.loggers`` (see logger/visualization.py).
- ``pipelines(dataset, transforms, in_memory, num_workers)``: from the part owning
  ``data_loader.args.transforms``, what the data loader runs its batches through (see
  base/base_data_loader.py, which asks :func:`owner` for it).
"""

import importlib
import importlib.util
from dataclasses import dataclass

from utils.errors import ConfigError


@dataclass(frozen=True)
class Part:
    module: str  # imported when a config uses the part
    about: str  # one line: what it does (the README's table, and the message when its files are gone)
    files: tuple  # what deleting the part removes: its code, command, configs and tests
    keys: tuple = ()  # config keys it owns, dotted ("trainer.ema")
    loaders: tuple = ()  # data_loader.type names it provides
    archs: tuple = ()  # arch.type prefixes ("timm.")
    metrics: tuple = ()  # metric type prefixes ("torchmetrics.")
    loggers: tuple = ()  # trainer.loggers names


PARTS = {
    "ema": Part("parts.ema", "an exponential moving average of the weights, scored and saved beside them",
                files=("parts/ema.py", "tests/parts/test_ema.py"), keys=("trainer.ema",)),
    "augment": Part("parts.augment", "per-split torchvision transforms, augmentation replayed exactly on resume",
                    files=("parts/augment.py", "tests/parts/test_augment.py"), keys=("data_loader.args.transforms",)),
    "image_folder": Part("parts.image_folder", "images in class folders as a data set, decoded once and cached",
                         files=("parts/image_folder.py", "configs/image_folder.json", "tests/parts/test_image_folder.py"),
                         loaders=("ImageFolderDataLoader",)),
    "tables": Part("parts.tables", "a CSV table as a data set: numeric features, a class or a number to predict",
                   files=("parts/tables.py", "configs/csv.json", "tests/parts/test_tables.py"), loaders=("CsvDataLoader",)),
}


def _off(value):
    """A key set to null, false, 0 or empty asks for nothing: its part need not be there."""
    return value is None or value is False or value == 0 or value == [] or value == {}


def key_owner(key):
    """The name of the part owning the dotted config key ``key``, or None."""
    return next((name for name, part in PARTS.items() if key in part.keys), None)


def part_keys():
    return [key for part in PARTS.values() for key in part.keys]


def used_by(config):
    """The names of the parts ``config`` uses, in the table's order."""
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    loader = (config.get("data_loader") or {}).get("type") if isinstance(config.get("data_loader"), dict) else None
    arch = (config.get("arch") or {}).get("type") if isinstance(config.get("arch"), dict) else None
    metrics = [m.get("type") if isinstance(m, dict) else m for m in config.get("metrics") or [] if isinstance(m, (str, dict))]
    loggers = [entry.get("type") if isinstance(entry, dict) else entry for entry in trainer.get("loggers") or []
               if isinstance(entry, (str, dict))]
    used = []
    for name, part in PARTS.items():
        keys = any(not _off(_get(config, key)) for key in part.keys)
        names = (loader in part.loaders or any(isinstance(arch, str) and arch.startswith(p) for p in part.archs)
                 or any(isinstance(m, str) and m.startswith(p) for m in metrics for p in part.metrics)
                 or any(logger in part.loggers for logger in loggers))
        if keys or names:
            used.append(name)
    return used


def _get(config, dotted):
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def present(name):
    """Whether part ``name``'s module is in this project (without importing it)."""
    return importlib.util.find_spec(PARTS[name].module) is not None


def load(name):
    """The module of part ``name``; a part whose files were deleted is one clear line."""
    part = PARTS[name]
    if not present(name):
        raise ConfigError(f"{_uses(part)}: needs the {name} part ({part.about}), whose files are not in this project"
                          f" ({part.files[0]}); restore them, or remove the setting")
    return importlib.import_module(part.module)


def _uses(part):
    return ", ".join([*part.keys, *(f"data_loader.type {n}" for n in part.loaders), *(f"arch.type {p}..." for p in part.archs),
                      *(f"metrics {p}..." for p in part.metrics), *(f"trainer.loggers {n}" for n in part.loggers)])


def modules(config):
    """The modules of the parts ``config`` uses (imported here, and only here)."""
    return [load(name) for name in used_by(config)]


def owner(key, value):
    """The module of the part owning the dotted config key ``key`` when ``value``, the key's value, asks for
    something (imported now); None when ``value`` is off.

    For a value the core is handed without its config: ``data_loader.args.transforms`` reaches the
    data loader as an argument.
    """
    if _off(value):
        return None
    name = key_owner(key)
    if name is None:
        raise ConfigError(f"{key}: no part of this project reads this setting; remove it")
    return load(name)


def provided(kind):
    """The names the parts provide under ``kind`` ("loaders"), in the table's order, whether or not their files are here."""
    return [name for part in PARTS.values() for name in getattr(part, kind)]


def provider(kind, name):
    """The class a part provides under ``name`` (``kind``: "loaders", "archs" or "metrics"), or None."""
    for part_name, part in PARTS.items():
        if kind == "loaders" and name in part.loaders:
            return load(part_name).LOADERS[name]
        if kind == "archs" and any(name.startswith(p) for p in part.archs):
            return load(part_name).model(name)
        if kind == "metrics" and any(name.startswith(p) for p in part.metrics):
            return load(part_name).metric(name)
    return None


def call_each(config, function, *args):
    """Call ``function(*args)`` of every part ``config`` uses that defines it; returns their results in order."""
    return [getattr(module, function)(*args) for module in modules(config) if hasattr(module, function)]
