"""Your own data: image folders, CSV tables and per-split transforms, on real files written here.

Images are PNG and JPEG files written with PIL (RGB and greyscale, odd sizes, damaged ones);
tables are CSV files with missing values and text columns. Every user mistake must be one
line of UserError naming what to fix.
"""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from base.base_data_loader import BaseDataLoader
from data_loader import image_folder
from data_loader.augment import BatchPipeline, parse_transforms, to_float
from data_loader.data_loaders import CsvDataLoader, ImageFolderDataLoader
from data_loader.datasets import SyntheticDataset
from model.metric import METRICS
from utils.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
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


def write_image(path, size, mode="RGB", seed=0):
    """A random-noise image of ``size`` (width, height) saved at ``path`` (PNG or JPEG by its suffix)."""
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels if channels == 3 else pixels[..., 0], mode).save(path)


def make_folder(root, counts=None, seed=0):
    """Three classes of differently made images: cat (RGB PNG), dog (RGB JPEG), owl (greyscale PNG), odd sizes."""
    counts = counts or {"cat": 10, "dog": 10, "owl": 10}
    kinds = {"cat": ("RGB", "png"), "dog": ("RGB", "jpg"), "owl": ("L", "png")}
    for c, (name, count) in enumerate(counts.items()):
        mode, ext = kinds.get(name, ("RGB", "png"))
        for i in range(count):
            write_image(Path(root) / name / f"{i:02d}.{ext}", (13 + i % 5, 11 + 2 * (i % 3)), mode, seed=seed * 1000 + c * 100 + i)
    return Path(root)


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "images")


def image_loader(data_dir, **args):
    args = {"batch_size": 8, "image_size": 10, "seed": 0, **args}
    return ImageFolderDataLoader(str(data_dir), **args)


def batches(loader, epoch, start=0):
    loader.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b) and len(a) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def rows_of(images):
    return {bytes(img.numpy()) for img in images}


# --------------------------------------------------------------------------- image folders


def test_image_folder_classes_and_held_out_test_split(folder):
    train = image_loader(folder)
    test = image_loader(folder, training=False)
    assert train.class_names == ["cat", "dog", "owl"] and test.class_names == train.class_names
    assert train.data_args() == {"class_names": ["cat", "dog", "owl"]}
    train_x, train_y = train.dataset.tensors()
    test_x, test_y = test.dataset.tensors()
    # 20% of each class held out; no image in both splits.
    assert torch.bincount(test_y).tolist() == [2, 2, 2] and torch.bincount(train_y).tolist() == [8, 8, 8]
    assert not rows_of(train_x) & rows_of(test_x)
    # The same files whatever the run's seed: the test set stays held out.
    other = image_loader(folder, training=False, seed=7)
    assert torch.equal(other.dataset.tensors()[0], test_x)
    # validation_split (default 0.1) comes out of the training images, with the run's seed.
    assert len(train.valid_idx) == round(0.1 * 24) and len(train.sampler) == 24 - len(train.valid_idx)
    x, y = next(iter(test))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.shape[1:] == (3, 10, 10)


def test_image_folder_split_folders(tmp_path):
    root = tmp_path / "split"
    make_folder(root / "train", {"cat": 6, "dog": 6}, seed=1)
    make_folder(root / "val", {"cat": 2, "dog": 1}, seed=2)
    make_folder(root / "test", {"dog": 3}, seed=3)
    train = image_loader(root)
    valid = train.split_validation()
    assert train.class_names == ["cat", "dog"] and len(train.sampler) == 12 and len(valid.sampler) == 3
    val_x = torch.cat([x for x, _ in valid])
    assert torch.equal(val_x, torch.cat([x for x, _ in image_loader(root / "val", test_split=0, validation_split=0, shuffle=False)])
                       .index_select(0, torch.tensor([0, 1, 2])))
    test = image_loader(root, training=False)
    assert torch.equal(test.dataset.tensors()[1], torch.tensor([1, 1, 1]))  # 'dog' keeps train's label


