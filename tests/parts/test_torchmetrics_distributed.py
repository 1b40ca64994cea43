"""torchmetrics metrics under torchrun: 2 CPU processes (gloo), sharded unpadded validation, a mid-epoch resume.

What is checked: a torchmetrics F1 (macro) and AUROC, training and validation, equal torchmetrics
computed directly over the whole epoch's outputs of both processes (torchmetrics' own sync at
compute, every rank calling it); every rank gets the same values; a 2-process resume from a
mid-epoch ``last.pth`` ends with the same values as the run left alone; the confusion matrix (the
confusion part, parts/confusion.py, where it is there) is summed over both validation shards and
logged once per validation, by rank 0.
One torchrun launch per phase, as in tests/test_distributed.py.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from test_distributed import WORLD

torchmetrics = pytest.importorskip("torchmetrics")
from torchmetrics.classification import MulticlassAUROC, MulticlassF1Score  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

NAME = "dist_tm"
N_TRAIN, N_VALID = 210, 33  # 105 per rank in batches of 8: 13 of 8 and one of 1; validation 17 + 16: 8, 8, 1 and 8, 8
N_TEST = 27  # 10% of the 270 samples: the test split rank 0 scores alone at the end (torchmetrics must not sync there)
PER_PROCESS_BATCH = 8
BATCHES = 14
F1 = {"type": "torchmetrics.classification.MulticlassF1Score", "args": {"num_classes": 3, "average": "macro"}}
AUROC = {"type": "torchmetrics.classification.MulticlassAUROC", "args": {"num_classes": 3}, "name": "auroc"}
KEYS = ["multiclass_f1_score", "auroc", "val_multiclass_f1_score", "val_auroc"]
CONFUSION = importlib.util.find_spec("parts.confusion") is not None  # another part: its files may be deleted

# Like tests/test_distributed.py's driver (a job's "save_last_every" too), and it records each training batch's
# (output, target) per rank.
DRIVER = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
from tests.conftest import add_hooks, save_last_hook
from trainer import build, run

rank = int(os.environ["RANK"])
records = []
build_loss = build.build_loss

def recording(config, device=None):
    loss = build_loss(config, device)

    def record(output, target):
        if torch.is_grad_enabled():  # training steps only
            records.append((output.detach().clone(), target.clone()))
        return loss(output, target)

    return record

build.build_loss = recording
drawn = []  # the sum of each confusion matrix this process draws
try:
    from parts import confusion
except ImportError:
    pass
else:
    image = confusion.confusion_image
    confusion.confusion_image = lambda counts, names: drawn.append(int(counts.sum())) or image(counts, names)
for job in json.load(open(sys.argv[1])):
    del records[:], drawn[:]
    undo = add_hooks(save_last_hook(job["save_last_every"])) if job.get("save_last_every") else lambda: None
    metrics = run.train(job["config"], resume=job.get("resume"), run_id=job.get("run_id"))
    undo()
    torch.save(records, f"{{job['out']}}.rank{{rank}}.records.pt")
    with open(f"{{job['out']}}.rank{{rank}}.drawn.json", "w") as f:
        json.dump(drawn, f)
    with open(f"{{job['out']}}.rank{{rank}}.json", "w") as f:
        json.dump(metrics, f)
"""


def config(save_dir, **trainer):
    return {
        "name": NAME,
        "seed": 3,
        "device": "cpu",
        "arch": {"type": "MLP", "args": {"input_size": 16, "hidden_sizes": [8], "num_classes": 3}},
        "data_loader": {
            "type": "SyntheticDataLoader",
            "args": {"num_samples": N_TRAIN + N_VALID + N_TEST, "input_shape": [1, 4, 4], "num_classes": 3,
                     "noise": 3.0, "test_fraction": 0.1, "batch_size": PER_PROCESS_BATCH, "shuffle": True,
                     "validation_split": N_VALID},
        },
        "optimizer": {"type": "SGD", "args": {"lr": 0.1, "momentum": 0.9}},
        "loss": "cross_entropy",
        "metrics": ["accuracy", F1, AUROC],
        "trainer": {"epochs": 2, "save_dir": str(save_dir), "save_period": 1, "verbosity": 0, "tensorboard": False,
                    "monitor": "max val_auroc", "log_every_n_steps": 5, **trainer},
    }


def metrics_of(out):
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(WORLD)]


def records_of(out):
    return [torch.load(f"{out}.rank{r}.records.pt", weights_only=True) for r in range(WORLD)]


def direct(outputs, targets):
    f1 = MulticlassF1Score(num_classes=3, average="macro", ignore_index=-100)
    auroc = MulticlassAUROC(num_classes=3, ignore_index=-100)
    return float(f1(outputs, targets)), float(auroc(outputs, targets))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, torchrun):
    """Launch 1: a 2-epoch run writing a mid-epoch ``last.pth`` at step 20 (epoch 2, batch 6 of 14), with the
    confusion matrix on (where that part is). Launch 2: that ``last.pth`` resumed by 2 processes."""
    tmp = tmp_path_factory.mktemp("tm_dist")
    torchrun.jobs(tmp, DRIVER, [
        {"config": config(tmp / "full", confusion_matrix=CONFUSION, tensorboard=True), "save_last_every": 20,
         "run_id": "full", "out": str(tmp / "full")},
        # a last.pth after the epoch's last batch (step 14 of 14), before the epoch's end
        {"config": config(tmp / "edge", epochs=1), "save_last_every": BATCHES, "run_id": "edge",
         "out": str(tmp / "edge")},
    ], "first", check=True)
    resumes = []
    for label, source in (("mid", "full"), ("edge_resumed", "edge")):
        folder = tmp / label / "models" / NAME / label
        folder.mkdir(parents=True)
        shutil.copy(tmp / source / "models" / NAME / source / "last.pth", folder / "last.pth")
        resumes.append({"config": config(tmp / label, epochs=2 if label == "mid" else 1),
                        "resume": str(folder / "last.pth"), "out": str(tmp / label)})
    torchrun.jobs(tmp, DRIVER, resumes, "resume", check=True)
    return tmp


