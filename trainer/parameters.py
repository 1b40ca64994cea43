"""Choosing a model's parameters by name, for ``trainer.freeze`` and ``optimizer.param_groups``, and a fused
optimizer on CUDA: imported by trainer/build.py only when a config uses one of them, or on CUDA."""

import fnmatch
import inspect

from utils.errors import ConfigError


def match_parameters(model, patterns, where):
    """Names of ``model``'s parameters matching any glob in ``patterns``; a pattern matching nothing is an error."""
    names = [name for name, _ in model.named_parameters()]
    matched = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(f"{where}: pattern {pattern!r} matches no parameter; parameter names look like: {sample}")
        matched.update(hits)
    return [n for n in names if n in matched]  # in model order


def freeze(model, patterns):
    """Set ``requires_grad=False`` on the parameters matching ``patterns``; returns their names."""
    names = match_parameters(model, patterns, "trainer.freeze")
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return names


def param_groups(model, section):
    """The optimizer's groups of trainable parameters: those ``section["param_groups"]`` select, with their own
    settings, after a first group of the rest. Every parameter lands in exactly one group."""
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    groups, taken = [], {}
    for i, group in enumerate(section["param_groups"]):
        names = [n for n in match_parameters(model, group["params"], f"optimizer.param_groups[{i}].params")
                 if n in trainable]
        for name in names:
            if name in taken:
                raise ConfigError(f"optimizer.param_groups[{i}]: parameter {name!r} is already in"
                                  f" param_groups[{taken[name]}]; every parameter must land in exactly one group")
            taken[name] = i
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [trainable[n] for n in names]})
    return [{"params": [p for n, p in trainable.items() if n not in taken]}, *groups]


def fast_optimizer_args(optimizer_class, args, device):
    """``{"fused": True}`` (one kernel launch per step, not one per parameter) where torch has a fused CUDA kernel
    for this optimizer and the config chose neither ``fused`` nor ``foreach``; else ``{}``."""
    if device.type != "cuda" or "fused" in args or "foreach" in args:
        return {}
    try:
        return {"fused": True} if "fused" in inspect.signature(optimizer_class).parameters else {}
    except (TypeError, ValueError):
        return {}