def test_image_folder_modes_sizes_and_values(tmp_path):
    root = tmp_path / "px"
    red = Image.new("RGB", (20, 10), (255, 0, 0))
    Path(root / "a").mkdir(parents=True)
    red.save(root / "a" / "red.png")
    Image.new("L", (7, 9), 128).save(root / "a" / "grey.png")
    write_image(root / "b" / "x.jpg", (31, 17), "RGB")
    write_image(root / "b" / "y.png", (5, 6), "L")
    rgb = image_loader(root, image_size=[4, 6], test_split=0, validation_split=0, shuffle=False)
    x, _ = next(iter(rgb))
    assert x.shape == (4, 3, 4, 6)
    # Files in name order: a/grey.png, a/red.png, b/x.jpg, b/y.png.
    assert torch.allclose(x[0], torch.full((3, 4, 6), 128 / 255))  # grey -> three equal channels
    assert torch.equal(x[1], torch.stack([torch.ones(4, 6), torch.zeros(4, 6), torch.zeros(4, 6)]))  # red stays red
    grey = image_loader(root, image_size=5, channels=1, test_split=0, validation_split=0, shuffle=False)
    x, _ = next(iter(grey))
    assert x.shape == (4, 1, 5, 5) and torch.allclose(x[0], torch.full((1, 5, 5), 128 / 255))
    assert torch.allclose(x[1], torch.full((1, 5, 5), 0.299 * 255 // 1 / 255), atol=1 / 255)  # red's luma


def test_image_folder_cache_is_used_then_invalidated(folder, monkeypatch):
    decoded = []
    real = image_folder.decode
    monkeypatch.setattr(image_folder, "decode", lambda path, *a: decoded.append(path) or real(path, *a))
    first = image_loader(folder)
    assert len(decoded) == 24 and first.dataset.cache_path.is_file()
    decoded.clear()
    again = image_loader(folder)
    assert decoded == [] and torch.equal(again.dataset.tensors()[0], first.dataset.tensors()[0])  # read from the cache
    changed = folder / "cat" / "03.png"
    write_image(changed, (13, 11), seed=99)
    os.utime(changed, ns=(1, 1))  # a different mtime whatever the file system's resolution
    after = image_loader(folder)
    assert len(decoded) in (24, 30) and after.dataset.cache_path != first.dataset.cache_path
    assert not first.dataset.cache_path.exists()  # the stale cache of this split was replaced
    assert not torch.equal(after.dataset.tensors()[0], first.dataset.tensors()[0])


def test_image_folder_cache_dir_and_streaming_agree(folder, tmp_path):
    cached = image_loader(folder, cache_dir=str(tmp_path / "cache"), shuffle=False, validation_split=0)
    assert cached.in_memory and cached.dataset.cache_path.parent == tmp_path / "cache"
    streamed = image_loader(folder, in_memory=False, shuffle=False, validation_split=0)
    assert not streamed.in_memory
    assert_same_batches(batches(cached, 1), batches(streamed, 1))


def make_damaged(folder):
    (folder / "cat" / "garbage.png").write_bytes(b"this is not a PNG file")
    (folder / "dog" / "empty.jpg").write_bytes(b"")
    data = (folder / "dog" / "00.jpg").read_bytes()
    (folder / "dog" / "truncated.jpg").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["garbage.png", "empty.jpg", "truncated.jpg"])
def test_unreadable_image_is_one_line_naming_it(folder, name):
    make_damaged(folder)
    for other in {"garbage.png", "empty.jpg", "truncated.jpg"} - {name}:
        next(folder.rglob(other)).unlink()
    with pytest.raises(UserError) as info:
        image_loader(folder, test_split=0)
    text = one_line(info)
    assert name in text and "skip_unreadable" in text


def test_skip_unreadable_warns_counting_and_naming(folder, caplog):
    make_damaged(folder)
    logger = logging.getLogger("train.data")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="train.data"):
            loader = image_loader(folder, test_split=0, skip_unreadable=True)
    finally:
        logger.removeHandler(caplog.handler)
    assert len(loader.dataset) == 30
    warning = sorted({r.getMessage() for r in caplog.records if "skipped" in r.getMessage()})
    assert len(warning) == 1 and "skipped 3 unreadable images" in warning[0]
    assert all(name in warning[0] for name in ("garbage.png", "empty.jpg", "truncated.jpg"))


