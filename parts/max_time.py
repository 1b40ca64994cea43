"""``trainer.max_time``: a wall-clock budget. Once it is spent the run finishes the step, writes a resumable
``last.pth`` and exits with :data:`EXIT_OUT_OF_TIME` (75, ``EX_TEMPFAIL`` of ``sysexits.h``: "try again later"),
so a script can tell out of time (75) from done (0), a bad input (2) or a failure (1).

A part (utils/parts.py): delete this file and tests/parts/test_max_time.py, and runs without
``trainer.max_time`` train as before. In a config::

    "trainer": {"max_time": "00:23:50:00"}      DD:HH:MM:SS, counted from the start of training

Each command gets a new budget; ``train.py -r auto`` with the same command line continues where the
last one stopped. Under torchrun, a restarted round of the launch that ran out does not (:func:`check_resume`).
"""

import json
import re
import time

from base.base_trainer import RunStopped
from base.base_hook import Hook
from utils import dist_round

EXIT_OUT_OF_TIME = 75

_DURATION = re.compile(r"(\d+):(\d{1,2}):(\d{1,2}):(\d{1,2})")


def parse_duration(text):
    """Seconds of a ``"DD:HH:MM:SS"`` duration (``"00:23:50:00"`` is 23 h 50 min).

    Raises:
        ValueError: not of that form, an hour above 23 or a minute or second above 59, or zero.
    """
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise ValueError("not of the form DD:HH:MM:SS")
    days, hours, minutes, seconds = (int(g) for g in match.groups())
    if hours > 23 or minutes > 59 or seconds > 59:
        raise ValueError("hours go to 23, minutes and seconds to 59")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total == 0:
        raise ValueError("zero")
    return total


def check(config):
    """``trainer.max_time``: null (off) or a duration ``"DD:HH:MM:SS"`` above zero."""
    value = config["trainer"].get("max_time")
    try:
        parse_duration(value)
    except ValueError:
        return [f"trainer.max_time: got {json.dumps(value)}, expected a duration \"DD:HH:MM:SS\" above zero, such as"
                ' "00:23:50:00" (hours to 23, minutes and seconds to 59)']
    return []


def hooks(config, parts, run):
    return [MaxTime(config["trainer"]["max_time"])]


class MaxTime(Hook):
    """Once the budget (counted from when the run's hooks are made, before the first step) is spent, ask the run to
    stop after the step, with exit code 75. One clock read per step."""

    def __init__(self, duration):
        self.duration = duration
        self.deadline = time.monotonic() + parse_duration(duration)

    def after_step(self, trainer, epoch, batch_idx):
        if trainer.stop is None and time.monotonic() >= self.deadline:
            trainer.ask_to_stop(EXIT_OUT_OF_TIME, f"out of time (trainer.max_time={self.duration})")
            trainer.logger.warning(f"trainer.max_time ({self.duration}) is spent: stopping"
                                   + (" when the processes next agree" if trainer.distributed else ""))


def spent_in_this_launch(state, environ=None):
    """Whether the run's budget ran out earlier in this same torchrun launch: its workers stopped with exit 75,
    which torchrun takes for a failure and answers with a restart (``--max-restarts``). A restarted round must
    not train on with a fresh budget: out of time means the launch, and the job around it, should end.
    A new launch (the command run again, a requeued SLURM job: its restart count starts at 0) trains on.

    ``last.pth`` says why it was written and where (``stopped_by``: the exit code, torchrun's launch and round).
    """
    stop = (state or {}).get("stopped_by") or {}
    here = dist_round.torchrun_round(environ)
    return bool(stop.get("exit_code") == EXIT_OUT_OF_TIME and here and stop.get("torchrun_run_id") == here[0]
                and stop.get("torchrun_round", here[1]) < here[1])


def check_resume(state, checkpoint):
    """Before a run continues ``state``: in a round torchrun restarted after the budget ran out, stop at once
    (exit 75, nothing trained or written) so that the launch ends; see :func:`spent_in_this_launch`."""
    if spent_in_this_launch(state):
        raise RunStopped(f"{checkpoint}: out of time: trainer.max_time ran out earlier in this torchrun launch (round"
                         f" {state['stopped_by']['torchrun_round']}); stopping at once so that the launch ends. Run"
                         " the command again for a new budget", exit_code=EXIT_OUT_OF_TIME)
