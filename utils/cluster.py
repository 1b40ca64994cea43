"""Runs that outlive the machine: wall-clock budgets, stop reasons every process agrees on, cluster context.

A run may stop early for a reason outside it: a signal (Ctrl-C, a scheduler's SIGTERM,
SLURM's warning signal USR1 before the time limit) or its own wall-clock budget
(``trainer.max_time``). Either way it finishes the current step, writes a resumable
``last.pth`` and exits with a code that tells a script what happened:

- ``128 + N`` for signal N: 130 (SIGINT), 143 (SIGTERM), 138 (SIGUSR1 on Linux);
- :data:`EXIT_OUT_OF_TIME` (75, ``EX_TEMPFAIL`` of ``sysexits.h``: "try again later") for ``max_time``.

``train.py -r auto`` with the same command line continues such a run where it stopped.
Nothing here imports torch.
"""

import os
import re
import signal

EXIT_OUT_OF_TIME = 75
OUT_OF_TIME = "max_time"  # the stop reason of trainer.max_time (the others are signal names)

# The signals that stop a run with a checkpoint; SIGUSR1 is SLURM's usual warning before the time limit.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))

_SIGNAL_CODE_BASE = 64  # reasons as integers, for a max over processes: a signal (64 + N) outranks max_time (1)


def reason_code(reason):
    """A stop reason (a signal name, :data:`OUT_OF_TIME` or None) as an int, for :func:`utils.dist.max_over_ranks`."""
    if reason is None:
        return 0
    if reason == OUT_OF_TIME:
        return 1
    return _SIGNAL_CODE_BASE + signal.Signals[reason].value


def reason_of(code):
    """The inverse of :func:`reason_code`."""
    if code == 0:
        return None
    if code == 1:
        return OUT_OF_TIME
    return signal.Signals(code - _SIGNAL_CODE_BASE).name


def exit_code(reason):
    """The exit code of a run stopped for ``reason`` (see the module docstring)."""
    return EXIT_OUT_OF_TIME if reason == OUT_OF_TIME else 128 + signal.Signals[reason].value


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


def duration_string(value):
    """Config check for ``trainer.max_time``: None when ``value`` is a valid duration, else what is expected."""
    try:
        parse_duration(value)
    except ValueError:
        return 'a duration "DD:HH:MM:SS" above zero, such as "00:23:50:00" (hours to 23, minutes and seconds to 59)'
    return None


def cluster_context(environ=None):
    """Where this process runs, for the manifest's resume history: the SLURM job and how often it was requeued,
    and how often torchrun restarted its workers; only the values that are set."""
    environ = os.environ if environ is None else environ
    keys = {"SLURM_JOB_ID": "slurm_job_id", "SLURM_RESTART_COUNT": "slurm_restart_count",
            "TORCHELASTIC_RESTART_COUNT": "torchrun_restart_count"}
    context = {}
    for variable, key in keys.items():
        value = environ.get(variable)
        if value is not None:
            context[key] = int(value) if value.isdigit() and key != "slurm_job_id" else value
    return context


def torchrun_round(environ=None):
    """``(run id, restart count)`` of the torchrun launch this process belongs to, or None outside torchrun.

    The run id is torchrun's ``--rdzv-id`` (a fresh one per launch with ``--standalone``; the job id
    in slurm/train.sbatch); the count is how often this launch restarted its workers.
    """
    environ = os.environ if environ is None else environ
    run_id, count = environ.get("TORCHELASTIC_RUN_ID"), environ.get("TORCHELASTIC_RESTART_COUNT")
    if run_id is None or count is None or not count.isdigit():
        return None
    return run_id, int(count)


def out_of_time_mark(environ=None):
    """What a checkpoint written because ``trainer.max_time`` ran out records under torchrun (None elsewhere):
    the launch and the round in which the budget ran out (see :func:`spent_in_this_launch`)."""
    here = torchrun_round(environ)
    return None if here is None else {"torchrun_run_id": here[0], "round": here[1]}


def spent_in_this_launch(state, environ=None):
    """Whether the run's budget ran out earlier in this same torchrun launch: its workers stopped with exit 75,
    which torchrun takes for a failure and answers with a restart (``--max-restarts``). A restarted round must
    not train on with a fresh budget: out of time means the launch, and the job around it, should end.
    A new launch (the command run again, a requeued SLURM job: its restart count starts at 0) trains on."""
    mark = (state or {}).get("out_of_time")
    here = torchrun_round(environ)
    return bool(mark and here and mark.get("torchrun_run_id") == here[0] and mark.get("round", here[1]) < here[1])

