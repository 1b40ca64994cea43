"""Crash-safe file writes and checkpoint reading.

Every file the project writes (checkpoints, JSON) goes through :func:`atomic_write`:
the bytes go to a temporary file in the target's folder, are flushed and fsynced,
and the temporary file is then renamed over the target. ``os.replace`` is atomic on
POSIX and Windows, so a ``kill -9`` at any moment leaves either the old file or the
new one on disk, never a torn one.
"""

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

from utils.errors import UserError


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file beside ``path``; on a clean exit, fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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


def write_json(path, obj):
    """Write ``obj`` as indented JSON, crash-safely."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def save_checkpoint(state, path):
    """``torch.save`` crash-safely. ``state`` must hold only tensors, containers and plain values."""
    import torch

    buffer = io.BytesIO()  # serialise first, so a failing save never touches the disk
    torch.save(state, buffer)
    with atomic_write(path) as f:
        f.write(buffer.getbuffer())


CHECKPOINT_KEYS = ("model", "config", "epoch")


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by this project with ``weights_only=True``.

    Raises:
        UserError: the file is missing, unreadable, truncated, or not one of this project's checkpoints.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (give the path of a .pth file written by train.py)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many kinds for a damaged file; all mean the same to the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint {path} cannot be read (damaged, truncated or not a PyTorch file): {reason[:200]}") from None
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        raise UserError(f"{path} is not a checkpoint of this project: expected a dict with keys {', '.join(CHECKPOINT_KEYS)}")
    return state
