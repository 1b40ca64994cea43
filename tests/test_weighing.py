"""Counting ignored targets only where the data can hold one (trainer.trainer.weighing).

Accuracy and the class-index losses weigh each batch by its targets that are not ``ignore_index``.
Most data holds no such target, and then every weight is the sample count: the trainer asks the
data once and skips the per-batch counting, with the same results to the bit.
"""

import functools

import torch

from base.base_data_loader import BaseDataLoader
from model.loss import cross_entropy
from model.metric import accuracy, top_k_acc
from tests.conftest import assert_states_identical, make_config
from trainer import run
from trainer.trainer import weighing


class Pairs(torch.utils.data.Dataset):
    def __init__(self, targets, offer_tensors=True):
        self.inputs, self.targets = torch.randn(len(targets), 4), torch.as_tensor(targets)
        if offer_tensors:
            self.tensors = lambda: (self.inputs, self.targets)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.inputs[i], self.targets[i]


def fast_variant(fn):
    """The variant :func:`weighing` gives a built-in metric on data holding no ignored target."""
    return weighing(cross_entropy, [fn], BaseDataLoader(Pairs([0, 1]), batch_size=2))[0][0]


def test_the_data_says_once_whether_it_holds_a_target():
    clean = BaseDataLoader(Pairs([0, 1, 2, 1]), batch_size=2, validation_split=0.5)
    assert clean.holds_target(-100) is False and clean.holds_target(2) is True
    assert clean.split_validation().holds_target(-100) is False
    assert BaseDataLoader(Pairs([0, -100, 2, 1]), batch_size=2).holds_target(-100) is True
    # Targets it cannot see without reading every sample, and targets that are not class indices: not known.
    assert BaseDataLoader(Pairs([0, 1], offer_tensors=False), batch_size=2).holds_target(-100) is None
    assert BaseDataLoader(Pairs([0.5, 1.5]), batch_size=2).holds_target(-100) is None


def test_weighing_skips_the_counts_only_where_every_target_is_kept():
    clean = BaseDataLoader(Pairs([0, 1, 2, 1]), batch_size=2)
    fns, weighed = weighing(cross_entropy, [accuracy, top_k_acc], clean)
    assert fast_variant(accuracy) is not accuracy and fast_variant(top_k_acc) is not top_k_acc
    assert weighed is None and fns == [fast_variant(accuracy), fast_variant(top_k_acc)]
    assert [fn.__name__ for fn in fns] == ["accuracy", "top_k_acc"]  # logged under the same names

    ignored = BaseDataLoader(Pairs([0, -100, 2, 1]), batch_size=2)
    fns, weighed = weighing(cross_entropy, [accuracy], ignored)
    assert fns == [accuracy] and weighed == [cross_entropy, accuracy]

    # A class weight makes the loss weigh itself; accuracy on clean data still takes its variant.
    weighted = functools.partial(cross_entropy, weight=torch.tensor([1.0, 2.0, 1.0]))
    fns, weighed = weighing(weighted, [accuracy], clean)
    assert fns == [fast_variant(accuracy)] and weighed == [weighted, fast_variant(accuracy)]

    # The loss ignoring a class the data holds (0 here) is counted per batch.
    fns, weighed = weighing(functools.partial(cross_entropy, ignore_index=0), [accuracy], clean)
    assert weighed is not None and fns == [fast_variant(accuracy)]


def test_the_variants_give_the_values_of_the_full_metrics():
    torch.manual_seed(0)
    output, target = torch.randn(37, 5), torch.randint(0, 5, (37,))
    assert torch.equal(fast_variant(accuracy)(output, target), accuracy(output, target))
    assert torch.equal(fast_variant(top_k_acc)(output, target, k=2), top_k_acc(output, target, k=2))


def test_a_run_without_the_counts_matches_one_with_them_bit_for_bit(tmp_path, monkeypatch):
    config = make_config(tmp_path / "saved", epochs=2)
    config["metrics"] = ["accuracy", "top_k_acc"]
    fast = run.train(config, run_id="fast")

    calls = []
    monkeypatch.setattr(BaseDataLoader, "holds_target", lambda self, value: calls.append(value))  # not known
    slow = run.train(make_config(tmp_path / "saved", epochs=2) | {"metrics": ["accuracy", "top_k_acc"]}, run_id="slow")
    assert calls, "the slow run did not ask the data"
    assert fast == slow  # every epoch value (loss, accuracy, top-k, validation) to the bit
    folder = tmp_path / "saved/models/tiny"
    assert_states_identical(torch.load(folder / "fast/checkpoint-epoch2.pth", weights_only=True),
                            torch.load(folder / "slow/checkpoint-epoch2.pth", weights_only=True))
