"""``ImageFolderDataLoader``: images in class folders (``data_dir/<class name>/<image files>``), decoded once and cached.

A part (utils/parts.py): delete this file, configs/image_folder.json and
tests/parts/test_image_folder.py, and the other loaders train as before. In a config::

    "data_loader": {"type": "ImageFolderDataLoader",
                    "args": {"data_dir": "data/example_images", "image_size": 32, "batch_size": 32}}

Promises:

* Layout. With ``data_dir/train/`` the splits are folders: ``train/`` (training),
  ``val/`` (validation, optional) and ``test/`` (test, optional); otherwise ``data_dir``
  itself holds the classes. A split without its folder is cut from the training images,
  per class, by a permutation with a fixed seed (:data:`SPLIT_SEED`): the same files are
  held out every time, whatever the run's seed.
* Classes are the sorted names of the training class folders (or ``class_names`` when
  given: a saved run's order). Label ``i`` is ``class_names[i]``.
* Images decode to uint8 ``(channels, H, W)``: RGB for ``channels=3``, grey for 1; with
  ``image_size`` each is resized to cover ``(h, w)`` keeping its aspect ratio, then
  centre-cropped to it.
* In memory, a split is decoded once and cached as one uint8 tensor file in ``cache_dir``
  (written atomically), keyed by the files' paths, sizes and modification times and by
  the decoding settings: a changed, added or removed file means a new decode. In a config
  ``cache_dir`` defaults to ``<trainer.save_dir>/cache/images`` (:func:`check`), never the
  user's data folder; a dry run (``fast_dev_run``) writes no cache; ``false`` turns it off.
* ``normalize: "auto"``: the mean and standard deviation of each channel, over the training
  split's images (neither validation nor test images), become a ``Normalize`` at the end of
  the ``train`` and ``eval`` transforms. They are kept in the run's config as
  ``feature_stats`` (like the table loader's scaling), so a resume, ``test.py`` and
  ``predict.py`` normalise with the same numbers (:func:`transforms_of`).
* Every problem with the data (missing folder, one class only, empty class folder, class in
  ``test/`` but not in ``train/``, unreadable or differently sized images) is one line of
  :class:`~utils.errors.UserError` naming the file or folder, before anything is written.
  With ``skip_unreadable``, unreadable images are left out instead, with one warning that
  counts and names them. Every split's files are checked readable when the training loader
  is built, streamed ones and the test split's included (:func:`check_readable`: a PNG
  verified, a JPEG decoded at 1/8 scale), so damage never surfaces in a worker or after training.
* Links are followed, each real folder once (by ``(st_dev, st_ino)``). A link to a folder
  that holds it (a loop, such as ``cat/up -> ..``) is an error naming the link, as is a folder
  reached from two class folders or two splits; one reached twice within a class is read once.
* One batch (uint8 and float32) must fit in half the available memory, and a split forced in
  memory in all of it (:func:`memory_check`): one line naming both numbers, not the OOM killer.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from base.base_data_loader import BaseDataLoader
from base.splits import check_fraction, stratified_split
from utils.errors import DiskFullError, UserError

RESIZE_FILTER = "bilinear"  # PIL's filter for the resize in decode (the export's preprocessing file names it)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
SPLIT_SEED = 0
CACHE_VERSION = 1
MEMORY_FRACTION = 0.25  # in_memory=None: cache a split when it needs at most this share of the RAM
_SHOWN = 5  # unreadable files named in one message

logger = logging.getLogger("train.data")


def _relative(path, root):
    return os.path.relpath(path, root).replace(os.sep, "/")


def _one_line(err):
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------- finding the files


def images_under(folder, seen=None):
    """Image files under ``folder`` (recursively, following links, hidden entries skipped), sorted.

    Each real directory is read once, by ``(st_dev, st_ino)``: a folder reached twice through
    links is listed once. ``seen`` (``{(st_dev, st_ino): folder}``, shared by the calls of one
    data folder) makes a folder reached from two class folders an error rather than images with
    two labels.

    Raises:
        UserError: a link to a folder that holds it (a loop: ``cat/up -> ..`` would list every
            class's images as cats, and two such links grow the scan exponentially), a folder
            reached from two class folders, or a folder that cannot be listed; each names the link.
    """
    seen = {} if seen is None else seen
    top = os.fspath(folder)
    found, stack = [], [top]
    while stack:
        here = stack.pop()
        try:
            info = os.stat(here)
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError as err:
            raise UserError(f"cannot list the folder {here}: {_one_line(err)}") from None
        key = (info.st_dev, info.st_ino)
        if key in seen:
            if os.path.commonpath([seen[key], top]) != top:  # first listed from another class folder
                raise UserError(f"{here} is {seen[key]} again, through a link: an image folder belongs to one class"
                                " of one split; copy the images or remove the link")
            continue  # the same folder through a second link of this class: its images are listed once
        seen[key] = here
        real_here = os.path.realpath(here)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if os.path.commonpath([target, real_here]) == target:
                        raise UserError(f"the link {entry.path} leads back to {target}, a folder that holds it"
                                        " (a loop: its images would be listed again and again, under this class):"
                                        " remove the link")
                stack.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(entry.path)
    return sorted(found)


def _no_folder(where, path):
    """The UserError for ``path``, which is no folder: missing, or a file, a FIFO, a device (named, never opened)."""
    from utils.io_problems import not_a_file

    return UserError(f"{where}: {not_a_file(path, 'folder', wanted='folder')}")


def scan_classes(folder, where, seen=None):
    """``{class name: [image paths]}`` of the class folders in ``folder``, sorted by name (``seen``: see
    :func:`images_under`).

    Raises UserError for a missing folder, no class folders, a class folder with no images, or a link loop.
    """
    if not os.path.isdir(folder):
        raise _no_folder(where, folder)
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not names:
        loose = [e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
        hint = f" (it holds {len(loose)} images directly)" if loose else ""
        raise UserError(f"{where}: {folder} has no class folders{hint}: put each class's images in {os.path.join(folder, '<class name>', '')}")
    classes = {}
    for name in names:
        files = images_under(os.path.join(folder, name), seen)
        if not files:
            kinds = ", ".join(IMAGE_EXTENSIONS)
            raise UserError(f"{where}: class folder {os.path.join(folder, name, '')} holds no images ({kinds}): add images or remove the folder")
        classes[name] = files
    return classes


class Layout:
    """The files of each split of an image folder, with their labels.

    Attributes:
        class_names: list of str; label ``i`` is ``class_names[i]``.
        splits: ``{"train"|"val"|"test": [(path, label), ...]}``; ``val`` and ``test`` may be empty.
        val_from_folder, test_from_folder: whether those splits are folders (else ``val`` is empty
            and the loader's ``validation_split`` applies; ``test`` is cut with ``test_split``).
    """

    def __init__(self, data_dir, test_split=None, class_names=None):
        where = "data_loader.args.data_dir"
        if not isinstance(data_dir, (str, os.PathLike)) or not os.fspath(data_dir):
            raise UserError(f"{where}: expected a folder path, got {data_dir!r}")
        root = os.path.expanduser(os.fspath(data_dir))
        if not os.path.isdir(root):
            raise _no_folder(where, root)
        self.root = root
        split_dirs = {name: os.path.join(root, name) for name in ("train", "val", "test")}
        has = {name: os.path.isdir(path) for name, path in split_dirs.items()}
        if not has["train"] and (has["test"] or has["val"]):
            other = "test" if has["test"] else "val"
            raise UserError(f"{where}: {root} has {other}/ but no train/: put the training images in {split_dirs['train']}/<class name>/")
        self.test_from_folder, self.val_from_folder = has["train"] and has["test"], has["train"] and has["val"]
        if self.test_from_folder and test_split is not None:
            raise UserError(f"data_loader.args.test_split: {root} has test/, which is the test split: remove test_split")
        test_split = check_fraction(0.2 if test_split is None else test_split, "test_split")

        train_root = split_dirs["train"] if has["train"] else root
        seen = {}  # each real folder in one class of one split
        train = scan_classes(train_root, where, seen)
        self.class_names = self._class_order(list(train), class_names, train_root)
        index = {name: i for i, name in enumerate(self.class_names)}
        files = [(path, index[name]) for name, paths in train.items() for path in paths]
        self.splits = {"train": files, "val": [], "test": []}
        for name in ("val", "test"):
            if has[name] and has["train"]:
                found = scan_classes(split_dirs[name], where, seen)
                for cls in found:
                    if cls not in index:
                        raise UserError(
                            f"{where}: class folder {os.path.join(split_dirs[name], cls, '')} is not a class of "
                            f"{train_root}/ (classes there: {', '.join(self.class_names)})"
                        )
                self.splits[name] = [(path, index[cls]) for cls, paths in found.items() for path in paths]
        if len(self.class_names) < 2:  # as the CSV loader: one class trains to a constant and scores 100%
            raise UserError(f"{where}: {train_root} holds one class folder ({self.class_names[0]}/); a classifier needs"
                            f" two or more: add a folder of images for each class")
        if not self.test_from_folder and test_split > 0:
            kept, held = stratified_split([label for _, label in files], test_split, SPLIT_SEED)
            self.splits["train"] = [files[i] for i in kept.tolist()]
            self.splits["test"] = [files[i] for i in held.tolist()]

    @staticmethod
    def _class_order(found, class_names, folder):
        if class_names is None:
            return found
        if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names) or len(set(class_names)) != len(class_names):
            raise UserError(f"data_loader.args.class_names: expected a list of distinct class names, got {class_names!r}")
        extra = [c for c in found if c not in class_names]
        if extra:
            raise UserError(
                f"data_loader.args.class_names: {os.path.join(folder, extra[0], '')} is not one of the saved classes "
                f"({', '.join(class_names)}); the model was trained on those"
            )
        return list(class_names)


# --------------------------------------------------------------------------- decoding


class Unreadable(Exception):
    """An image that cannot be decoded; ``str()`` is the reason."""


def size_pair(image_size):
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0:
        return (image_size, image_size)
    if (isinstance(image_size, (list, tuple)) and len(image_size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_size)):
        return tuple(image_size)
    raise UserError(f"data_loader.args.image_size: got {image_size!r}, expected a positive integer or [height, width]")


def decode(path, channels=3, size=None):
    """The image at ``path`` as uint8 ``(channels, H, W)``, resized to cover ``size`` and centre-cropped to it.

    Read with PIL (torchvision's own decoders are deprecated from 0.29), turned upright by
    its EXIF orientation; 16-bit images keep their top 8 bits.

    Raises:
        Unreadable: the file is empty, damaged or not an image.
    """
    import numpy as np
    from PIL import Image, ImageOps

    mode = "RGB" if channels == 3 else "L"
    try:
        if os.path.getsize(path) == 0:
            raise Unreadable("empty file")
        with Image.open(path) as image:
            if size is not None:
                image.draft(mode, (size[1], size[0]))  # JPEG: decode at a reduced scale that still covers size
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I;16"):
                image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
            image = image.convert(mode)
            if size is not None and (image.height, image.width) != size:
                scale = max(size[0] / image.height, size[1] / image.width)
                width, height = max(size[1], round(image.width * scale)), max(size[0], round(image.height * scale))
                image = image.resize((width, height), Image.Resampling[RESIZE_FILTER.upper()])
                left, top = (width - size[1]) // 2, (height - size[0]) // 2
                image = image.crop((left, top, left + size[1], top + size[0]))
            array = np.array(image)
    except Unreadable:
        raise
    except MemoryError:  # the size asked for, not the file: memory_check refuses such sizes before this
        if size is None:
            raise UserError(f"out of memory decoding {path} at its own size: set data_loader.args.image_size") from None
        raise UserError(f"data_loader.args.image_size: out of memory resizing an image to {size[0]}x{size[1]}:"
                        " lower image_size") from None
    except Exception as err:  # any failure to decode a user's file means the file is unreadable
        raise Unreadable(_one_line(err).replace(f" {str(path)!r}", "")) from None  # the message names the file itself
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()


def _header_size(path):
    """``(height, width)`` from the file's header, or None when it cannot be read."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            return image.size[1], image.size[0]
    except Exception:  # an unreadable file: reported when it is decoded
        return None


def check_readable(path):
    """Raise :class:`Unreadable` unless ``path`` opens as an image whose data is all there, at a fraction of a
    decode's cost: a PNG's chunks are verified (CRCs, truncation), a JPEG is decoded at 1/8 scale (its ``verify()``
    misses a truncated file), other formats are loaded. Measured on 256x256 images: PNG 0.16 ms against 2 ms for a
    decode, JPEG 0.2 ms against 0.35 ms."""
    from PIL import Image

    try:
        if os.path.getsize(path) == 0:
            raise Unreadable("empty file")
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft(image.mode, (1, 1))
                image.load()
    except Unreadable:
        raise
    except Exception as err:  # as in decode: any failure means the file is unreadable
        raise Unreadable(_one_line(err).replace(f" {str(path)!r}", "")) from None


def readable_files(files, skip_unreadable, threads=None):
    """``(kept, skipped)`` of ``files`` (``[(path, label)]``) by :func:`check_readable`; ``skipped`` lists
    ``(path, reason)``. Without ``skip_unreadable`` the first unreadable file (in order) is a UserError naming it."""

    def one(item):
        try:
            check_readable(item[0])
        except Unreadable as err:
            return str(err)
        return None

    kept, skipped = [], []
    with concurrent.futures.ThreadPoolExecutor(threads or min(4, os.cpu_count() or 1)) as pool:
        for item, reason in zip(files, pool.map(one, files)):
            if reason is None:
                kept.append(item)
            elif not skip_unreadable:
                pool.shutdown(wait=True, cancel_futures=True)
                raise _unreadable_error(item[0], reason)
            else:
                skipped.append((item[0], reason))
    return kept, skipped


def _report_skipped(skipped, root):
    names = ", ".join(f"{_relative(p, root)} ({reason})" for p, reason in skipped[:_SHOWN])
    more = f" and {len(skipped) - _SHOWN} more" if len(skipped) > _SHOWN else ""
    logger.warning(f"skipped {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''} in {root}: {names}{more}")


def _unreadable_error(path, reason):
    return UserError(f"cannot read image {path}: {reason}; fix or remove the file, or set data_loader.args.skip_unreadable=true to skip such files")


# --------------------------------------------------------------------------- datasets


class ImageTensorDataset(Dataset):
    """Decoded images held in memory: uint8 ``images`` (N, C, H, W) and int64 ``targets`` (N,)."""

    uint8_images = True

    def __init__(self, images, targets, class_names, skipped=()):
        self.images, self.targets, self.class_names = images, targets, list(class_names)
        self.skipped = list(skipped)
        self.input_shape = tuple(images.shape[1:])
        self.num_classes = len(self.class_names)

    def tensors(self):
        """``(images, targets)``, the dataset's own tensors (do not modify them in place)."""
        return self.images, self.targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], int(self.targets[index])


class ImageFileDataset(Dataset):
    """Images decoded from their files on every access (for data that does not fit in memory)."""

    uint8_images = True

    def __init__(self, files, class_names, channels, size):
        self.files, self.class_names, self.channels, self.size = list(files), list(class_names), channels, size
        self.num_classes = len(self.class_names)
        self.input_shape = (channels, *size)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path, label = self.files[index]
        try:
            return decode(path, self.channels, self.size), label
        except Unreadable as err:
            raise _unreadable_error(path, err) from None


def _cache_file(cache_dir, split, files, channels, size):
    stats = []
    for path, label in files:
        info = os.stat(path)
        stats.append([path, label, info.st_size, info.st_mtime_ns])
    key = json.dumps({"version": CACHE_VERSION, "channels": channels, "size": size, "files": stats})
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    shape = "native" if size is None else f"{size[0]}x{size[1]}"
    prefix = f"{split}-{channels}ch-{shape}-"
    return Path(cache_dir) / f"{prefix}{digest}.pt", prefix


def _load_cache(path, count, channels):
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        images, targets = data["images"], data["targets"]
        ok = (images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] == channels
              and len(images) == len(targets) == count - len(data["skipped"]))
    except Exception:  # a damaged cache is simply rebuilt
        return None
    return data if ok else None


def _write_cache(path, prefix, data):
    from utils.io import atomic_write

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            torch.save(data, f)
    except (OSError, UserError) as err:  # no cache is slower, not wrong; but a full disk fails the checkpoints next
        if isinstance(err, DiskFullError) or getattr(err, "errno", None) == errno.ENOSPC:
            raise DiskFullError(f"cannot write the image cache {path}: no space left on the device (or the disk quota"
                                " is used up); free some space, set data_loader.args.cache_dir to another disk, or"
                                " cache_dir=false to decode the images without a cache") from None
        logger.warning(f"cannot write the image cache {path} ({_one_line(err)}): later runs decode the images again")
        return
    for old in path.parent.glob(f"{prefix}{'[0-9a-f]' * 24}.pt"):  # the same split decoded from older files: only
        if old != path:  # names this cache gives (a digest), never another file of that folder
            try:
                old.unlink()
            except OSError:
                pass


def decode_all(files, root, channels, size, skip_unreadable, threads=None):
    """Decode ``files`` (``[(path, label)]``) into ``(images, targets, skipped)``; ``skipped`` lists ``(path, reason)``.

    Images are copied into one preallocated tensor as they come, so the peak memory is about the dataset's size.
    """
    threads = threads or min(4, os.cpu_count() or 1)

    def one(item):
        try:
            return decode(item[0], channels, size)
        except Unreadable as err:
            return err

    images, labels, skipped, first = None, [], [], None
    pool = concurrent.futures.ThreadPoolExecutor(threads)  # PIL releases the GIL while it decodes
    try:
        for (path, label), image in zip(files, pool.map(one, files)):
            if isinstance(image, Unreadable):
                if not skip_unreadable:
                    raise _unreadable_error(path, image)
                skipped.append((path, str(image)))
                continue
            if images is None:
                images, first = torch.empty((len(files), *image.shape), dtype=torch.uint8), path
            elif image.shape != images.shape[1:]:
                raise UserError(
                    f"image {path} is {tuple(image.shape)} (channels, height, width) but {first} is {tuple(images.shape[1:])}:"
                    " set data_loader.args.image_size to resize all images to one size"
                )
            images[len(labels)] = image
            labels.append(label)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if images is None:
        raise UserError(f"no readable images in {root}")
    if skipped:
        images = images[: len(labels)].clone()  # a view would keep (and save) the unused rows
    return images, torch.tensor(labels, dtype=torch.int64), skipped


def _check_classes_left(files, skipped, class_names, root):
    gone = {p for p, _ in skipped}
    present = {label for _, label in files}
    left = {label for path, label in files if path not in gone}
    for label in sorted(present - left):
        raise UserError(f"every image of class {class_names[label]!r} in {root} is unreadable; fix them or remove the class folder")


def _image_size(files, size):
    """``size``, or when it is None the ``(height, width)`` of the first readable header (None if there is none)."""
    for path, _ in files if size is None else ():
        size = _header_size(path)
        if size is not None:
            break
    return size


def memory_needed(files, channels, size):
    """Bytes a split needs in memory (from the first readable header when ``size`` is None)."""
    size = _image_size(files, size)
    return 0 if size is None else len(files) * channels * size[0] * size[1]


def available_memory():
    """Bytes the machine can give now: /proc/meminfo's MemAvailable, else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return physical_memory()


def _bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def memory_check(files, channels, size, batch_size, in_memory):
    """Refuse, before anything is decoded, what the machine's memory cannot hold: one batch (each image as decoded,
    uint8, and as the model reads it, float32: 5 bytes a value) in half the available memory, or a split forced in
    memory (``in_memory=true``) in all of it. Each is one line naming both numbers: the kernel's out-of-memory
    killer would otherwise end the run (and maybe others on the machine) minutes later.

    Returns:
        whether a split with ``in_memory=None`` fits in memory (at most :data:`MEMORY_FRACTION` of the RAM, and
        what is available).
    """
    shape = _image_size(files, size)
    if shape is None:
        return True  # no readable header: decoding names the files
    image, available = channels * shape[0] * shape[1], available_memory()
    if isinstance(batch_size, int) and batch_size > 0:
        batch = 5 * image * min(batch_size, len(files))
        if batch > available / 2:
            raise UserError(f"data_loader.args.image_size: a batch of {min(batch_size, len(files))} images of"
                            f" {channels}x{shape[0]}x{shape[1]} needs about {_bytes(batch)} (uint8 and float32),"
                            f" more than half of the {_bytes(available)} of memory available: lower image_size or"
                            " batch_size")
    needed = image * len(files)
    if in_memory is True and needed > available:
        raise UserError(f"data_loader.args.in_memory: true holds {len(files)} images of"
                        f" {channels}x{shape[0]}x{shape[1]} in memory, about {_bytes(needed)}, more than the {_bytes(available)} of memory available:"
                        " set in_memory to null or false (read from the files), or lower image_size")
    return needed <= min(MEMORY_FRACTION * physical_memory(), available)


def physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def load_split(files, split, root, class_names, channels=3, image_size=None, cache_dir=None, in_memory=None,
               skip_unreadable=False, batch_size=None):
    """A dataset over ``files``: in memory (decoded or read from the cache) or, if it does not fit, from the files.

    ``in_memory=None`` keeps a split in memory when it needs at most :data:`MEMORY_FRACTION` of the RAM.
    ``cache_dir`` None or False: decoded without a cache file. Read from the files, every file is checked readable
    here (:func:`readable_files`), so a damaged one stops the run before it starts, not in a worker. Memory that
    one batch or the split would need beyond the machine's is refused (:func:`memory_check`).
    """
    if channels not in (1, 3) or isinstance(channels, bool):
        raise UserError(f"data_loader.args.channels: got {channels!r}, expected 3 (RGB) or 1 (grey)")
    size = size_pair(image_size)
    fits = memory_check(files, channels, size, batch_size, in_memory)
    if in_memory is None:
        in_memory = fits
    if not in_memory:
        if size is None:
            raise UserError("data_loader.args.image_size: needed when the images are read from their files"
                            " (in_memory false, or too many to fit): batches need one image size")
        kept, skipped = readable_files(files, skip_unreadable)
        if skipped:
            _check_classes_left(files, skipped, class_names, root)
            _report_skipped(skipped, root)
        return ImageFileDataset(kept, class_names, channels, size)

    path = data = None
    if cache_dir not in (None, False):
        path, prefix = _cache_file(os.path.expanduser(os.fspath(cache_dir)), split, files, channels, size)
        data = _load_cache(path, len(files), channels)
    if data is None:
        images, targets, skipped = decode_all(files, root, channels, size, skip_unreadable)
        data = {"images": images, "targets": targets, "skipped": [[p, r] for p, r in skipped]}
        if path is not None:
            _write_cache(path, prefix, data)
    skipped = [tuple(item) for item in data["skipped"]]
    if skipped and not skip_unreadable:  # a cache written by a run that skipped them
        raise _unreadable_error(*skipped[0])
    if skipped:
        _check_classes_left(files, skipped, class_names, root)
        _report_skipped(skipped, root)
    dataset = ImageTensorDataset(data["images"], data["targets"], class_names, skipped)
    dataset.cache_path = path
    return dataset


# --------------------------------------------------------------------------- the loader


class ImageFolderDataLoader(BaseDataLoader):
    """Images in class folders: ``data_dir/<class name>/<images>``, or ``data_dir/{train,val,test}/<class name>/``.

    Without ``test/`` a ``test_split`` fraction (default 0.2) of each class is held out, the
    same files every time; without ``val/``, ``validation_split`` (default 0.1) as in every
    loader. Images become ``channels`` x ``image_size`` (RGB or grey; resized to cover and
    centre-cropped) uint8, batches float32 in [0, 1] before the transforms' ``Normalize``
    (``normalize: "auto"``: one from the training images' ``feature_stats``, computed unless
    given). ``in_memory``: null decodes a split once into memory (cached in ``cache_dir``;
    None here is no cache, a config's default is ``<save_dir>/cache/images``) when it needs at
    most a quarter of the RAM, else reads the files in DataLoader workers; true or false forces
    either. ``skip_unreadable`` leaves out damaged images with a warning instead of stopping.
    ``class_names`` fixes the class order (a saved run's); ``loader.class_names`` is the order used.
    """

    options_from = BaseDataLoader

    def __init__(self, data_dir, batch_size=64, shuffle=True, validation_split=None, test_split=None, training=True,
                 image_size=None, channels=3, in_memory: bool | None = None, cache_dir=None, skip_unreadable=False,
                 class_names=None, normalize=None, feature_stats=None, **options):
        if problems := _normalize_problems(normalize, options.get("transforms")):
            raise UserError(problems[0])
        augment = self.transforms_part(options.get("transforms"))
        if augment is not None:  # a config mistake shows before minutes of decoding
            augment.parse_transforms(options["transforms"])
        layout = Layout(data_dir, test_split, class_names)
        if layout.val_from_folder and validation_split not in (None, 0):
            raise UserError(f"data_loader.args.validation_split: {layout.root} has val/, which is the validation split:"
                            " remove validation_split")
        if training:
            files = layout.splits["train"] + layout.splits["val"]
        else:
            files = layout.splits["test"]
            if not files:
                raise UserError(f"data_loader.args.test_split: 0 holds out no test images from {layout.root};"
                                " set test_split > 0 or add a test/ folder")
        if training and not skip_unreadable:  # the test split is read after training: a damaged file shows now
            readable_files(layout.splits["test"], False)
        dataset = load_split(files, "train" if training else "test", layout.root, layout.class_names,
                             channels, image_size, cache_dir, in_memory, skip_unreadable, batch_size)
        skipped = {path for path, _ in getattr(dataset, "skipped", [])}
        n_train = sum(1 for path, _ in layout.splits["train"] if path not in skipped) if training else len(dataset)
        split = 0.0 if layout.val_from_folder or not training else (0.1 if validation_split is None else validation_split)
        stats = feature_stats
        if normalize == "auto":
            if feature_stats is not None:
                stats = check_stats(feature_stats, channels)
            elif not training:
                raise UserError('data_loader.args.normalize: "auto" needs the training split\'s feature_stats to score'
                                " the test split: evaluate a run's checkpoint, whose config holds them")
            else:  # the images that train: neither test nor validation images inform the statistics
                fit_idx, _ = BaseDataLoader.split_indices(torch.arange(n_train), split, options.get("seed", 0))
                stats = channel_stats(dataset, fit_idx)
                logger.info(f"normalize auto: mean {_rounded(stats['mean'])}, std {_rounded(stats['std'])} from"
                            f" {len(fit_idx)} training images (kept in the run's config as feature_stats)")
            options["transforms"] = transforms_of({**options, "normalize": normalize, "feature_stats": stats})
        super().__init__(dataset, batch_size, shuffle and training, split, training=training, indices=list(range(n_train)),
                         **options)
        self.feature_stats = stats
        if training and layout.val_from_folder and len(dataset) > n_train:
            self.valid_idx = torch.arange(n_train, len(dataset))

    def data_args(self):
        args = {"class_names": list(self.class_names)}
        if self.feature_stats is not None:
            args["feature_stats"] = self.feature_stats
        return args


# --------------------------------------------------------------------------- the config: cache folder, normalisation


def check(config):
    """Fill in ``cache_dir`` (``<trainer.save_dir>/cache/images``: the user's data folder stays as it was; false for a
    dry run, ``fast_dev_run``, which writes nothing) and check ``normalize``; one line per problem."""
    args = config["data_loader"]["args"]
    if config["trainer"].get("fast_dev_run"):
        args["cache_dir"] = False
    elif args.get("cache_dir") is None:
        args["cache_dir"] = os.path.join(config["trainer"]["save_dir"], "cache", "images")
    return _normalize_problems(args.get("normalize"), args.get("transforms"))


def _normalize_problems(normalize, transforms):
    if normalize in (None, False, "auto"):
        entries = [e for split in (transforms or {}).values() if isinstance(split, list) for e in split]
        if normalize == "auto" and any(isinstance(e, dict) and e.get("type") == "Normalize" for e in entries):
            return ['data_loader.args.normalize: "auto" adds a Normalize with the training images\' mean and std,'
                    " and the transforms already have one: remove one of the two"]
        return []
    return [f'data_loader.args.normalize: got {normalize!r}, expected "auto" (per-channel mean and std from the'
            " training images) or null (none; or a Normalize in the transforms)"]


def transforms_of(args):
    """``data_loader.args.transforms`` of a config's ``args`` as the loader runs them: with ``normalize: "auto"`` and
    its ``feature_stats``, a ``Normalize`` ends both lists. What ``predict.py`` and the export read too."""
    transforms = args.get("transforms")
    stats = args.get("feature_stats")
    if args.get("normalize") != "auto" or stats is None:
        return transforms
    step = {"type": "Normalize", "args": {"mean": list(stats["mean"]), "std": list(stats["std"])}}
    transforms = dict(transforms or {})
    return {**transforms, **{split: [*(transforms.get(split) or []), step] for split in ("train", "eval")}}


def channel_stats(dataset, indices, most=2000):
    """``{"mean": [...], "std": [...]}`` per channel of the images ``indices`` of ``dataset``, in [0, 1] (as the
    transforms see them). A dataset read from files is sampled: ``most`` images, the same ones every time."""
    if not hasattr(dataset, "tensors") and len(indices) > most:
        indices = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(SPLIT_SEED))[:most]]
    total = squares = count = 0
    for start in range(0, len(indices), 256):  # float64 sums a chunk at a time: the peak memory stays small
        chunk = indices[start:start + 256]
        if hasattr(dataset, "tensors"):
            images = dataset.tensors()[0][chunk]
        else:
            images = torch.stack([dataset[int(i)][0] for i in chunk])
        x = images.to(torch.float64).div_(255).transpose(0, 1).flatten(1)
        total, squares, count = total + x.sum(1), squares + x.square().sum(1), count + x.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # a constant channel: centred, not divided by 0
    return {"mean": mean.tolist(), "std": std.tolist()}


def check_stats(stats, channels):
    """``stats`` (a saved run's ``feature_stats``) checked against ``channels``."""
    ok = (isinstance(stats, dict) and {"mean", "std"} <= set(stats)
          and all(isinstance(stats[k], list) and len(stats[k]) == channels for k in ("mean", "std"))
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in stats["mean"] + stats["std"])
          and all(v > 0 for v in stats["std"]))
    if not ok:
        raise UserError(f'data_loader.args.feature_stats: expected {{"mean": [...], "std": [...]}} with {channels}'
                        f" values each (one per channel, std > 0), got {stats!r}")
    return stats


def _rounded(values):
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


LOADERS = {"ImageFolderDataLoader": ImageFolderDataLoader}
