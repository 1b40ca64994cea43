"""The segmentation example (examples/segmentation.py, configs/examples/segmentation.json): its scenes, training to a
mean IoU well above predicting the background everywhere, an exact mid-epoch resume, and predict.py's mask images."""

from pathlib import Path

import numpy as np
import pytest
import torch

from base.base_data_loader import to_float
from conftest import assert_states_identical, run_folder, stopped_and_resumed
from examples import segmentation
from trainer import run
from utils.config import apply_overrides, load_config

pytest.importorskip("torchmetrics")  # (the config's mean IoU; the torchmetrics part is needed, utils/parts.py)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/examples/segmentation.json"


def config_for(save_dir, *overrides):
    return apply_overrides(load_config(CONFIG), [f"trainer.save_dir={save_dir}", "trainer.verbosity=0",
                                                 "trainer.tensorboard=false", "device=cpu", *overrides])


def test_the_config_validates():
    config, _ = run.checked_config(load_config(CONFIG))
    assert config["task"]["type"] == "examples.segmentation:SceneMasks"
    assert config["trainer"]["monitor"] == "max val_mean_iou"


def test_scenes_are_fixed_and_each_split_has_digit_images_of_its_own():
    x, masks = segmentation.make_scenes("valid", 40)
    segmentation.make_scenes.cache_clear()
    again = segmentation.make_scenes("valid", 40)
    assert torch.equal(x, again[0]) and torch.equal(masks, again[1])  # from the split's seed, not the run's
    assert x.shape == (40, 1, 32, 32) and masks.shape == (40, 32, 32) and masks.dtype == torch.int64
    assert torch.equal(x, to_float(torch.round(x * 255).to(torch.uint8)))  # 8-bit steps: what a PNG holds
    assert set(masks.unique().tolist()) <= set(range(11)) and (masks != 10).float().mean() > 0.05
    ink = masks != segmentation.BACKGROUND
    assert (x[:, 0][ink] > 0.5).all() and (x[:, 0][~ink] < 0.51).all()  # a digit's pixel is one with ink
    digits = segmentation.DigitsDataset
    test, train = set(digits(train=False).indices.tolist()), digits(train=True).indices
    held = round(len(train) * 0.15)
    assert not test & set(train.tolist()) and not set(train[:held].tolist()) & set(train[held:].tolist())


def background_baseline():
    """The mean IoU of predicting the background everywhere, on the config's validation scenes: the background's
    IoU is its share of the pixels, every digit's is 0."""
    _, masks = segmentation.make_scenes("valid", 300, 0.15)
    return (masks == segmentation.BACKGROUND).float().mean().item() / 11


@pytest.fixture(scope="module")
def first_epoch(tmp_path_factory):
    """The example's config trained for one epoch: ``(checkpoint, the epoch's results)``."""
    config = config_for(tmp_path_factory.mktemp("seg") / "saved", "data_loader.args.test_scenes=16",
                        "trainer.epochs=1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (as conftest's _one_thread, which a module's fixture runs before)
    try:
        result = run.train(config, run_id="r")
    finally:
        torch.set_num_threads(threads)
    return run_folder(config, "r") / "model_best.pth", result


def test_one_epoch_reaches_three_times_the_mean_iou_of_predicting_the_background(first_epoch):
    baseline = background_baseline()
    assert 0.07 < baseline < 0.09
    assert first_epoch[1]["val_mean_iou"] > 3 * baseline, (first_epoch[1], baseline)  # measured: 0.33


@pytest.mark.slow
def test_three_epochs_reach_a_mean_iou_of_a_half(tmp_path):
    config = config_for(tmp_path / "saved", "data_loader.args.test_scenes=16", "trainer.epochs=3")
    last = run.train(config, run_id="r")
    assert last["val_mean_iou"] > 0.5, last  # measured: 0.81; eight epochs (README): 0.88


def test_it_resumes_mid_epoch_bit_exactly(tmp_path, interrupt_at_step):
    config = config_for(tmp_path / "saved", "data_loader.args.scenes=96", "data_loader.args.test_scenes=16",
                        "data_loader.args.batch_size=16", "arch.args.width=4", "trainer.epochs=2",
                        "trainer.test_after_train=false")
    run.train(config, run_id="whole")
    reference = torch.load(run_folder(config, "whole") / "checkpoint-epoch2.pth", weights_only=True)
    # Stopped in epoch 2, after its batch 2 of 6 (96 scenes: 82 to train on, 14 to validate).
    resumed = stopped_and_resumed(interrupt_at_step, config, 8, (1, 2, 8), "checkpoint-epoch2.pth")
    assert_states_identical(reference, resumed)


def test_predict_writes_one_mask_image_per_scene(first_epoch, tmp_path, capsys):
    predict = pytest.importorskip("parts.predict")
    from PIL import Image

    checkpoint = first_epoch[0]
    paths = segmentation.write_scenes(tmp_path / "scenes", count=6)
    out = tmp_path / "masks"
    assert predict.predict_command(["-r", str(checkpoint), str(tmp_path / "scenes"), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    written = sorted(out.iterdir())
    assert [p.name for p in written] == [f"scene_{i:03d}_mask.png" for i in range(6)]
    assert captured.out.splitlines()[0] == "input,row,output" and len(captured.out.splitlines()) == 7
    assert "6 outputs written to" in captured.err
    # Each mask holds the class the model gives each pixel of that test scene (test.py's input, as the file holds it).
    model = predict.load_for_inference(checkpoint).model
    scenes, _ = segmentation.make_scenes("test", 16)
    with torch.no_grad():
        expected = model(scenes[:6]).argmax(1)
    for i, path in enumerate(written):
        with Image.open(path) as image:
            assert image.mode == "P" and image.size == (32, 32)
            assert np.array_equal(np.array(image), expected[i].numpy())
    # The folder of the scenes is refused as -o (a rerun would read the masks as scenes), before anything is written.
    assert predict.predict_command(["-r", str(checkpoint), str(paths[0]), "-o", str(tmp_path / "scenes")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: -o {tmp_path / 'scenes'} is ") and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in (tmp_path / "scenes").iterdir()) == [p.name for p in paths]
    # Without -o: one line asking for the folder.
    assert predict.predict_command(["-r", str(checkpoint), str(paths[0])]) == 2
    assert "give -o FOLDER" in capsys.readouterr().err
