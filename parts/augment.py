"""``data_loader.args.transforms``: transforms named in a config, one list per split, run per sample or on whole batches.

A part (utils/parts.py): delete this file and tests/parts/test_augment.py, and configs without
``transforms`` train as before; one with them says, in one line, that this part is missing.
Any data loader built on :class:`~base.base_data_loader.BaseDataLoader` takes them::

    "transforms": {"train": [{"type": "RandomCrop", "args": {"size": 32, "padding": 4}},
                             {"type": "RandomHorizontalFlip"}],
                   "eval": [{"type": "Normalize", "args": {"mean": [0.5], "std": [0.25]}}]}

Each entry ``{"type": NAME, "args": {...}}`` names a class of ``torchvision.transforms.v2``.
(A horizontal flip suits photos, not digits or text: configs/image_folder.json does not flip.)
The promises kept here:

* The whole spec is checked with the config and again when the loader is built (unknown
  names with a "did you mean", arguments bound against the signature, random transforms in
  ``eval``), every problem one line of a :class:`~utils.errors.ConfigError`, before any run
  folder exists; then each split's transforms are tried on one sample of the data.
* Training batches get ``train``; the validation split and the test split get ``eval``,
  so no random augmentation ever reaches them.
* uint8 images (image folders) reach the transforms as uint8 and are converted to float32
  in [0, 1] just before the first transform that needs floats (``Normalize``), or after
  the last one.
* Augmentation replays exactly. On the batched path each batch draws from a generator
  seeded by ``(seed, epoch, batch, rank)`` on the device the data lives on, each sample
  drawing its own parameters; on the per-sample path the CPU generator is seeded by
  ``(seed, epoch, sample index)`` around each sample's transforms and restored after. The
  augmentation of a batch is thus a function of the seed and its place in the epoch, and
  a run resumed mid-epoch sees the same pixels as the run left alone.

torchvision is imported only when transforms are configured.
"""

from __future__ import annotations

import logging
import math

import torch

from base.base_data_loader import to_float
from utils.config import ConfigError, Registry, check_args, did_you_mean

WHERE = "data_loader.args.transforms"
SPLITS = ("train", "eval")

# v2 classes a config may not name: they take Python objects (other transforms, callables,
# tensors), need labels or boxes, or do not return one image.
EXCLUDED = {
    "Transform", "Compose", "RandomApply", "RandomChoice", "RandomOrder", "Lambda", "LinearTransformation",
    "CutMix", "MixUp", "FiveCrop", "TenCrop", "ToPILImage", "PILToTensor", "ToTensor", "RandomIoUCrop",
    "ClampBoundingBoxes", "ClampKeyPoints", "ConvertBoundingBoxFormat", "SanitizeBoundingBoxes",
    "SanitizeKeyPoints", "SetClampingMode", "UniformTemporalSubsample",
}
# Random transforms whose names do not start with "Random".
ALWAYS_RANDOM = {"ColorJitter", "AutoAugment", "RandAugment", "TrivialAugmentWide", "AugMix", "ElasticTransform",
                 "ScaleJitter", "GaussianNoise"}
# Transforms that need float input: uint8 images are converted to [0, 1] floats before them.
NEEDS_FLOAT = {"Normalize", "GaussianNoise"}
# Deterministic transforms that are correct applied to a whole batch (same operation on every image).
BATCH_SAFE = {"Normalize", "CenterCrop", "Resize", "Pad", "Grayscale", "RGB", "ToDtype", "ConvertImageDtype",
              "Identity", "ToPureTensor", "ToImage"}
# Random transforms with a batched version here (each sample its own draw).
BATCHED_RANDOM = {"RandomCrop", "RandomResizedCrop", "RandomHorizontalFlip", "RandomVerticalFlip"}

_MASK64 = 2**64 - 1


