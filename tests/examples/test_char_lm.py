"""The character-level language model example (examples/char_lm.py, configs/examples/char_lm.json): it learns (bits per
character well below a uniform guess's), writes a text sample to the log each epoch, and resumes bit-exactly."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import assert_states_identical, run_folder, stopped_and_resumed, with_changes
from examples import char_lm
from trainer import run
from trainer.build import registries
from utils.config import apply_overrides, load_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
UNIFORM = math.log2(len(char_lm.VOCAB))  # bits per character of a uniform guess: log2(96) = 6.58


def lm_config(tmp_path, *overrides):
    """The shipped config, quiet on the CPU, short epochs (``trainer.len_epoch`` batches) and a shorter sample."""
    return apply_overrides(load_config(ROOT / "configs/examples/char_lm.json"), [
        f"trainer.save_dir={tmp_path / 'saved'}", "trainer.verbosity=0", "trainer.tensorboard=false", "device=cpu",
        "trainer.len_epoch=20", "trainer.epochs=2", "trainer.early_stop=0", "task.args.sample_chars=40",
        *overrides])


def test_the_shipped_config_is_valid_and_its_data_is_split_by_module():
    validate_config(load_config(ROOT / "configs/examples/char_lm.json"), registries())
    splits = {m: char_lm.split_of(m, 0.06, 0.06) for m in char_lm.MODULES}
    assert set(splits.values()) == {"train", "valid", "test"}
    loader = char_lm.DocstringLoader(seq_len=64)
    x, y = loader.dataset.tensors()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == 64
    assert torch.equal(x[0, 1:], y[0, :-1])  # the target is the next character
    valid, test = loader.split_validation(), char_lm.DocstringLoader(training=False)
    assert len(loader.sampler) > 3 * len(valid.sampler) > 0 and len(test.sampler) > 0
    text = lambda ids: "".join(char_lm.VOCAB[i] for i in ids.flatten().tolist())  # noqa: E731
    train_text, test_text = text(x[loader.sampler.indices]), text(test.dataset.tensors()[0])
    # No module's prose is in two splits: a long line of the test text never appears in the training text.
    line = max(test_text.splitlines(), key=len)
    assert len(line) > 40 and line not in train_text


def test_it_learns_well_below_a_uniform_guess_and_samples_text_each_epoch(tmp_path):
    config = lm_config(tmp_path)
    result = run.train(config, run_id="r")
    bits = result["val_bits_per_char"]
    # 40 steps reach about 3.2 bits (a uniform guess: 6.58); a step scoring the wrong positions stays near 4.5 or
    # above, and one that saw its own target would be near 0.
    assert 1.0 < bits < 0.6 * UNIFORM, bits
    # The metric is the loss in bits, weighted per character like the loss.
    assert bits == pytest.approx(result["val_loss"] / math.log(2), rel=1e-6)
    # The run scored the test split (other modules) with model_best.pth at its end.
    scores = json.loads((run_folder(config, "r") / "result.json").read_text())["test"]
    assert 1.0 < scores["bits_per_char"] < 0.6 * UNIFORM
    log = (Path(config["trainer"]["save_dir"]) / "log" / config["name"] / "r" / "info.log").read_text()
    samples = [line.split("sample after epoch ", 1)[1] for line in log.splitlines() if "sample after epoch" in line]
    assert [s.split(":")[0] for s in samples] == ["1", "2"], log
    assert all(": 'Return the " in s or ': "Return the ' in s for s in samples)  # (repr quotes)


def test_sampling_leaves_the_random_state_and_the_mode_as_they_were():
    from types import SimpleNamespace

    model, lines = char_lm.CharGRU(), []
    trainer = SimpleNamespace(is_main=True, model=model, device=torch.device("cpu"),
                              logger=SimpleNamespace(info=lines.append))
    hook = char_lm.SampleText("The ", 20, 64)
    before = torch.get_rng_state()
    hook.after_epoch(trainer, 3, {})
    hook.after_epoch(trainer, 3, {})
    assert torch.equal(torch.get_rng_state(), before) and model.training
    assert lines[0] == lines[1] and lines[0].startswith("sample after epoch 3: 'The ")


def test_it_resumes_mid_epoch_bit_exactly(tmp_path, interrupt_at_step):
    # Short: 8 batches an epoch, no validation (the sample is still drawn after each epoch), no test scoring.
    config = lm_config(tmp_path, "trainer.len_epoch=8", "trainer.epochs=3", "trainer.save_period=1",
                       "task.args.sample_chars=8", "data_loader.args.validation_split=0", "trainer.monitor=off",
                       "trainer.test_after_train=false")
    run.train(with_changes(config, name="whole"), run_id="w")
    reference = torch.load(run_folder(with_changes(config, name="whole"), "w") / "checkpoint-epoch3.pth",
                           weights_only=True)
    # Stopped in epoch 2, batch 4 of 8: after epoch 1's sample was drawn.
    resumed = stopped_and_resumed(interrupt_at_step, config, 12, (1, 4, 12), "checkpoint-epoch3.pth")
    assert_states_identical(reference, resumed)
