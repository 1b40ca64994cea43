"""train.py for tests/parts/test_slurm.py: on the job's first start, each process waits after step HOLD_AT_STEP until
SLURM's warning signal has reached it, so the test's signal always comes in the middle of the run, however
slowly or fast the machine goes. It writes HOLD_REACHED (a file) once it waits. The weights are not touched.
A requeued job (SLURM_RESTART_COUNT above 0) trains as train.py does."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from trainer import trainer as _trainer  # noqa: E402
from trainer.cli import train_command  # noqa: E402

HOLD_AT_STEP = int(os.environ.get("HOLD_AT_STEP", "0"))
HOLD_LIMIT_S = 600  # never wait forever: a lost signal then shows as a run that finished unwarned


def _hold_until_warned(trainer):
    Path(os.environ["HOLD_REACHED"]).touch()
    give_up = time.monotonic() + HOLD_LIMIT_S
    while trainer.stop is None and time.monotonic() < give_up:
        time.sleep(0.05)  # a poll for the signal handler's flag, not a wait for time to pass


if HOLD_AT_STEP and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    _step = _trainer.Trainer.optimizer_step

    def optimizer_step(self, *args):
        _step(self, *args)
        if self.global_step + 1 == HOLD_AT_STEP:  # (counted after the optimizer's step)
            _hold_until_warned(self)

    _trainer.Trainer.optimizer_step = optimizer_step

if __name__ == "__main__":
    sys.exit(train_command())
