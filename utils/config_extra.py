"""The config code a default run does not need, imported where it is used:

- reading YAML (a ``.yaml`` config), and saying where a config file went wrong (only when it did);
- the wording of a problem that utils/config.py's quick check found: a value JSON cannot hold, a bad
  folder name, a monitored metric the run will not log, an override whose quotes the shell dropped;
- the checks of what a default config does not hold: a part's metric (``{"type": ..., "args": ...}``
  in ``metrics``), ``optimizer.param_groups``, ``trainer.tensorboard`` (an alias of ``trainer.loggers``),
  and the checks of the parts' optional features (:func:`feature_settings`);
- old checkpoints' configs that hold both ``tensorboard`` and ``loggers`` (utils/io.py), and what changed
  between two configs (utils/resume.py).

utils/config.py imports it (lazily), so it imports nothing of utils/config.py: what it needs from there
(``check_args``) comes as an argument.
"""

import json

import math
import re

from utils.errors import ConfigError, UserError, did_you_mean, shown

_SURROGATE = re.compile("[\ud800-\udfff]")  # what makes a Python string invalid UTF-8

# --------------------------------------------------------------------------- reading a file


def load_yaml(path, text):
    """``text`` read as YAML, refusing a key repeated in one mapping (PyYAML keeps the last one silently).

    Raises:
        UserError: not valid YAML (with the line and column), or nested too deeply to read.
    """
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                        continue  # keys from a "<<" merge may be overridden; a non-scalar key is refused later
                    key = self.construct_object(key_node)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r} (first at line {seen[key]}); keep one of them",
                            key_node.start_mark)
                    seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep)

    try:
        return yaml.load(text, Loader=ConfigLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise UserError(f"{path}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to read; a config needs a few levels") from None


def load_problems(path, data, err):
    """The lines saying what is wrong with the config file ``path`` (its bytes ``data``) and where, for the error
    ``err`` reading it raised: missing or unreadable, not UTF-8, not JSON, a key repeated in one object, NaN,
    absurd nesting."""
    if isinstance(err, OSError):
        if path.is_dir():
            return [f"config {path} is a folder, not a file (give the path of a .json or .yaml file)"]
        if not path.exists():
            return [f"config file not found: {path}"]
        return [f"config {path} cannot be read: {err.strerror or err}"]
    if isinstance(err, UnicodeDecodeError):
        line, col = _line_col(data.decode("utf-8", errors="replace"),
                              len(data[: err.start].decode("utf-8", errors="replace")))
        return [f"{path}: not UTF-8 text: byte 0x{data[err.start]:02x} at line {line}, column {col};"
                " save the file as UTF-8"]
    if isinstance(err, RecursionError):
        return [f"{path}: nested too deeply to read; a config needs a few levels"]
    if isinstance(err, json.JSONDecodeError):
        return [f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}"]
    text = data.decode("utf-8-sig")
    if getattr(err, "kind", None) == "duplicate":
        duplicates = _json_sites(text)[0]
        if not duplicates:
            return [f"{path}: key {err.args[0]!r} appears twice in one object; keep one of them"]
        return [f"{path}: line {line}: key {key!r} appears twice in one object (the last would win silently);"
                " keep one of them" for key, line in duplicates]
    if getattr(err, "kind", None) == "constant":
        constants = _json_sites(text)[1]
        where = f" at line {constants[0][1]}, column {constants[0][2]}" if constants else ""
        return [f"{path}: {err.args[0]}{where} is not a finite number; JSON has no NaN or Infinity:"
                " write a number (or null)"]
    return [f"{path}: cannot be read as a config: {' '.join(str(err).split())}"]


def _line_col(text, pos):
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _json_sites(text):
    """Where ``text`` repeats a key within one object, and where it has a bare NaN/Infinity.

    Returns ``(duplicates, constants)``: ``[(key path, line), ...]`` and ``[(token, line, column), ...]``.
    A scan of the tokens, without recursion: it is only called to say where a problem the parser
    found is, and survives text the parser would refuse further on.
    """
    from json.decoder import scanstring

    duplicates, constants = [], []
    stack = []  # one entry per open bracket: [keys seen (None in a list), path, the last key read]
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            try:
                value, end = scanstring(text, i + 1)
            except ValueError:
                break
            j = end
            while j < n and text[j] in " \t\r\n":
                j += 1
            if j < n and text[j] == ":" and stack and stack[-1][0] is not None:
                keys, path, _ = stack[-1]
                if value in keys:
                    duplicates.append((".".join([*path, value]), _line_col(text, i)[0]))
                keys.add(value)
                stack[-1][2] = value
            i = end
            continue
        if c in "{[":
            path = []
            if stack:
                keys, parent, last = stack[-1]
                path = [*parent, last] if keys is not None else [*parent[:-1], parent[-1] + "[]"] if parent else ["[]"]
            stack.append([set() if c == "{" else None, path, None])
        elif c in "}]":
            if stack:
                stack.pop()
        else:
            for token in ("-Infinity", "Infinity", "NaN"):
                if text.startswith(token, i):
                    constants.append((token, *_line_col(text, i)))
                    i += len(token) - 1
                    break
        i += 1
    return duplicates, constants


# --------------------------------------------------------------------------- trainer.tensorboard, old and new


def resolve_tensorboard(given, trainer, problems, loggers_ok):
    """``trainer.tensorboard``: another way to say what ``trainer.loggers`` says, resolved into it here, and only here.

    ``false`` takes "tensorboard" out of the default loggers, ``true`` leaves it in; given together with
    ``loggers`` (``given`` is the trainer section as written, ``trainer`` the checked one, which holds
    ``loggers`` alone; ``loggers_ok``: they passed their check), the two must agree.
    """
    on = given["tensorboard"]
    if not isinstance(on, bool):  # reported already
        return
    if "loggers" not in given:
        trainer["loggers"] = ["tensorboard"] if on else []
    elif loggers_ok and on != any((item.get("type") if isinstance(item, dict) else item) == "tensorboard"
                                  for item in trainer["loggers"]):
        problems.append(f"trainer.tensorboard: {json.dumps(on)}, but trainer.loggers {json.dumps(trainer['loggers'])}"
                        f" {'leaves' if on else 'names'} \"tensorboard\"{' out' if on else ''}; the two say the same"
                        " thing: keep trainer.loggers alone")


def saved_config(config):
    """A checkpoint's config in this version's terms, so that checkpoints of older versions still resume.

    Their configs hold both ``trainer.tensorboard`` and ``trainer.loggers``, and TensorBoard was on where
    both said so: that is what their ``loggers`` becomes.
    """
    trainer = config.get("trainer") if isinstance(config, dict) else None
    if not isinstance(trainer, dict) or "tensorboard" not in trainer or not isinstance(trainer.get("loggers"), list):
        return config
    trainer = dict(trainer)
    if trainer.pop("tensorboard") is False:
        trainer["loggers"] = [item for item in trainer["loggers"]
                              if (item.get("type") if isinstance(item, dict) else item) != "tensorboard"]
    return {**config, "trainer": trainer}


# --------------------------------------------------------------------------- the wording of a problem found


def value_problems(value, where, max_depth, max_values):
    """Lines saying where ``value`` holds what a JSON config cannot (utils/config.py's plain_value_problems found
    something): a value that is not a string, finite number, true/false or null, a non-string key, invalid UTF-8,
    nesting deeper than ``max_depth``, more than ``max_values`` values, a container holding itself. At most 20."""
    problems, todo, seen = [], [(value, where, ())], 0  # (a value, its dotted path, the containers above it)
    while todo and len(problems) < 20:
        v, path, above = todo.pop()
        name, seen = path or "the config", seen + 1
        if seen > max_values:
            problems.append(f"{where or 'the config'}: more than {max_values} values (YAML aliases expanding?);"
                            " a config needs far fewer")
            break
        if v is None or isinstance(v, (bool, int)):
            pass
        elif isinstance(v, float):
            if not math.isfinite(v):
                problems.append(f"{name}: got {v}, expected a finite number (JSON has no NaN or Infinity)")
        elif isinstance(v, str):
            if _SURROGATE.search(v):
                problems.append(f"{name}: {v!r} is not valid UTF-8 text")
        elif not isinstance(v, (dict, list, tuple)):
            kind = {"date": "a date", "datetime": "a timestamp", "set": "a set", "bytes": "binary data"}.get(
                type(v).__name__, f"a {type(v).__name__}")
            problems.append(f"{name}: got {kind} ({shown(v, 40)}), which JSON cannot hold; write a string, number,"
                            " true/false, null, list or mapping (quote a date to keep it as text)")
        elif len(above) >= max_depth:
            problems.append(f"{name}: nested more than {max_depth} levels deep; a config needs a few")
        elif id(v) in above:
            problems.append(f"{name}: contains itself (a YAML alias inside its own anchor)")
        else:
            items = v.items() if isinstance(v, dict) else ((f"[{i}]", item) for i, item in enumerate(v))
            children = []
            for key, item in items:
                if not isinstance(key, str):
                    problems.append(f"{name}: key {key!r} is a {type(key).__name__}; keys must be strings (quote it)")
                elif _SURROGATE.search(key):
                    problems.append(f"{name}: key {key!r} is not valid UTF-8 text")
                else:
                    sub = path + key if isinstance(v, (list, tuple)) else f"{path}.{key}" if path else key
                    children.append((item, sub, (*above, id(v))))
            todo.extend(reversed(children))  # in the order of the file
    return problems


def path_component_problem(value, where):
    """Why ``value`` cannot be one folder name (utils/config.py's folder_name refused it), as a problem line."""
    if not isinstance(value, str) or not value:
        return f"{where}: got {shown(value)}, expected a non-empty string"
    short = shown(value, 40)
    separators = [s for s in ("/", "\\") if s in value]
    if "\0" in value:
        return f"{where}: got {short}, which contains a NUL character; use a plain folder name"
    if control := re.search(r"[\x01-\x1f\x7f-\x9f]", value):
        return (f"{where}: got {short}, which contains the control character {control.group()!r}; use a plain"
                " folder name (letters, digits, '-', '_', '.')")
    if separators:
        return (f"{where}: got {short}, which contains {separators[0]!r}: it must be a single folder name,"
                " or the run would be written outside trainer.save_dir")
    if value in (".", ".."):
        return f"{where}: got {short}, which names a folder above the run's; use a plain folder name"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return f"{where}: got {value!r}, which is not valid UTF-8 text"
    return f"{where}: got {short} ({size} bytes), longer than the 255 bytes a file system allows in a folder name"


def monitor_problem(name, metric_names, available):
    """Why ``trainer.monitor``'s metric ``name`` will not be logged: it needs validation data, or is none of them."""
    if name.startswith("val_") and name[4:] in metric_names:
        return (f"trainer.monitor: {name!r} needs validation data: set data_loader.args.validation_split > 0, or"
                f" monitor one of {', '.join(available)}")
    return (f"trainer.monitor: {name!r} will not exist{did_you_mean(name, available)} it can be one of"
            f" {', '.join(available)}")


# --------------------------------------------------------------------------- what a default config does not hold

METRIC_KEYS = ("type", "args", "name")


def metric_entry_problems(entry, where, registry, check_args):
    """The problem lines of one ``{"type": ..., "args": {...}, "name": ...}`` entry of ``metrics``: a part's metric
    (utils/parts.py). Its arguments must bind (``check_args``: utils/config.py's), and the class accept them. A string
    ``"module:name"``: a metric function of the user's, which must import."""
    if isinstance(entry, str):
        try:
            registry.get(entry, where)
        except ConfigError as err:
            return err.problems
        return []
    unknown = [key for key in entry if key not in METRIC_KEYS]
    if unknown:
        return [f"{where}.{unknown[0]}: unknown key{did_you_mean(unknown[0], METRIC_KEYS)}"
                f" valid: {', '.join(METRIC_KEYS)}"]
    kind, args, name = entry.get("type"), entry.get("args") or {}, entry.get("name")
    if not isinstance(kind, str) or not kind:
        return [f"{where}.type: missing or not a string (the name of a part's metric, e.g."
                ' "torchmetrics.classification.MulticlassF1Score")']
    if kind in registry.table:
        return [f"{where}: {kind!r} is a built-in metric; write it as the plain name \"{kind}\""]
    if not isinstance(args, dict):
        return [f"{where}.args: expected a mapping of argument names to values, got {json.dumps(args)}"]
    if name is not None and not (isinstance(name, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)):
        return [f"{where}.name: got {shown(name)}, expected a short name of letters, digits and _"]
    try:
        build = registry.get(kind, f"{where}.type")
    except ConfigError as err:
        return [p.replace("metrics:", f"{where}.type:", 1) for p in err.problems]
    bad = check_args(build, args, f"{where}.args")
    if bad:
        return bad
    try:  # cheap (no data yet), and the only way to catch values the class itself refuses (average="macr")
        build(**args)
    except (TypeError, ValueError) as err:
        return [f"{where}.args: {kind} rejected its arguments: {' '.join(str(err).split()) or type(err).__name__}"]
    except (ImportError, OSError, RuntimeError) as err:  # an optional package it needs, weights to download
        reason = " ".join(str(err).split()) or type(err).__name__
        return [f"{where}.type: {kind} cannot be built here: {reason[:300]}"]
    return []


def param_group_problems(groups, named, arg_value_problem):
    """The problem lines of ``optimizer.param_groups``: a list of ``{"params": ["glob", ...], ...}`` whose other
    settings are the optimizer's own arguments (``named``: its parameters, None when its type is unknown), checked
    as its ``args`` are (``arg_value_problem``: utils/config.py's; no ``"lr": "0.1"``)."""
    if not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and g["params"]
            and all(isinstance(s, str) and s for s in g["params"]) for g in groups):
        return ['optimizer.param_groups: expected a list of {"params": ["glob", ...], "lr": ...} entries']
    if named is None:  # the optimizer's type is unknown (reported)
        return []
    valid = ["params", *(name for name in named if name != "params")]
    return [f"optimizer.param_groups[{index}].{name}: unknown key{did_you_mean(name, valid)} valid: {', '.join(valid)}"
            if name not in valid else problem for index, group in enumerate(groups) for name, value in group.items()
            if name not in valid or (name != "params" and (problem := arg_value_problem(
                name, value, named.get(name), f"optimizer.param_groups[{index}]")))]