def bad_layouts(tmp_path):
    """(name, make the data, loader args, a text the message must hold)."""
    def empty_class(root):
        make_folder(root)
        (root / "fox").mkdir()
        return {}, "fox"

    def loose_images(root):
        write_image(root / "a.png", (5, 5))
        return {}, "no class folders"

    def no_folder(root):
        return {}, "not found"

    def unknown_test_class(root):
        make_folder(root / "train", {"cat": 3})
        make_folder(root / "test", {"dog": 2})
        return {}, str(root / "test" / "dog")

    def validation_and_val(root):
        make_folder(root / "train", {"cat": 3, "dog": 3})
        make_folder(root / "val", {"cat": 1})
        return {"validation_split": 0.2}, "val/"

    def test_split_and_test(root):
        make_folder(root / "train", {"cat": 3, "dog": 3})
        make_folder(root / "test", {"cat": 1})
        return {"test_split": 0.3}, "test/"

    def sizes_differ(root):
        make_folder(root)
        return {"image_size": None}, "image_size"

    def wrong_channels(root):
        make_folder(root)
        return {"channels": 2}, "channels"

    def bad_image_size(root):
        make_folder(root)
        return {"image_size": [3, 0]}, "image_size"

    def other_classes(root):
        make_folder(root)
        return {"class_names": ["cat", "dog"]}, "owl"

    def streaming_without_size(root):
        make_folder(root)
        return {"in_memory": False, "image_size": None}, "image_size"

    return [empty_class, loose_images, no_folder, unknown_test_class, validation_and_val, test_split_and_test,
            sizes_differ, wrong_channels, bad_image_size, other_classes, streaming_without_size]


@pytest.mark.parametrize("case", bad_layouts(None), ids=lambda f: f.__name__)
def test_bad_image_folder_is_one_line(tmp_path, case):
    root = tmp_path / "data"
    args, expected = case(root)
    with pytest.raises(UserError) as info:
        image_loader(root, **args)
    assert expected in one_line(info)
    assert not (root / ".cache").exists() or case.__name__ == "sizes_differ" or not any((root / ".cache").iterdir())


# --------------------------------------------------------------------------- CSV tables


def write_csv(path, rows, header=("a", "b", "city", "label")):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for row in rows:
            f.write(",".join(str(v) for v in row) + "\n")
    return str(path)


def table_rows(n=60):
    rng = np.random.default_rng(0)
    return [[f"{rng.normal(3, 2):.3f}", f"{rng.normal(-1, 5):.3f}", ["Oslo", "Lima"][i % 2], [10, 2, 33][i % 3]] for i in range(n)]


def test_csv_classification_features_classes_and_stats(tmp_path):
    path = write_csv(tmp_path / "t.csv", table_rows())
    train = CsvDataLoader(path, "label", batch_size=8, seed=3)
    assert train.feature_names == ["a", "b"]  # 'city' is text: not a default feature
    assert train.class_names == ["2", "10", "33"]  # numeric labels sorted as numbers
    raw = torch.tensor([[float(r[0]), float(r[1])] for r in table_rows()], dtype=torch.float64)
    # The statistics come from the training rows only: not the validation rows, not the test rows.
    fit = train.sampler.indices
    assert len(fit) == 60 - 12 - round(0.1 * 48)
    assert torch.allclose(torch.tensor(train.feature_stats["mean"], dtype=torch.float64), raw[fit].mean(0))
    assert torch.allclose(torch.tensor(train.feature_stats["std"], dtype=torch.float64), raw[fit].std(0, unbiased=False))
    assert not torch.allclose(torch.tensor(train.feature_stats["mean"], dtype=torch.float64), raw.mean(0))
    inputs, _ = train.dataset.tensors()
    assert torch.allclose(inputs[fit].mean(0), torch.zeros(2), atol=1e-5)
    json.dumps(train.data_args())  # plain values: storable in a config and a checkpoint
    # The test loader rebuilt from the saved arguments scales with the training statistics.
    test = CsvDataLoader(path, "label", training=False, seed=3, **train.data_args())
    assert torch.equal(test.dataset.tensors()[0], inputs) and len(test.sampler) == 12
    assert sorted(set(test.sampler.indices.tolist()) & set(train.sampler.indices.tolist())) == []


def test_csv_regression(tmp_path):
    rows = [[i, i * 0.5, "x", 2.0 * i + 1] for i in range(50)]
    path = write_csv(tmp_path / "r.csv", rows, header=("u", "v", "tag", "y"))
    loader = CsvDataLoader(path, "y", task="regression", features=["u", "v"], batch_size=64, validation_split=0,
                           standardize=False, shuffle=False)
    x, y = next(iter(loader))
    assert y.dtype == torch.float32 and torch.equal(y, 2 * x[:, 0] + 1) and loader.class_names is None
    assert len(loader.sampler) == 40 and "class_names" not in loader.data_args()


