"""Train a model from a config.

    python train.py -c config.json [key.path=VALUE ...]          start a run
    python train.py -r saved/models/NAME/RUN/last.pth [...]      continue it
    python train.py --help                                       every flag

The command line is :func:`trainer.cli.train_command`; the run itself is
:func:`trainer.run.train`, which tests and notebooks import and call with a config dict.
A user's mistake is one ``error:`` line on stderr and exit code 2.
"""

import signal
import sys

from trainer.cli import train_command

if __name__ == "__main__":
    code = train_command(sys.argv[1:])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run is over: a late Ctrl-C must not print a traceback
    sys.exit(code)
