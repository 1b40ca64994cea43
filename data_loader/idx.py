"""Read and write IDX files, the format MNIST is distributed in.

Use :func:`write_idx` to turn your own images and labels into MNIST-format
files that :class:`data_loader.builtin.MnistDataset` (torchvision's MNIST
reader) accepts::

    write_idx("data/MNIST/raw/train-images-idx3-ubyte", images)  # uint8, (N, H, W)
    write_idx("data/MNIST/raw/train-labels-idx1-ubyte", labels)  # uint8, (N,)

The IDX format (http://yann.lecun.com/exdb/mnist/), all integers big-endian:

* bytes 0-1: zero;
* byte 2: element type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
  0x0D float32, 0x0E float64;
* byte 3: number of dimensions ``ndim``;
  so the 4-byte magic number is 0x00000803 for 3-D uint8 images and
  0x00000801 for 1-D uint8 labels;
* then ``ndim`` unsigned 32-bit sizes, one per dimension;
* then the elements in C (row-major) order, each big-endian.

A path ending in ``.gz`` is written (and read) gzip-compressed, as the files on
the MNIST site are.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from utils.errors import UserError

# IDX element type code -> numpy dtype (big-endian, as stored in the file)
IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_TYPE_CODES = {dtype.newbyteorder("="): code for code, dtype in IDX_TYPES.items()}


def _open(path, mode):
    return gzip.open(path, mode) if os.fspath(path).endswith(".gz") else open(path, mode)


def write_idx(path, array) -> None:
    """Write ``array`` to ``path`` in IDX format (gzip-compressed if ``path`` ends in ``.gz``).

    ``array`` is anything :func:`numpy.asarray` accepts, of one of the IDX element
    types (uint8 for MNIST images and labels; int8, int16, int32, float32 and
    float64 are also allowed) and with at least one dimension. Images for MNIST
    are uint8 ``(N, H, W)`` (magic 0x00000803), labels uint8 ``(N,)`` (magic
    0x00000801). Missing parent folders are created. Raises :class:`UserError`
    for an array the format cannot hold.
    """
    arr = np.asarray(array)
    code = _TYPE_CODES.get(arr.dtype.newbyteorder("="))
    if code is None:
        names = ", ".join(str(d.newbyteorder("=")) for d in IDX_TYPES.values())
        raise UserError(f"write_idx: cannot store dtype {arr.dtype} in an IDX file; convert the array to one of {names}")
    if not 1 <= arr.ndim <= 255:
        raise UserError(f"write_idx: an IDX array needs 1 to 255 dimensions, got {arr.ndim}")
    if any(size >= 2**32 for size in arr.shape):
        raise UserError(f"write_idx: each dimension must be below 2**32, got shape {arr.shape}")
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    body = np.ascontiguousarray(arr, dtype=IDX_TYPES[code]).tobytes()
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    if os.fspath(path).endswith(".gz"):
        # mtime=0 keeps the output byte-identical for identical input
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(header + body)
    else:
        with open(path, "wb") as f:
            f.write(header + body)


def read_idx_header(path):
    """Return ``(dtype, shape, data_offset)`` of an IDX file, checking it is complete.

    Raises :class:`UserError` (one line, naming the file) when the file cannot be
    read, has a wrong magic number, or is shorter or longer than its header says.
    Only the header is parsed; for an uncompressed file the data is not read.
    """
    name = os.fspath(path)
    try:
        with _open(name, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in IDX_TYPES or head[3] == 0:
                magic = head.hex() if head else "empty file"
                raise UserError(
                    f"{name} is not an IDX file (magic number {magic}, expected 0x00000803 for images "
                    f"or 0x00000801 for labels): replace it with the original file"
                )
            code, ndim = head[2], head[3]
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise UserError(f"{name} is truncated (its header is incomplete): replace it with the original file")
            shape = struct.unpack(f">{ndim}I", dims_raw)
            offset = 4 + 4 * ndim
            dtype = IDX_TYPES[code]
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if name.endswith(".gz"):
                actual = len(f.read())
            else:
                actual = os.fstat(f.fileno()).st_size - offset
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"cannot read {name} ({reason}): replace it with the original file") from err
    if actual != expected:
        state = "truncated" if actual < expected else "longer than its header says"
        raise UserError(
            f"{name} is {state} (header shape {tuple(shape)} needs {expected} data bytes, found {actual}): "
            f"replace it with the original file"
        )
    return dtype, tuple(shape), offset


def read_idx(path) -> np.ndarray:
    """Read an IDX file (gzip-compressed if ``path`` ends in ``.gz``) into a native-byte-order numpy array."""
    dtype, shape, offset = read_idx_header(path)
    with _open(os.fspath(path), "rb") as f:
        f.read(offset)
        data = f.read()
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
