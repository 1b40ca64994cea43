"""Evaluate a checkpoint on its config's held-out test split.

    python test.py -r saved/models/NAME/RUN/model_best.pth [-d cpu] [key.path=VALUE ...]

Prints the loss and metrics and writes them as JSON beside the checkpoint
(``model_best.test.json`` for ``model_best.pth``). The command line is
:func:`trainer.evaluate_cli.test_command`; the evaluation is :func:`trainer.run.evaluate_checkpoint`.
"""

import sys

from trainer.evaluate_cli import test_command

if __name__ == "__main__":
    sys.exit(test_command(sys.argv[1:]))
