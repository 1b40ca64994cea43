"""The rare half of utils/io.py: why a write failed, what a checkpoint must hold, why one could not be read.

Imported only when a write fails, when a run resumes, or when a checkpoint is damaged, incomplete, holds a NaN,
is no regular file (a FIFO, a device) or is refused by the safe loader; and when write_json meets a NaN. A fresh
run never needs it: the model_best.pth it evaluates at its end passes load_checkpoint's one check of ``model`` and
``config``.
"""

import errno
import math
import os
import re
import shutil
from pathlib import Path

import torch

from utils.errors import DiskFullError, UserError, WriteError

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _size(n):
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def write_error(err, path, needed):
    """The one-line :class:`WriteError` for an ``OSError`` the user can fix, or None for any other."""
    folder = path.parent
    if err.errno in _NO_SPACE:
        try:
            free = _size(shutil.disk_usage(folder).free)
        except OSError:
            free = "unknown"
        what = "the disk quota is used up" if err.errno != errno.ENOSPC else "no space left on the device"
        need = f"the file needs about {_size(needed)}" if needed else "the file could not be written whole"
        return DiskFullError(
            f"cannot write {path}: {what} holding {folder} ({free} free, {need}); free some space (or set"
            f" trainer.save_dir to another disk) and resume; the previous {path.name}, if any, is intact"
        )
    if err.errno in _NOT_WRITABLE:
        reason = {errno.EROFS: "the file system is read-only", errno.EFBIG: "the file is too large for this file system"}
        return WriteError(
            f"cannot write {path}: {reason.get(err.errno, 'no permission to write in ' + str(folder))};"
            " choose a folder you can write to"
        )
    if err.errno == errno.EISDIR:  # the rename met a folder of that name
        return UserError(f"cannot write {path}: a folder of that name is in the way; move or rename it")
    return None


def run_folder_error(err, folders, save_dir):
    """The one-line error for run ``folders`` that cannot be made (trainer/run.py: open_run): a dangling symbolic
    link on their path, named; a full disk (:class:`DiskFullError`, exit code 28); else what the system said."""
    for folder in folders:
        for path in [folder, *folder.parents]:
            if path.is_symlink() and not path.exists():
                return UserError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: make its"
                                 " target, remove the link, or choose another trainer.save_dir or --run-id")
    if err.errno in _NO_SPACE:
        return DiskFullError(f"cannot create the run folders under {save_dir}: no space left on the device (or the"
                             " disk quota is used up); free some space, or set trainer.save_dir to another disk")
    return UserError(f"trainer.save_dir: cannot create the run folders under {save_dir}: {err.strerror or err};"
                     " choose a folder you can write to")


def unmake_run(made, checkpoint_dir):
    """Remove the run folders ``made`` by a start cut short (Ctrl-C, a full disk, a checkpoint that does not fit) while
    nothing to resume was written since the run took its folder's lock (no checkpoint or ``result.json`` newer than
    ``.lock``): a half-made run folder would block the same command next time; a resume's new log folder, mislead."""
    try:
        since = (checkpoint_dir / ".lock").stat().st_mtime
        if any((p.suffix == ".pth" or p.name == "result.json") and p.stat().st_mtime >= since
               for p in checkpoint_dir.iterdir()):
            return
    except FileNotFoundError:  # (no lock: nothing of this run was written there)
        pass
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


def _got(v, wanted):
    return f"is {'None' if v is None else 'a ' + type(v).__name__}, expected {wanted}"


def _count(v):
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else _got(v, "an integer >= 0")


def _mapping(v):
    return None if isinstance(v, dict) else _got(v, "a mapping")


def _number(v):
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) else _got(v, "a number")


def _weights(v):
    if not isinstance(v, dict):
        return _got(v, "a mapping of parameter names to tensors (a model's state_dict())")
    for name, tensor in v.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            return f"should map parameter names to tensors, but {name!r} holds a {type(tensor).__name__}"
    return None


def _optimizer(v):
    if isinstance(v, dict) and isinstance(v.get("state"), dict) and isinstance(v.get("param_groups"), list):
        return None
    return _got(v, 'an optimizer\'s state_dict() (a mapping with "state" and "param_groups")')


