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
import types
import typing
from pathlib import Path

from utils import parts
from utils.errors import ConfigError, UserError

# --------------------------------------------------------------------------- loading

MAX_DEPTH = 64  # a config is a few levels deep; deeper nesting is a mistake (or an attack on the recursion limit)
MAX_VALUES = 100_000  # YAML aliases can make a small file expand to billions of values
NAME_MAX = 255  # bytes in one file or folder name on every common file system


class _DuplicateKey(Exception):
    pass


class _NonFiniteConstant(Exception):
    pass


def _no_duplicates(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKey(next(k for i, k in enumerate(keys) if k in keys[:i]))
    return dict(pairs)


def _reject_constant(name):
    raise _NonFiniteConstant(name)


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


def _yaml_loader():
    """A ``yaml.SafeLoader`` that refuses a key repeated in one mapping (PyYAML keeps the last one silently)."""
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

    return ConfigLoader


def plain_value_problems(value, where=""):
    """Lines saying where ``value`` holds something a JSON config cannot: every value must be a string,
    a finite number, true/false, null, a list or a mapping with string keys, at most :data:`MAX_DEPTH` deep.

    YAML can produce dates, sets, binary data, non-string keys and self-referencing aliases; a
    JSON file can hold ``1e999`` (infinity); a Python caller can pass anything. An empty list means fine.
    """
    problems = []
    budget = [MAX_VALUES]
    on_path = set()  # ids of the containers above the current one: a cycle comes back to one of them

    def name(path):
        return path or "the config"

    def walk(v, path, depth):
        budget[0] -= 1
        if budget[0] < 0 or len(problems) >= 20:
            return
        if isinstance(v, bool) or v is None or isinstance(v, int):
            return
        if isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                problems.append(f"{name(path)}: got {v}, expected a finite number (JSON has no NaN or Infinity)")
            return
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                problems.append(f"{name(path)}: {v!r} is not valid UTF-8 text")
            return
        if isinstance(v, (dict, list, tuple)):  # a tuple from a Python caller is written as a list
            if depth >= MAX_DEPTH:
                problems.append(f"{name(path)}: nested more than {MAX_DEPTH} levels deep; a config needs a few")
                return
            if id(v) in on_path:
                problems.append(f"{name(path)}: contains itself (a YAML alias inside its own anchor)")
                return
            on_path.add(id(v))
            if isinstance(v, dict):
                for key, item in v.items():
                    if not isinstance(key, str):
                        problems.append(f"{name(path)}: key {key!r} is a {type(key).__name__}; keys must be strings (quote it)")
                        continue
                    try:
                        key.encode("utf-8")
                    except UnicodeEncodeError:
                        problems.append(f"{name(path)}: key {key!r} is not valid UTF-8 text")
                        continue
                    walk(item, f"{path}.{key}" if path else key, depth + 1)
            else:
                for index, item in enumerate(v):
                    walk(item, f"{path}[{index}]", depth + 1)
            on_path.discard(id(v))
            return
        kind = {"date": "a date", "datetime": "a timestamp", "set": "a set", "bytes": "binary data"}.get(
            type(v).__name__, f"a {type(v).__name__}")
        shown = repr(v)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        problems.append(f"{name(path)}: got {kind} ({shown}), which JSON cannot hold; write a string, number,"
                        " true/false, null, list or mapping (quote a date to keep it as text)")

    walk(value, where, 0)
    if budget[0] < 0:
        problems.append(f"{name(where)}: more than {MAX_VALUES} values (YAML aliases expanding?); a config needs far fewer")
    return problems


def load_config(path):
    """Read a config file: YAML when it ends in ``.yaml``/``.yml``, JSON otherwise.

    Raises:
        UserError: one line per problem: the file is missing, a folder or unreadable, not UTF-8,
            not valid JSON/YAML, repeats a key within one mapping, holds NaN/Infinity, or holds
            a value JSON cannot (a YAML date or set, say), or is nested absurdly deep.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config {path} is a folder, not a file (give the path of a .json or .yaml file)")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"config {path} cannot be read: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8-sig")  # tolerate the byte-order mark some Windows editors write
    except UnicodeDecodeError as err:
        line, col = _line_col(data.decode("utf-8", errors="replace"), len(data[: err.start].decode("utf-8", errors="replace")))
        raise UserError(f"{path}: not UTF-8 text: byte 0x{data[err.start]:02x} at line {line}, column {col};"
                        " save the file as UTF-8") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml  # only YAML users pay for the import

        try:
            config = yaml.load(text, Loader=_yaml_loader())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = " ".join(str(getattr(err, "problem", None) or err).split())
            raise UserError(f"{path}: not valid YAML{where}: {problem}") from None
        except RecursionError:
            raise UserError(f"{path}: nested too deeply to read; a config needs a few levels") from None
    else:
        try:
            config = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
        except _DuplicateKey as err:
            duplicates = _json_sites(text)[0]
            if not duplicates:
                raise UserError(f"{path}: key {err.args[0]!r} appears twice in one object; keep one of them") from None
            raise UserError(*(f"{path}: line {line}: key {key!r} appears twice in one object (the last would win"
                              " silently); keep one of them" for key, line in duplicates)) from None
        except _NonFiniteConstant as err:
            constants = _json_sites(text)[1]
            where = f" at line {constants[0][1]}, column {constants[0][2]}" if constants else ""
            raise UserError(f"{path}: {err.args[0]}{where} is not a finite number; JSON has no NaN or Infinity:"
                            " write a number (or null)") from None
        except RecursionError:
            raise UserError(f"{path}: nested too deeply to read; a config needs a few levels") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: a config must be a mapping of keys to values, got {type(config).__name__}")
    problems = plain_value_problems(config)
    if problems:
        raise UserError(*(f"{path}: {problem}" for problem in problems))
    return config


def parse_value(text):
    """An override's value: JSON when it parses (``3``, ``0.1``, ``true``, ``null``, ``[1, 2]``), else the string.

    Raises:
        UserError: the value is JSON with NaN or Infinity, or nested too deeply to parse.
    """
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError:
        return text
    except _NonFiniteConstant as err:
        raise UserError(f"{err.args[0]} is not a finite number (JSON has no NaN or Infinity); for the text,"
                        f" quote it: '\"{text}\"'") from None
    except RecursionError:
        raise UserError("the value is nested too deeply to read") from None


def apply_overrides(config, overrides):
    """Return a copy of ``config`` with each ``a.b.c=VALUE`` applied; missing dicts on the path are created.

    Raises:
        UserError: an override is not ``key.path=VALUE``, its path runs through a value that is not a
            section, or its value is not a plain JSON value (NaN, Infinity, absurd nesting, invalid UTF-8).
    """
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
        problems = plain_value_problems({key: value})
        if problems:
            raise UserError(*(f"override {item!r}: {problem}" for problem in problems))
        node[last] = value
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
    ``torchvision.models.resnet18``, or a loader of an optional part); it returns the callable
    or None. ``extra_names`` are names it resolves, listed (and suggested) with the table's.
    """

    def __init__(self, kind, table, extra=None, extra_hint="", extra_names=()):
        self.kind = kind
        self.table = dict(table)
        self.extra = extra
        self.extra_hint = extra_hint
        self.extra_names = tuple(extra_names)

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
        valid = [*self.table, *self.extra_names]
        raise ConfigError(f"{where}: unknown {self.kind} {name!r}{did_you_mean(name, valid)} valid: {_listing(valid)}{hint}")


def _parameters(target):
    """``target``'s keyword parameters by name, and whether it also takes any keyword (``**kwargs``).

    A class may forward its ``**kwargs`` to a base named by its ``options_from`` (data loaders
    do): the base's parameters count as the class's own. ``(None, True)`` when there is no signature.
    """
    try:
        params = dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None, True  # a builtin without a signature: the constructor itself will complain
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
    return named, accepts_any


def check_args(target, args, where, provided=()):
    """Problems binding ``args`` to ``target``'s signature: unknown keywords, missing required ones,
    and values of the wrong type or range (see :func:`arg_value_problem`).

    ``provided`` names parameters the builder passes itself (``params`` for an optimizer).
    """
    named, accepts_any = _parameters(target)
    if named is None:
        return [problem for key, value in args.items() if (problem := arg_value_problem(key, value, None, where))]
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
    for key, value in args.items():
        if key in provided or (key not in named and not accepts_any):
            continue  # already reported as an argument it does not take
        problem = arg_value_problem(key, value, named.get(key), where)
        if problem:
            problems.append(problem)
    return problems


# --------------------------------------------------------------------------- argument values

_COUNTS = {"num_classes", "num_samples", "epochs", "total_steps", "steps_per_epoch", "T_max", "T_0", "prefetch_factor"}
SEED_LIMIT = 2**63  # the data order seeds a generator with seed + epoch: keep that below torch's 2**64


def _annotation_kind(annotation):
    """``"bool"``, ``"integer"``, ``"number"`` or ``"numbers"`` (a number or a list of them) from a type
    annotation, with whether it allows None; ``(None, True)`` when the annotation says nothing this can check."""
    if isinstance(annotation, str):  # under "from __future__ import annotations"
        text = annotation.replace(" ", "")
        optional = text.startswith("Optional[") or "|None" in text or "None|" in text
        text = text.removeprefix("Optional[").removesuffix("]") if text.startswith("Optional[") else text
        text = text.replace("|None", "").replace("None|", "")
        return {"bool": "bool", "int": "integer", "float": "number"}.get(text), optional if text in ("bool", "int", "float") else True
    if annotation is bool:
        return "bool", False
    if annotation is int:
        return "integer", False
    if annotation is float:
        return "number", False
    args = typing.get_args(annotation)
    if not args or typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None, True
    none_ok = type(None) in args
    rest = [a for a in args if a is not type(None)]
    if rest == [bool]:
        return "bool", none_ok
    if rest == [int]:
        return "integer", none_ok
    scalar = all(a in (int, float) or getattr(a, "__name__", "") == "Tensor" for a in rest)
    if scalar and any(a in (int, float) for a in rest):
        return "number", none_ok
    listed = [a for a in rest if typing.get_origin(a) in (list, tuple)]
    if listed and all(a in listed or a in (int, float) or getattr(a, "__name__", "") == "Tensor" for a in rest):
        return "numbers", none_ok
    return None, True


def _expected_kind(param):
    """What a parameter takes, from its annotation, else from the type of its default: ``(kind, None allowed)``."""
    if param is None:
        return None, True
    kind, none_ok = _annotation_kind(param.annotation) if param.annotation is not inspect.Parameter.empty else (None, True)
    if kind:
        return kind, none_ok or param.default is None
    default = param.default
    if isinstance(default, bool):
        return "bool", False
    if isinstance(default, (int, float)):
        return "numbers", True  # a number, or one per parameter group (min_lr of ReduceLROnPlateau)
    return None, True


_KIND_OK = {
    "bool": lambda v: isinstance(v, bool),
    "integer": lambda v: _is_int(v),
    "number": lambda v: _is_number(v),
    "numbers": lambda v: _is_number(v) or (isinstance(v, list) and bool(v) and all(_is_number(x) for x in v)),
}
_KIND_WANTED = {"bool": "true or false", "integer": "an integer", "number": "a number", "numbers": "a number"}


def _named_rule(name, value):
    """What an argument of this name must be, whatever the target (a count of classes is never 0), or None if fine."""
    if name in _COUNTS or name.endswith("_size"):
        return positive_int(value)
    if name.endswith("_sizes"):
        ok = isinstance(value, (list, tuple)) and all(_is_int(v) and v > 0 for v in value)
        return None if ok else "a list of positive integers"
    if name.startswith("num_"):
        return non_negative_int(value)
    if name == "seed" or name.endswith("_seed"):
        return seed_int(value)
    if name.endswith("_split"):
        ok = (_is_int(value) and value >= 0) or (isinstance(value, float) and 0 <= value < 1)
        return None if ok else "a fraction in [0, 1) or a sample count (an integer >= 0)"
    if name.endswith("_fraction"):
        return None if _is_number(value) and 0 <= value < 1 else "a fraction in [0, 1)"
    return None


def arg_value_problem(name, value, param, where):
    """The line saying ``where.name: got VALUE, expected ...`` when ``value`` does not fit, else None.

    The type comes from the parameter's annotation or default (``param``, an ``inspect.Parameter``
    or None): a default of ``True`` wants true or false, never ``"no"``; a default of ``0.1`` wants a
    number, never ``true``. The range comes from the name: ``num_classes``, ``*_size``, ``epochs``
    and the like are positive integers, ``num_*`` integers >= 0, ``*seed`` an integer in [0, 2**63),
    ``*_split`` a fraction in [0, 1) or a count, ``*_fraction`` a fraction in [0, 1).
    """
    if value is None:
        kind, none_ok = _expected_kind(param)
        return None if none_ok or not kind else f"{where}.{name}: got null, expected {_KIND_WANTED[kind]}"
    kind, _ = _expected_kind(param)
    wanted = _KIND_WANTED[kind] if kind and not _KIND_OK[kind](value) else _named_rule(name, value)
    return f"{where}.{name}: got {_show(value)}, expected {wanted}" if wanted else None


def _show(value, limit=60):
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def seed_int(v):
    return None if _is_int(v) and 0 <= v < SEED_LIMIT else "an integer from 0 to 2**63 - 1"


def path_string(v):
    return None if isinstance(v, str) and v and "\0" not in v else "a non-empty path (a string without NUL characters)"


def check_path_component(value, where):
    """The problem line when ``value`` cannot name one folder inside another, or None when it can.

    A run's ``name`` and its run id become ``save_dir/models/<name>/<run_id>``: each must be one
    path component (no ``/`` or ``\\``, not ``.`` or ``..``, no NUL, valid UTF-8, at most
    :data:`NAME_MAX` bytes), or the run would be written outside ``save_dir`` or fail half-way.
    """
    if not isinstance(value, str) or not value:
        return f"{where}: got {_show(value)}, expected a non-empty string"
    shown = _show(value, 40)
    if "\0" in value:
        return f"{where}: got {shown}, which contains a NUL character; use a plain folder name"
    separators = [s for s in ("/", "\\") if s in value]
    if separators:
        return (f"{where}: got {shown}, which contains {separators[0]!r}: it must be a single folder name,"
                " or the run would be written outside trainer.save_dir")
    if value in (".", ".."):
        return f"{where}: got {shown}, which names a folder above the run's; use a plain folder name"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return f"{where}: got {value!r}, which is not valid UTF-8 text"
    if size > NAME_MAX:
        return f"{where}: got {shown} ({size} bytes), longer than the {NAME_MAX} bytes a file system allows in a folder name"
    return None


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


def metric_list(v):
    ok = isinstance(v, list) and all((isinstance(m, str) and m) or isinstance(m, dict) for m in v)
    return None if ok else 'a list of metric names, or {"type": ..., "args": {...}} entries naming a part\'s metric'


METRIC_KEYS = ("type", "args", "name")


def metric_name(entry):
    """The name an entry of ``metrics`` goes by in results (``val_<name>``) and in ``trainer.monitor``: a built-in's
    own name, or an entry's ``name``, by default its class in snake case (``multiclass_f1_score``)."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry.get("name"), str):
        return entry["name"]
    kind = entry.get("type")
    cls = kind.rsplit(".", 1)[-1] if isinstance(kind, str) else "?"
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", cls).lower()


def _check_metrics(metrics, registry, problems):
    """One line per problem in ``metrics``: unknown names, malformed entries of a part's metrics (utils/parts.py),
    arguments that do not bind or that the class rejects, repeated names. A part is imported only if an entry
    names it."""
    if metric_list(metrics) is not None:
        return  # already reported by the schema
    for index, entry in enumerate(metrics):
        where = f"metrics[{index}]"
        if isinstance(entry, str):
            if entry not in registry.table:
                problems.append(f"metrics: unknown metric {entry!r}{did_you_mean(entry, registry.table)}"
                                f" valid: {_listing(registry.table)}")
            continue
        unknown = [key for key in entry if key not in METRIC_KEYS]
        if unknown:
            problems.append(f"{where}.{unknown[0]}: unknown key{did_you_mean(unknown[0], METRIC_KEYS)}"
                            f" valid: {', '.join(METRIC_KEYS)}")
            continue
        kind, args, name = entry.get("type"), entry.get("args") or {}, entry.get("name")
        if not isinstance(kind, str) or not kind:
            problems.append(f"{where}.type: missing or not a string (the name of a part's metric, e.g."
                            ' "torchmetrics.classification.MulticlassF1Score")')
            continue
        if kind in registry.table:
            problems.append(f"{where}: {kind!r} is a built-in metric; write it as the plain name \"{kind}\"")
            continue
        if not isinstance(args, dict):
            problems.append(f"{where}.args: expected a mapping of argument names to values, got {json.dumps(args)}")
            continue
        if name is not None and not (isinstance(name, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)):
            problems.append(f"{where}.name: got {_show(name)}, expected a short name of letters, digits and _")
            continue
        try:
            build = registry.get(kind, f"{where}.type")
        except ConfigError as err:
            problems.extend(p.replace("metrics:", f"{where}.type:", 1) for p in err.problems)
            continue
        bad = check_args(build, args, f"{where}.args")
        if bad:
            problems.extend(bad)
            continue
        try:  # cheap (no data yet), and the only way to catch values the class itself refuses (average="macr")
            build(**args)
        except (TypeError, ValueError) as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            problems.append(f"{where}.args: {kind} rejected its arguments: {reason}")
        except (ImportError, OSError, RuntimeError) as err:  # an optional package it needs, weights to download
            reason = " ".join(str(err).split()) or type(err).__name__
            problems.append(f"{where}.type: {kind} cannot be built here: {reason[:300]}")
    names = [metric_name(entry) for entry in metrics]
    for name in sorted({n for n in names if names.count(n) > 1 or n == "loss"}):
        problems.append(f"metrics: the name {name!r} is taken twice (or is reserved); give the entry its own \"name\"")


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


def feature_settings(defaults, checks):
    """A check for ``null``/``false`` (off), ``true`` (the defaults) or a mapping of some of ``defaults``' keys,
    each value checked by ``checks[key]`` (a function returning what was expected, or None)."""

    def inner(v):
        if v is None or isinstance(v, bool):
            return None
        if not isinstance(v, dict):
            return f"true, false, null or a mapping with keys {', '.join(defaults)}"
        for key, value in v.items():
            if key not in defaults:
                return f"a mapping with keys {', '.join(defaults)} ({key!r} is none of them{did_you_mean(key, defaults)})"
            wanted = checks[key](value)
            if wanted:
                return f"{key} to be {wanted}"
        return None

    return inner


def settings_of(value, defaults):
    """The completed settings of an optional feature, or None when it is off (``null`` or ``false``)."""
    if value is None or value is False:
        return None
    return {**defaults, **(value if isinstance(value, dict) else {})}


CORE_LOGGERS = ("tensorboard",)  # the trainer.loggers name the core writes itself (logger/visualization.py)


def logger_names():
    """Every name ``trainer.loggers`` may hold: the core's, then the optional parts' (utils/parts.py)."""
    return [*CORE_LOGGERS, *(name for part in parts.PARTS.values() for name in part.loggers)]


def check_loggers(value):
    """Config check of ``trainer.loggers``: None when valid, else what was expected (one line).

    The form and the names; a part checks its own logger's ``args`` (its ``check(config)``).
    """
    names = logger_names()
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
            args = item.get("args") or {}
            if set(item) - {"type", "args"} or not isinstance(args, dict):
                return f'{wanted} ({name}: only "type" and "args", a mapping)'
            if name in CORE_LOGGERS and args:
                return f"{wanted} ({name} takes no args)"
    return None


def logger_entries(trainer):
    """``[(name, args)]`` of a checked config's ``trainer.loggers``: where the run's numbers go."""
    return [(item["type"], dict(item.get("args") or {})) if isinstance(item, dict) else (item, {})
            for item in trainer["loggers"]]


def _resolve_tensorboard(given, trainer, problems):
    """``trainer.tensorboard``: another way to say what ``trainer.loggers`` says, resolved into it here, and only here.

    ``false`` takes "tensorboard" out of the default loggers, ``true`` leaves it in; given
    together with ``loggers``, the two must agree. The checked config holds ``loggers`` alone.
    """
    on = trainer.pop("tensorboard")
    if not isinstance(on, bool):  # not given (or not a boolean: reported already)
        return
    if "loggers" not in given:
        trainer["loggers"] = ["tensorboard"] if on else []
    elif check_loggers(trainer["loggers"]) is None and on != ("tensorboard" in dict(logger_entries(trainer))):
        problems.append(f"trainer.tensorboard: {json.dumps(on)}, but trainer.loggers {json.dumps(trainer['loggers'])}"
                        f" {'leaves' if on else 'names'} \"tensorboard\"{' out' if on else ''}; the two say the same thing:"
                        " keep trainer.loggers alone")


def saved_config(config):
    """A checkpoint's config in this version's terms, so that checkpoints of older versions still resume.

    Their configs hold both ``trainer.tensorboard`` and ``trainer.loggers``, and TensorBoard
    was on where both said so: that is what their ``loggers`` becomes.
    """
    trainer = config.get("trainer") if isinstance(config, dict) else None
    if not isinstance(trainer, dict) or "tensorboard" not in trainer or not isinstance(trainer.get("loggers"), list):
        return config
    trainer = dict(trainer)
    if trainer.pop("tensorboard") is False:
        trainer["loggers"] = [item for item in trainer["loggers"]
                              if (item.get("type") if isinstance(item, dict) else item) != "tensorboard"]
    return {**config, "trainer": trainer}


# key: (check, default). A default of REQUIRED means the key must be given.
REQUIRED = object()

TRAINER_SCHEMA = {
    "epochs": (positive_int, 10),
    "save_dir": (path_string, "saved/"),
    "save_period": (positive_int, 1),
    "verbosity": (one_of(0, 1, 2), 2),
    "monitor": (monitor_string, "off"),
    "early_stop": (optional(non_negative_int), None),
    "tensorboard": (boolean, None),  # true/false: an alias, resolved into loggers (_resolve_tensorboard)
    "loggers": (check_loggers, ["tensorboard"]),  # and the parts' loggers: "csv", {"type": "mlflow", "args": {...}}
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
    # the end of a run
    "test_after_train": (boolean, True),
}

TOP_SCHEMA = {
    "name": (None, REQUIRED),  # checked by check_path_component
    "seed": (seed_int, 0),
    "device": (device_string, "auto"),
    "n_gpu": (one_of(0, 1), 1),  # victoresque's key: 0 is the CPU; several GPUs are torchrun's (see validate_config)
    "arch": (None, REQUIRED),
    "data_loader": (None, REQUIRED),
    "optimizer": (None, REQUIRED),
    "lr_scheduler": (None, None),
    "loss": (None, REQUIRED),
    "metrics": (metric_list, []),  # built-in names, or a part's {"type": "torchmetrics.<...>.<Class>", "args": {...}, "name": ...}
    "trainer": (None, {}),
}

SECTION_KEYS = {
    "arch": {"type", "args"},
    "data_loader": {"type", "args"},
    "loss": {"type", "args"},
    "optimizer": {"type", "args", "param_groups"},
    "lr_scheduler": {"type", "args", "interval"},
}


def trainer_keys():
    """The keys ``trainer`` may hold: the core's, then those of the optional parts (utils/parts.py)."""
    return [*TRAINER_SCHEMA, *(key[len("trainer."):] for key in parts.KEY_OWNERS if key.startswith("trainer."))]


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
    if not isinstance(config, dict):
        raise ConfigError("a config must be a mapping of keys to values")
    problems = plain_value_problems(config)
    if problems:  # the checks below assume JSON values (they print them as JSON)
        raise ConfigError(*problems)
    _check_keys(config, TOP_SCHEMA, "", problems)
    if isinstance(config.get("n_gpu"), int) and not isinstance(config["n_gpu"], bool) and config["n_gpu"] > 1:
        problems.append(f"n_gpu: {config['n_gpu']} GPUs are trained by torchrun, one process each: torchrun"
                        f" --nproc_per_node={config['n_gpu']} train.py -c CONFIG (n_gpu may be 0, the CPU, or 1)")
        config = {k: v for k, v in config.items() if k != "n_gpu"}
    out = _fill(config, TOP_SCHEMA, "", problems)
    if out.get("n_gpu") == 0 and out.get("device") == "auto":  # the one place n_gpu acts: 0 means the CPU
        out["device"] = "cpu"
    elif out.get("n_gpu") == 0 and isinstance(out.get("device"), str) and out["device"] not in ("cpu", "auto"):
        problems.append(f"n_gpu: 0 (the CPU) and device {json.dumps(out['device'])} say different things; keep one"
                        " (device alone says where a run trains)")
    if "name" in config:
        problem = check_path_component(config["name"], "name")
        if problem:
            problems.append(problem)

    trainer = config.get("trainer", {})
    if not isinstance(trainer, dict):
        problems.append(f"trainer: expected a mapping of settings, got {json.dumps(trainer)}")
        trainer = {}
    # A key of an optional part (utils/parts.py) is checked by the part itself, below.
    _check_keys({k: v for k, v in trainer.items() if f"trainer.{k}" not in parts.KEY_OWNERS},
                dict.fromkeys(trainer_keys()), "trainer", problems)
    out["trainer"] = _fill(trainer, TRAINER_SCHEMA, "trainer", problems)
    _resolve_tensorboard(trainer, out["trainer"], problems)
    out["trainer"].update({k: v for k, v in trainer.items()
                           if k not in TRAINER_SCHEMA and f"trainer.{k}" in parts.KEY_OWNERS})

    # Object sections: the name must be in the table and its args must bind to the signature.
    provided = {"arch": (), "data_loader": ("seed",), "optimizer": ("params",), "lr_scheduler": ("optimizer",)}
    failed = set()  # sections whose type is unknown or malformed
    for key in ("arch", "data_loader", "loss", "optimizer", "lr_scheduler"):
        if key not in config or (key == "lr_scheduler" and config[key] is None):
            continue
        section = _section(config, key, problems)
        out[key] = section
        if section is None:
            failed.add(key)
            continue
        try:
            target = registries[key].get(section["type"], f"{key}.type")
        except ConfigError as err:
            problems.extend(err.problems)
            failed.add(key)
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
        elif "optimizer" not in failed:
            # A group's settings are the optimizer's own arguments: the same types apply (no "lr": "0.1").
            named, _ = _parameters(registries["optimizer"].get(opt["type"]))
            for index, group in enumerate(groups):
                for name, value in group.items():
                    if name != "params":
                        problem = arg_value_problem(name, value, (named or {}).get(name), f"optimizer.param_groups[{index}]")
                        if problem:
                            problems.append(problem)

    _check_metrics(out.get("metrics") or [], registries["metrics"], problems)

    t = out["trainer"]
    split_reported = any(p.startswith("data_loader.args.validation_split:") for p in problems) or "data_loader" in failed
    if monitor_string(t["monitor"]) is None and t["monitor"] != "off" and not split_reported:
        # (a bad validation_split or data loader is the problem to report, not the validation metric it would not produce)
        problems.extend(_check_monitor(t["monitor"], out, registries))
    if t["unfreeze_at_epoch"] is not None and not t["freeze"]:
        problems.append("trainer.unfreeze_at_epoch: set, but trainer.freeze is empty (nothing to unfreeze)")

    try:  # each part the config uses checks its own keys (and fills in their defaults)
        for problem_list in parts.call_each(out, "check", out):
            problems.extend(problem_list)
    except ConfigError as err:  # a part whose files were deleted
        problems.extend(err.problems)
    if problems:  # (a deleted part named twice, by its key and by a name it provides, is one line)
        raise ConfigError(*dict.fromkeys(problems))
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
    metric_names = ["loss"] + [metric_name(m) for m in config.get("metrics") or [] if isinstance(m, (str, dict))]
    available = list(metric_names)
    if has_validation(config, registries):
        available += [f"val_{m}" for m in metric_names]
    if name in available:
        return []
    if name.startswith("val_") and name[4:] in metric_names:
        return [f"trainer.monitor: {name!r} needs validation data: set data_loader.args.validation_split > 0, or monitor one of {', '.join(available)}"]
    return [f"trainer.monitor: {name!r} will not exist{did_you_mean(name, available)} it can be one of {', '.join(available)}"]
