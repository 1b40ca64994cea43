"""Shared fixtures: a tiny CPU config that the end-to-end, resume and control tests build on; the torchrun launcher."""

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def make_config(save_dir, **trainer):
    """A run that trains in well under a second: an MLP on 256 seeded synthetic samples."""
    return {
        "name": "tiny",
        "seed": 0,
        "device": "cpu",
        "arch": {"type": "MLP", "args": {"input_size": 16, "hidden_sizes": [16], "num_classes": 3, "dropout": 0.2}},
        "data_loader": {
            "type": "SyntheticDataLoader",
            "args": {"num_samples": 320, "input_shape": [1, 4, 4], "num_classes": 3, "batch_size": 16,
                     "validation_split": 0.2, "shuffle": True},
        },
        "optimizer": {"type": "SGD", "args": {"lr": 0.1, "momentum": 0.9}},
        "lr_scheduler": {"type": "StepLR", "args": {"step_size": 1, "gamma": 0.9}},
        "loss": "logsumexp_cross_entropy",
        "metrics": ["accuracy"],
        "trainer": {"epochs": 2, "save_dir": str(save_dir), "verbosity": 0, "monitor": "min val_loss",
                    "tensorboard": False, **trainer},
    }


@pytest.fixture
def tiny_config(tmp_path):
    return make_config(tmp_path / "saved")


@pytest.fixture(autouse=True)
def _one_thread():
    # Two cores: one intra-op thread keeps the tests' timings steady and results reproducible.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def with_changes(config, **dotted):
    """A copy of ``config`` with ``{"a__b": v}`` meaning ``config["a"]["b"] = v``."""
    config = copy.deepcopy(config)
    for key, value in dotted.items():
        node, *path = [config, *key.split("__")]
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return config


@pytest.fixture(scope="session")
def example_data(tmp_path_factory):
    """The own-data examples of ``tools/make_example_data.py`` (image folders, CSV tables), made once per session."""
    from tools import make_example_data

    out = tmp_path_factory.mktemp("example")
    make_example_data.main(["--out", str(out)])
    return out


def example_config(name, example_data, save_dir, *overrides):
    """``configs/<name>.json`` (``image_folder`` or ``csv``) on the example data, quiet, on the CPU, saving in ``save_dir``."""
    from pathlib import Path

    from utils.config import apply_overrides, load_config

    where = [f"data_loader.args.data_dir={example_data / 'example_images'}",
             f"data_loader.args.cache_dir={save_dir / 'cache'}"] if name == "image_folder" else \
        [f"data_loader.args.path={example_data / 'example_table.csv'}"]
    root = Path(__file__).resolve().parents[1]
    return apply_overrides(load_config(root / f"configs/{name}.json"),
                           [f"trainer.save_dir={save_dir}", "trainer.verbosity=0", "trainer.tensorboard=false",
                            "device=cpu", *where, *overrides])



def assert_example_config_builds(name, key, shipped, example_data, save_dir):
    """``configs/<name>.json`` names ``shipped`` (what tools/make_example_data.py writes) in ``data_loader.args.<key>``,
    and on the example data builds a loader and a model whose outputs fit the batch and the classes."""
    from trainer import build
    from utils.config import validate_config

    root = Path(__file__).resolve().parents[1]
    assert json.loads((root / f"configs/{name}.json").read_text())["data_loader"]["args"][key] == shipped
    config = validate_config(example_config(name, example_data, save_dir), build.registries())
    loader, model = build.build_data_loader(config), build.build_model(config)
    x, y = next(iter(loader))
    assert model(x).shape == (len(y), len(loader.class_names))


def batches(loader, epoch, start=0):
    """Every batch of ``epoch`` from batch ``start`` on, copied."""
    loader.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b) and len(a) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)

