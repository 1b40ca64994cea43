"""``trainer.profile``: torch.profiler over a few optimizer steps of the first epoch, written as a trace.

A part (utils/parts.py): delete this file and tests/parts/test_profiler.py, and runs without
``trainer.profile`` train as before. In a config::

    "trainer": {"profile": true}                                   the defaults below
    "trainer": {"profile": {"wait": 1, "warmup": 1, "active": 3}}  some of them changed

A dry run (``fast_dev_run``) writes no trace, so it is not profiled.
"""

import json

import torch

from base.base_hook import Hook
from utils.config import non_negative_int, positive_int
from utils.config_extra import feature_settings, settings_of

DEFAULTS = {"wait": 1, "warmup": 1, "active": 3}
CHECKS = {"wait": non_negative_int, "active": positive_int, "warmup": non_negative_int}


def check(config):
    """``trainer.profile``: null/false (off), true (the defaults) or a mapping of some of them."""
    value = config["trainer"].get("profile")
    wanted = feature_settings(DEFAULTS, CHECKS)(value)
    return [f"trainer.profile: got {json.dumps(value)}, expected {wanted}"] if wanted else []


def hooks(config, parts, run):
    settings = settings_of(config["trainer"].get("profile"), DEFAULTS)
    return [Profile(settings, run, parts.device)] if settings and run.writes else []


class Profile(Hook):
    """``trainer.profile``: torch.profiler over a few optimizer steps of the first epoch.

    The schedule skips ``wait`` steps, warms up for ``warmup`` and records ``active``; then
    the trace goes to the run's log folder as ``profile-trace.json`` (``-rankN`` under
    torchrun; open it in https://ui.perfetto.dev or chrome://tracing) and the operators
    taking the most self time are printed. On CUDA it also prints the peak memory and writes
    ``memory-snapshot.pickle`` (drop it on https://pytorch.org/memory_viz). After that the
    hook leaves the per-step list, so the rest of the run pays nothing for it.
    """

    def __init__(self, settings, run, device):
        self.settings, self.run, self.cuda = settings, run, device.type == "cuda"
        suffix = f"-rank{run.dist.rank}" if run.dist.enabled else ""
        self.trace_path = run.log_dir / f"profile-trace{suffix}.json"
        self.snapshot_path = run.log_dir / f"memory-snapshot{suffix}.pickle"
        self.profiler, self.done = None, False

    def before_epoch(self, trainer, epoch):
        if self.profiler is not None or self.done:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        s = self.settings
        if self.cuda:  # written by hand for CUDA; untested on a CPU-only machine
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.profiler = profile(activities=activities, schedule=schedule(wait=s["wait"], warmup=s["warmup"],
                                active=s["active"], repeat=1), on_trace_ready=self._ready, profile_memory=self.cuda)
        self.profiler.start()

    def after_step(self, trainer, epoch, batch_idx):
        if self.profiler is not None:
            self.profiler.step()

    def after_train_epoch(self, trainer, epoch, last_inputs):
        if self.profiler is None:
            return
        self.profiler.stop()  # a schedule longer than the epoch: the trace holds what was recorded
        self.profiler, self.done = None, True
        if self in trainer.step_hooks:
            trainer.step_hooks.remove(self)

    def _ready(self, profiler):
        logger = self.run.logger
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)  # rank 0 made it; another machine's rank may not have
        profiler.export_chrome_trace(str(self.trace_path))
        key = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=key, row_limit=15)
        logger.info(f"Profile of {self.settings['active']} steps (trace: {self.trace_path}):\n{table}")
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / 2**20
            logger.info(f"Peak CUDA memory allocated: {peak:,.0f} MiB (snapshot: {self.snapshot_path})")
            torch.cuda.memory._dump_snapshot(str(self.snapshot_path))
            torch.cuda.memory._record_memory_history(enabled=None)
