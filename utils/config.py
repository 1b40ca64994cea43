"""Reading, overriding and checking a run's config: plain data (a dict loaded from JSON).

Every problem is raised at once as a :class:`ConfigError`, one line each naming the key, the value and what
would be valid. Keys are declared in tables of ``key: (default, check)``; a section naming a component is looked
up in a :class:`Registry` and its ``args`` bound to the signature. What a default run does not need (YAML, the
wording of most problems) is in utils/config_extra.py.
"""

import copy
import inspect
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from utils import parts
from utils.errors import ConfigError, UserError, did_you_mean, listing, shown

MAX_DEPTH = 64  # a config is a few levels deep; deeper nesting is a mistake (or an attack on the recursion limit)
MAX_VALUES = 100_000  # YAML aliases can make a small file expand to billions of values
NAME_MAX = 255  # bytes in one file or folder name on every common file system
SEED_LIMIT = 2**63  # the data order seeds a generator with seed + epoch: keep that below torch's 2**64
_SURROGATE = re.compile("[\ud800-\udfff]")  # what makes a Python string invalid UTF-8

# --------------------------------------------------------------------------- loading


class _JsonProblem(ValueError):
    """A key repeated in one JSON object (``kind`` "duplicate") or a NaN/Infinity ("constant"), named by ``args[0]``."""

    def __init__(self, kind, name):
        super().__init__(name)
        self.kind = kind


def _no_duplicates(pairs):
    """A JSON object as a dict; a repeated key is refused (``json`` would keep the last one silently)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        keys = [key for key, _ in pairs]
        raise _JsonProblem("duplicate", next(k for i, k in enumerate(keys) if k in keys[:i]))
    return obj


def _reject_constant(name):
    raise _JsonProblem("constant", name)


def load_config(path, bases=True):
    """Read a config file: YAML when it ends in ``.yaml``/``.yml``, JSON otherwise; one naming a ``base`` is built on
    it (utils/compose.py) unless ``bases`` is False. A UserError, one line per problem: missing or unreadable, not
    UTF-8, not JSON/YAML, a key repeated in one mapping, NaN, a YAML date, a base missing or in a cycle."""
    path, data = Path(path), None
    try:
        data = path.read_bytes()
        text = data.decode("utf-8-sig")  # tolerate the byte-order mark some Windows editors write
        if path.suffix in (".yaml", ".yml"):
            from utils.config_extra import load_yaml  # only YAML users pay for PyYAML

            config = load_yaml(path, text)
        else:
            config = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (OSError, ValueError, RecursionError) as err:  # unreadable, not UTF-8 or JSON, a repeated key, NaN...
        from utils.config_extra import load_problems  # what and where, read only when there is a problem

        raise UserError(*load_problems(path, data, err)) from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: a config must be a mapping of keys to values, got {type(config).__name__}")
    problems = plain_value_problems(config)
    if problems:
        raise UserError(*(f"{path}: {problem}" for problem in problems))
    if bases and "base" in config:  # an experiment that gives only what differs from another config
        from utils.compose import compose_config

        return compose_config(path, config, load_config)
    return config


def plain_value_problems(value, where=""):
    """Lines saying where ``value`` holds what a JSON config cannot ([] when nothing): a quick walk with a stack (a
    config may nest past the recursion limit), :data:`MAX_DEPTH` deep and :data:`MAX_VALUES` in all (a cycle ends
    at the depth); what it finds is worded by config_extra.value_problems."""
    todo, count = [(value, 0)], 0
    while todo:
        v, depth = todo.pop()
        count += 1
        if count > MAX_VALUES:
            break
        if isinstance(v, (dict, list, tuple)):  # a tuple from a Python caller is written as a list
            if depth >= MAX_DEPTH or (isinstance(v, dict) and not all(
                    isinstance(key, str) and not _SURROGATE.search(key) for key in v)):
                break
            todo.extend((item, depth + 1) for item in (v.values() if isinstance(v, dict) else v))
        elif not (v is None or isinstance(v, (bool, int)) or (isinstance(v, float) and math.isfinite(v))
                  or (isinstance(v, str) and not _SURROGATE.search(v))):
            break
    else:
        return []
    from utils.config_extra import value_problems

    return value_problems(value, where, MAX_DEPTH, MAX_VALUES)


def parse_value(text):
    """An override's value: JSON when it parses (``3``, ``0.1``, ``true``, ``null``, ``[1, 2]``), else the string.
    A UserError for NaN or Infinity, or nesting too deep to parse."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except _JsonProblem as err:  # NaN or Infinity
        raise UserError(f"{err.args[0]} is not a finite number (JSON has no NaN or Infinity); for the text,"
                        f" quote it: '\"{text}\"'") from None
    except json.JSONDecodeError:
        return text
    except RecursionError:
        raise UserError("the value is nested too deeply to read") from None