# --------------------------------------------------------------------------- the parts' optional features


def optional(check):
    """``check`` (a Check, or a function returning None or what was expected), or null."""
    return lambda v: None if v is None or not check(v) else f"{check(v)}, or null"


def feature_settings(defaults, checks):
    """A check for ``null``/``false`` (off), ``true`` (the defaults) or a mapping of some of ``defaults``' keys,
    each value checked by ``checks[key]`` (a function returning what was expected, or None)."""

    def check(v):
        if v is None or isinstance(v, bool):
            return None
        if not isinstance(v, dict):
            return f"true, false, null or a mapping with keys {', '.join(defaults)}"
        for key, value in v.items():
            if key not in defaults:
                return (f"a mapping with keys {', '.join(defaults)} ({key!r} is none of them"
                        f"{did_you_mean(key, defaults)})")
            wanted = checks[key](value)
            if wanted:
                return f"{key} to be {wanted}"
        return None

    return check


def settings_of(value, defaults):
    """The completed settings of an optional feature, or None when it is off (``null`` or ``false``)."""
    if value is None or value is False:
        return None
    return {**defaults, **(value if isinstance(value, dict) else {})}


def config_diff(old, new):
    """Lines saying what changed between two flattened configs (utils/config.py's flatten), as ``key: old -> new``."""
    missing = object()
    show = lambda v: "(unset)" if v is missing else json.dumps(v)  # noqa: E731
    return [f"{key}: {show(old.get(key, missing))} -> {show(new.get(key, missing))}"
            for key in sorted(old.keys() | new.keys()) if old.get(key, missing) != new.get(key, missing)]


