"""The augment part (parts/augment.py): transforms from the config, checked early, applied per split, drawn per
sample, and replayed bit for bit by a resumed run. Some tests read image folders (the image-folder part)."""

import logging

import pytest
import torch

from base.base_data_loader import BaseDataLoader, to_float
from conftest import assert_same_batches, batches, make_folder, with_changes
from data_loader.builtin import SyntheticDataset
from parts.augment import BatchPipeline, parse_transforms
from utils.errors import ConfigError

NORMALIZE = {"type": "Normalize", "args": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
HEAVY = {
    "train": [{"type": "RandomResizedCrop", "args": {"size": 12, "scale": [0.3, 1.0]}},
              {"type": "RandomHorizontalFlip"}, {"type": "RandomVerticalFlip"},
              {"type": "RandomCrop", "args": {"size": 12, "padding": 3}}, NORMALIZE],
    "eval": [{"type": "Resize", "args": {"size": [12, 12]}}, NORMALIZE],
}


def one_line(info):
    text = str(info.value)
    assert text and "\n" not in text, text
    return text


@pytest.fixture
def folder(tmp_path):
    pytest.importorskip("parts.image_folder")
    return make_folder(tmp_path / "images")


def image_loader(data_dir, **args):
    image_folder = pytest.importorskip("parts.image_folder")  # another part: its files may be deleted
    args = {"batch_size": 8, "image_size": 10, "seed": 0, **args}
    return image_folder.ImageFolderDataLoader(str(data_dir), **args)


# --------------------------------------------------------------------------- transforms from the config


@pytest.mark.parametrize("spec,expected", [
    ({"train": [{"type": "RandomCorp", "args": {"size": 8}}]}, "did you mean 'RandomCrop'"),
    ({"train": [{"type": "RandomCrop", "args": {"sise": 8}}]}, "takes no argument 'sise'"),
    ({"train": [{"type": "RandomCrop"}]}, "needs argument 'size'"),
    ({"train": [{"type": "RandomCrop", "args": {"size": 8, "padding": [1, 2, 3]}}]}, "rejected its arguments"),
    ({"eval": [{"type": "RandomHorizontalFlip"}]}, "is random"),
    ({"eval": [{"type": "ColorJitter", "args": {"brightness": 0.3}}]}, "is random"),
    ({"trian": []}, "did you mean 'train'"),
    ({"train": {"type": "RandomCrop"}}, "expected a list"),
    ({"train": ["RandomCrop"]}, "naming a torchvision.transforms.v2 class"),
    # the batched Normalize divided by zero: the run folder was made and the loss was NaN at step 1
    ({"eval": [{"type": "Normalize", "args": {"mean": [0.5] * 3, "std": [0, 0, 0]}}]}, "is 0 for channels 0, 1, 2"),
    ({"train": [{"type": "Normalize", "args": {"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}}]}, "is 0 for channel 1,"),
    ({"train": [{"type": "Normalize", "args": {"mean": [0.5, float("nan"), 0.5], "std": [1] * 3}}]}, "not a finite"),
])
def test_bad_transforms_are_config_errors_at_construction(spec, expected):
    with pytest.raises(ConfigError) as info:
        BaseDataLoader(SyntheticDataset(40, (3, 8, 8), 2), 8, transforms=spec)
    assert expected in str(info.value)
    assert all(line.startswith("data_loader.args.transforms") for line in info.value.problems)


@pytest.mark.parametrize("args,expected", [
    ({"channels": 1, "transforms": {"eval": [NORMALIZE]}}, "transforms.eval: fails on this data's samples of shape (1, 10, 10)"),
    ({"transforms": {"train": [{"type": "RandomCrop", "args": {"size": 16}}]}}, "transforms.train: fails"),
    ({"in_memory": False, "transforms": {"train": [{"type": "CenterCrop", "args": {"size": 8}},
                                                    {"type": "ColorJitter", "args": {"brightness": 0.2}},
                                                    {"type": "Normalize", "args": {"mean": [0.5] * 2, "std": [0.2] * 2}}]}},
     "transforms.train: fails on this data's samples of shape (3, 10, 10)"),
])
def test_transforms_that_do_not_fit_the_data_fail_at_construction(folder, args, expected):
    with pytest.raises(ConfigError) as info:
        image_loader(folder, **args)
    assert expected in one_line(info)


def test_every_transform_problem_reported_at_once(folder):
    spec = {"train": [{"type": "RandomCorp"}, {"type": "Normalise"}], "eval": [{"type": "RandomInvert"}]}
    with pytest.raises(ConfigError) as info:
        image_loader(folder, transforms=spec)
    assert len(info.value.problems) == 3
    assert not (folder / ".cache").exists()  # checked before any decoding


def test_json_spellings_of_dtype_and_interpolation():
    spec = parse_transforms({"eval": [{"type": "ToDtype", "args": {"dtype": "float32", "scale": True}},
                                      {"type": "Resize", "args": {"size": 4, "interpolation": "nearest"}}]})
    assert spec.eval[0][1].dtype == torch.float32 and spec.batchable()


def test_bad_transforms_in_a_config_are_one_line_each_before_anything_is_built(tiny_config):
    from trainer import run

    spec = {"train": [{"type": "RandomCorp"}], "eval": [{"type": "RandomInvert"}]}
    config = with_changes(tiny_config, data_loader__args={**tiny_config["data_loader"]["args"], "transforms": spec})
    with pytest.raises(ConfigError) as info:
        run.checked_config(config)
    assert len(info.value.problems) == 2
    assert all(line.startswith("data_loader.args.transforms") for line in info.value.problems)


# --------------------------------------------------------------------------- augmentation


def same_images(n=16, size=12):
    """A dataset of ``n`` copies of one image: any difference within a batch comes from per-sample draws."""
    class Same(torch.utils.data.Dataset):
        uint8_images = True

        def __init__(self):
            self.images = torch.arange(3 * size * size, dtype=torch.int64).remainder(251).to(torch.uint8)
            self.images = self.images.view(1, 3, size, size).expand(n, 3, size, size).contiguous()
            self.targets = torch.zeros(n, dtype=torch.int64)

        def tensors(self):
            return self.images, self.targets

        def __len__(self):
            return n

        def __getitem__(self, i):
            return self.images[i], 0

    return Same()


CROP_FLIP = {"train": [{"type": "RandomCrop", "args": {"size": 12, "padding": 4}}, {"type": "RandomHorizontalFlip"}]}
JITTER = {"train": [{"type": "RandomCrop", "args": {"size": 12, "padding": 4}},
                    {"type": "ColorJitter", "args": {"brightness": 0.5}}]}  # no batched version: per sample


@pytest.mark.parametrize("spec,workers", [(CROP_FLIP, 0), (JITTER, 0), (JITTER, 2)], ids=["batched", "per-sample", "workers"])
def test_each_sample_draws_its_own_augmentation(spec, workers):
    loader = BaseDataLoader(same_images(), 16, transforms=spec, num_workers=workers, seed=0)
    assert loader.in_memory == (spec is CROP_FLIP)
    x, _ = next(iter(loader))
    distinct = {bytes(img.numpy()) for img in x}
    assert len(distinct) >= 8  # 16 identical inputs, (mostly) different crops


def test_batched_crop_and_flip_are_windows_of_the_padded_image():
    loader = BaseDataLoader(same_images(64), 64, transforms=CROP_FLIP, seed=1)
    x, _ = next(iter(loader))
    source = torch.nn.functional.pad(to_float(same_images(1).images[0]), (4, 4, 4, 4))
    windows = {bytes(source[:, i:i + 12, j:j + 12].contiguous().numpy()): (i, j, f)
               for i in range(9) for j in range(9) for f in (False,)}
    windows.update({bytes(source[:, i:i + 12, j:j + 12].flip(-1).contiguous().numpy()): (i, j, True)
                    for i in range(9) for j in range(9)})
    found = [windows.get(bytes(img.numpy())) for img in x]
    assert None not in found
    assert len({f for _, _, f in found}) == 2 and len({(i, j) for i, j, _ in found}) > 20


def test_batched_resized_crop_of_the_whole_image_is_the_image():
    # scale 1 and ratio 1 on square images: the crop is the whole image, resampled at its own pixel centres.
    spec = parse_transforms({"train": [{"type": "RandomResizedCrop", "args": {"size": 12, "scale": [1, 1], "ratio": [1, 1]}},
                                       {"type": "RandomHorizontalFlip"}]})
    images = same_images(32).images
    pipeline = BatchPipeline(spec.train)
    out = pipeline(images.clone(), pipeline.generator("cpu").manual_seed(0))
    flipped = [torch.equal(o, to_float(images[0]).flip(-1)) for o in out]
    assert all(f or torch.equal(o, to_float(images[0])) for o, f in zip(out, flipped)) and 0 < sum(flipped) < 32


def test_normalize_matches_torchvision():
    from torchvision.transforms import v2

    spec = parse_transforms({"eval": [NORMALIZE]})
    batch = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    expected = v2.Normalize(**NORMALIZE["args"])(batch.float() / 255)
    assert torch.allclose(BatchPipeline(spec.eval)(batch.clone()), expected, atol=1e-5)


def heavy_folder_loader(folder, **args):
    return image_loader(folder, image_size=14, transforms=HEAVY, batch_size=4, validation_split=6, **args)


@pytest.mark.parametrize("per_sample", [False, True], ids=["batched", "workers"])
def test_validation_and_test_never_see_random_augmentation(folder, per_sample):
    extra = {"in_memory": False, "num_workers": 2} if per_sample else {}
    train = heavy_folder_loader(folder, **extra)
    assert train.in_memory != per_sample
    valid = train.split_validation()
    first, second = batches(valid, 1), batches(valid, 2)
    assert_same_batches(first, second)
    plain = image_loader(folder, image_size=14, batch_size=4, validation_split=6, shuffle=False,
                         transforms={"eval": HEAVY["eval"]}).split_validation()
    assert_same_batches(first, batches(plain, 1))  # exactly the eval transforms: resize, normalise
    test = heavy_folder_loader(folder, training=False, **extra)
    assert_same_batches(batches(test, 1), batches(test, 2))
    a, b = batches(train, 1), batches(train, 2)
    assert not torch.equal(torch.cat([x for x, _ in a]).sort(0).values, torch.cat([x for x, _ in b]).sort(0).values)


@pytest.mark.parametrize("path", ["batched", "per-sample 0 workers", "per-sample 2 workers"])
def test_mid_epoch_resume_replays_augmentation_bit_for_bit(folder, path):
    args = {"batched": {}, "per-sample 0 workers": {"in_memory": False},
            "per-sample 2 workers": {"in_memory": False, "num_workers": 2}}[path]
    loader = heavy_folder_loader(folder, **args)
    assert loader.in_memory == (path == "batched")
    full = batches(loader, 3)
    fresh = heavy_folder_loader(folder, **args)
    for start in (1, 3):
        assert_same_batches(batches(fresh, 3, start), full[start:])
    batches(fresh, 1)  # another epoch in between changes nothing
    assert_same_batches(batches(fresh, 3), full)
    assert not torch.equal(full[0][0], batches(loader, 4)[0][0])  # each epoch its own draws


def test_benchmark_rows_for_augmentation():
    from benchmarks import data as data_bench

    augmentation = data_bench.bench_augmentation(256, 1, 0.01, True, lambda message: None)
    assert set(augmentation["paths"]) == set(data_bench.AUGMENTATION_PATHS)
    assert all(path["samples_per_s"] > 0 for path in augmentation["paths"].values())
    assert augmentation["resnet20_step_s"] > 0 and augmentation["batched_vs_best_per_sample"] > 0


def test_transforms_without_batched_version_warn_once_with_no_workers(caplog):
    logger = logging.getLogger("train.data")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="train.data"):
            BaseDataLoader(same_images(), 16, transforms=CROP_FLIP)
            BaseDataLoader(same_images(), 16, transforms=JITTER, num_workers=2)
            assert not caplog.records
            BaseDataLoader(same_images(), 16, transforms=JITTER)
    finally:
        logger.removeHandler(caplog.handler)
    messages = {r.getMessage() for r in caplog.records}
    assert len(messages) == 1 and "ColorJitter has no batched version" in messages.pop()
