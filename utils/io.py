"""Crash-safe file writes and checkpoint reading.

Every file the project writes (checkpoints, JSON) goes through :func:`atomic_write`:
the bytes go to a temporary file in the target's folder, are flushed and fsynced,
and the temporary file is then renamed over the target. ``os.replace`` is atomic on
POSIX and Windows, so a ``kill -9`` at any moment leaves either the old file or the
new one on disk, never a torn one. A write that fails (a full disk, a read-only
folder) removes its temporary file, leaves the old target as it was and raises a
one-line :class:`~utils.errors.WriteError`; only a ``kill -9`` can leave a temporary
file behind, and :func:`remove_stale_temp_files` clears those when a run folder is reused.

A checkpoint is read once, by :func:`load_checkpoint`, which checks its whole structure
in one place: the code after it may index any key it promises without a ``KeyError``.
"""

import contextlib
import errno
import io
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from utils.errors import DiskFullError, UserError, WriteError

# --------------------------------------------------------------------------- writing

_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[A-Za-z0-9_]{8}\.tmp")  # what mkstemp makes of the prefix and suffix below
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_umask_lock = threading.Lock()


def current_umask():
    """The process's umask, read without changing it where the OS allows (Linux's /proc), else set and restored."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _umask_lock:  # os.umask can only be read by setting it: restore it at once
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _size(n):
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def _write_error(err, path, needed):
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
    return None


@contextlib.contextmanager
def atomic_write(path, mode="wb", expected_size=None):
    """Open a temporary file beside ``path``; on a clean exit, fsync it and rename it over ``path``.

    The file gets the permissions a newly created file gets under the umask (``0o666 & ~umask``),
    not ``mkstemp``'s 0600. On any exception the temporary file is removed and ``path`` is left as it was.

    Args:
        expected_size: the bytes the caller will write, if known: a full disk's message says how much was needed.

    Raises:
        DiskFullError: no space left (or the quota is used up); exit code 28.
        WriteError: a read-only file system or no permission to write in the folder; exit code 73.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _write_error(err, path, expected_size) or err from None
    try:
        mode_bits = 0o666 & ~current_umask()
        with contextlib.suppress(OSError):  # some file systems (vfat, some network mounts) have no modes to set
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode_bits)
            else:  # Windows
                os.chmod(tmp, mode_bits)
        try:
            f = os.fdopen(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            user_error = _write_error(err, path, expected_size)
            if user_error is not None:
                raise user_error from None
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder):
    # The rename itself lives in the folder's entry table; fsync the folder so it survives a power cut.
    with contextlib.suppress(OSError):  # not every platform can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temp_files(folder):
    """Delete the temporary files :func:`atomic_write` left in ``folder`` when a process was killed mid-write.

    Only names of the form ``.<name>.XXXXXXXX.tmp`` (what ``atomic_write`` creates) are removed; call it
    when no other process writes into ``folder``. Returns the paths removed; a missing folder removes nothing.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if _TEMP_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def write_json(path, obj):
    """Write ``obj`` as indented JSON, crash-safely."""
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8")  # a value JSON cannot hold fails here
    with atomic_write(path, expected_size=len(data)) as f:
        f.write(data)


def save_checkpoint(state, path):
    """``torch.save`` crash-safely. ``state`` must hold only tensors, containers and plain values."""
    import torch

    buffer = io.BytesIO()  # serialise first, so a failing save never touches the disk
    torch.save(state, buffer)
    with atomic_write(path, expected_size=buffer.getbuffer().nbytes) as f:
        f.write(buffer.getbuffer())


# --------------------------------------------------------------------------- reading checkpoints

PURPOSES = ("resume", "weights")


def _got(v, wanted):
    return f"is {'None' if v is None else 'a ' + type(v).__name__}, expected {wanted}"


def _count(v):
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else _got(v, "an integer >= 0")


def _mapping(v):
    return None if isinstance(v, dict) else _got(v, "a mapping")


def _number(v):
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) else _got(v, "a number")


def _weights(v):
    import torch

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
    import torch

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
CHECKPOINT_KEYS = tuple(CHECKPOINT_SCHEMA["resume"])


def checkpoint_problems(state, purpose="resume"):
    """What is missing from ``state`` or of the wrong type for ``purpose``, as short phrases (empty when fine)."""
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


def _unreadable_reason(err, path=None):
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


def load_checkpoint(path, map_location="cpu", purpose="resume"):
    """Load a checkpoint written by this project with ``weights_only=True`` and check its structure.

    Args:
        purpose: ``"resume"`` (``train.py -r``): everything a training run continues from (see
            ``CHECKPOINT_SCHEMA``); ``"weights"`` (``test.py -r``, ``--init-from``): only ``model``
            (parameter names to tensors) and ``config`` (a mapping).

    Raises:
        UserError: one line: the path is missing or a folder, the file is unreadable, truncated or
            refused by the safe loader (naming the global it asked for), or it lacks what ``purpose``
            needs (naming each missing key and each value of the wrong type).
    """
    import torch

    if purpose not in CHECKPOINT_SCHEMA:
        raise ValueError(f"purpose must be one of {', '.join(CHECKPOINT_SCHEMA)}, got {purpose!r}")
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder, not a file (give the path of a .pth file written by train.py)")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (give the path of a .pth file written by train.py)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise UserError(f"checkpoint {path} cannot be read: permission denied") from None
    except Exception as err:  # torch raises many kinds for a damaged file; all mean the same to the user
        reason = _unreadable_reason(err, path)
        if reason.startswith("refused"):
            raise UserError(f"checkpoint {path} was {reason}; it may run code: load it only if you trust its source") from None
        raise UserError(f"checkpoint {path} cannot be read (damaged, truncated or not a PyTorch file): {reason}") from None
    problems = checkpoint_problems(state, purpose)
    if problems:
        what = "a checkpoint to resume a run from" if purpose == "resume" else "a checkpoint of this project"
        raise UserError(f"{path} is not {what}: {'; '.join(problems)}")
    if "tensorboard" in (state["config"].get("trainer") or {}):  # an older version's config: in this version's terms
        from utils.config_extra import saved_config

        state["config"] = saved_config(state["config"])
    return state