def mix_seed(*values: int) -> int:
    """A seed in [0, 2**63) mixed from integers (splitmix64 steps): neighbouring inputs give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        z = (h ^ (int(v) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
        h = z ^ (z >> 31)
    return h >> 1


def transform_table():
    """The ``torchvision.transforms.v2`` classes a config may name, by name."""
    from torchvision.transforms import v2

    return {
        name: obj for name, obj in vars(v2).items()
        if isinstance(obj, type) and issubclass(obj, v2.Transform) and not name.startswith("_") and name not in EXCLUDED
    }


def _is_random(name, transform):
    if name.startswith("Random") or name in ALWAYS_RANDOM:
        return True
    for attr in ("sigma", "quality"):  # GaussianBlur and JPEG draw from a range unless its ends are equal
        value = getattr(transform, attr, None)
        if name in ("GaussianBlur", "JPEG") and isinstance(value, (list, tuple)) and len(value) == 2:
            return value[0] != value[1]
    return False


def _json_args(name, args):
    """Config values for arguments JSON cannot spell: ``"float32"`` for a dtype, ``"bilinear"`` for an interpolation."""
    args = dict(args)
    if isinstance(args.get("dtype"), str) and isinstance(getattr(torch, args["dtype"], None), torch.dtype):
        args["dtype"] = getattr(torch, args["dtype"])
    if isinstance(args.get("interpolation"), str):
        from torchvision.transforms import InterpolationMode

        try:
            args["interpolation"] = InterpolationMode(args["interpolation"].lower())
        except ValueError:
            valid = ", ".join(m.value for m in InterpolationMode)
            raise ValueError(f"interpolation {args['interpolation']!r} is not one of {valid}") from None
    return args


class Transforms:
    """The checked ``train`` and ``eval`` lists: each a list of ``(name, v2 transform)``."""

    def __init__(self, train, eval):
        self.train, self.eval = train, eval

    def steps(self, split):
        return self.train if split == "train" else self.eval

    def batchable(self, steps=None):
        """Whether every transform (of both lists, or of ``steps``) can run on whole batches (the in-memory fast path)."""
        steps = self.train + self.eval if steps is None else steps
        return all(batch_op(name, t) is not None for name, t in steps)


def check(config):
    """The spec's problems, one line each, before anything is built (the loader checks it again)."""
    try:
        parse_transforms(config["data_loader"]["args"].get("transforms"))
    except ConfigError as err:
        return err.problems
    return []


def pipelines(dataset, transforms, in_memory, num_workers):
    """What :class:`~base.base_data_loader.BaseDataLoader` runs its batches through: ``(in_memory, {"train": pipeline,
    "eval": pipeline})``, a split without transforms None.

    ``in_memory`` is whether the loader may batch by indexing ``dataset.tensors()``; it stays so only
    when every transform has a batched version (:class:`BatchPipeline`), else samples go one by one
    through a :class:`SamplePipeline`. Each split's transforms are tried on the first sample here.

    Raises:
        ConfigError: a bad spec, or transforms that fail on this data's samples.
    """
    spec = parse_transforms(transforms)
    if spec is None:
        return in_memory, {split: None for split in SPLITS}
    batched = in_memory and spec.batchable()
    if in_memory and not batched and num_workers == 0:
        names = sorted({name for name, t in spec.train + spec.eval if not spec.batchable([(name, t)])})
        logging.getLogger("train.data").warning(
            f"{WHERE}: {', '.join(names)} has no batched version, so every sample is transformed on its own"
            " in this process; set data_loader.args.num_workers > 0 to use worker processes")
    made = {}
    for split in SPLITS:
        steps = spec.steps(split)
        made[split] = None if not steps else BatchPipeline(steps) if batched else SamplePipeline(steps)
    _try(dataset, made, batched)
    return batched, made


def _try(dataset, made, batched):
    """Run each split's transforms on one sample now: a mismatch (a 3-channel Normalize on grey images, a crop
    larger than the images) is a config error before the run starts rather than a crash in its first step."""
    if len(dataset) == 0:
        return
    for split, pipeline in made.items():
        if pipeline is None:
            continue
        try:
            if batched:
                sample = dataset.tensors()[0][0]
                pipeline.seeded(sample[None].clone(), 0)
            else:
                sample = dataset[0][0]
                pipeline.samples(dataset)[(0, 0) if pipeline.random else 0]
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            shape = tuple(getattr(sample, "shape", ()))
            raise ConfigError(f"{WHERE}.{split}: fails on this data's samples of shape {shape}:"
                              f" {' '.join(str(err).split())[:300]}") from None