def write_image(path, size, mode="RGB", seed=0):
    """A random-noise image of ``size`` (width, height) saved at ``path`` (PNG or JPEG by its suffix)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels if channels == 3 else pixels[..., 0], mode).save(path)


def make_folder(root, counts=None, seed=0):
    """Image files in class folders: cat (RGB PNG), dog (RGB JPEG), owl (greyscale PNG), of odd sizes."""
    from pathlib import Path

    counts = counts or {"cat": 10, "dog": 10, "owl": 10}
    kinds = {"cat": ("RGB", "png"), "dog": ("RGB", "jpg"), "owl": ("L", "png")}
    for c, (name, count) in enumerate(counts.items()):
        mode, ext = kinds.get(name, ("RGB", "png"))
        for i in range(count):
            write_image(Path(root) / name / f"{i:02d}.{ext}", (13 + i % 5, 11 + 2 * (i % 3)), mode, seed=seed * 1000 + c * 100 + i)
    return Path(root)


def assert_run_keeps_pinned(name, pinned, example_data, tmp_path):
    """``configs/<name>.json`` trains, keeps the ``pinned`` data arguments (class order, scaling) in its saved config
    and checkpoints, is evaluated from the checkpoint's own config, and resumes from the user's original file."""
    import json

    from trainer import cli, run

    config = example_config(name, example_data, tmp_path / "saved", "trainer.epochs=2", "trainer.save_period=1")
    metrics = run.train(config, run_id="r")
    folder = tmp_path / "saved/models" / config["name"] / "r"
    saved_args = json.loads((folder / "config.json").read_text())["data_loader"]["args"]
    assert pinned <= set(saved_args)
    state = torch.load(folder / "checkpoint-epoch2.pth", weights_only=True)
    assert state["config"]["data_loader"]["args"]["class_names"] == saved_args["class_names"]
    assert len(saved_args["class_names"]) == 3
    assert metrics["epoch"] == 2
    scores = run.evaluate_checkpoint(folder / "model_best.pth")  # rebuilt from the checkpoint's own config
    assert scores["n_samples"] > 0 and 0 <= scores["accuracy"] <= 1
    # The user's own file does not list the pinned arguments: resuming with it is no change of the data.
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    assert cli.train_command(["-c", str(path), "-r", str(folder / "checkpoint-epoch2.pth"), "trainer.epochs=3"]) == 0
    assert (folder / "checkpoint-epoch3.pth").is_file()


def assert_states_identical(a, b):
    """Model and optimizer state bit-identical (torch.equal, not allclose)."""
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for index in sa:
        for name, value in sa[index].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[index][name])), (index, name)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["global_step"] == b["global_step"]


def run_folder(config, run_id):
    """The checkpoint folder of run ``run_id`` of ``config``."""
    return Path(config["trainer"]["save_dir"]) / "models" / config["name"] / run_id


def stopped_and_resumed(interrupt_at_step, config, at_step, where, final):
    """Train ``config`` as run "cut", stopped by a SIGTERM inside optimizer step ``at_step`` (``interrupt_at_step``:
    the fixture); check that it exits as a scheduler's stop and that last.pth is at ``where``, ``(epoch,
    batch_in_epoch, global_step)``; resume from it to the end and return the state saved as ``final``."""
    from base.base_trainer import RunStopped
    from trainer import run

    interrupt_at_step(at_step, signal.SIGTERM)
    with pytest.raises(RunStopped) as stopped:
        run.train(copy.deepcopy(config), run_id="cut")
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    folder = run_folder(config, "cut")
    last = torch.load(folder / "last.pth", weights_only=True)
    assert (last["epoch"], last["batch_in_epoch"], last["global_step"]) == where
    run.train(None, resume=folder / "last.pth")
    return torch.load(folder / final, weights_only=True)


@pytest.fixture
def steps():
    """The parameters after every optimizer step, as one flat tensor each."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    seen = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: seen.append(
        torch.cat([p.detach().flatten().clone() for g in opt.param_groups for p in g["params"]])))
    yield seen
    handle.remove()


@pytest.fixture
def interrupt_at_step():
    """Send this process SIGINT from inside optimizer step ``n`` (``interrupt_at_step(n)``), as a Ctrl-C would arrive;
    ``interrupt_at_step(n, signal.SIGTERM)``: a scheduler's stop."""
    import os
    import signal

    from torch.optim.optimizer import register_optimizer_step_post_hook

    handles = []

    def arm(n, sig=signal.SIGINT):
        count = [0]

        def hook(opt, args, kwargs):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), sig)

        handles.append(register_optimizer_step_post_hook(hook))

    yield arm
    for handle in handles:
        handle.remove()


def add_hooks(*hooks):
    """Every Trainer built from now on runs ``hooks`` too, after its own; returns the function that undoes this.

    (trainer.trainer looks ``hooks_for`` up when a Trainer is built: a torchrun driver can call this too.)
    """
    import trainer.trainer as module

    original = module.hooks_for
    module.hooks_for = lambda *args: [*original(*args), *hooks]
    return lambda: setattr(module, "hooks_for", original)