def unquoted_problem(key, text):
    """The line for an override whose value looks like a JSON list or mapping but is not JSON: the shell dropped its
    quotes (``metrics=[accuracy]`` arrives as ``[accuracy]``); it shows the override quoted."""

    def quoted(match):  # a word between the brackets, commas and colons: kept if JSON (3, true), else quoted
        try:
            json.loads(match[0])
            return match[0]
        except ValueError:
            return json.dumps(match[0])

    fixed = re.sub(r'"[^"]*"|[^\[\]{},:\s"]+', quoted, re.sub(r"'([^']*)'", r'"\1"', text))
    try:
        json.loads(fixed)
    except ValueError as err:  # not a matter of quotes: a bracket missing, say
        return (f"override {key}={text}: {text} is not valid JSON ({err.msg.lower()}); write the list"
                f" or mapping as JSON and quote the whole override, as in '{key}=[\"a\", 1]'")
    return (f"override {key}={text}: {text} is not JSON: the shell dropped its quotes; quote the whole override:"
            f" '{key}={fixed}'")


def task_loss_names(section, registry):
    """``loss_<name>`` for each named loss of the config's task (its ``args.loss_weights``, else its class's)."""
    weights = section["args"].get("loss_weights", getattr(registry.get(section["type"]), "loss_weights", None))
    return [f"loss_{name}" for name in weights] if isinstance(weights, dict) else []


