"""Crash-safe file writes, one writer per run folder, and reading a checkpoint back.

Every file the project writes goes through :func:`atomic_write`: a temporary file beside the target, fsynced, then
renamed over it (``os.replace`` is atomic), so a ``kill -9`` leaves the old file or the new one, never a torn one; a
failed write leaves the old file and raises a one-line WriteError. A run holds :func:`lock_folder` on its folder.
:func:`load_checkpoint` checks a checkpoint's whole structure, so the code after it may index any key.
"""

import contextlib
import io
import json
import os
import re
import secrets
from pathlib import Path

from utils.errors import UserError

_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[A-Za-z0-9_]{8}\.tmp")  # the names atomic_write gives its temporary files


@contextlib.contextmanager
def atomic_write(path, mode="wb", expected_size=None):
    """Open a temporary file beside ``path``; on a clean exit, fsync it and rename it over ``path`` (with the umask's
    permissions). On any exception ``path`` is left as it was; a full disk or quota raises DiskFullError (exit code
    28), an unwritable folder WriteError (73). ``expected_size``: the bytes to write, if known, for that message."""
    path = Path(path)
    for attempt in range(5):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"  # a name lock_folder knows
        try:  # O_EXCL: a file of our own. (mkstemp would make it 0600; os.open's mode goes through the umask.)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except OSError as err:
            if isinstance(err, FileExistsError) and attempt < 4:
                continue  # the name is taken (a stale temporary file, say): draw another rather than fail the save
            from utils.io_problems import write_error

            raise write_error(err, path, expected_size) or err from None
    try:
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
            from utils.io_problems import write_error

            raise write_error(err, path, expected_size) or err from None
        raise
    # The rename is an entry of the folder: fsync the folder too, so that it survives a power cut.
    with contextlib.suppress(OSError):  # (not every platform can open a folder)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def lock_folder(folder):
    """Make this process the one writer of ``folder`` until the returned file is closed or the process dies (so a crash
    leaves no stale lock): an exclusive ``lockf`` of its ``.lock``, which holds the PID (without fcntl, nothing). The
    temporary files :func:`atomic_write` left there are then a killed writer's: removed. UserError if it is held."""
    lock = open(Path(folder) / ".lock", "a+", encoding="utf-8")
    try:  # lockf, not flock: a lock of this process, which the DataLoader workers it forks do not hold on to
        import fcntl

        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # (EAGAIN or EACCES: another process holds it)
        lock.close()
        holder = Path(folder, ".lock").read_text().strip() or "?"  # (none yet: it is written right after the lock)
        raise UserError(f"run folder {folder} is in use by another process (PID {holder}): one process writes to a"
                        " run folder at a time; wait for it to end, or give another --run-id") from None
    except (ImportError, OSError):  # no fcntl (Windows), a file system without locks: nothing to lock
        pass
    lock.truncate(0)
    print(os.getpid(), file=lock, flush=True)
    for entry in os.scandir(folder):
        if _TEMP_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
    return lock


def write_json(path, obj):
    """Write ``obj`` as indented JSON, crash-safely. JSON has no NaN: a non-finite number (a NaN metric) is written
    as null, named under the key ``"nonfinite"`` (utils/io_problems.py); other values JSON cannot hold fail."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError:
        from utils.io_problems import nonfinite_as_null

        text = json.dumps(nonfinite_as_null(obj), indent=2, allow_nan=False)
    data = (text + "\n").encode("utf-8")
    with atomic_write(path, expected_size=len(data)) as f:
        f.write(data)


def save_checkpoint(state, path):
    """``torch.save`` crash-safely. ``state`` must hold only tensors, containers and plain values."""
    import torch

    buffer = io.BytesIO()  # serialise first, so a failing save never touches the disk
    torch.save(state, buffer)
    with atomic_write(path, expected_size=buffer.getbuffer().nbytes) as f:
        f.write(buffer.getbuffer())


def load_checkpoint(path, map_location="cpu", purpose="resume"):
    """Load a checkpoint of this project with ``weights_only=True`` and check its structure; any problem is one
    UserError line. ``purpose``: ``"resume"`` needs all a run continues from (utils/io_problems.py), ``"weights"``
    (``test.py -r``, ``--init-from``) only ``model`` and ``config``."""
    import torch

    path = Path(path)
    if (path / ".metadata").is_file():  # a sharded checkpoint: a folder (utils/sharded.py)
        from utils.sharded import load

        return load(path, purpose)
    if not path.is_file():  # missing, a folder, a FIFO, a device: named, never opened
        from utils.io_problems import not_a_checkpoint_file

        raise UserError(not_a_checkpoint_file(path))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many kinds for a damaged file; all mean the same to the user
        from utils.io_problems import unreadable_checkpoint

        raise UserError(unreadable_checkpoint(err, path)) from None
    # The finite weights of a sound checkpoint (test.py, a run's final test) pass this one check; anything else is
    # checked key by key, so that each problem (a missing key, the first tensor holding a NaN) is named.
    model = state.get("model") if isinstance(state, dict) else None
    if purpose != "weights" or not (isinstance(model, dict) and isinstance(state.get("config"), dict) and all(
            isinstance(name, str) and isinstance(value, torch.Tensor) and bool(value.isfinite().all())
            for name, value in model.items())):
        from utils.io_problems import check_checkpoint

        check_checkpoint(state, purpose, path)
    if "tensorboard" in (state["config"].get("trainer") or {}):  # an older version's config: in this version's terms
        from utils.config_extra import saved_config

        state["config"] = saved_config(state["config"])
    return state