def test_every_rank_gets_the_same_values(runs):
    for label in ("full", "mid"):
        ranks = metrics_of(runs / label)
        assert ranks[0] == ranks[1], label
        assert all(0 < ranks[0][key] <= 1 for key in KEYS), ranks[0]


def test_training_values_are_those_of_both_processes_batches(runs):
    ranks = records_of(runs / "full")
    assert [len(r) for r in ranks] == [2 * BATCHES] * WORLD
    assert [len(t) for _, t in ranks[0][:BATCHES]] == [8] * 13 + [1]  # an uneven last batch
    epoch2 = [pair for r in ranks for pair in r[BATCHES:]]
    f1, auroc = direct(torch.cat([o for o, _ in epoch2]), torch.cat([t for _, t in epoch2]))
    metrics = metrics_of(runs / "full")[0]
    assert metrics["multiclass_f1_score"] == f1
    assert metrics["auroc"] == auroc
    # one process's batches alone would give other values: the reduction over ranks happened
    own = direct(torch.cat([o for o, _ in ranks[0][BATCHES:]]), torch.cat([t for _, t in ranks[0][BATCHES:]]))
    assert own != (f1, auroc)


def test_validation_values_are_those_of_all_held_out_samples(runs):
    from trainer import build

    state = torch.load(runs / "full" / "models" / NAME / "full" / "checkpoint-epoch2.pth", map_location="cpu",
                       weights_only=True)
    model = build.build_model(state["config"])
    model.load_state_dict(state["model"])
    model.eval()
    valid = build.build_data_loader(state["config"]).split_validation()
    assert len(valid.sampler) == N_VALID
    inputs, targets = valid.dataset.tensors()
    idx = valid.sampler.indices
    with torch.no_grad():
        f1, auroc = direct(model(inputs[idx]), targets[idx])
    metrics = metrics_of(runs / "full")[0]
    assert metrics["val_multiclass_f1_score"] == pytest.approx(f1, abs=1e-6)
    assert metrics["val_auroc"] == pytest.approx(auroc, abs=1e-6)


def test_rank_0_scores_the_test_split_alone_at_the_end(runs):
    """After training, rank 0 alone evaluates model_best.pth: a torchmetrics sync there would wait forever."""
    scores = json.loads((runs / "full" / "models" / NAME / "full" / "model_best.test.json").read_text())
    assert scores["n_samples"] == N_TEST and 0 < scores["auroc"] <= 1 and 0 <= scores["multiclass_f1_score"] <= 1


def test_a_mid_epoch_resume_under_two_processes_ends_with_the_same_values(runs):
    state = torch.load(runs / "mid" / "models" / NAME / "mid" / "last.pth", map_location="cpu", weights_only=True)
    assert state["batch_in_epoch"] == 6
    # The state of both processes' 6 batches was saved (8 samples each).
    assert state["train_epoch_metrics"]["auroc"]["states"]["preds"][0].shape == (WORLD * 6 * 8, 3)
    full, resumed = metrics_of(runs / "full")[0], metrics_of(runs / "mid")[0]
    for key in KEYS + ["loss", "accuracy", "val_loss"]:
        assert resumed[key] == full[key], key
    assert [len(r) for r in records_of(runs / "mid")] == [BATCHES - 6] * WORLD  # it trained only the rest


def test_a_resume_after_the_epochs_last_batch_computes_on_every_process(runs):
    """Resumed after the last batch, no process trains a batch: rank 1's AUROC scores are empty, and must still
    gather with rank 0's saved ones (an empty list state of another shape aborts gloo)."""
    state = torch.load(runs / "edge_resumed" / "models" / NAME / "edge_resumed" / "last.pth", map_location="cpu",
                       weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"]) == (0, BATCHES)
    edge, resumed = metrics_of(runs / "edge"), metrics_of(runs / "edge_resumed")
    assert resumed[0] == resumed[1]
    for key in KEYS + ["loss", "accuracy"]:
        assert resumed[0][key] == edge[0][key], key
    assert [len(r) for r in records_of(runs / "edge_resumed")] == [0] * WORLD


def test_the_confusion_matrix_image_is_logged_once_per_validation_by_rank_0(runs):
    pytest.importorskip("parts.confusion")
    from tensorboard.backend.event_processing import event_accumulator

    log_dir = runs / "full" / "log" / NAME / "full"
    assert len(list(log_dir.glob("events.out.tfevents*"))) == 1
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("val/confusion_matrix")
    assert [im.step for im in images] == [BATCHES, 2 * BATCHES]
    drawn = [json.loads(Path(f"{runs / 'full'}.rank{r}.drawn.json").read_text()) for r in range(WORLD)]
    assert drawn == [[N_VALID, N_VALID], []]  # both shards' samples (17 + 16), drawn by rank 0 alone