def _scheduler(v):
    return None if v is None or isinstance(v, dict) else _got(v, "a scheduler's state_dict() (a mapping) or None")


def _rng(v):
    if not isinstance(v, dict) or any(k not in v for k in ("python", "numpy", "torch")):
        return _got(v, 'the random-number states (a mapping with "python", "numpy" and "torch")')
    python, numpy = v["python"], v["numpy"]
    if not isinstance(v["torch"], torch.Tensor):
        return "should hold torch's random-number state as a tensor"
    if not isinstance(python, (tuple, list)) or len(python) != 3 or not isinstance(python[1], (tuple, list)):
        return "should hold Python's random-number state as (version, state, gauss)"
    if not isinstance(numpy, (tuple, list)) or len(numpy) != 5 or not isinstance(numpy[1], torch.Tensor):
        return "should hold NumPy's random-number state as (name, keys, pos, has_gauss, cached)"
    return None


# key: check returning what was expected, or None. What train.py -r needs; test.py and --init-from need only
# the weights and the config. Keys a trainer adds and reads with .get() (scaler, frozen, ...) are not required.
CHECKPOINT_SCHEMA = {
    "weights": {"model": _weights, "config": _mapping},
    "resume": {
        "model": _weights,
        "config": _mapping,
        "epoch": _count,
        "batch_in_epoch": _count,
        "global_step": _count,
        "optimizer": _optimizer,
        "lr_scheduler": _scheduler,
        "monitor_best": _number,
        "not_improved_count": _count,
        "rng": _rng,
    },
}


def checkpoint_problems(state, purpose="resume"):
    """What is missing from ``state`` or of the wrong type for ``purpose``, as short phrases (empty when fine)."""
    if purpose not in CHECKPOINT_SCHEMA:
        raise ValueError(f"purpose must be one of {', '.join(CHECKPOINT_SCHEMA)}, got {purpose!r}")
    schema = CHECKPOINT_SCHEMA[purpose]
    if not isinstance(state, dict):
        return [f"it holds a {type(state).__name__}, not a mapping of {', '.join(schema)}"]
    missing = [key for key in schema if key not in state]
    problems = [f"missing {', '.join(missing)}"] if missing else []
    for key, check in schema.items():
        if key in state:
            problem = check(state[key])
            if problem:
                problems.append(f"{key} {problem}")
    # A run that stopped mid-epoch also keeps the epoch's running sums.
    if purpose == "resume" and not problems and state["batch_in_epoch"] > 0 and not isinstance(state.get("train_metrics"), dict):
        problems.append("stopped mid-epoch but train_metrics (the epoch's running sums) is missing")
    return problems


def check_checkpoint(state, purpose, path):
    """Raise the one-line UserError for a checkpoint ``state`` that lacks what ``purpose`` needs, or whose weights
    (and, to resume, optimizer state) hold a NaN or an infinity: scores or training on them would be NaN."""
    problems = checkpoint_problems(state, purpose)
    if problems:
        what = "a checkpoint to resume a run from" if purpose == "resume" else "a checkpoint of this project"
        raise UserError(f"{path} is not {what}: {'; '.join(problems)}")
    tensors = [(f"model weight {name!r}", value) for name, value in state["model"].items()]
    if purpose == "resume":
        tensors += [(f"optimizer state {key!r} of parameter {index}", value)
                    for index, slots in state["optimizer"]["state"].items() if isinstance(slots, dict)
                    for key, value in slots.items() if isinstance(value, torch.Tensor)]
    for name, value in tensors:
        if not bool(value.isfinite().all()):
            kind = "NaN" if bool(value.isnan().any()) else "an infinity"
            raise UserError(f"checkpoint {path}: {name} holds {kind} (the run that wrote it diverged); use an earlier"
                            " checkpoint of the run, or train again with a lower learning rate")


def not_a_checkpoint_file(path):
    """Why ``path``, which is not a regular file, is no checkpoint: missing, a folder, a FIFO, a device, a socket, or a
    link to one of those (a dangling link: missing). Read with ``stat`` only: a FIFO or device is never opened."""
    return not_a_file(path, "checkpoint", "give the path of a .pth file written by train.py")