def parse_transforms(spec, where=WHERE):
    """Check and build ``data_loader.args.transforms``; None when there are none.

    Raises:
        ConfigError: every problem of the spec, one line each.
    """
    if spec is None or spec == {}:
        return None
    problems = []
    if not isinstance(spec, dict):
        raise ConfigError(f'{where}: expected {{"train": [...], "eval": [...]}} (lists of {{"type": NAME, "args": {{...}}}}), got {spec!r}')
    for key in spec:
        if key not in SPLITS:
            problems.append(f"{where}.{key}: unknown key{did_you_mean(key, SPLITS)} valid: {', '.join(SPLITS)}")
    table = transform_table()
    registry = Registry("transform", table)
    built = {}
    for split in SPLITS:
        entries = spec.get(split) or []
        built[split] = []
        if not isinstance(entries, list):
            problems.append(f'{where}.{split}: expected a list of {{"type": NAME, "args": {{...}}}}, got {entries!r}')
            continue
        for i, entry in enumerate(entries):
            at = f"{where}.{split}[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
                problems.append(f'{at}: expected {{"type": NAME, "args": {{...}}}} naming a torchvision.transforms.v2 class, got {entry!r}')
                continue
            extra = [k for k in entry if k not in ("type", "args")]
            if extra:
                problems.append(f"{at}.{extra[0]}: unknown key{did_you_mean(extra[0], ('type', 'args'))} valid: type, args")
            args = entry.get("args") or {}
            if not isinstance(args, dict):
                problems.append(f"{at}.args: expected a mapping of argument names to values, got {args!r}")
                continue
            name = entry["type"]
            try:
                cls = registry.get(name, f"{at}.type")
            except ConfigError as err:
                problems.extend(err.problems)
                continue
            bad = check_args(cls, args, f"{at}.args")
            if bad:
                problems.extend(bad)
                continue
            try:
                transform = cls(**_json_args(name, args))
            except (TypeError, ValueError) as err:
                problems.append(f"{at}.args: {name} rejected its arguments: {' '.join(str(err).split())}")
                continue
            if name == "Normalize" and (bad := _normalize_problem(transform)):
                problems.append(f"{at}.args: {bad}")
                continue
            if split == "eval" and _is_random(name, transform):
                problems.append(f"{at}: {name} is random; eval transforms (validation and test) must be deterministic:"
                                " move it to the train list")
                continue
            built[split].append((name, transform))
    if problems:
        raise ConfigError(*problems)
    return Transforms(built["train"], built["eval"])


def _normalize_problem(transform):
    """Why a built ``Normalize`` cannot work (v2 checks its std only on the first image, mid-run), or None."""
    std, mean = list(transform.std), list(transform.mean)
    for what, values in (("std", std), ("mean", mean)):
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            return f"Normalize's {what} {values} holds a value that is not a finite number"
    if zero := [i for i, v in enumerate(std) if v == 0]:
        return (f"Normalize's std {std} is 0 for channel{'s' if len(zero) > 1 else ''} {', '.join(map(str, zero))},"
                " which divides by zero: give each channel its standard deviation (> 0)")
    return None


# --------------------------------------------------------------------------- per sample


class SamplePipeline:
    """One sample's transforms, in order, with the uint8 -> float conversion described above."""

    def __init__(self, steps):
        self.steps = list(steps)
        self.random = any(_is_random(name, t) for name, t in self.steps)

    def __call__(self, x):
        for name, transform in self.steps:
            if name in NEEDS_FLOAT:
                x = to_float(x)
            x = transform(x)
        return to_float(x) if isinstance(x, torch.Tensor) else x

    def keys(self, indices, seed, epoch):
        """What the loader asks the dataset for: with random transforms each index with its sample's seed."""
        return [(i, mix_seed(seed, epoch, i)) for i in indices] if self.random else indices

    def samples(self, dataset):
        """``dataset`` with this pipeline applied to each sample, for a torch DataLoader."""
        return SeededSamples(dataset, self)