def save_last_hook(every):
    """A hook writing a resumable ``last.pth`` every ``every`` optimizer steps of a run that goes on, through the core's
    ``save_resumable``: what the core's tests need of a mid-epoch checkpoint (a crash or a kill after it, a resume
    from it), without an optional part's config key."""
    from base.base_hook import Hook

    class SaveLast(Hook):
        def after_step(self, trainer, epoch, batch_idx):
            if trainer.global_step % every == 0:
                trainer.save_resumable("last.pth")

    return SaveLast()


@pytest.fixture
def save_last_every():
    """``save_last_every(n)``: the runs of this test write a resumable ``last.pth`` every ``n`` optimizer steps."""
    undo = []
    yield lambda n: undo.append(add_hooks(save_last_hook(n)))
    for function in reversed(undo):
        function()


class FixedLogits(torch.nn.Module):
    """A stand-in model: returns the stored logits of the samples whose indices it is given."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, index):
        return self.logits[index]


# ---------------------------------------------------------------- torchrun: every launch of the suite

REPO = Path(__file__).resolve().parents[1]


def _descendants(pid):
    """The ids of every process below ``pid`` (children, grandchildren, ...), from /proc; empty where there is none."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid):
    """SIGKILL ``pid`` and every process below it."""
    for victim in [pid, *_descendants(pid)]:  # listed before any dies: an orphan loses its link to the tree
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Torchrun:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2``: the one way the tests launch torchrun.

    The workers run on the CPU (gloo) with one thread each and import the repository (``PYTHONPATH``); no
    variable of an enclosing launch (``RANK``, ``MASTER_PORT``, ...) reaches them. A script is the ``Path`` of
    one, or a driver's source (``{repo}`` standing for the repository root), then written to ``driver.py`` in
    ``cwd``. A launch still running after ``timeout`` seconds is killed with its workers (each in a session of
    its own, holding the output pipes) and fails its test with its output so far, instead of hanging the suite.
    """

    nproc = 2
    timeout = 300  # s: a launch takes 12-27 s on two busy cores
    _inherited = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")

    def command(self, cwd, script, *args, nproc=None, torchrun_args=()):
        if not isinstance(script, Path):
            source, script = script, Path(cwd) / "driver.py"
            script.write_text(source.format(repo=str(REPO)))
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc or self.nproc}", *torchrun_args, str(script), *map(str, args)]

    def environment(self, env=None):
        environ = {k: v for k, v in os.environ.items() if k not in self._inherited}
        environ.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **(env or {}))
        return environ

    @contextlib.contextmanager
    def start(self, cwd, script, *args, nproc=None, torchrun_args=(), env=None, **popen):
        """A launch under way: its ``subprocess.Popen`` (``popen``: the options of that), killed with its workers
        when the ``with`` block ends if it is still running then."""
        cmd = self.command(cwd, script, *args, nproc=nproc, torchrun_args=torchrun_args)
        with subprocess.Popen(cmd, cwd=cwd, env=self.environment(env), **popen) as proc:
            try:
                yield proc
            finally:
                if proc.poll() is None:
                    kill_tree(proc.pid)

    def __call__(self, cwd, script, *args, label=None, check=False, timeout=None, **options):
        """A launch run to its end: its ``subprocess.CompletedProcess``, with ``output`` (stdout + stderr).

        ``check``: fail unless it exits with 0, the message naming ``label``. ``options``: ``nproc``,
        ``torchrun_args`` (``["--max-restarts=2"]``), ``env`` (variables added for the workers)."""
        limit, name = timeout or self.timeout, f"torchrun ({label})" if label else "torchrun"
        with self.start(cwd, script, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        **options) as proc:
            try:
                out, err = proc.communicate(timeout=limit)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                try:
                    out, err = proc.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    out, err = "", "(no output: a process still held the pipes)"
                pytest.fail(f"{name} ran past {limit} s and was killed with its workers; its output:\n"
                            f"{(out + err)[-6000:]}")
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        done.output = out + err
        if check:
            assert done.returncode == 0, f"{name} exited with {done.returncode}:\n{done.output[-6000:]}"
        return done

    def jobs(self, cwd, driver, jobs, label, **options):
        """``driver`` run on ``jobs``, a list written to ``<label>.jobs.json`` in ``cwd`` (its one argument)."""
        spec = Path(cwd) / f"{label}.jobs.json"
        spec.write_text(json.dumps(jobs))
        return self(cwd, driver, spec, label=label, **options)


@pytest.fixture(scope="session")
def torchrun():
    """The launcher of every torchrun launch (see ``Torchrun``): session-wide, so that a module-scoped fixture can
    share one launch among many tests."""
    return Torchrun()
