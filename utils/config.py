"""Reading, overriding and checking a run's config.

A config is plain data (a dict loaded from JSON or YAML). This module never creates
folders or touches the disk beyond reading the file: ``main()`` sets up the run once
the whole config has been checked. Every problem found is collected and raised at
once as a :class:`ConfigError`, one line per problem.
"""

import copy
import difflib
import inspect
import json
import re
from pathlib import Path

from utils.errors import ConfigError, UserError

# --------------------------------------------------------------------------- loading


def load_config(path):
    """Read a config file: YAML when it ends in ``.yaml``/``.yml``, JSON otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml  # only YAML users pay for the import

        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise UserError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    else:
        try:
            config = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: a config must be a mapping of keys to values, got {type(config).__name__}")
    return config


def parse_value(text):
    """An override's value: JSON when it parses (``3``, ``0.1``, ``true``, ``null``, ``[1, 2]``), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config, overrides):
    """Return a copy of ``config`` with each ``a.b.c=VALUE`` applied; missing dicts on the path are created."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override {item!r} is not of the form key.path=VALUE (for example trainer.epochs=3)")
        node = config
        *parents, last = key.split(".")
        for depth, part in enumerate(parents):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                where = ".".join(parents[: depth + 1])
                raise UserError(f"override {item!r}: {where} is a {type(node).__name__}, not a section with keys")
        node[last] = parse_value(text)
    return config


def flatten(config, prefix=""):
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the dotted keys the command line uses."""
    flat = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def config_diff(old, new):
    """Lines describing what changed between two configs, as ``key: old -> new``."""
    a, b = flatten(old), flatten(new)
    missing = object()
    lines = []
    for key in sorted(a.keys() | b.keys()):
        before, after = a.get(key, missing), b.get(key, missing)
        if before != after:
            show = lambda v: "(unset)" if v is missing else json.dumps(v)  # noqa: E731
            lines.append(f"{key}: {show(before)} -> {show(after)}")
    return lines


# --------------------------------------------------------------------------- lookup by name


def did_you_mean(name, valid):
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _listing(valid, limit=25):
    valid = sorted(valid)
    shown = ", ".join(valid[:limit])
    return shown + (f", ... ({len(valid)} in all)" if len(valid) > limit else "")


class Registry:
    """An explicit table of the components of one kind that a config may name.

    ``extra`` is an optional function resolving names outside the table (e.g.
    ``torchvision.models.resnet18``); it returns the callable or None.
    """

    def __init__(self, kind, table, extra=None, extra_hint=""):
        self.kind = kind
        self.table = dict(table)
        self.extra = extra
        self.extra_hint = extra_hint

    def get(self, name, where=None):
        where = where or self.kind
        if isinstance(name, str):
            if name in self.table:
                return self.table[name]
            if self.extra is not None:
                found = self.extra(name)
                if found is not None:
                    return found
        hint = f" (or {self.extra_hint})" if self.extra_hint else ""
        raise ConfigError(
            f"{where}: unknown {self.kind} {name!r}{did_you_mean(name, self.table)} valid: {_listing(self.table)}{hint}"
        )


def check_args(target, args, where, provided=()):
    """Problems binding ``args`` to ``target``'s signature: unknown keywords and missing required ones.

    ``provided`` names parameters the builder passes itself (``params`` for an optimizer).
    """
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return []  # a builtin without a signature: the constructor itself will complain
    params = dict(signature.parameters)
    # A class may forward its **kwargs to a base (data loaders do): check against both.
    base = getattr(target, "options_from", None)
    if base is not None:
        for name, param in inspect.signature(base).parameters.items():
            if name not in ("self", "dataset", "indices") and param.kind is not inspect.Parameter.VAR_KEYWORD:
                params.setdefault(name, param)
        params = {n: p for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {
        n: p for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY) and n != "self"
    }
    problems = []
    if not accepts_any:
        for key in args:
            if key not in named or key in provided:
                valid = [n for n in named if n not in provided]
                problems.append(
                    f"{where}: {getattr(target, '__name__', target)} takes no argument {key!r}"
                    f"{did_you_mean(key, valid)} valid: {', '.join(valid) or '(none)'}"
                )
    for name, param in named.items():
        if param.default is inspect.Parameter.empty and name not in args and name not in provided:
            problems.append(f"{where}: {getattr(target, '__name__', target)} needs argument {name!r}")
    return problems


def default_arg(target, name, fallback=None):
    """The default of ``target``'s parameter ``name``, or ``fallback``."""
    try:
        param = inspect.signature(target).parameters.get(name)
    except (TypeError, ValueError):
        return fallback
    if param is None or param.default is inspect.Parameter.empty:
        return fallback
    return param.default