def not_a_file(path, what="file", hint=None, wanted=None):
    """:func:`not_a_checkpoint_file` for any ``what`` (``"file"``, ``"checkpoint"``), with ``hint`` in parentheses;
    ``wanted="folder"``: why ``path`` is no folder."""
    import stat

    path, hint = Path(path), f" ({hint})" if hint else ""
    try:
        mode = path.stat().st_mode
    except OSError:
        link = f" (a link to {os.readlink(path)}, which does not exist)" if path.is_symlink() else ""
        return f"{what} not found: {path}{link}{hint}"
    kind = next((kind for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (a named pipe)"),
                                         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                                         (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a file")) if test(mode)),
                "not a regular file")
    link = f" (a link to {os.readlink(path)})" if path.is_symlink() else ""
    noun = wanted or ("file" if kind == "a folder" else "regular file" if what == "file" else f"{what} file")
    return f"{what} {path}{link} is {kind}, not a {noun}{hint}"


def nonfinite_as_null(obj):
    """``obj`` for utils/io.py's write_json with each NaN or infinity as None, and, in a mapping, the key
    ``"nonfinite"`` naming where they were (``{"final.val_r2": "NaN"}``): valid JSON that still says what happened."""
    found = {}

    def walk(value, where):
        if isinstance(value, float) and not math.isfinite(value):
            found[where] = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
            return None
        if isinstance(value, dict):
            return {key: walk(item, f"{where}.{key}" if where else str(key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return value

    out = walk(obj, "")
    return {**out, "nonfinite": found} if isinstance(out, dict) and found else out


def _global_name(name):
    """``eval`` -> ``builtins.eval``; ``commands.Popen`` (how a protocol-2 pickle spells it) -> ``subprocess.Popen``."""
    from _compat_pickle import IMPORT_MAPPING

    module, _, attr = name.rpartition(".")
    if not module:
        return f"builtins.{attr}"
    return f"{IMPORT_MAPPING.get(module, module)}.{attr}"


def _foreign_globals(path, limit=3):
    """The first globals (``module.name``) a pickle in ``path`` imports outside torch and the standard
    containers, read from its opcodes without running anything; empty when none or unreadable."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(member) if member else b""
        else:
            data = Path(path).read_bytes()
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return []
    try:  # torch's own list of what weights_only allows (private, so only where it exists)
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except Exception:
        allowed = {"collections.OrderedDict"}
    found, strings = [], []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                name = ".".join(arg.split(" ", 1))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                name = f"{strings[-2]}.{strings[-1]}"
            else:
                if isinstance(arg, str) and ("UNICODE" in opcode.name or "STRING" in opcode.name):
                    strings.append(arg)
                continue
            name = _global_name(name)
            if name not in allowed and name not in found:
                found.append(name)
                if len(found) >= limit:
                    break
    except Exception:  # a damaged or hostile pickle: report what was read so far
        pass
    return found


def unreadable_checkpoint(err, path):
    """The line of load_checkpoint for a checkpoint ``path`` that ``torch.load`` could not read (``err``)."""
    if isinstance(err, PermissionError):
        return f"checkpoint {path} cannot be read: permission denied"
    reason = unreadable_reason(err, path)
    if reason.startswith("refused"):
        return f"checkpoint {path} was {reason}; it may run code: load it only if you trust its source"
    return f"checkpoint {path} cannot be read (damaged, truncated or not a PyTorch file): {reason}"


def unreadable_reason(err, path=None):
    """One line saying why ``torch.load`` refused a file; for a refused pickle, the global it asked for."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch colours part of its message
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        found = re.search(r"GLOBAL\s+([\w.]+)", text)
        names = [_global_name(found.group(1))] if found else _foreign_globals(path) if path else []
        if names:
            return (f"refused: it asks to import {', '.join(names)}, which a checkpoint of tensors and plain"
                    " values never needs")
        found = re.search(r"(Unsupported [^\n]*|Unpickler error:[^\n]*\S)", text)
        return f"refused by the safe loader ({found.group(1).strip() if found else 'not tensors and plain values'})"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__
