"""Building a run's objects from a checked config: the lookup tables and the builders.

The run set-up (``trainer/run.py``) and ``test.py`` both build through here, so a model or data loader is
made the same way for training, resuming and evaluating.
"""

import fnmatch
import functools
import importlib
import json
import inspect

import torch

from data_loader.data_loaders import BUILTIN, DATA_LOADERS
from model.loss import LOSSES
from model.metric import METRICS
from model.model import BUILTIN as BUILTIN_MODELS
from model.model import MODELS
from utils import parts
from utils.config import ConfigError, Registry, init_obj


def _torchvision_model(name):
    # "torchvision.models.resnet18": torchvision is imported only by configs that name it.
    prefix = "torchvision.models."
    if not isinstance(name, str) or not name.startswith(prefix):
        return None
    import torchvision

    short = name[len(prefix):]
    return torchvision.models.get_model_builder(short) if short in torchvision.models.list_models() else None


def _external_model(name):
    # LeNet, MLP or CifarResNet (model/builtin.py), torchvision.models.NAME, or a part's model by its prefix
    # (utils/parts.py): each imported only when named.
    if name in BUILTIN_MODELS:
        return getattr(importlib.import_module(BUILTIN_MODELS[name]), name)
    from utils import parts

    return _torchvision_model(name) or parts.provider("archs", name)


def _external_loader(name):
    # MNIST, CIFAR-10 or synthetic data (data_loader/builtin.py), or a part's loader: each imported only when named.
    if name in BUILTIN:
        return getattr(importlib.import_module(BUILTIN[name]), name)
    return parts.provider("loaders", name)


def _external_metric(name):
    # A part's metric by its prefix (utils/parts.py), imported only when named.
    from utils import parts

    return parts.provider("metrics", name)


def _part_names(kind, example):
    from utils.parts import PARTS

    return ", ".join(f"{prefix}{example}" for part in PARTS.values() for prefix in getattr(part, kind))


def _classes(module, base, exclude=()):
    return {
        name: obj for name, obj in vars(module).items()
        if isinstance(obj, type) and issubclass(obj, base) and not name.startswith("_") and name not in exclude
    }


@functools.lru_cache(maxsize=None)
def registries():
    """The lookup table of each config section: what ``type`` may name there."""
    schedulers = _classes(torch.optim.lr_scheduler, object, exclude=("LRScheduler", "Optimizer", "Counter"))
    schedulers = {n: c for n, c in schedulers.items() if hasattr(c, "step") and hasattr(c, "state_dict")}
    return {
        "arch": Registry("model", MODELS, _external_model,
                         "a torchvision model as torchvision.models.NAME; a part's as " + _part_names("archs", "NAME"),
                         extra_names=BUILTIN_MODELS),
        "data_loader": Registry("data loader", DATA_LOADERS, _external_loader,
                                extra_names=[*BUILTIN, *parts.PART_LOADERS]),
        "loss": Registry("loss", LOSSES),
        "metrics": Registry("metric", METRICS, _external_metric,
                            f'a part\'s as {{"type": "{_part_names("metrics", "<module>.<Class>")}", "args": {{...}}}}'),
        "optimizer": Registry("optimizer", _classes(torch.optim, torch.optim.Optimizer, exclude=("Optimizer",))),
        "lr_scheduler": Registry("lr scheduler", schedulers),
    }


def resolve_device(name):
    """``auto`` picks CUDA, then MPS, then the CPU. An unavailable device is the user's error."""
    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f'device: "{name}" requested but CUDA is not available here; use "auto" or "cpu"')
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f'device: "{name}" requested but there are {torch.cuda.device_count()} CUDA devices')
    if name == "mps" and not mps_ok:
        raise ConfigError('device: "mps" requested but MPS is not available here; use "auto" or "cpu"')
    return torch.device(name)


def build_data_loader(config, training=True):
    section = config["data_loader"]
    args = {"seed": config["seed"], **section["args"]}
    if not training:
        args.update(training=False)
    return init_obj({"type": section["type"], "args": args}, registries()["data_loader"], where="data_loader")


def build_model(config):
    model = init_obj(config["arch"], registries()["arch"], where="arch")
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"arch: {config['arch']['type']} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def trained_model(checkpoint, overrides=(), device=None):
    """The model a checkpoint holds, rebuilt from the checkpoint's own config: what ``test.py``, ``predict.py``
    and ``export.py`` use.

    ``overrides`` (``key.path=VALUE``) and ``device`` change that config first. The weights are the
    checkpoint's, or its EMA weights when the run kept them (``trainer.ema``: the ones validation
    scored); an arch's ``pretrained_path`` (a timm model's) is not read, so it need not exist any more. Returns
    ``(model, config, device, autocast)``: the model in eval mode on ``device``, and the run's autocast
    on an accelerator (on the CPU none, so CPU scores are exact).

    Raises:
        UserError: the checkpoint is missing or damaged, its config no longer checks, or its weights do not
            fit the model the config builds.
    """
    import contextlib

    from utils.config import apply_overrides, validate_config
    from utils.errors import UserError
    from utils.io import load_checkpoint

    state = load_checkpoint(checkpoint, purpose="weights")
    config = apply_overrides(state["config"], list(overrides) + ([f"device={device}"] if device else []))
    config = validate_config(config, registries())
    device = resolve_device(config["device"])
    arch_args = {k: v for k, v in config["arch"]["args"].items() if k != "pretrained_path"}
    model = build_model({**config, "arch": {**config["arch"], "args": arch_args}})
    try:
        model.load_state_dict(state["model"])
        from utils import parts

        for weights in parts.call_each(config, "evaluated_weights", state):  # e.g. an EMA's average
            if weights:
                model.load_state_dict(weights, strict=False)
    except RuntimeError as err:
        raise UserError(f"{checkpoint}: the weights do not fit the model its config builds"
                        f" ({str(err).splitlines()[0]})") from None
    model.to(device).eval()
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config["trainer"]["amp"])
    autocast = torch.autocast(device.type, dtype=amp) if amp and device.type != "cpu" else contextlib.nullcontext()
    return model, config, device, autocast