def init_obj(section, registry, *args, where=None, **kwargs):
    """Build ``registry.get(section["type"])(*args, **section["args"], **kwargs)``.

    A ``TypeError``/``ValueError`` raised by the constructor is the user's: a bad
    value in ``args`` (a negative learning rate, say). It becomes a one-line ConfigError.
    """
    where = where or registry.kind
    target = registry.get(section["type"], where + ".type")
    try:
        return target(*args, **section.get("args", {}), **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}.args: {section['type']} rejected its arguments: {err}") from None


# --------------------------------------------------------------------------- the schema


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def positive_int(v):
    return None if _is_int(v) and v > 0 else "a positive integer"


def non_negative_int(v):
    return None if _is_int(v) and v >= 0 else "an integer >= 0"


def positive_number(v):
    return None if _is_number(v) and v > 0 else "a positive number"


def optional(check):
    def inner(v):
        if v is None:
            return None
        wanted = check(v)
        return wanted and f"{wanted}, or null"

    return inner


def boolean(v):
    return None if isinstance(v, bool) else "true or false"


def string(v):
    return None if isinstance(v, str) and v else "a non-empty string"


def string_list(v):
    return None if isinstance(v, list) and all(isinstance(s, str) and s for s in v) else "a list of strings"


def one_of(*choices):
    def inner(v):
        return None if any(v == c and type(v) is type(c) for c in choices) else "one of " + ", ".join(json.dumps(c) for c in choices)

    return inner


def device_string(v):
    ok = isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", v)
    return None if ok else '"auto", "cpu", "cuda", "cuda:N" or "mps"'


def norm_type(v):
    return None if (_is_number(v) and v > 0) or v in ("inf", float("inf")) else 'a positive number or "inf"'


def monitor_string(v):
    ok = isinstance(v, str) and (v == "off" or re.fullmatch(r"(min|max) \S+", v))
    return None if ok else '"off", or "min NAME" / "max NAME" such as "min val_loss" or "max val_accuracy"'


# key: (check, default). A default of REQUIRED means the key must be given.
REQUIRED = object()

TRAINER_SCHEMA = {
    "epochs": (positive_int, 10),
    "save_dir": (string, "saved/"),
    "save_period": (positive_int, 1),
    "verbosity": (one_of(0, 1, 2), 2),
    "monitor": (monitor_string, "off"),
    "early_stop": (optional(non_negative_int), None),
    "tensorboard": (boolean, True),
    "log_every_n_steps": (positive_int, 50),
    # training controls
    "clip_grad_norm": (optional(positive_number), None),
    "clip_grad_norm_type": (norm_type, 2.0),
    "clip_grad_value": (optional(positive_number), None),
    "freeze": (string_list, []),
    "unfreeze_at_epoch": (optional(positive_int), None),
    "unfreeze_lr": (optional(positive_number), None),
    "accumulate_grad_batches": (positive_int, 1),
    "amp": (one_of(False, "bf16", "fp16"), False),
    "compile": (boolean, False),
    "len_epoch": (optional(positive_int), None),
    "max_steps": (optional(positive_int), None),
    "skip_nonfinite": (boolean, False),
    "deterministic": (boolean, False),
    "tf32": (boolean, True),
    "cudnn_benchmark": (boolean, True),
    "histogram_every": (non_negative_int, 0),
    "activation_histograms": (string_list, []),
    "log_images": (boolean, True),
    # checkpoints
    "keep_last": (optional(positive_int), None),
    "save_every_n_steps": (optional(positive_int), None),
}

TOP_SCHEMA = {
    "name": (string, REQUIRED),
    "seed": (non_negative_int, 0),
    "device": (device_string, "auto"),
    "n_gpu": (non_negative_int, 1),
    "arch": (None, REQUIRED),
    "data_loader": (None, REQUIRED),
    "optimizer": (None, REQUIRED),
    "lr_scheduler": (None, None),
    "loss": (None, REQUIRED),
    "metrics": (string_list, []),
    "trainer": (None, {}),
}

SECTION_KEYS = {
    "arch": {"type", "args"},
    "data_loader": {"type", "args"},
    "loss": {"type", "args"},
    "optimizer": {"type", "args", "param_groups"},
    "lr_scheduler": {"type", "args", "interval"},
}


def _check_keys(given, schema, where, problems):
    for key in given:
        if key not in schema:
            prefix = f"{where}." if where else ""
            problems.append(
                f"{prefix}{key}: unknown key{did_you_mean(key, schema)} valid: {', '.join(schema)}"
            )


def _fill(given, schema, where, problems):
    """Check each known key's value and fill in the defaults; returns the completed dict."""
    out = {}
    for key, (check, default) in schema.items():
        path = f"{where}.{key}" if where else key
        if key not in given:
            if default is REQUIRED:
                problems.append(f"{path}: missing (this key is required)")
            else:
                out[key] = copy.deepcopy(default)
            continue
        value = given[key]
        wanted = check(value) if check else None
        if wanted:
            problems.append(f"{path}: got {json.dumps(value)}, expected {wanted}")
        out[key] = value
    return out


