"""The image-folder part (parts/image_folder.py) on real files written here: PNG and JPEG, RGB and grey, odd sizes,
damaged ones. Every user mistake must be one line of UserError naming what to fix."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import (assert_example_config_builds, assert_run_keeps_pinned, assert_same_batches, batches,
                      make_folder, write_image)
from parts import image_folder
from parts.image_folder import ImageFolderDataLoader
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def one_line(info):
    text = str(info.value)
    assert text and "\n" not in text, text
    return text


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "images")


def image_loader(data_dir, **args):
    args = {"batch_size": 8, "image_size": 10, "seed": 0, **args}
    return ImageFolderDataLoader(str(data_dir), **args)


def rows_of(images):
    return {bytes(img.numpy()) for img in images}


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


def test_image_folder_cache_is_used_then_invalidated(folder, monkeypatch, tmp_path):
    decoded = []
    real = image_folder.decode
    monkeypatch.setattr(image_folder, "decode", lambda path, *a: decoded.append(path) or real(path, *a))
    first = image_loader(folder, cache_dir=tmp_path / "cache")
    assert len(decoded) == 24 and first.dataset.cache_path.is_file()
    theirs = first.dataset.cache_path.with_name(first.dataset.cache_path.name[:-27] + "kept.pt")  # not a cache name
    theirs.write_bytes(b"a file of the user's in the cache folder")
    decoded.clear()
    again = image_loader(folder, cache_dir=tmp_path / "cache")
    assert decoded == [] and torch.equal(again.dataset.tensors()[0], first.dataset.tensors()[0])  # read from the cache
    changed = folder / "cat" / "03.png"
    write_image(changed, (13, 11), seed=99)
    os.utime(changed, ns=(1, 1))  # a different mtime whatever the file system's resolution
    after = image_loader(folder, cache_dir=tmp_path / "cache")
    assert len(decoded) in (24, 30) and after.dataset.cache_path != first.dataset.cache_path
    assert not first.dataset.cache_path.exists()  # the stale cache of this split was replaced
    assert theirs.read_bytes() == b"a file of the user's in the cache folder"  # a file it did not write stays
    assert not torch.equal(after.dataset.tensors()[0], first.dataset.tensors()[0])
    assert not list(folder.rglob(".*"))  # nothing written into the user's data folder


def test_image_folder_cache_dir_and_streaming_agree(folder, tmp_path):
    cached = image_loader(folder, cache_dir=str(tmp_path / "cache"), shuffle=False, validation_split=0)
    assert cached.in_memory and cached.dataset.cache_path.parent == tmp_path / "cache"
    streamed = image_loader(folder, in_memory=False, shuffle=False, validation_split=0)
    assert not streamed.in_memory
    assert_same_batches(batches(cached, 1), batches(streamed, 1))


def test_normalize_auto_uses_the_training_images_only_and_their_saved_stats_after(folder, monkeypatch):
    pytest.importorskip("parts.augment")  # the Normalize runs as a transform
    loader = image_loader(folder, normalize="auto", image_size=6, validation_split=0.25, shuffle=False)
    stats, train_idx = loader.feature_stats, loader.sampler.indices
    images = loader.dataset.tensors()[0]
    pixels = images[train_idx].double().div(255).transpose(0, 1).flatten(1)  # neither validation nor test images
    assert stats["mean"] == pytest.approx(pixels.mean(1).tolist())
    assert stats["std"] == pytest.approx(pixels.std(1, unbiased=False).tolist())
    assert loader.data_args()["feature_stats"] == stats
    x = torch.cat([x for x, _ in batches(loader, 1)]).transpose(0, 1).flatten(1)
    assert x.mean(1).abs().max() < 1e-4 and (x.std(1, unbiased=False) - 1).abs().max() < 1e-4
    # Given back (a saved run's config), the numbers are used as they are, for training and for the test split.
    monkeypatch.setattr(image_folder, "channel_stats", lambda *a: pytest.fail("recomputed"))
    again = image_loader(folder, normalize="auto", feature_stats=stats, image_size=6, validation_split=0.25,
                         shuffle=False)
    assert_same_batches(batches(again, 1), batches(loader, 1))
    test = image_loader(folder, normalize="auto", feature_stats=stats, image_size=6, training=False, shuffle=False)
    mean, std = (torch.tensor(stats[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    x, _ = next(iter(test))
    assert torch.allclose(x, (test.dataset.tensors()[0][: len(x)].float() / 255 - mean) / std, atol=1e-5)
    with pytest.raises(UserError) as info:  # the test split alone cannot know the training images' statistics
        image_loader(folder, normalize="auto", image_size=6, training=False)
    assert "feature_stats" in one_line(info)


@pytest.mark.parametrize("args, expected", [
    ({"normalize": "yes"}, 'expected "auto"'),
    ({"normalize": "auto", "transforms": {"eval": [{"type": "Normalize", "args": {"mean": [0.5], "std": [0.2]}}]}},
     "already have one"),
    ({"normalize": "auto", "feature_stats": {"mean": [0.5], "std": [0.2]}}, "3 values"),
])
def test_normalize_mistakes_are_one_line(folder, args, expected):
    with pytest.raises(UserError) as info:
        image_loader(folder, **args)
    assert expected in one_line(info)


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


# ------------------------------------------------------------------ links, one class, damage, memory (issue 24)


def link_loops():
    """(name, make the links under a three-class folder ``root``, the link the message must name)."""
    def two_links_to_the_root(root):  # the scan grew exponentially (MemoryError after 51 s)
        (root / "cat" / "up").symlink_to(root, target_is_directory=True)
        (root / "cat" / "up2").symlink_to(root, target_is_directory=True)
        return root / "cat" / "up"

    def a_link_to_its_own_class(root):  # a loop inside the class folder
        (root / "owl" / "again").symlink_to(root / "owl", target_is_directory=True)
        return root / "owl" / "again"

    def a_deep_link_to_its_parent(root):
        (root / "dog" / "sub").mkdir()
        (root / "dog" / "sub" / "back").symlink_to("..", target_is_directory=True)
        return root / "dog" / "sub" / "back"

    def a_relative_link_above_the_class(root):
        (root / "cat" / "sub").mkdir()
        (root / "cat" / "sub" / "top").symlink_to("../..", target_is_directory=True)
        return root / "cat" / "sub" / "top"

    return [two_links_to_the_root, a_link_to_its_own_class, a_deep_link_to_its_parent, a_relative_link_above_the_class]


@pytest.mark.parametrize("case", link_loops(), ids=lambda f: f.__name__)
def test_a_link_loop_in_an_image_folder_is_one_line_naming_the_link(folder, case):
    link = case(folder)
    with pytest.raises(UserError) as info:
        image_loader(folder)
    text = one_line(info)
    assert str(link) in text and "loop" in text


@pytest.mark.parametrize("link, target", [("train/cat/dogs", "train/dog"), ("train/owl/more", "test/owl")])
def test_a_folder_reached_from_two_classes_or_splits_is_one_line(tmp_path, link, target):
    make_folder(tmp_path / "train")
    make_folder(tmp_path / "test", {"cat": 2, "dog": 2, "owl": 2})
    (tmp_path / link).symlink_to(tmp_path / target, target_is_directory=True)
    with pytest.raises(UserError) as info:
        image_loader(tmp_path)
    text = one_line(info)
    assert str(tmp_path / target) in text and "one class" in text


@pytest.mark.parametrize("link, target", [("cat/b", "cat/a"), ("cat/a/inner", "cat/b")])
def test_a_folder_reached_twice_in_one_class_is_read_once(tmp_path, link, target):
    root = make_folder(tmp_path / "data", {"cat": 4, "dog": 4})
    write_image(root / "cat" / "a" / "x.png", (13, 11))
    if target == "cat/b":
        write_image(root / "cat" / "b" / "y.png", (13, 11))
    (root / link).symlink_to(root / target, target_is_directory=True)  # not a loop: the target does not hold it
    loader = image_loader(root, test_split=0, validation_split=0)
    assert len(loader.dataset) == 8 + 1 + (target == "cat/b")


@pytest.mark.parametrize("layout", [{"": {"cat": 4}}, {"train": {"cat": 3}, "test": {"cat": 2}}])
def test_an_image_folder_with_one_class_is_one_line(tmp_path, layout):
    for split, counts in layout.items():
        make_folder(tmp_path / split, counts)
    with pytest.raises(UserError) as info:
        image_loader(tmp_path)
    assert "one class folder (cat/)" in one_line(info)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damaged, args", [
    ("train/cat/03.png", {"in_memory": False}),  # streaming: found by a worker's traceback after the folder existed
    ("train/dog/02.jpg", {"in_memory": False, "num_workers": 2}),
    ("test/owl/01.png", {"in_memory": False}),  # only in test/: found after training
    ("test/dog/01.jpg", {"in_memory": True}),
    ("test/cat/00.png", {}),
])
def test_a_damaged_image_in_any_split_stops_the_training_loader(tmp_path, damaged, args):
    make_folder(tmp_path / "train", {"cat": 4, "dog": 4, "owl": 4})
    make_folder(tmp_path / "test", {"cat": 2, "dog": 2, "owl": 2})
    truncate(tmp_path / damaged)
    with pytest.raises(UserError) as info:
        image_loader(tmp_path, **args)
    assert f"cannot read image {tmp_path / damaged}" in one_line(info)
    if args.get("in_memory") is False:  # skipped with a warning when asked, as in memory
        loader = image_loader(tmp_path, skip_unreadable=True, **args)
        assert len(loader.dataset) == 12 - damaged.startswith("train")


@pytest.mark.parametrize("args, available, expected", [
    ({"image_size": 100000}, None, "a batch of 8 images of 3x100000x100000"),
    ({"image_size": 64, "batch_size": 64}, 2**20, "a batch of 24 images of 3x64x64 needs about 1.41 MiB"),
    ({"image_size": 64, "batch_size": 2, "in_memory": True}, 250_000, "true holds 24 images of 3x64x64"),
])
def test_what_memory_cannot_hold_is_one_line_naming_both_numbers(folder, monkeypatch, args, available, expected):
    if available is not None:
        monkeypatch.setattr(image_folder, "available_memory", lambda: available)
    with pytest.raises(UserError) as info:
        image_loader(folder, **args)
    text = one_line(info)
    assert expected in text and "of memory available" in text
    assert available is None or image_folder._bytes(available) in text


@pytest.mark.parametrize("method", ["resize", "convert"])
def test_running_out_of_memory_while_decoding_blames_image_size_not_the_file(folder, monkeypatch, method):
    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(Image.Image, method, out_of_memory)
    path = folder / "cat" / "00.png"
    with pytest.raises(UserError) as info:
        image_folder.decode(path, 3, (50, 40))
    text = one_line(info)
    assert "image_size" in text and "50x40" in text and "00.png" not in text


# --------------------------------------------------------------------------- as a user runs it


def test_the_loader_is_found_by_its_name_through_the_parts_table():
    from trainer import build

    assert build.registries()["data_loader"].get("ImageFolderDataLoader") is ImageFolderDataLoader
    assert "ImageFolderDataLoader" not in build.DATA_LOADERS  # not in the core's table


def test_the_example_config_builds_on_the_example_data(example_data, tmp_path):
    pytest.importorskip("parts.augment")  # configs/image_folder.json augments
    assert_example_config_builds("image_folder", "data_dir", "data/example_images", example_data, tmp_path / "saved")


def test_a_run_keeps_its_class_names_and_resumes_from_the_original_config(example_data, tmp_path):
    pytest.importorskip("parts.augment")  # configs/image_folder.json augments
    assert_run_keeps_pinned("image_folder", {"class_names", "feature_stats"}, example_data, tmp_path)


def test_the_example_config_flips_nothing_normalises_its_own_data_and_caches_outside_it(example_data, tmp_path):
    pytest.importorskip("parts.augment")  # configs/image_folder.json augments
    from trainer import run
    from utils.config import apply_overrides, load_config

    shipped = load_config(ROOT / "configs/image_folder.json")
    args = shipped["data_loader"]["args"]
    assert not [t for split in args["transforms"].values() for t in split if "Flip" in t["type"]]  # digits, text
    assert args["normalize"] == "auto" and "cache_dir" not in args
    data = tmp_path / "images"
    shutil.copytree(example_data / "example_images", data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    config = apply_overrides(shipped, [f"data_loader.args.data_dir={data}", f"trainer.save_dir={tmp_path / 'saved'}",
                                       "trainer.verbosity=0", "trainer.tensorboard=false", "device=cpu",
                                       "trainer.epochs=1"])
    run.train(apply_overrides(config, ["trainer.fast_dev_run=2"]))  # a dry run writes nothing: no cache either
    assert not (tmp_path / "saved").exists() and sorted(p.relative_to(data) for p in data.rglob("*")) == before
    run.train(config, run_id="r")
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # the user's data folder is left alone
    assert list((tmp_path / "saved" / "cache" / "images").glob("train-*.pt"))
    folder = tmp_path / "saved/models" / config["name"] / "r"
    saved = json.loads((folder / "config.json").read_text())
    stats = saved["data_loader"]["args"]["feature_stats"]
    assert len(stats["mean"]) == 3 and 0 < stats["mean"][0] < 1 and stats["mean"] != [0.5, 0.5, 0.5]
    # A resume from the user's file in the middle of an epoch: the pinned statistics and the cache folder are no change.
    state = torch.load(folder / "checkpoint-epoch1.pth", weights_only=True)
    from trainer.build import registries
    from utils.resume import checked_resume_config

    checked, _ = checked_resume_config(apply_overrides(config, ["trainer.epochs=2"]), {**state, "batch_in_epoch": 1},
                                       registries())
    assert checked["data_loader"]["args"]["feature_stats"] == stats
    # predict.py (and the export, which reads the same) normalises with the run's numbers.
    predict = pytest.importorskip("parts.predict")
    assert predict.input_reader(saved).normalisation() == (stats["mean"], stats["std"])


def test_benchmark_rows_for_image_folders():
    from benchmarks import data as data_bench

    folder = data_bench.bench_image_folder(20, lambda message: None)
    assert len(folder["images_per_s"]) == 4 and all(rate > 0 for rate in folder["images_per_s"].values())


def test_a_mid_epoch_resume_may_move_the_image_cache_but_not_change_the_data():
    """The cache's place (set under trainer.save_dir by check()) decides no sample order: a resume in the middle
    of an epoch with another save_dir, or from a checkpoint written before cache_dir existed, goes on."""
    from utils.errors import ConfigError
    from utils.resume import check_resume_changes

    saved = {"seed": 0, "data_loader": {"type": "ImageFolderDataLoader", "args": {"data_dir": "d", "batch_size": 8}}}
    moved = {"seed": 0, "data_loader": {"type": "ImageFolderDataLoader",
                                        "args": {"data_dir": "d", "batch_size": 8, "cache_dir": "other/cache/images"}}}
    assert check_resume_changes(saved, moved, mid_epoch=True) == ['data_loader.args.cache_dir: (unset) -> "other/cache/images"']
    other_data = {**moved, "data_loader": {**moved["data_loader"], "args": {**moved["data_loader"]["args"], "data_dir": "e"}}}
    with pytest.raises(ConfigError, match="changed data_loader.args.data_dir"):
        check_resume_changes(saved, other_data, mid_epoch=True)


def test_a_full_disk_writing_the_image_cache_is_one_line_exit_28(folder, tmp_path, monkeypatch, capsys):
    """The cache's write fails as on a full disk (ENOSPC): one ``error:`` line naming the cache and what to do, exit 28
    (checkpoints on that disk would fail next), before the run folder exists and with no cache file left."""
    import errno

    from conftest import make_config
    from trainer import cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(image_folder.torch, "save", full)
    config = make_config(tmp_path / "saved")
    config["data_loader"] = {"type": "ImageFolderDataLoader", "args": {
        "data_dir": str(folder), "image_size": 8, "batch_size": 8, "validation_split": 0.2,
        "cache_dir": str(tmp_path / "saved/cache")}}
    config["arch"]["args"].update(input_size=3 * 8 * 8)
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert cli.train_command(["-c", str(tmp_path / "c.json")]) == 28
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write the image cache"), err
    assert "no space left" in lines[0] and "cache_dir=false" in lines[0] and "Traceback" not in err
    assert [p for p in (tmp_path / "saved").rglob("*") if not p.is_dir()] == []
    assert not (tmp_path / "saved/models").exists()


@pytest.mark.parametrize("kind, named", [("fifo", "is a FIFO (a named pipe), not a folder"),
                                         ("link to /dev/zero", "(a link to /dev/zero) is a character device"),
                                         ("file", "is a file, not a folder"), ("missing", "folder not found: ")])
def test_a_data_dir_that_is_no_folder_is_named_as_what_it_is(tmp_path, kind, named):
    path = tmp_path / "images"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "file":
        path.write_text("x")
    elif kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    with pytest.raises(UserError) as info:
        image_loader(path)
    text = one_line(info)
    assert text.startswith("data_loader.args.data_dir: ") and str(path) in text and named in text, text