def build_loss(config, device=None):
    """The loss function, with its ``args`` bound. Class weights given as a JSON list (``"weight": [1, 2, 0.5]``)
    become a float tensor on ``device`` (the CPU when None), as ``F.cross_entropy`` needs."""
    section = config["loss"]
    fn = registries()["loss"].get(section["type"], "loss.type")
    args = dict(section["args"])
    if isinstance(args.get("weight"), list):
        weight = args["weight"]
        if not weight or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weight):
            raise ConfigError(f"loss.args.weight: expected a list of numbers, one per class, got {json.dumps(weight)}")
        args["weight"] = torch.tensor(weight, dtype=torch.float32, device=device)
    return functools.partial(fn, **args) if args else fn


def build_metrics(config):
    """The metrics of ``config["metrics"]``, in order: a built-in's function (``model/metric.py``), or for a
    ``{"type": ..., "args": {...}}`` entry the :class:`trainer.trainer.EpochMetric` spec a part builds by
    that name (utils/parts.py: ``torchmetrics.<module>.<Class>``), named by :func:`utils.config.metric_name`.

    Such a metric that takes ``ignore_index`` gets the loss's (default -100) unless its args set one,
    so targets the loss ignores are left out of it too.
    """
    from utils.config import metric_name

    metrics = []
    for entry in config["metrics"]:
        if isinstance(entry, str):
            metrics.append(registries()["metrics"].get(entry, "metrics"))
            continue
        build = registries()["metrics"].get(entry["type"], "metrics")
        args = dict(entry.get("args") or {})
        if "ignore_index" in inspect.signature(build).parameters and "ignore_index" not in args:
            args["ignore_index"] = config["loss"]["args"].get("ignore_index", -100)
        metric = build(**args)
        metric.__name__ = metric_name(entry)
        metrics.append(metric)
    return metrics


# --------------------------------------------------------------------------- parameters


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


def fast_optimizer_args(optimizer_class, args, device):
    """``{"fused": True}`` where torch offers a fused CUDA kernel for this optimizer and the config chose neither
    ``fused`` nor ``foreach``; otherwise nothing. One kernel launch per step instead of one per parameter."""
    import inspect

    if device.type != "cuda" or "fused" in args or "foreach" in args:
        return {}
    try:
        accepts = "fused" in inspect.signature(optimizer_class).parameters
    except (TypeError, ValueError):
        return {}
    return {"fused": True} if accepts else {}


def build_optimizer(model, config, device=None):
    """The optimizer over the trainable parameters, grouped by ``optimizer.param_groups`` when given.

    On CUDA, optimizers that offer a fused kernel use it unless the config says otherwise.
    The model must already be on ``device``.
    """
    section = config["optimizer"]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    taken = {}
    for i, group in enumerate(section.get("param_groups") or []):
        settings = {k: v for k, v in group.items() if k != "params"}
        names = match_parameters(model, group["params"], f"optimizer.param_groups[{i}].params")
        names = [n for n in names if dict(trainable).get(n) is not None]
        for name in names:
            if name in taken:
                raise ConfigError(
                    f"optimizer.param_groups[{i}]: parameter {name!r} is already in param_groups[{taken[name]}];"
                    " every parameter must land in exactly one group"
                )
            taken[name] = i
        groups.append({"params": [p for n, p in trainable if n in names], **settings})
    rest = [p for n, p in trainable if n not in taken]
    if rest or not groups:
        groups.insert(0, {"params": rest})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("trainer.freeze: every parameter is frozen; nothing is left to train")
    extra = {}
    if device is not None:
        extra = fast_optimizer_args(registries()["optimizer"].get(section["type"]), section["args"], device)
    return init_obj(section, registries()["optimizer"], groups, where="optimizer", **extra)


def build_scheduler(optimizer, config):
    section = config.get("lr_scheduler")
    if not section:
        return None
    return init_obj(section, registries()["lr_scheduler"], optimizer, where="lr_scheduler")


def check_amp(amp, device):
    """fp16 needs a CUDA device (its gradient scaler); bf16 works on CPU and CUDA."""
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(f'trainer.amp: "fp16" needs a CUDA device, but the run is on {device.type}; use "bf16" or false')
    if amp == "bf16" and device.type == "mps":
        raise ConfigError('trainer.amp: "bf16" autocast is not supported on mps here; use false')



def wrap_model(model, config, device, info, logger):
    """What runs the steps: the model itself, or compiled / DistributedDataParallel around it.

    Checkpoints always save ``model`` itself, so no ``_orig_mod.`` or ``module.`` prefixes reach the saved keys.
    """
    forward = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config["trainer"]["compile"]:
        forward = torch.compile(forward)
    return forward


def grad_scaler(device):
    """The fp16 gradient scaler (saved in checkpoints)."""
    try:
        return torch.amp.GradScaler(device.type)
    except (AttributeError, TypeError):  # torch < 2.3
        return torch.cuda.amp.GradScaler()
