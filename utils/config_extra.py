"""The config code a default run does not need, imported where it is used:

- reading YAML (a ``.yaml`` config), and saying where a config file went wrong (only when it did);
- ``trainer.tensorboard``, an alias of ``trainer.loggers`` (only when given), and old checkpoints' configs
  that hold both (only when a checkpoint has one: utils/io.py).

utils/config.py imports it (lazily), so it imports nothing of utils/config.py.
"""

import json

from utils.errors import UserError

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
    ``err`` reading it raised: not UTF-8, not JSON, a key repeated in one object, NaN, absurd nesting."""
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
