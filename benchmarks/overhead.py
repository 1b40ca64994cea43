"""What the project's Trainer costs over a bare hand-written training loop.

    python benchmarks/overhead.py            # the full run (about 3 minutes on 2 CPU cores)
    python benchmarks/overhead.py --smoke    # a few steps, tiny data, one round: checks it runs
    python benchmarks/overhead.py --profile mlp   # also: cProfile of a trainer epoch and a bare epoch

Both sides train the same model (same initial weights) on the same in-memory data with
the same batch size, loss and optimizer, in one process. The bare loop is zero_grad,
forward, loss, backward, step over batches indexed from the data tensors in a fresh
random order, nothing else. The Trainer runs with its defaults on: a progress bar
(tqdm, shown in a real pseudo-terminal: under a pipe tqdm turns itself off, so that
case, "trainer, no TTY", is measured too), the accuracy metric on every step,
TensorBoard (a real SummaryWriter into a temporary folder) and a debug log line at the
default logging interval (``log_every_n_steps`` 50). Validation and checkpoints are out
of both sides: the benchmark calls ``Trainer.train_epoch`` itself, and a step's time is
an epoch's time over its number of steps.

Timings vary ~20% between runs (more on a machine shared with other work), so the two
sides are interleaved finely, in one process: a round is one Trainer epoch (469 steps
for the MLP) during which, every ``every`` batches (25 for the MLP), the Trainer's data
loader hands control to ``every`` steps of the bare loop, timed apart (a wrapper around
the loader; the Trainer iterates it as it iterates the loader). The bare chunks' time
is taken out of the epoch's; what remains, epoch start and end included, is the
Trainer's. Per round this gives one paired ratio (Trainer step time / bare step time,
both over the same 469 steps, measured within the same ~2 seconds); the ratio reported
is the median over rounds ("ratio paired"), with the ratio of medians and of minima,
the same in process CPU time ("CPU ratio"), and the median over every pair of
neighbouring stretches (Trainer's 25 steps / the bare loop's 25 steps right after them:
the steady state, without epoch start and end; "steady ratio"). The sides measured this
way alternate between rounds: the Trainer with its progress bar on, with it off, and an
A/A control, the bare loop's own five lines over the Trainer's loader on another copy of
the model, driven through the same harness: its ratio (ideally 1.000) shows the harness's
bias and noise on the machine at the time. (It showed that chunks of 5 LeNet steps
favoured the side under test by 4-13%; with chunks of 25 steps it is within noise.) Python calls per step are
counted with ``sys.setprofile`` ("call" events: Python functions, a generator's
resumption counting as one; "c_call" events, built-in functions called from Python, are
reported beside them) over epochs of two lengths (50 and 150 steps: one and three
logging steps); the slope between them is the per-step count, so set-up and epoch-end
work cancel.

The CPU workloads run with ``torch.set_num_threads(1)``: on a 2-core machine intra-op
threads make step times depend on what else the OS schedules, and one thread makes
repeated runs agree (it is also how the reference figures were taken).

Workloads: a tiny MLP (784-256-10, 60,000 MNIST-shaped samples, Adam, batch 128; the
per-step overhead dominates), a LeNet-style CNN (``model.builtin.LeNet`` on 28x28; compute
dominates) and, where CUDA is available, torchvision's ResNet-18 on CIFAR-shaped data
with bf16 autocast and channels_last, eager and under torch.compile.
Results: a table on stdout and ``benchmarks/results/overhead.json``.
"""

from __future__ import annotations

import contextlib
import copy
import cProfile
import functools
import gc
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C

CUDA_SKIPPED = "CUDA not available: ResNet-18 workload skipped"

# Targets from the issue: time ratio trainer/bare per workload, and calls per step.
TIME_TARGETS = {"mlp": 1.05, "lenet": 1.02}
CALLS_TARGET = 1.5

# The CPU workloads; "every": bare-loop steps per interleaved chunk; "count_steps": the two epoch lengths of the call count.
CPU_WORKLOADS = {
    "mlp": {
        "description": "MLP 784-256-10, 60,000 MNIST-shaped samples, Adam, batch 128, CPU, 1 thread",
        "arch": {"type": "MLP", "args": {"input_size": 784, "hidden_sizes": [256], "num_classes": 10}},
        "input_shape": [1, 28, 28],
        "train_samples": 60_000,
        "smoke_samples": 128 * 12,
        "batch_size": 128,
        "rounds": 10,
        "every": 25,
        "count_steps": (50, 150),
    },
    "lenet": {
        "description": "LeNet on 28x28, 12,800 MNIST-shaped samples (100 steps an epoch), Adam, batch 128, CPU, 1 thread",
        "arch": {"type": "LeNet", "args": {"num_classes": 10}},
        "input_shape": [1, 28, 28],
        "train_samples": 12_800,
        "smoke_samples": 128 * 6,
        "batch_size": 128,
        "rounds": 8,
        "every": 25,
        "count_steps": (50, 150),
    },
}