def _section(config, key, problems):
    """Normalise an object section to ``{"type": NAME, "args": {...}, ...}`` (``loss`` may be a bare name)."""
    value = config.get(key)
    if isinstance(value, str) and key == "loss":
        value = {"type": value}
    if not isinstance(value, dict):
        problems.append(f'{key}: expected {{"type": NAME, "args": {{...}}}}, got {json.dumps(value)}')
        return None
    _check_keys(value, {k: None for k in sorted(SECTION_KEYS[key])}, key, problems)
    if not isinstance(value.get("type"), str):
        problems.append(f"{key}.type: missing or not a string (the name of the {key.replace('_', ' ')} to build)")
        return None
    args = value.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        problems.append(f"{key}.args: expected a mapping of argument names to values, got {json.dumps(args)}")
        return None
    return {**value, "args": dict(args)}


def validate_config(config, registries):
    """Check the whole config and return it completed with defaults.

    ``registries`` maps each section (``arch``, ``data_loader``, ``loss``, ``metrics``,
    ``optimizer``, ``lr_scheduler``) to its :class:`Registry`.

    Raises:
        ConfigError: with every problem found, one line each.
    """
    problems = []
    if not isinstance(config, dict):
        raise ConfigError("a config must be a mapping of keys to values")
    _check_keys(config, TOP_SCHEMA, "", problems)
    out = _fill(config, TOP_SCHEMA, "", problems)

    trainer = config.get("trainer", {})
    if not isinstance(trainer, dict):
        problems.append(f"trainer: expected a mapping of settings, got {json.dumps(trainer)}")
        trainer = {}
    _check_keys(trainer, TRAINER_SCHEMA, "trainer", problems)
    out["trainer"] = _fill(trainer, TRAINER_SCHEMA, "trainer", problems)

    # Object sections: the name must be in the table and its args must bind to the signature.
    provided = {"arch": (), "data_loader": ("seed",), "optimizer": ("params",), "lr_scheduler": ("optimizer",)}
    for key in ("arch", "data_loader", "loss", "optimizer", "lr_scheduler"):
        if key not in config or (key == "lr_scheduler" and config[key] is None):
            continue
        section = _section(config, key, problems)
        out[key] = section
        if section is None:
            continue
        try:
            target = registries[key].get(section["type"], f"{key}.type")
        except ConfigError as err:
            problems.extend(err.problems)
            continue
        given = provided.get(key, ())
        if key == "loss":  # the first two parameters are the output and the target
            names = list(_safe_params(target))[:2]
            given = tuple(names)
        problems.extend(check_args(target, section["args"], f"{key}.args", given))

    sched = out.get("lr_scheduler")
    if sched:
        interval = sched.setdefault("interval", "epoch")
        if interval not in ("epoch", "step"):
            problems.append(f'lr_scheduler.interval: got {json.dumps(interval)}, expected "epoch" or "step"')

    opt = out.get("optimizer")
    if opt and "param_groups" in opt:
        groups = opt["param_groups"]
        if not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and g["params"] and string_list(g["params"]) is None
            for g in groups
        ):
            problems.append('optimizer.param_groups: expected a list of {"params": ["glob", ...], "lr": ...} entries')

    metrics = out.get("metrics") or []
    if string_list(metrics) is None:
        for name in metrics:
            if name not in registries["metrics"].table:
                valid = registries["metrics"].table
                problems.append(f"metrics: unknown metric {name!r}{did_you_mean(name, valid)} valid: {_listing(valid)}")

    t = out["trainer"]
    if monitor_string(t["monitor"]) is None and t["monitor"] != "off":
        problems.extend(_check_monitor(t["monitor"], out, registries))
    if t["unfreeze_at_epoch"] is not None and not t["freeze"]:
        problems.append("trainer.unfreeze_at_epoch: set, but trainer.freeze is empty (nothing to unfreeze)")

    if problems:
        raise ConfigError(*problems)
    return out


def _safe_params(target):
    try:
        return inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}


def has_validation(config, registries):
    """Whether the configured data loader will hold out validation data."""
    section = config.get("data_loader")
    if not section:
        return False
    split = section["args"].get("validation_split")
    if split is None:
        try:
            split = default_arg(registries["data_loader"].get(section["type"]), "validation_split", 0.0)
        except ConfigError:
            return False
    return _is_number(split) and split > 0


def _check_monitor(monitor, config, registries):
    _, name = monitor.split()
    metric_names = ["loss"] + list(config.get("metrics") or [])
    available = list(metric_names)
    if has_validation(config, registries):
        available += [f"val_{m}" for m in metric_names]
    if name in available:
        return []
    if name.startswith("val_") and name[4:] in metric_names:
        return [f"trainer.monitor: {name!r} needs validation data: set data_loader.args.validation_split > 0, or monitor one of {', '.join(available)}"]
    return [f"trainer.monitor: {name!r} will not exist{did_you_mean(name, available)} it can be one of {', '.join(available)}"]