def apply_overrides(config, overrides):
    """A copy of ``config`` with each ``a.b.c=VALUE`` applied; missing sections on the path are created.
    A UserError when an item is not ``key.path=VALUE``, runs through a value that is not a section, or its
    value is not plain JSON (NaN, absurd nesting, invalid UTF-8)."""
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
        try:
            value = parse_value(text)
        except UserError as err:
            raise UserError(f"override {item!r}: {err}") from None
        if isinstance(value, str) and value.startswith(("[", "{")):  # a list whose quotes the shell dropped
            from utils.config_extra import unquoted_problem

            raise UserError(unquoted_problem(key, text))
        problems = plain_value_problems({key: value})
        if problems:
            raise UserError(*(f"override {item!r}: {problem}" for problem in problems))
        node[last] = value
    return config


def flatten(config, prefix=""):
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the dotted keys the command line uses."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --------------------------------------------------------------------------- checks


class Check(NamedTuple):
    """What a value must be: ``ok(value)`` says if it is, ``wanted`` says what in the error line ("expected a
    positive integer"). Called, it returns None for a valid value, else ``wanted``: any function doing that is
    a check too (the parts')."""

    ok: Callable
    wanted: str

    def __call__(self, value):
        return None if self.ok(value) else self.wanted


integer = Check(lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
number = Check(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
positive_int = Check(lambda v: integer.ok(v) and v > 0, "a positive integer")
non_negative_int = Check(lambda v: integer.ok(v) and v >= 0, "an integer >= 0")
seed_int = Check(lambda v: integer.ok(v) and 0 <= v < SEED_LIMIT, "an integer from 0 to 2**63 - 1")
positive_number = Check(lambda v: number.ok(v) and v > 0, "a positive number")
boolean = Check(lambda v: isinstance(v, bool), "true or false")
string_list = Check(lambda v: isinstance(v, list) and all(isinstance(s, str) and s for s in v), "a list of strings")
path_string = Check(lambda v: isinstance(v, str) and v and "\0" not in v,
                    "a non-empty path (a string without NUL characters)")
monitor_string = Check(lambda v: isinstance(v, str) and (v == "off" or re.fullmatch(r"(min|max) \S+", v)),
                       '"off", or "min NAME" / "max NAME" such as "min val_loss" or "max val_accuracy"')
metric_list = Check(lambda v: isinstance(v, list) and all((isinstance(m, str) and m) or isinstance(m, dict) for m in v),
                    'a list such as ["accuracy"] (metric names, or a part\'s {"type": ..., "args": {...}} entries)')
# A run's name and its run id become save_dir/models/<name>/<run_id>: each one folder name (not "." or "..", no
# separator, control character or invalid UTF-8, at most NAME_MAX bytes), or the run would be written outside save_dir
# or fail.
folder_name = Check(lambda v: isinstance(v, str) and v not in ("", ".", "..") and not re.search(
    r"[/\\\x00-\x1f\x7f-\x9f\ud800-\udfff]", v) and len(v.encode("utf-8")) <= NAME_MAX, "a single folder name")

CORE_LOGGERS = ("tensorboard",)  # the trainer.loggers name the core writes itself (logger/logger.py)


def check_loggers(value):
    """``trainer.loggers``' check: its form and names (a part checks its own logger's ``args``)."""
    names = [*CORE_LOGGERS, *(name for part in parts.PARTS.values() for name in part.loggers)]
    wanted = f'a list of {", ".join(json.dumps(n) for n in names)} or {{"type": NAME, "args": {{...}}}}'
    if not isinstance(value, list):
        return wanted
    for item in value:
        name = item.get("type") if isinstance(item, dict) else item
        if not isinstance(name, str):
            return wanted
        if name not in names:
            return f"{wanted} ({name!r} is none of them{did_you_mean(name, names)})"
        if isinstance(item, dict):
            if set(item) - {"type", "args"} or not isinstance(item.get("args") or {}, dict):
                return f'{wanted} ({name}: only "type" and "args", a mapping)'
            if name in CORE_LOGGERS and item.get("args"):
                return f"{wanted} ({name} takes no args)"
    return None


def logger_entries(trainer):
    """``[(name, args)]`` of a checked config's ``trainer.loggers``: where the run's numbers go."""
    return [(item["type"], dict(item.get("args") or {})) if isinstance(item, dict) else (item, {})
            for item in trainer["loggers"]]


def check_path_component(value, where):
    """The problem line when ``value`` is not one :data:`folder_name` (a run's name, its run id), else None."""
    if folder_name.ok(value):
        return None
    from utils.config_extra import path_component_problem

    return path_component_problem(value, where)


# --------------------------------------------------------------------------- the keys

REQUIRED = object()  # the default of a key that must be given

TOP = {  # key: (default, check); None: checked apart (the name, the sections)
    "name": (REQUIRED, None),  # one folder_name
    "seed": (0, seed_int),
    "device": ("auto", Check(lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", v),
                             '"auto", "cpu", "cuda", "cuda:N" or "mps"')),
    # victoresque's key: 0 is the CPU; several GPUs are torchrun's
    "n_gpu": (1, Check(lambda v: integer.ok(v) and v in (0, 1), "one of 0, 1")),
    "arch": (REQUIRED, None),
    "data_loader": (REQUIRED, None),
    "optimizer": (REQUIRED, None),
    "lr_scheduler": (None, None),
    "loss": (REQUIRED, None),
    "metrics": ([], metric_list),  # built-in names, or a part's {"type": "torchmetrics.<...>.<Class>", "args": ...}
    "task": (None, None),  # how a batch becomes the loss, when not as the default step (base/base_task.py)
    "trainer": ({}, None),
}

TRAINER = {  # a key whose default is null may also be set to null
    "epochs": (10, positive_int),
    "save_dir": ("saved/", path_string),
    "save_period": (1, positive_int),
    "verbosity": (2, Check(lambda v: integer.ok(v) and v in (0, 1, 2, 3), "one of 0, 1, 2, 3")),
    "monitor": ("off", monitor_string),
    "early_stop": (None, non_negative_int),
    "tensorboard": (None, boolean),  # an alias, resolved into loggers (config_extra.resolve_tensorboard)
    "loggers": (["tensorboard"], check_loggers),  # and the parts' loggers: "csv", {"type": "mlflow", "args": {...}}
    "log_every_n_steps": (50, positive_int),
    "histogram_every": (0, non_negative_int), "activation_histograms": ([], string_list), "log_images": (True, boolean),
    # training controls
    "clip_grad_norm": (None, positive_number), "clip_grad_value": (None, positive_number),
    "clip_grad_norm_type": (2.0, Check(lambda v: positive_number.ok(v) or v in ("inf", float("inf")),
                                       'a positive number or "inf"')),
    "freeze": ([], string_list), "unfreeze_at_epoch": (None, positive_int), "unfreeze_lr": (None, positive_number),
    "accumulate_grad_batches": (1, positive_int),
    "len_epoch": (None, positive_int), "max_steps": (None, positive_int),
    "skip_nonfinite": (False, boolean),
    # the backend
    "amp": (False, Check(lambda v: v is False or v in ("bf16", "fp16"), 'one of false, "bf16", "fp16"')),
    "compile": (False, boolean), "deterministic": (False, boolean), "tf32": (True, boolean),
    "strategy": ("ddp", Check(lambda v: v in ("ddp", "fsdp"), 'one of "ddp", "fsdp"')),  # under torchrun
    "fsdp_blocks": (None, Check(lambda v: string_list.ok(v) or positive_int.ok(v), "module names, or a count")),
    "activation_checkpointing": (False, boolean),
    "cudnn_benchmark": (True, boolean),
    # checkpoints, and the end of a run
    "keep_last": (None, positive_int), "test_after_train": (True, boolean),
}
# The keys trainer may hold: the core's, then those of the optional parts (utils/parts.py).
TRAINER_KEYS = [*TRAINER, *(key[len("trainer."):] for key in parts.KEY_OWNERS if key.startswith("trainer."))]

# The keys of the sections naming a component, and the arguments its builder passes itself.
SECTIONS = {"arch": (("args", "type"), ()), "data_loader": (("args", "type"), ("seed",)),
            "loss": (("args", "type"), ()),  # (the loss's first two parameters: the output and the target)
            "optimizer": (("args", "param_groups", "type"), ("params",)),
            "lr_scheduler": (("args", "interval", "type"), ("optimizer",)), "task": (("args", "type"), ())}


def check_table(given, table, where, problems, valid=None):
    """``given`` checked against ``table`` (``key: (default, check)``) and completed with its defaults. Appends to
    ``problems`` a line per key not in ``valid`` (default: the table's), required key missing and value its check
    refuses (null passes where the default is null); a key of ``valid`` not in ``table`` is kept for its part."""
    valid = list(valid or table)
    prefix = f"{where}." if where else ""
    problems.extend(f"{prefix}{key}: unknown key{did_you_mean(key, valid)} valid: {', '.join(valid)}"
                    for key in given if key not in valid)
    out = {}
    for key, (default, check) in table.items():
        if key in given:
            out[key] = given[key]
            wanted = check and (given[key] is not None or default is not None) and check(given[key])
            if wanted:
                problems.append(f"{prefix}{key}: got {json.dumps(given[key])}, expected {wanted}"
                                f"{', or null' if default is None else ''}")
        elif default is REQUIRED:
            problems.append(f"{prefix}{key}: missing (this key is required)")
        else:
            out[key] = copy.deepcopy(default)
    out.update((key, value) for key, value in given.items() if key in valid and key not in table)
    return out


def validate_config(config, registries):
    """The whole config checked and completed with defaults, or a ConfigError with every problem, one line each.
    ``registries``: each section's :class:`Registry` (``arch``, ``data_loader``, ``loss``, ``metrics``, ...)."""
    if not isinstance(config, dict):
        raise ConfigError("a config must be a mapping of keys to values")
    problems = plain_value_problems(config)
    if problems:  # the checks below assume JSON values (they print them as JSON)
        raise ConfigError(*problems)
    if integer.ok(config.get("n_gpu")) and config["n_gpu"] > 1:
        problems.append(f"n_gpu: {config['n_gpu']} GPUs are trained by torchrun, one process each: torchrun"
                        f" --nproc_per_node={config['n_gpu']} train.py -c CONFIG (n_gpu may be 0, the CPU, or 1)")
        config = {k: v for k, v in config.items() if k != "n_gpu"}
    out = check_table(config, TOP, "", problems)
    if out.get("n_gpu") == 0 and out.get("device") == "auto":  # the one place n_gpu acts: 0 means the CPU
        out["device"] = "cpu"
    elif out.get("n_gpu") == 0 and isinstance(out.get("device"), str) and out["device"] not in ("cpu", "auto"):
        problems.append(f"n_gpu: 0 (the CPU) and device {json.dumps(out['device'])} say different things; keep one"
                        " (device alone says where a run trains)")
    if "name" in config and not folder_name.ok(config["name"]):
        problems.append(check_path_component(config["name"], "name"))

    trainer = config.get("trainer", {})
    if not isinstance(trainer, dict):
        problems.append(f"trainer: expected a mapping of settings, got {json.dumps(trainer)}")
        trainer = {}
    t = out["trainer"] = check_table(trainer, TRAINER, "trainer", problems, TRAINER_KEYS)
    if t.pop("tensorboard") is not None:  # another way to say what loggers says
        from utils.config_extra import resolve_tensorboard

        resolve_tensorboard(trainer, t, problems, check_loggers(t["loggers"]) is None)

    failed = set()  # the sections whose type is unknown or malformed
    for key in SECTIONS:
        if key in config and not _check_section(config, key, out, registries, problems):
            failed.add(key)
    if out.get("lr_scheduler") and out["lr_scheduler"].setdefault("interval", "epoch") not in ("epoch", "step"):
        problems.append(f'lr_scheduler.interval: got {json.dumps(out["lr_scheduler"]["interval"])},'
                        ' expected "epoch" or "step"')
    if out.get("optimizer") and "param_groups" in out["optimizer"]:
        from utils.config_extra import param_group_problems

        optimizer = out["optimizer"]
        named = None if "optimizer" in failed else _parameters(registries["optimizer"].get(optimizer["type"]))[0] or {}
        problems.extend(param_group_problems(optimizer["param_groups"], named, arg_value_problem))

    names, table = ["loss"], registries["metrics"].table
    if out.get("task") and "task" not in failed:  # its named losses are logged as loss_<name>
        from utils.config_extra import task_loss_names

        names += task_loss_names(out["task"], registries["task"])
    for index, entry in enumerate(out["metrics"] if metric_list.ok(out["metrics"]) else []):  # (else reported)
        if isinstance(entry, dict) or ":" in entry:  # a part's metric, or a function of the user's ("module:name")
            from utils.config_extra import metric_entry_problems

            problems.extend(metric_entry_problems(entry, f"metrics[{index}]", registries["metrics"], check_args))
            entry = metric_name(entry)
        elif entry not in table:
            problems.append(f"metrics: unknown metric {entry!r}{did_you_mean(entry, table)} valid: {listing(table)}")
        names.append(entry)
    problems.extend(f"metrics: the name {name!r} is taken twice (or is reserved); give the entry its own \"name\""
                    for name in sorted({n for n in names[1:] if names.count(n) > 1}))

    # The monitored metric must be one the run logs (val_* only with validation data). A bad validation_split or
    # data loader is the problem to report, not the validation metric it would not produce.
    monitor = t["monitor"].split()[1] if monitor_string.ok(t["monitor"]) and t["monitor"] != "off" else None
    if monitor and not ("data_loader" in failed or any(
            p.startswith("data_loader.args.validation_split:") for p in problems)):
        loader = out.get("data_loader")
        split = loader["args"].get("validation_split") if loader else 0
        if split is None:  # the loader's default
            param = (_parameters(registries["data_loader"].get(loader["type"]))[0] or {}).get("validation_split")
            split = param.default if param is not None else 0
        available = [*names, *(f"val_{m}" for m in names if number.ok(split) and split > 0)]
        if monitor not in available:
            from utils.config_extra import monitor_problem

            problems.append(monitor_problem(monitor, names, available))
    if t["strategy"] != "ddp" or t["fsdp_blocks"] is not None or t["activation_checkpointing"]:
        from utils.config_extra import strategy_problems

        problems.extend(strategy_problems(t))
    if t["unfreeze_at_epoch"] is not None and not t["freeze"]:
        problems.append("trainer.unfreeze_at_epoch: set, but trainer.freeze is empty (nothing to unfreeze)")

    try:  # each part the config uses checks its own keys (and fills in their defaults)
        for problem_list in parts.call_each(out, "check", out):
            problems.extend(problem_list)
    except ConfigError as err:  # a part whose files were deleted
        problems.extend(err.problems)
    if problems:  # (a deleted part named twice, by its key and by a name it provides, is one line)
        raise ConfigError(*dict.fromkeys(problems))
    # "~" is the home folder, as in a shell: expanded here, so the run, its messages and config.json say one path
    for args, key in ((t, "save_dir"), *((out["data_loader"]["args"], k) for k in ("data_dir", "path", "cache_dir"))):
        if isinstance(args.get(key), str):
            args[key] = os.path.expanduser(args[key])
    return out


def _check_section(config, key, out, registries, problems):
    """``out[key]``: the section as ``{"type": NAME, "args": {...}, ...}`` (``loss`` may be a bare name), its type
    found in the registry and its args bound to its signature. False when the type is unknown or malformed."""
    section, out[key] = config[key], None
    if key in ("lr_scheduler", "task") and section is None:
        return True
    if isinstance(section, str) and key == "loss":
        section = {"type": section}
    if not isinstance(section, dict):
        problems.append(f'{key}: expected {{"type": NAME, "args": {{...}}}}, got {json.dumps(section)}')
        return False
    keys, provided = SECTIONS[key]
    problems.extend(f"{key}.{k}: unknown key{did_you_mean(k, keys)} valid: {', '.join(keys)}" for k in section
                    if k not in keys)
    args = {} if section.get("args") is None else section["args"]
    if not isinstance(section.get("type"), str):
        problems.append(f"{key}.type: missing or not a string (the name of the {key.replace('_', ' ')} to build)")
        return False
    if not isinstance(args, dict):
        problems.append(f"{key}.args: expected a mapping of argument names to values, got {json.dumps(args)}")
        return False
    section = out[key] = {**section, "args": dict(args)}
    try:
        target = registries[key].get(section["type"], f"{key}.type")
    except ConfigError as err:
        problems.extend(err.problems)
        return False
    if key == "loss":
        provided = tuple(_parameters(target)[0] or ())[:2]
    problems.extend(check_args(target, section["args"], f"{key}.args", provided))
    return True


def metric_name(entry):
    """The name an entry of ``metrics`` goes by in results (``val_<name>``) and in ``trainer.monitor``: a built-in's
    own name, or an entry's ``name``, by default its class in snake case (``multiclass_f1_score``)."""
    if isinstance(entry, str):
        return entry.rpartition(":")[2]
    if isinstance(entry.get("name"), str):
        return entry["name"]
    kind = entry.get("type")
    cls = kind.rsplit(".", 1)[-1] if isinstance(kind, str) else "?"
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", cls).lower()


# --------------------------------------------------------------------------- components by name


@dataclass
class Registry:
    """The components of one ``kind`` ("optimizer") a config may name: ``table``, and the names ``extra(name)``
    resolves to a callable (else None: ``torchvision.models.resnet18``, a part's loader), of which ``extra_names``
    are listed and suggested with the table's; ``extra_hint`` says what else it takes."""

    kind: str
    table: dict
    extra: Callable = None
    extra_hint: str = ""
    extra_names: tuple = ()

    def get(self, name, where=None):
        if isinstance(name, str):
            found = self.table.get(name) or (self.extra and self.extra(name))
            if found is None and ":" in name:  # "module:Name", of a file of the user's (utils/user_code.py)
                from utils.user_code import imported

                found = imported(name, where or self.kind)
            if found is not None:
                return found
        valid = [*self.table, *self.extra_names]
        hint = (f" (or {self.extra_hint})" if valid else f"; expected {self.extra_hint}") if self.extra_hint else ""
        raise ConfigError(f"{where or self.kind}: unknown {self.kind} {name!r}{did_you_mean(name, valid)}"
                          f"{f' valid: {listing(valid)}' if valid else ''}{hint}")


def init_obj(section, registry, *args, where=None, **kwargs):
    """``registry.get(section["type"])(*args, **section["args"], **kwargs)``; a ``TypeError``/``ValueError`` it
    raises is a bad value in ``args`` (a negative learning rate), the user's: a one-line ConfigError."""
    where = where or registry.kind
    target = registry.get(section["type"], where + ".type")
    try:
        return target(*args, **section.get("args", {}), **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}.args: {section['type']} rejected its arguments: {err}") from None


def _parameters(target):
    """``target``'s keyword parameters by name, and whether it also takes any keyword (``**kwargs``); ``(None,
    True)`` without a signature. A class forwarding ``**kwargs`` to the base named by its ``options_from`` (the
    data loaders) takes the base's parameters as its own."""
    try:
        params = dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None, True  # a builtin without a signature: the constructor itself will complain
    base = getattr(target, "options_from", None)
    if base is not None:
        for name, param in inspect.signature(base).parameters.items():
            if name not in ("self", "dataset", "indices") and param.kind is not param.VAR_KEYWORD:
                params.setdefault(name, param)
        params = {n: p for n, p in params.items() if p.kind is not p.VAR_KEYWORD}
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"}
    return named, accepts_any


def check_args(target, args, where, provided=()):
    """Problems binding ``args`` to ``target``'s signature: unknown keywords, missing required ones, and values
    of the wrong type or range (:func:`arg_value_problem`). ``provided``: what the builder passes itself."""
    named, accepts_any = _parameters(target)
    if named is None:
        return [problem for key, value in args.items() if (problem := arg_value_problem(key, value, None, where))]
    name = getattr(target, "__name__", target)
    valid = [n for n in named if n not in provided]
    refused = [key for key in args if key in provided or (key not in named and not accepts_any)]
    problems = [f"{where}: {name} takes no argument {key!r}{did_you_mean(key, valid)}"
                f" valid: {', '.join(valid) or '(none)'}" for key in refused]
    problems += [f"{where}: {name} needs argument {n!r}" for n, p in named.items()
                 if p.default is p.empty and n not in args and n not in provided]
    return problems + [problem for key, value in args.items() if key not in refused
                       and (problem := arg_value_problem(key, value, named.get(key), where))]


# What an argument of these names must be, whatever it belongs to (a count of classes is never 0): the
# first regular expression matching the whole name gives the check.
ARG_NAMES = [
    (r"image_size", Check(lambda v: positive_int.ok(v) or (isinstance(v, list) and len(v) == 2 and all(
        map(positive_int.ok, v))), "a positive integer or [height, width]")),
    (r"num_classes|num_samples|epochs|total_steps|steps_per_epoch|T_max|T_0|prefetch_factor|.*_size", positive_int),
    (r".*_sizes", Check(lambda v: isinstance(v, (list, tuple)) and all(positive_int.ok(x) for x in v),
                        "a list of positive integers")),
    (r"num_.*", non_negative_int),
    (r"seed|.*_seed", seed_int),
    (r".*_split", Check(lambda v: non_negative_int.ok(v) or (isinstance(v, float) and 0 <= v < 1),
                        "a fraction in [0, 1) or a sample count (an integer >= 0)")),
    (r".*_fraction", Check(lambda v: number.ok(v) and 0 <= v < 1, "a fraction in [0, 1)")),
    (r"label_smoothing", Check(lambda v: number.ok(v) and 0 <= v <= 1, "a number from 0 to 1")),
    (r"lr|.*_lr|eta_min", Check(lambda v: all(x >= 0 for x in (v if isinstance(v, list) else [v]) if number.ok(x)),
                                "a learning rate >= 0 (a negative one climbs the loss)")),
]
numbers = Check(lambda v: number.ok(v) or (isinstance(v, list) and v and all(map(number.ok, v))), "a number")
_TYPE_NAMES = {"bool": bool, "int": int, "float": float, "None": type(None)}  # in annotations written as text


def arg_value_problem(name, value, param, where):
    """The line ``where.name: got VALUE, expected ...`` when ``value`` does not fit, else None. The type comes from
    the annotation of ``param`` (an ``inspect.Parameter`` or None), else its default: a default of ``True`` wants
    true or false, never ``"no"``; of ``0.1``, a number (or one per parameter group). The range comes from the
    name (:data:`ARG_NAMES`)."""
    kind, none_ok = None, True
    if param is not None:
        annotation = param.annotation
        if isinstance(annotation, str):  # under "from __future__ import annotations": "int", "Optional[float]"
            text = annotation.replace(" ", "")
            wrapped = text.startswith("Optional[")
            alternatives = [_TYPE_NAMES.get(t, object) for t in (text[9:-1] if wrapped else text).split("|")]
            alternatives += [type(None)] * wrapped
        elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
            alternatives = list(typing.get_args(annotation))
        else:
            alternatives = [annotation]
        rest = [a for a in alternatives if a is not type(None)]
        scalar = [a for a in rest if a in (int, float) or getattr(a, "__name__", "") == "Tensor"]
        listed = [a for a in rest if typing.get_origin(a) in (list, tuple)]
        if rest in ([bool], [int]):
            kind = boolean if rest == [bool] else integer
        elif len(scalar) + len(listed) == len(rest) and (any(a in (int, float) for a in rest)
                                                       or (listed and len(alternatives) > 1)):
            kind = numbers if listed else number
        if kind:
            none_ok = len(rest) < len(alternatives) or param.default is None
        elif isinstance(param.default, bool):
            kind, none_ok = boolean, False
        elif number.ok(param.default):
            kind = numbers
    if value is None:
        return None if none_ok or not kind else f"{where}.{name}: got null, expected {kind.wanted}"
    wanted = kind(value) if kind else None
    if not wanted:
        wanted = next((check(value) for pattern, check in ARG_NAMES if re.fullmatch(pattern, name)), None)
    return f"{where}.{name}: got {shown(value)}, expected {wanted}" if wanted else None
