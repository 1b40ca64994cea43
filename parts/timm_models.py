"""timm models by name: ``"arch": {"type": "timm.resnet18", "args": {"num_classes": 10, "in_chans": 1}}``.

A part (utils/parts.py): delete this file and tests/parts/test_timm.py, and configs naming the
project's own models (or ``torchvision.models.NAME``) train as before.

Promises:

* timm is imported only when a config names ``timm.NAME`` (importing it takes seconds).
* Nothing is downloaded: the model is built with ``pretrained=False``; ``pretrained_path`` (a
  local ``.safetensors``, ``.pth``/``.pt``/``.bin`` state dict, or a checkpoint of this project)
  loads weights like ``--init-from --init-from-strict false``: the tensors whose names and shapes
  fit, with a report of the rest (logged, and kept as ``model.init_report``).
* An unknown name is a :class:`~utils.config.ConfigError` with a did-you-mean from timm's own list.
"""

from __future__ import annotations

import logging
import os

from utils.config import ConfigError, did_you_mean
from utils.errors import UserError

PREFIX = "timm."


def model(name):
    """The builder of ``timm.NAME``, for :func:`utils.parts.provider`.

    Raises:
        ConfigError: ``NAME`` is not a timm model (or timm is not installed).
    """
    try:
        import timm
    except ImportError:
        raise ConfigError(f"arch.type: {name!r} needs the package timm: pip install timm") from None
    short = name[len(PREFIX):]
    known = timm.list_models()
    if short.split(".")[0] not in known:  # "resnet18.a1_in1k" names a pretrained tag of resnet18
        raise ConfigError(f"arch.type: unknown timm model {short!r}{did_you_mean(short, known)} (timm has"
                          f" {len(known)}; python -c \"import timm; print(timm.list_models('resnet*'))\" lists them)")

    def build(pretrained_path=None, **args):
        built = timm.create_model(short, pretrained=False, **args)
        if pretrained_path is not None:
            built.init_report = load_pretrained(built, pretrained_path)
            logging.getLogger("train").info(built.init_report)
        return built

    build.__name__ = build.__qualname__ = f"timm.{short}"
    return build


def _read_weights(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_state_dict"):  # this project's checkpoints, and common wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return state


def load_pretrained(model, path):
    """Load the tensors of the local file ``path`` that fit ``model`` by name and shape; returns the report line.

    Raises:
        UserError: the file is missing or unreadable, or no tensor of it fits the model.
    """
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise UserError(f"arch.args.pretrained_path: file not found: {path} (nothing is downloaded: give a local"
                        " .safetensors or .pth file)")
    try:
        weights = _read_weights(path)
    except Exception as err:  # safetensors and torch raise many kinds for a damaged or foreign file
        raise UserError(f"arch.args.pretrained_path: cannot read {path}: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(weights, dict):
        raise UserError(f"arch.args.pretrained_path: {path} holds no state dict (names to tensors)")
    weights = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}
    own = model.state_dict()
    reshaped = [k for k, v in weights.items() if k in own and getattr(v, "shape", None) != own[k].shape]
    fitting = {k: v for k, v in weights.items() if k in own and k not in reshaped}
    if not fitting:
        raise UserError(f"arch.args.pretrained_path: no tensor of {path} fits the model (names like"
                        f" {', '.join(list(weights)[:3])}; the model's: {', '.join(list(own)[:3])})")
    result = model.load_state_dict(fitting, strict=False)
    unexpected = [k for k in weights if k not in own]
    return (f"Initialised from {path}: missing keys {list(result.missing_keys)}, unexpected keys {unexpected},"
            f" skipped for a different shape {reshaped}")