def strategy_problems(trainer):
    """``trainer.strategy`` and its keys: what cannot work with a sharded model (trainer/fsdp.py), one line each."""
    fsdp = 'trainer.strategy "fsdp"'
    if trainer["strategy"] != "fsdp":
        return [f"trainer.{key}: applies to a sharded model only; set trainer.strategy to \"fsdp\", or remove it"
                for key in ("fsdp_blocks", "activation_checkpointing") if trainer[key] not in (None, False)]
    refused = {"amp": (trainer["amp"] == "fp16", '"fp16" needs a gradient scaler over sharded gradients, which this'
                       f' template does not have under {fsdp}; use "bf16" (bf16 compute, fp32 gradient reduction)'),
               "compile": (trainer["compile"], f"not supported with {fsdp} here; leave it false"),
               "skip_nonfinite": (trainer["skip_nonfinite"], f"not supported with {fsdp} (every process would have"
                                  " to agree on each step); leave it false, so a non-finite loss stops the run"),
               "ema": (trainer.get("ema"), "the average would have to be sharded like the weights, which the EMA"
                       " part does not do; remove trainer.ema, or use trainer.strategy \"ddp\""),
               "auto_accumulate": (trainer.get("auto_accumulate"), f"not supported with {fsdp} (it retries steps"
                                   " with a process's own batch size); remove it")}
    return [f"trainer.{key}: {why}" for key, (refuse, why) in refused.items() if refuse]