def test_mae_metric():
    output, target = torch.tensor([[1.0], [2.0], [5.0]]), torch.tensor([1.5, 2.0, 3.0])
    assert METRICS["mae"](output, target).item() == pytest.approx(2.5 / 3)
    assert METRICS["mae"](output.view(-1), target).item() == pytest.approx(2.5 / 3)


def bad_tables():
    good = table_rows(12)
    missing = [r[:] for r in good]
    missing[4][1] = "NA"
    text_feature = [r[:] for r in good]
    text_feature[6][0] = "seven"
    missing_label = [r[:] for r in good]
    missing_label[2][3] = ""
    return [
        ("missing value", missing, {}, "line 6, column 'b': missing value"),
        ("text in a named feature", text_feature, {"features": ["a", "b"]}, "line 8, column 'a': 'seven' is not a number"),
        ("text feature named", good, {"features": ["a", "city"]}, "column 'city'"),
        ("missing label", missing_label, {}, "line 4, column 'label': missing value"),
        ("unknown target", good, {"target": "lable"}, "did you mean 'label'"),
        ("unknown feature", good, {"features": ["a", "bb"]}, "no column 'bb'"),
        ("target as feature", good, {"features": ["a", "label"]}, "target column"),
        ("ragged row", good[:3] + [["1", "2"]], {}, "line 5: 2 values"),
        ("header only", [], {}, "no rows"),
        ("one class", [r[:3] + [7] for r in good], {}, "one class"),
        ("bad task", good, {"task": "ranking"}, "classification, regression"),
        ("no file", None, {}, "file not found"),
        ("bad feature_stats", good, {"feature_stats": {"features": ["a"], "mean": [0], "std": [1]}}, "feature_stats"),
    ]


@pytest.mark.parametrize("name,rows,args,expected", bad_tables(), ids=[c[0] for c in bad_tables()])
def test_bad_table_is_one_line(tmp_path, name, rows, args, expected):
    path = str(tmp_path / "missing.csv") if rows is None else write_csv(tmp_path / "t.csv", rows)
    args = {"path": path, "target": "label", **args}
    with pytest.raises(UserError) as info:
        CsvDataLoader(**args)
    assert expected in one_line(info)


def test_empty_csv_is_one_line(tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(UserError) as info:
        CsvDataLoader(str(tmp_path / "e.csv"), "label")
    assert "empty" in one_line(info)


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


def test_no_transforms_leaves_the_fast_path_untouched():
    loader = BaseDataLoader(SyntheticDataset(40, (3, 8, 8), 2), 8)
    assert loader.in_memory and loader._pipeline is None and loader.split_validation() is None


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


def test_example_configs_build_on_the_example_data(tmp_path):
    from tools import make_example_data
    from trainer import build
    from utils.config import validate_config

    out = make_example_data.main(["--out", str(tmp_path / "data")])
    for name, key, value in (("image_folder", "data_dir", "example_images"), ("csv", "path", "example_table.csv")):
        config = json.loads((ROOT / "configs" / f"{name}.json").read_text())
        assert config["data_loader"]["args"][key] == f"data/{value}"
        config["data_loader"]["args"][key] = str(out / value)
        config = validate_config(config, build.registries())
        loader = build.build_data_loader(config)
        model = build.build_model(config)
        x, y = next(iter(loader))
        assert model(x).shape == (len(y), len(loader.class_names))


def test_benchmark_rows_for_augmentation_and_image_folders():
    from benchmarks import data as data_bench

    augmentation = data_bench.bench_augmentation(256, 1, 0.01, True, lambda message: None)
    assert set(augmentation["paths"]) == set(data_bench.AUGMENTATION_PATHS)
    assert all(path["samples_per_s"] > 0 for path in augmentation["paths"].values())
    assert augmentation["resnet20_step_s"] > 0 and augmentation["batched_vs_best_per_sample"] > 0
    folder = data_bench.bench_image_folder(20, lambda message: None)
    assert len(folder["images_per_s"]) == 4 and all(rate > 0 for rate in folder["images_per_s"].values())


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