class SeededSamples(torch.utils.data.Dataset):
    """``dataset`` with a :class:`SamplePipeline` applied to each sample's input.

    With a random pipeline, keys are ``(index, seed)`` pairs: the CPU generator is seeded
    with ``seed`` around that sample (and restored after), so its augmentation does not
    depend on which worker reads it or on what that worker read before.
    """

    def __init__(self, dataset, pipeline):
        self.dataset, self.pipeline = dataset, pipeline

    def __len__(self):
        return len(self.dataset)

    def _one(self, key):
        if isinstance(key, tuple):
            index, seed = key
            torch.default_generator.manual_seed(seed)
        else:
            index = key
        x, y = self.dataset[index]
        return self.pipeline(x), y

    def __getitems__(self, keys):
        if not self.pipeline.random:
            return [self._one(k) for k in keys]
        state = torch.get_rng_state()  # the caller's RNG (the main process's, with 0 workers) is left as it was
        try:
            return [self._one(k) for k in keys]
        finally:
            torch.set_rng_state(state)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]


# --------------------------------------------------------------------------- on whole batches


class BatchPipeline:
    """Transforms applied to a whole batch ``(N, C, H, W)``; random ones draw per sample from ``generator``.

    ``__call__`` may modify its input in place: hand it a batch made by indexing (a copy).
    """

    def __init__(self, steps):
        self.ops = []
        for name, transform in steps:
            if name in _FLIPS and self.ops and hasattr(self.ops[-1], "flips"):
                self.ops[-1].flips.append((transform.p, _FLIPS[name]))  # done in the same pass as the crop before it
                continue
            op = batch_op(name, transform)
            if op is None:
                raise ValueError(f"internal: {name} has no batched version")
            self.ops.append(op)
        self.random = any(op.random for op in self.ops)
        self._generators = {}

    def generator(self, device):
        """This pipeline's generator on ``device`` (one per device, re-seeded for every batch)."""
        device = torch.device(device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    def __call__(self, x, generator=None):
        for op in self.ops:
            if op.needs_float:
                x = to_float(x)
            x = op(x, generator)
        return to_float(x)

    def seeded(self, x, *key):
        """``self(x)`` drawing from the generator on ``x``'s device seeded with ``key`` (``seed, epoch, batch, rank``)."""
        return self(x, self.generator(x.device).manual_seed(mix_seed(*key)) if self.random else None)


class _Op:
    random = False
    needs_float = False


class _Whole(_Op):
    """A deterministic v2 transform, applied to the batch as it is (the same operation on every image)."""

    def __init__(self, name, transform):
        self.transform, self.needs_float = transform, name in NEEDS_FLOAT

    def __call__(self, x, generator):
        return self.transform(x)


class _Normalize(_Op):
    """``(x - mean) / std`` per channel, the constants kept on the batch's device. The same operations as v2's
    ``Normalize`` after :func:`to_float`, so the batched and per-sample paths agree bit for bit."""

    needs_float = True

    def __init__(self, transform):
        self.mean, self.std = list(transform.mean), list(transform.std)
        self._constants = {}

    def __call__(self, x, generator):
        if x.device not in self._constants:
            self._constants[x.device] = tuple(torch.tensor(v, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
                                              for v in (self.mean, self.std))
        mean, std = self._constants[x.device]
        return x.sub_(mean).div_(std)


def _windows(x, tops, lefts, hflip, vflip, crop_h, crop_w):
    """Per sample ``k``, the window ``x[k, :, tops[k]:+crop_h, lefts[k]:+crop_w]``, flipped where ``hflip``/``vflip``.

    ``tops``/``lefts`` may be None (0). No loop over samples and no per-element indexing
    kernel: one row gather (``index_select`` of whole rows), and for the columns one gather
    of whole per-sample chunks from a view that starts each chunk at the sample's column
    offset; horizontally flipped samples read their chunk from a copy whose rows are
    reversed. About 10x faster on the CPU than ``gather`` or advanced indexing.
    """
    n, c, height, width = x.shape
    device = x.device
    x = x.contiguous()
    i = torch.arange(crop_h, device=device).view(1, 1, crop_h)
    if vflip is not None:
        i = torch.where(vflip.view(n, 1, 1), crop_h - 1 - i, i)
    rows = (torch.arange(n * c, device=device) * height).view(n, c, 1) + i
    if tops is not None:
        rows = rows + tops.view(n, 1, 1)
    count = n * c * crop_h  # rows of the output, each still ``width`` long
    if lefts is None and hflip is None and crop_w == width:
        return x.view(n * c * height, width).index_select(0, rows.view(-1)).view(n, c, crop_h, width)
    copies = 1 if hflip is None else 2
    # One spare row: a chunk starting at column offset l reads up to width - crop_w past its sample's rows.
    buf = torch.empty(copies * count + 1, width, dtype=x.dtype, device=device)
    buf[-1].zero_()
    torch.index_select(x.view(n * c * height, width), 0, rows.view(-1), out=buf[:count])
    chunk = c * crop_h * width
    k = torch.arange(n, device=device)
    offset = lefts if lefts is not None else torch.zeros(n, dtype=torch.int64, device=device)
    start = k * chunk + offset
    if hflip is not None:
        # Reverse the whole buffer (rows and columns), then put the rows back in order: each row reversed.
        reversed_rows = torch.arange(count - 1, -1, -1, device=device)
        torch.index_select(buf[:count].view(-1).flip(0).view(count, width), 0, reversed_rows, out=buf[count : 2 * count])
        start = torch.where(hflip, count * width + k * chunk + (width - crop_w) - offset, start)
    chunks = buf.view(-1).as_strided((buf.numel() - chunk + 1, chunk), (1, 1))
    out = chunks.index_select(0, start).view(n, c, crop_h, width)
    return out if crop_w == width else out[..., :crop_w].contiguous()


class _Geometric(_Op):
    """A random crop (v2 ``RandomCrop``, with its padding, ``pad_if_needed``, fill and padding mode) and/or
    the random flips that follow it, each sample with its own offset and flips, in one pass."""

    random = True

    def __init__(self, crop=None):
        self.crop = crop
        self.flips = []  # (p, dim): -1 horizontal, -2 vertical
        if crop is not None:
            self.size = tuple(crop.size)
            self.padding = list(crop.padding) if crop.padding else [0, 0, 0, 0]  # left, right, top, bottom

    def _pad_and_draw(self, x, generator):
        from torchvision.transforms.v2 import functional as F

        n, _, height, width = x.shape
        left, right, top, bottom = self.padding
        crop_h, crop_w = self.size
        if self.crop.pad_if_needed and height + top + bottom < crop_h:
            diff = crop_h - (height + top + bottom)
            top, bottom = top + diff, bottom + diff
        if self.crop.pad_if_needed and width + left + right < crop_w:
            diff = crop_w - (width + left + right)
            left, right = left + diff, right + diff
        if left or right or top or bottom:
            x = F.pad(x, [left, top, right, bottom], fill=self.crop.fill, padding_mode=self.crop.padding_mode)
        padded_h, padded_w = x.shape[-2:]
        if padded_h < crop_h or padded_w < crop_w:
            raise ValueError(f"RandomCrop: crop size {(crop_h, crop_w)} is larger than the (padded) images {(padded_h, padded_w)}")
        tops = torch.randint(0, padded_h - crop_h + 1, (n,), generator=generator, device=x.device)
        lefts = torch.randint(0, padded_w - crop_w + 1, (n,), generator=generator, device=x.device)
        return x, tops, lefts

    def __call__(self, x, generator):
        tops = lefts = None
        crop_h, crop_w = x.shape[-2:]
        if self.crop is not None:
            x, tops, lefts = self._pad_and_draw(x, generator)
            crop_h, crop_w = self.size
        hflip, vflip = _draw_flips(self.flips, x.shape[0], generator, x.device)
        return _windows(x, tops, lefts, hflip, vflip, crop_h, crop_w)


def _draw_flips(flips, n, generator, device):
    """Per-sample horizontal and vertical flip masks (None when that flip is absent)."""
    hflip = vflip = None
    for p, dim in flips:
        mask = torch.rand(n, generator=generator, device=device) < p
        if dim == -1:
            hflip = mask if hflip is None else hflip ^ mask
        else:
            vflip = mask if vflip is None else vflip ^ mask
    return hflip, vflip


class _RandomResizedCrop(_Op):
    """v2 ``RandomResizedCrop``: per sample a crop of random area and aspect ratio (v2's 10 tries, then
    its central fallback), resampled to ``size`` in one ``grid_sample`` for the whole batch.

    Differences from v2: no antialiasing when shrinking, and uint8 results are rounded from
    the float resampling (v2 resizes uint8 natively), so pixels can differ by a level or so.
    """

    random = True
    MODES = {"bilinear": "bilinear", "nearest": "nearest", "bicubic": "bicubic"}

    def __init__(self, transform):
        self.flips = []  # flips that follow it: folded into the sampling grid
        self.size = tuple(transform.size)
        self.scale, self.ratio = tuple(transform.scale), tuple(transform.ratio)
        self.mode = self.MODES[_interpolation_name(transform.interpolation)]

    def __call__(self, x, generator):
        n, c, height, width = x.shape
        device = x.device
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        area = torch.empty(n, 10, device=device).uniform_(self.scale[0], self.scale[1], generator=generator) * (height * width)
        aspect = torch.empty(n, 10, device=device).uniform_(log_lo, log_hi, generator=generator).exp_()
        w = torch.sqrt(area * aspect).round_()
        h = torch.sqrt(area / aspect).round_()
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first try that fits, as v2 takes
        found = ok.any(dim=1)
        fallback_h, fallback_w = self._fallback(height, width)
        w = torch.where(found, w.gather(1, first).squeeze(1), float(fallback_w))
        h = torch.where(found, h.gather(1, first).squeeze(1), float(fallback_h))
        u = torch.rand(n, 2, generator=generator, device=device)
        top = torch.where(found, (u[:, 0] * (height - h + 1)).floor_(), ((height - h) / 2).floor())
        left = torch.where(found, (u[:, 1] * (width - w + 1)).floor_(), ((width - w) / 2).floor())
        # Output pixel centres mapped onto the crop, in grid_sample's [-1, 1] coordinates (align_corners=False);
        # a flip after the crop mirrors the output coordinate.
        hflip, vflip = _draw_flips(self.flips, n, generator, device)
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0] = w / width if hflip is None else torch.where(hflip, -w / width, w / width)
        theta[:, 0, 2] = (2 * left + w) / width - 1
        theta[:, 1, 1] = h / height if vflip is None else torch.where(vflip, -h / height, h / height)
        theta[:, 1, 2] = (2 * top + h) / height - 1
        out_h, out_w = self.size
        grid = torch.nn.functional.affine_grid(theta, [n, c, out_h, out_w], align_corners=False)
        source = x.to(torch.float32) if x.dtype == torch.uint8 else x
        out = torch.nn.functional.grid_sample(source, grid.to(source.dtype), mode=self.mode, padding_mode="border",
                                              align_corners=False)
        if x.dtype == torch.uint8:
            out = out.round_().clamp_(0, 255).to(torch.uint8)
        return out

    def _fallback(self, height, width):
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w = width
            h = int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h = height
            w = int(round(h * max(self.ratio)))
        else:
            w, h = width, height
        return h, w


_FLIPS = {"RandomHorizontalFlip": -1, "RandomVerticalFlip": -2}


def _interpolation_name(mode):
    return str(getattr(mode, "value", mode)).lower()


def batch_op(name, transform):
    """The batched version of one v2 transform, or None when it has none."""
    if name == "Normalize":
        return _Normalize(transform)
    if name in BATCH_SAFE:
        return _Whole(name, transform)
    if name in _FLIPS:
        op = _Geometric()
        op.flips.append((transform.p, _FLIPS[name]))
        return op
    if name == "RandomCrop" and not isinstance(transform.fill, dict):
        return _Geometric(transform)
    if name == "RandomResizedCrop" and _interpolation_name(transform.interpolation) in _RandomResizedCrop.MODES:
        return _RandomResizedCrop(transform)
    return None