RESNET = {
    "description": "torchvision ResNet-18 (num_classes=10) on 25,600 CIFAR-shaped samples, data on the GPU, "
                   "SGD, batch 256, bf16 autocast, channels_last",
    "arch": {"type": "torchvision.models.resnet18", "args": {"num_classes": 10}},
    "input_shape": [3, 32, 32],
    "train_samples": 25_600,
    "smoke_samples": 16 * 4,
    "batch_size": 256,
    "smoke_batch_size": 16,
    "rounds": 7,
    "every": 25,
    "count_steps": (50, 150),
}

TEST_FRACTION = 0.2  # SyntheticDataLoader holds out the last 20% as its test split


def data_args(input_shape, train_samples, batch_size, **extra):
    total = round(train_samples / (1 - TEST_FRACTION))
    assert total - round(total * TEST_FRACTION) == train_samples, train_samples
    return {"num_samples": total, "input_shape": list(input_shape), "num_classes": 10, "test_fraction": TEST_FRACTION,
            "batch_size": batch_size, "shuffle": True, "validation_split": 0, "num_workers": 0, **extra}


# --------------------------------------------------------------------------- the bare loop


class BareLoop:
    """zero_grad, forward, loss, backward, step: nothing else.

    ``inputs``/``targets`` are the training samples (the same tensors the Trainer's loader
    indexes). Each pass over them draws a fresh random order and indexes batches from it;
    :meth:`run` continues the current pass, so a pass can be run in chunks.
    """

    def __init__(self, model, optimizer, inputs, targets, batch_size, device, autocast_dtype=None, forward=None):
        import torch

        self.model, self.optimizer = model, optimizer
        self.forward = forward or model
        self.inputs, self.targets, self.batch_size = inputs, targets, batch_size
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.generator = torch.Generator().manual_seed(1)
        self.order, self.position = None, 0

    def steps_in_epoch(self):
        return -(-len(self.targets) // self.batch_size)

    def epoch(self, steps=None):
        """A fresh pass of ``steps`` steps (default: the whole data)."""
        self.order = None
        return self.run(steps or self.steps_in_epoch())

    def run(self, steps):
        """``steps`` more steps of the current pass (a new pass starts when it is used up)."""
        import torch
        import torch.nn.functional as F

        model, optimizer, forward = self.model, self.optimizer, self.forward
        inputs, targets, batch = self.inputs, self.targets, self.batch_size
        model.train()
        done = 0
        while done < steps:
            if self.order is None or self.position >= len(self.order):
                self.order = torch.randperm(len(targets), generator=self.generator).to(self.device)
                self.position = 0
            end = min(self.position + (steps - done) * batch, len(self.order))
            if self.autocast_dtype is None:
                for start in range(self.position, end, batch):
                    idx = self.order[start : start + batch]
                    x, y = inputs[idx], targets[idx]
                    optimizer.zero_grad()
                    loss = F.cross_entropy(forward(x), y)
                    loss.backward()
                    optimizer.step()
            else:
                device_type = self.device.type
                for start in range(self.position, end, batch):
                    idx = self.order[start : start + batch]
                    x, y = inputs[idx], targets[idx]
                    optimizer.zero_grad()
                    with torch.autocast(device_type, dtype=self.autocast_dtype):
                        loss = F.cross_entropy(forward(x), y)
                    loss.backward()
                    optimizer.step()
            done += -(-(end - self.position) // batch)
            self.position = end
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return steps


class LoaderLoop:
    """The A/A control: the bare loop's five lines over the Trainer's own loader, driven as the
    Trainer is (``train_epoch``), on another copy of the model. Timed through the same harness
    as the Trainer, its ratio to the bare loop shows the harness's own bias and noise (about 1.00)."""

    def __init__(self, bare, loader):
        self.bare, self.data_loader = bare, loader

    def batches_per_epoch(self):
        return len(self.data_loader)

    def train_epoch(self, epoch):
        import torch
        import torch.nn.functional as F

        bare, loader = self.bare, self.data_loader
        model, optimizer, forward = bare.model, bare.optimizer, bare.forward
        loader.set_epoch(epoch)
        model.train()
        if bare.autocast_dtype is None:
            for x, y in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(forward(x), y)
                loss.backward()
                optimizer.step()
        else:
            for x, y in loader:
                optimizer.zero_grad()
                with torch.autocast(bare.device.type, dtype=bare.autocast_dtype):
                    loss = F.cross_entropy(forward(x), y)
                loss.backward()
                optimizer.step()
        if bare.device.type == "cuda":
            torch.cuda.synchronize()


def make_bare(built, optimizer_factory, autocast_dtype=None, compile_model=False, prepare_model=None):
    """A bare loop on a copy of the Trainer's model (same initial weights) over the same training samples."""
    import torch

    from trainer import build

    model = build.build_model(built.config)
    model.load_state_dict(built.model.state_dict())
    model.to(built.device)
    if prepare_model is not None:
        prepare_model(model)
    optimizer = optimizer_factory(model.parameters())
    loader = built.loader
    inputs, targets = loader._tensors  # the loader's own tensors (on the device when device_resident)
    train_idx = loader.sampler.indices.to(inputs.device)
    forward = torch.compile(model) if compile_model else model
    return BareLoop(model, optimizer, inputs[train_idx], targets[train_idx], loader.batch_size, built.device,
                    autocast_dtype, forward)


# --------------------------------------------------------------------------- measuring one workload


class BareClock:
    """Runs and times chunks of the bare loop: wall and process CPU seconds, and steps.

    ``marks`` records, per chunk, the clocks just before and just after it, so that the
    Trainer's stretch between two chunks can be timed too.
    """

    def __init__(self, bare):
        self.bare = bare
        self.cuda = bare.device.type == "cuda"
        self.reset()

    def reset(self):
        self.wall = self.cpu = 0.0
        self.steps = 0
        self.marks = []

    def chunk(self, steps):
        if steps <= 0:
            return
        if self.cuda:
            import torch

            torch.cuda.synchronize()  # the Trainer's queued work is the Trainer's time
        c0, t0 = time.process_time(), time.perf_counter()
        self.bare.run(steps)  # ends with a synchronize on CUDA
        t1, c1 = time.perf_counter(), time.process_time()
        self.wall += t1 - t0
        self.cpu += c1 - c0
        self.steps += steps
        self.marks.append((t0, c0, t1, c1))

    def chunk_ratios(self):
        """Per pair of neighbouring stretches: (Trainer's ``every`` steps between chunks k-1 and k) / (chunk k),
        wall and CPU. Only whole stretches between two chunks: epoch start and end are not in them."""
        wall, cpu = [], []
        for (_, _, prev_t1, prev_c1), (t0, c0, t1, c1) in zip(self.marks, self.marks[1:]):
            wall.append((t0 - prev_t1) / (t1 - t0))
            cpu.append((c0 - prev_c1) / max(c1 - c0, 1e-9))
        return wall, cpu


class InterleavedLoader:
    """The Trainer's loader, unchanged, except that before every ``every``-th batch a chunk of
    ``every`` bare-loop steps runs (timed apart). The Trainer iterates it as it would the loader."""

    def __init__(self, loader, every, chunk):
        self.loader, self.every, self.chunk = loader, every, chunk

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def set_epoch(self, epoch, start_batch=0):
        self.loader.set_epoch(epoch, start_batch)

    def __iter__(self):
        every, chunk = self.every, self.chunk
        for i, batch in enumerate(self.loader):
            if i and i % every == 0:
                chunk(every)
            yield batch


class TrainerArm:
    """Runs the Trainer's ``train_epoch`` for numbered epochs (the data order changes each epoch)."""

    def __init__(self, built, trainer=None):
        self.built, self.trainer, self.epoch = built, trainer or built.trainer, 0

    def epoch_run(self, loader=None):
        trainer = self.trainer
        original = trainer.data_loader
        if loader is not None:
            trainer.data_loader = loader
        try:
            self.epoch += 1
            trainer.train_epoch(self.epoch)
            return trainer.batches_per_epoch()
        finally:
            trainer.data_loader = original

    def paired_round(self, clock, every):
        """One Trainer epoch with bare chunks interleaved; returns per-step (wall, cpu) of the Trainer and the bare loop.

        The bare loop runs as many steps as the epoch has (the rest after the epoch ends), and
        its chunks' time is taken out of the epoch's time: what is left is the Trainer's.
        """
        loader = self.built.loader
        clock.reset()
        clock.bare.order = None  # a fresh pass, as the Trainer's epoch is
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        steps = self.epoch_run(InterleavedLoader(loader, every, clock.chunk))
        t1, c1 = time.perf_counter(), time.process_time()
        trainer_wall, trainer_cpu = (t1 - t0) - clock.wall, (c1 - c0) - clock.cpu
        self.chunk_ratios = clock.chunk_ratios()  # before the catch-up chunk below
        clock.chunk(steps - clock.steps)
        assert clock.steps == steps
        return (trainer_wall / steps, trainer_cpu / steps), (clock.wall / steps, clock.cpu / steps)


def loaders_of_lengths(built, lengths):
    """Loaders built from the workload's config whose epochs are ``lengths`` batches long (for the call counts)."""
    from trainer import build

    out = {}
    for steps in lengths:
        config = copy.deepcopy(built.config)
        args = config["data_loader"]["args"]
        args.update(data_args(args["input_shape"], steps * args["batch_size"], args["batch_size"],
                              device_resident=args.get("device_resident", False)))
        loader = build.build_data_loader(config)
        assert len(loader) == steps
        out[steps] = loader.to(built.device)
    return out


def measure(name, built, bare, rounds, every, count_steps, log, no_tty_arm=True, prepare_loader=None, control=None,
            other=None):
    """Time the Trainer against the bare loop, interleaved, then count calls per step; returns the results.

    ``control``: a second bare loop (another model copy) run as the A/A control side.
    ``other``: a second built Trainer (another ``trainer.loggers``, say) run as side ``trainer_b`` in
    the same rounds, so that the two Trainers' ratios to the bare loop are paired round by round.
    """
    arm = TrainerArm(built)
    clock = BareClock(bare)
    null = open(os.devnull, "w")  # noqa: SIM115 - closed at the end of this function
    not_a_tty = functools.partial(contextlib.redirect_stderr, null)  # tqdm disables itself
    sides = {"trainer": (arm, contextlib.nullcontext)}
    if no_tty_arm:
        sides["trainer_no_tty"] = (arm, not_a_tty)
    if other is not None:
        sides["trainer_b"] = (TrainerArm(other), contextlib.nullcontext)
    if control is not None:
        sides["control"] = (TrainerArm(built, LoaderLoop(control, built.loader)), contextlib.nullcontext)
    trainer_sides = [side for side in sides if side != "control"]

    log(f"{name}: warm-up")
    for side_arm, context in sides.values():
        with context():
            side_arm.paired_round(clock, every)
    log(f"{name}: {rounds} rounds; each is, per side, one epoch of {len(built.loader)} steps "
        f"with the bare loop's steps interleaved {every} at a time")
    samples = {side: {"wall": [], "cpu": []} for side in ["bare", *sides]}
    pairs = {side: {"wall": [], "cpu": []} for side in sides}  # the bare samples taken alongside each side
    chunks = {side: {"wall": [], "cpu": []} for side in sides}  # per-stretch ratios, steady state
    for r in range(rounds):
        names = list(sides)
        order = names[r % len(names):] + names[: r % len(names)]
        line = []
        for side in order:
            side_arm, context = sides[side]
            with context():
                mine, theirs = side_arm.paired_round(clock, every)
            for i, clock_name in enumerate(("wall", "cpu")):
                samples[side][clock_name].append(mine[i])
                samples["bare"][clock_name].append(theirs[i])
                pairs[side][clock_name].append(theirs[i])
                chunks[side][clock_name].extend(side_arm.chunk_ratios[i])
            line.append(f"{side} {mine[0] * 1e3:.3f} ms vs bare {theirs[0] * 1e3:.3f} ms ({mine[0] / theirs[0]:.3f}x)")
        log(f"  round {r + 1}/{rounds}: " + "; ".join(line))

    log(f"{name}: counting calls per step over epochs of {count_steps[0]} and {count_steps[1]} steps")
    loaders = loaders_of_lengths(built, count_steps)
    if prepare_loader is not None:
        for loader in loaders.values():
            prepare_loader(loader)
    calls = {"bare": C.calls_per_step(lambda n: bare.epoch(n), *count_steps)}
    for side in trainer_sides:
        side_arm, context = sides[side]

        def run(n, side_arm=side_arm, context=context):
            with context():
                return side_arm.epoch_run(loaders[n])
        calls[side] = C.calls_per_step(run, *count_steps)
    null.close()

    result = {
        "steps_per_epoch": len(built.loader),
        "batch_size": built.loader.batch_size,
        "rounds": rounds,
        "interleave_every": every,
        "step_time": {side: {clock_name: C.summary(v) for clock_name, v in samples[side].items()} for side in samples},
        "time_ratio": {
            side: {c: C.paired_ratio(samples[side][c], pairs[side][c]) for c in ("wall", "cpu")} for side in sides
        },
        "chunk_time_ratio": {
            side: {c: {"median": statistics.median(v) if v else None, "count": len(v)} for c, v in chunks[side].items()}
            for side in sides
        },
        "calls": calls,
        **({"b_over_a": _b_over_a(samples, pairs)} if other is not None else {}),
        "calls_ratio": {side: calls[side]["per_step"]["call"] / calls["bare"]["per_step"]["call"] for side in trainer_sides},
        "calls_total_ratio": {
            side: calls[side]["per_step"]["total"] / calls["bare"]["per_step"]["total"] for side in trainer_sides
        },
    }
    target = TIME_TARGETS.get(name)
    result["targets"] = {"time_ratio": target, "calls_ratio": CALLS_TARGET}
    result["within_targets"] = {
        side: {
            "time": None if target is None else result["time_ratio"][side]["wall"]["median_of_paired"] <= target,
            "time_cpu": None if target is None else result["time_ratio"][side]["cpu"]["median_of_paired"] <= target,
            "calls": result["calls_ratio"][side] <= CALLS_TARGET,
        }
        for side in trainer_sides
    }
    return result


def _b_over_a(samples, pairs):
    """Side ``trainer_b`` against side ``trainer``: the median over rounds of (b / its bare) / (a / its bare)."""
    out = {}
    for clock_name in ("wall", "cpu"):
        a = [m / t for m, t in zip(samples["trainer"][clock_name], pairs["trainer"][clock_name])]
        b = [m / t for m, t in zip(samples["trainer_b"][clock_name], pairs["trainer_b"][clock_name])]
        out[clock_name] = statistics.median(y / x for x, y in zip(a, b))
    return out


def ema_cost(name, bare, rounds, chunk, log, decay=0.999):
    """What ``trainer.ema`` (updated every step) adds per step: the bare loop with and without the EMA update
    (parts/ema.py's ``EMA``, one ``torch._foreach_lerp_`` over all weights) registered on its optimizer, in
    alternating chunks of ``chunk`` steps; and the update alone, timed over as many calls."""
    import torch

    try:
        from parts.ema import EMA
    except ImportError:  # the EMA part was deleted from this project
        log(f"{name}: EMA cost skipped: the ema part (parts/ema.py) is not in this project")
        return None
    # The average follows the bare loop's weights; the optimizer given to EMA itself is never stepped.
    ema = EMA(bare.model, torch.optim.SGD(bare.model.parameters(), lr=0.0),
              {"decay": decay, "every_n_steps": 1, "warmup": 0, "buffers": True})
    times = {"plain": [], "ema": []}
    log(f"{name}: EMA cost, {rounds} rounds of {chunk} steps each way")
    for r in range(rounds + 1):  # round 0 warms up
        for side in ("plain", "ema") if r % 2 else ("ema", "plain"):
            handle = bare.optimizer.register_step_post_hook(ema._after_optimizer_step) if side == "ema" else None
            start = time.perf_counter()
            bare.run(chunk)
            elapsed = (time.perf_counter() - start) / chunk
            if handle is not None:
                handle.remove()
            if r:
                times[side].append(elapsed)
    start = time.perf_counter()
    for _ in range(chunk):
        ema._after_optimizer_step(None, (), {})
    alone = (time.perf_counter() - start) / chunk
    ratios = [e / p for e, p in zip(times["ema"], times["plain"])]
    return {"decay": decay, "step_ms_plain": statistics.median(times["plain"]) * 1e3,
            "step_ms_ema": statistics.median(times["ema"]) * 1e3, "ratio_paired": statistics.median(ratios),
            "update_ms": alone * 1e3, "tensors": len(ema._avg) + len(ema._avg_copied),
            "values": sum(t.numel() for t in ema._avg)}


LOGGERS = None  # --loggers
LOGGERS_B = None  # --ab-loggers


def cpu_workload(name, spec, smoke, save_root, log):
    import torch

    samples = spec["smoke_samples"] if smoke else spec["train_samples"]
    rounds = 1 if smoke else spec["rounds"]
    count_steps = (2, 4) if smoke else spec["count_steps"]
    config = C.base_config(
        f"overhead_{name}", spec["arch"], data_args(spec["input_shape"], samples, spec["batch_size"]),
        {"type": "Adam", "args": {"lr": 1e-3}}, save_root / name, device="cpu",
        epochs=1, save_period=10**6,  # defaults otherwise: verbosity 2, tensorboard on, log_every_n_steps 50
        **({"loggers": LOGGERS} if LOGGERS else {}),
    )
    built = C.build_trainer(config)
    other = None
    try:
        if LOGGERS_B:
            config_b = copy.deepcopy(config)
            config_b["trainer"].update(loggers=LOGGERS_B, save_dir=str(save_root / f"{name}_b"))
            other = C.build_trainer(config_b)
        bare = make_bare(built, lambda params: torch.optim.Adam(params, lr=1e-3))
        control = make_bare(built, lambda params: torch.optim.Adam(params, lr=1e-3))
        result = measure(name, built, bare, rounds, 2 if smoke else spec["every"], count_steps, log, control=control,
                         other=other)
        result["ema"] = ema_cost(name, bare, 1 if smoke else 2 * rounds, 2 if smoke else spec["every"], log)
    finally:
        built.close()
        if other is not None:
            other.close()
    result["description"] = spec["description"] if not smoke else f"{spec['description']} (smoke: {samples} samples)"
    result["device"] = "cpu"
    return result


def resnet_workloads(smoke, save_root, log, device_name="cuda", variants=("eager", "compiled"), rounds=None):
    """ResNet-18, bf16 autocast, channels_last, eager and compiled; both sides the same way.

    A variant that fails is recorded as ``{"error": ...}`` (with the traceback on stderr),
    so that the other results are still written.
    """
    import traceback

    import torch

    spec = RESNET
    samples = spec["smoke_samples"] if smoke else spec["train_samples"]
    batch = spec["smoke_batch_size"] if smoke else spec["batch_size"]
    rounds = 1 if smoke else rounds or spec["rounds"]
    count_steps = (2, 4) if smoke else spec["count_steps"]
    channels_last = torch.channels_last

    def prepare_model(model):
        model.to(memory_format=channels_last)

    def prepare_loader(loader):
        # The project has no channels_last option: store the images channels_last for both sides
        # (indexing a batch keeps the layout), so no conversion runs inside either loop.
        inputs, targets = loader._tensors
        loader._tensors = (inputs.contiguous(memory_format=channels_last), targets)

    results = {}
    for variant in variants:
        compiled = variant == "compiled"
        config = C.base_config(
            f"overhead_resnet18_{variant}", spec["arch"],
            data_args(spec["input_shape"], samples, batch, device_resident=True),
            {"type": "SGD", "args": {"lr": 0.05, "momentum": 0.9}}, save_root / f"resnet18_{variant}",
            device=device_name, epochs=1, save_period=10**6, amp="bf16", compile=compiled,
        )
        try:
            built = C.build_trainer(config, prepare_model=prepare_model)
            try:
                prepare_loader(built.loader)
                bare, control = (
                    make_bare(built, lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
                              autocast_dtype=torch.bfloat16, compile_model=compiled, prepare_model=prepare_model)
                    for _ in range(2)
                )
                result = measure(f"resnet18_{variant}", built, bare, rounds, 2 if smoke else spec["every"], count_steps,
                                 log, no_tty_arm=False, prepare_loader=prepare_loader, control=control)
            finally:
                built.close()
        except Exception as err:  # noqa: BLE001 - keep the CPU results; the error is reported
            log(traceback.format_exc())
            results[f"resnet18_{variant}"] = {"error": f"{type(err).__name__}: {err}"}
            continue
        result["description"] = spec["description"] + (", torch.compile on both sides" if compiled else ", eager")
        if smoke:
            result["description"] += f" (smoke: {samples} samples, batch {batch})"
        result["device"] = str(built.device)
        results[f"resnet18_{variant}"] = result
    return results


# --------------------------------------------------------------------------- profile (diagnosis)


def profile_workload(name, save_root, steps, out):
    """cProfile of one trainer epoch and one bare epoch of ``steps`` steps (printed, not saved)."""
    import torch

    spec = CPU_WORKLOADS[name]
    config = C.base_config(f"profile_{name}", spec["arch"], data_args(spec["input_shape"], steps * spec["batch_size"],
                           spec["batch_size"]), {"type": "Adam", "args": {"lr": 1e-3}}, save_root / f"profile_{name}",
                           device="cpu", epochs=1, save_period=10**6)
    built = C.build_trainer(config)
    try:
        bare = make_bare(built, lambda params: torch.optim.Adam(params, lr=1e-3))
        arm = TrainerArm(built)
        bare.epoch(), arm.epoch_run()  # warm-up
        profiles = {}
        for label, fn in (("bare loop", bare.epoch), ("trainer (TTY)", arm.epoch_run)):
            prof = cProfile.Profile()
            prof.enable()
            fn()
            prof.disable()
            profiles[label] = prof
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(20)
            print(f"\n==== cProfile: {name}, {label}, {steps} steps, top 20 by own time ====", file=out)
            print(text.getvalue().strip(), file=out)
        # What only the trainer runs: the project's own code, tqdm, TensorBoard and logging, by cumulative time.
        text = io.StringIO()
        stats = pstats.Stats(profiles["trainer (TTY)"], stream=text).sort_stats("cumulative")
        stats.print_stats(r"(/trainer/|/base/|/utils/|/logger/|/model/metric|/model/loss|tqdm|tensorboard|logging)", 30)
        print(f"\n==== cProfile: {name}, trainer (TTY): the template's, tqdm's, TensorBoard's and logging's functions ====",
              file=out)
        print(text.getvalue().strip(), file=out)
    finally:
        built.close()


# --------------------------------------------------------------------------- report


SIDE_LABELS = {"bare": "bare loop", "trainer": "Trainer (bar on, pty)", "trainer_no_tty": "Trainer (no TTY, bar off)",
               "control": "A/A control (bare via harness)", "trainer_b": "Trainer B (--ab-loggers)"}
HEADERS = ["workload", "side", "median ms/step", "min ms/step", "ratio paired", "ratio medians", "ratio minima",
           "CPU ratio", "steady ratio", "calls/step", "c_calls/step", "calls ratio"]


def rows_for(name, result):
    rows = []
    bare_calls = result["calls"]["bare"]["per_step"]
    for side in result["step_time"]:
        t = result["step_time"][side]["wall"]
        calls = result["calls"].get(side, {}).get("per_step")
        if side == "bare":
            ratios = ["1.000"] * 5
            calls_ratio = "1.00"
        else:
            w, c = result["time_ratio"][side]["wall"], result["time_ratio"][side]["cpu"]
            steady = result["chunk_time_ratio"][side]["wall"]["median"]
            ratios = [f"{w['median_of_paired']:.3f}", f"{w['of_medians']:.3f}", f"{w['of_minima']:.3f}",
                      f"{c['median_of_paired']:.3f}", "-" if steady is None else f"{steady:.3f}"]
            calls_ratio = f"{calls['call'] / bare_calls['call']:.2f}" if calls else "-"
        call_cells = [f"{calls['call']:.0f}", f"{calls['c_call']:.0f}"] if calls else ["-", "-"]
        rows.append([name if side == "bare" else "", SIDE_LABELS[side], C.fmt_ms(t["median_s"]), C.fmt_ms(t["min_s"]),
                     *ratios, *call_cells, calls_ratio])
    return rows


def verdicts(results):
    lines = []
    for name, result in results.items():
        if "within_targets" not in result:
            continue
        for side, ok in result["within_targets"].items():
            t = result["targets"]["time_ratio"]
            wall = result["time_ratio"][side]["wall"]["median_of_paired"]
            cpu = result["time_ratio"][side]["cpu"]["median_of_paired"]
            calls = result["calls_ratio"][side]
            if t is not None:
                head = (f"time {wall:.3f}x wall, {cpu:.3f}x CPU (target <= {t:.2f}x: "
                        f"{'OK' if ok['time'] else 'OVER'} wall, {'OK' if ok['time_cpu'] else 'OVER'} CPU)")
            else:
                head = f"time {wall:.3f}x wall, {cpu:.3f}x CPU (no target)"
            tail = f"calls {calls:.2f}x (target <= {CALLS_TARGET:.1f}x: {'OK' if ok['calls'] else 'OVER'})"
            lines.append(f"{name:17s} {SIDE_LABELS[side]:30s} {head}; {tail}")
        if "control" in result["time_ratio"]:
            c = result["time_ratio"]["control"]
            lines.append(f"{name:17s} {SIDE_LABELS['control']:30s} {c['wall']['median_of_paired']:.3f}x wall, "
                         f"{c['cpu']['median_of_paired']:.3f}x CPU (the harness's own bias and noise; ideally 1.000)")
    return lines


def main(argv=None):
    from trainer.cli import CommandParser  # a mistake in a flag: one error line, exit 2

    parser = CommandParser(prog="benchmarks/overhead.py", description="Trainer overhead against a bare training loop.")
    parser.add_argument("--smoke", action="store_true", help="a few steps, tiny data, one round")
    parser.add_argument("--out", help="folder for overhead.json (default benchmarks/results/)")
    parser.add_argument("--workloads", default="mlp,lenet,resnet18", help="comma-separated subset (default: all)")
    parser.add_argument("--rounds", type=int, help="override the number of interleaved rounds")
    parser.add_argument("--profile", metavar="WORKLOAD", choices=sorted(CPU_WORKLOADS),
                        help="also print cProfile of a trainer epoch and a bare epoch of this CPU workload")
    parser.add_argument("--resnet-on-cpu", action="store_true",
                        help="run the ResNet-18 workload on the CPU (eager only; to check its code path without CUDA)")
    parser.add_argument("--loggers", help='trainer.loggers of the CPU workloads, e.g. "tensorboard,csv" (default: the'
                        " project's, TensorBoard): compare the per-step calls and ratios with and without a logger")
    parser.add_argument("--ab-loggers", help='a second Trainer with these trainer.loggers (e.g. "tensorboard,csv"),'
                        " timed in the same interleaved rounds as the first: prints their paired ratio")
    args = parser.parse_args(argv)
    global LOGGERS, LOGGERS_B
    LOGGERS = [name.strip() for name in args.loggers.split(",")] if args.loggers else None
    LOGGERS_B = [name.strip() for name in args.ab_loggers.split(",")] if args.ab_loggers else None
    from utils.config import check_loggers

    for flag, names in (("--loggers", LOGGERS), ("--ab-loggers", LOGGERS_B)):
        if names and (wanted := check_loggers(names)):  # the config's own check, before anything runs
            parser.error(f"{flag}: expected {wanted}")

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # repeatable CPU timings (see the module docstring)
    out = sys.stdout
    wanted = [w.strip() for w in args.workloads.split(",") if w.strip()]

    real_err = sys.stderr

    def log_real(message):
        print(message, file=real_err, flush=True)

    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp, C.terminal() as term:
            save_root = Path(tmp)
            for name, spec in CPU_WORKLOADS.items():
                if name not in wanted:
                    continue
                if args.rounds:
                    spec = {**spec, "rounds": args.rounds}
                results[name] = cpu_workload(name, spec, args.smoke, save_root, log_real)
            if "resnet18" in wanted:
                if torch.cuda.is_available():
                    torch.set_num_threads(threads)  # the CPU only feeds the GPU here
                    torch.backends.cudnn.benchmark = True
                    # --smoke: eager only (compiling ResNet-18 takes about a minute)
                    variants = ("eager",) if args.smoke else ("eager", "compiled")
                    results.update(resnet_workloads(args.smoke, save_root, log_real, variants=variants,
                                                    rounds=args.rounds))
                elif args.resnet_on_cpu:
                    results.update(resnet_workloads(True, save_root, log_real, device_name="cpu", variants=("eager",)))
                else:
                    results["resnet18"] = {"skipped": CUDA_SKIPPED}
            if args.profile:
                buffer = io.StringIO()
                profile_workload(args.profile, save_root, 20 if args.smoke else 200, buffer)
    finally:
        torch.set_num_threads(threads)

    data = {
        "benchmark": "overhead",
        "smoke": args.smoke,
        "environment": {**C.environment(), "torch_threads_cpu_workloads": 1},
        "terminal": term,
        "call_events": "sys.setprofile 'call' events (Python functions; a generator resumption counts as one); "
                       "'c_call' events reported separately",
        "workloads": results,
    }
    path = C.write_results("overhead", data, args.out)

    rows = []
    for name, result in results.items():
        if "skipped" in result or "error" in result:
            continue
        rows.extend(rows_for(name, result))
    print(C.table(HEADERS, rows), file=out)
    for name, result in results.items():
        if "skipped" in result:
            print(result["skipped"], file=out)
        elif "error" in result:
            print(f"{name}: FAILED: {result['error']}", file=out)
        else:
            print(f"{name}: {result['description']}; {result['steps_per_epoch']} steps an epoch, {result['rounds']} rounds",
                  file=out)
    print("\n".join(verdicts(results)), file=out)
    for name, result in results.items():
        if "b_over_a" in result:
            r = result["b_over_a"]
            print(f"{name:17s} Trainer with loggers {','.join(LOGGERS_B)} / Trainer with"
                  f" {','.join(LOGGERS or ['the default loggers'])}: {r['wall']:.3f}x wall, {r['cpu']:.3f}x CPU"
                  " (paired by round)", file=out)
        if result.get("ema"):
            e = result["ema"]
            print(f"{name:17s} EMA (decay {e['decay']}, every step): {e['step_ms_plain']:.3f} -> {e['step_ms_ema']:.3f}"
                  f" ms/step ({e['ratio_paired']:.3f}x paired); the update alone {e['update_ms']:.3f} ms"
                  f" ({e['tensors']} tensors, {e['values']:,} values, one foreach lerp)", file=out)
    if args.profile:
        print(buffer.getvalue(), file=out)
    print(f"results: {path}", file=out)
    return data


if __name__ == "__main__":
    main()
