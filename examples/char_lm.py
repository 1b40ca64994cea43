"""A character-level language model on English that ships with Python: the standard library's docstrings, split by
module into training, validation and test text. A GRU predicts the next character at every position; the loss and
``bits_per_char`` are per character, and a text sample is logged after each epoch::

    python train.py -c configs/examples/char_lm.json
"""

import ast
import functools
import math
import sysconfig
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from base.base_data_loader import BaseDataLoader
from base.base_hook import Hook
from base.base_task import Task

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # fixed (a config alone rebuilds it): 96 characters
INDEX = {c: i for i, c in enumerate(VOCAB)}
# Pure-Python modules, about 340 KB of docstrings on Python 3.11; one missing on a Python is skipped.
MODULES = ("argparse ast base64 bdb calendar cmd code codecs configparser contextlib dataclasses datetime dis enum"
           " fileinput fractions ftplib functools gzip heapq locale mimetypes numbers optparse os pickle pickletools"
           " pkgutil platform poplib queue random selectors shelve shutil socket socketserver statistics tempfile"
           " textwrap threading timeit tokenize traceback uuid wave zipfile").split()


@functools.lru_cache(maxsize=None)  # (parsed once per process: a test trains, resumes and scores several times)
def docstrings(module):
    """The module's, its classes' and its functions' docstrings, in file order, as printable ASCII."""
    path = Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py"
    if not path.is_file():
        return ""
    nodes = ast.walk(ast.parse(path.read_text(encoding="utf-8")))
    docs = [ast.get_docstring(n) for n in nodes if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
    return "".join(c for c in "\n\n".join(filter(None, docs)) if c in INDEX)


def split_of(module, validation, test):
    """"train", "valid" or "test": where a hash of the name (the same on every machine and run) puts ``module``."""
    h = zlib.crc32(module.encode()) / 2**32
    return "test" if h < test else "valid" if h < test + validation else "train"


class Windows(Dataset):
    """Windows of ``seq_len`` characters of each group of modules' text in turn, with the next character at every
    position: two ``(N, seq_len)`` int64 tensors, which the loader batches by indexing them."""

    def __init__(self, groups, seq_len):
        ids = [torch.tensor([INDEX[c] for c in "\n\n".join(filter(None, map(docstrings, modules)))], dtype=torch.long)
               for modules in groups]
        self.sizes = [max(len(i) - 1, 0) // seq_len for i in ids]
        self.inputs = torch.cat([i[:n * seq_len].view(n, seq_len) for i, n in zip(ids, self.sizes)])
        self.targets = torch.cat([i[1:n * seq_len + 1].view(n, seq_len) for i, n in zip(ids, self.sizes)])

    def tensors(self):
        return self.inputs, self.targets

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, i):
        return self.inputs[i], self.targets[i]


class DocstringLoader(BaseDataLoader):
    """Training windows, and validation ones of other modules (``validation_split``, ``test_split``: the share of the
    modules each holds); ``training=False``: the test modules'."""

    def __init__(self, batch_size=32, seq_len=64, shuffle=True, validation_split=0.06, test_split=0.06, seed=0,
                 training=True):
        split = {m: split_of(m, validation_split, test_split) for m in MODULES}
        names = ["train", "valid"] if training else ["test"]
        data = Windows([[m for m in MODULES if split[m] == name] for name in names], seq_len)
        n = data.sizes[0]
        super().__init__(data, batch_size, shuffle and training, seed=seed, indices=torch.arange(n))
        self.valid_idx = torch.arange(n, len(data)) if len(data) > n else None  # the validation windows, last


class CharGRU(torch.nn.Module):
    """Embedding -> GRU -> a linear layer: logits ``(N, T, vocab_size)`` for characters ``(N, T)``."""

    def __init__(self, vocab_size=len(VOCAB), embed=64, hidden=128, layers=1):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, embed)
        self.gru = torch.nn.GRU(embed, hidden, layers, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab_size)

    def forward(self, x):
        return self.head(self.gru(self.embed(x))[0])


def bits_per_char(output, target):
    """The cross-entropy in bits (the loss is in nats): 0 is certainty, log2(96) = 6.58 a uniform guess."""
    return F.cross_entropy(output, target) / math.log(2)


class NextCharTask(Task):
    """Every position predicts the next character: logits and targets flattened to ``(N*T, V)`` and ``(N*T,)``, so
    the loss and the metrics are per character and an epoch weighs a batch by its characters."""

    def __init__(self, prompt="Return the ", sample_chars=80):
        super().__init__()
        self.prompt, self.sample_chars = prompt, sample_chars

    def step(self, model, batch, criterion):
        output, target = model(batch[0]).flatten(0, 1), batch[1].flatten()
        return criterion(output, target), output, target

    def hooks(self, config, parts, run):
        return [SampleText(self.prompt, self.sample_chars, config["data_loader"]["args"].get("seq_len", 64))]


class SampleText(Hook):
    """After each epoch, ``chars`` characters sampled after ``prompt`` in the log. The draws come from a generator
    of its own, seeded by the epoch: the run's random state is untouched, so a resumed run stays exact."""

    def __init__(self, prompt, chars, context):
        self.prompt, self.chars, self.context = prompt, chars, context

    @torch.no_grad()
    def after_epoch(self, trainer, epoch, result):
        if not trainer.is_main:
            return
        model, generator, was_training = trainer.model, torch.Generator().manual_seed(epoch), trainer.model.training
        model.eval()
        ids = [INDEX[c] for c in self.prompt if c in INDEX]
        for _ in range(self.chars):
            x = torch.tensor([ids[-self.context:]], device=trainer.device)
            probs = torch.softmax(model(x)[0, -1].float(), dim=0).cpu()
            ids.append(int(torch.multinomial(probs, 1, generator=generator)))
        model.train(was_training)
        trainer.logger.info(f"sample after epoch {epoch}: {''.join(VOCAB[i] for i in ids)!r}")
