"""Experiment configs that build on others: a config naming a ``"base"`` gives only what differs from it.

Imported by utils/config.py:load_config only for a config with a ``base`` key: a default run never reads this file.

The rules (README, "Experiment configs that build on others"):

- ``"base": "path.json"`` is relative to the file that names it (JSON or YAML); a list of paths merges them in
  order, a later one winning. A base may have a base of its own (a chain), but never lead back to itself.
- A mapping merges into the base's mapping key by key; any other value (a list, a number, a string, null)
  replaces the base's value whole.
- The value ``"__delete__"`` removes the key from the base.
- A key the base lacks is refused as a typo (``trainer.epohcs``), unless it is written ``"+name"`` (it is added as
  ``name``) or lies inside an ``args`` mapping, whose keys the component's signature checks later anyway.

The result is a whole config without ``base``: the run's config.json and checkpoints hold it, so resuming or
``test.py`` never reads the base files again.
"""

import json
import os
from pathlib import Path

from utils.errors import UserError, did_you_mean

BASE = "base"  # the key naming the base(s)
DELETE = "__delete__"  # a value removing its key
NEW = "+"  # the prefix of a key the base lacks


def compose_config(path, config, load):
    """``config`` (read from ``path``) built on its base(s), resolved to a plain config without ``base``; ``load``
    reads a base file raw (utils/config.py:load_config, passed in: this module imports nothing of the config's).

    Raises:
        UserError: a base missing, unreadable or not a mapping, or bases in a cycle (one line naming the chain);
            else one line per refused key: one the base lacks (a typo?), or a removal of what it does not have.
    """
    return _resolve(Path(path), str(path), config, [], load)


def _shown(path):
    """A base's path as the user reads it: relative to the working folder where that is possible."""
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)


def _resolve(path, shown, config, chain, load):
    """``config`` of the file ``path`` (written ``shown`` in messages) merged onto its bases; ``chain``: the
    ``(resolved path, shown)`` of the files that led here, child first."""
    chain = [*chain, (path.resolve(), shown)]
    config = dict(config)
    names = config.pop(BASE)
    if isinstance(names, str):
        names = [names]
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        raise UserError(f'{shown}: "base" must be a path relative to this file, or a list of them;'
                        f" got {json.dumps(names)}")
    merged, against, problems = None, [], []
    for name in names:
        base_path = (path.parent / name).resolve()
        base_shown = _shown(base_path)
        if base_path in [p for p, _ in chain]:
            raise UserError("configs whose bases form a cycle (a config cannot build on itself): "
                            + " -> ".join([*(s for _, s in chain), base_shown]))
        if not base_path.exists():
            raise UserError(f"{shown}: base config not found: {base_shown} (\"base\": {json.dumps(name)})")
        try:
            base = load(base_path, bases=False)
        except UserError as err:
            raise UserError(*(f"{problem} (the base of {shown})" for problem in err.problems)) from None
        if BASE in base:
            base = _resolve(base_path, base_shown, base, chain, load)
        # the bases of one list merge freely: each may bring sections the others lack
        merged = base if merged is None else _merge(merged, base, base_shown, " + ".join(against), problems, free=True)
        against.append(base_shown)
    merged = _merge(merged, config, shown, " + ".join(against), problems)
    if problems:
        raise UserError(*problems)
    return merged


def _merge(base, child, shown, against, problems, prefix="", free=False):
    """A new mapping: ``child`` (of the file ``shown``) merged into ``base`` (what the files ``against`` give);
    a line appended to ``problems`` per key refused. ``free``: new keys need no ``+`` (inside ``args``)."""
    out = dict(base)
    for key, value in child.items():
        name = key[len(NEW):] if key.startswith(NEW) else key
        where = prefix + name
        if value == DELETE:
            if name in out:
                del out[name]
            else:
                problems.append(f"{shown}: {where}: \"{DELETE}\" removes a key, but {against} has"
                                f" no {where}{did_you_mean(name, out)}")
        elif key != name and name in out and not free:
            problems.append(f"{shown}: {prefix}{key}: {against} already has {where}; write \"{name}\" to change it")
        elif key == name and name not in out and not free:
            problems.append(f"{shown}: {where}: not a key of its base {against}{did_you_mean(name, out)}"
                            f' (to add a key the base lacks, write it "{NEW}{name}")')
        elif isinstance(value, dict):  # merged key by key, or (where the base has no mapping) taken whole
            inner = out.get(name) if isinstance(out.get(name), dict) else {}
            out[name] = _merge(inner, value, shown, against, problems, where + ".",
                               free or name == "args" or not isinstance(out.get(name), dict))
        else:
            out[name] = value
    return out
