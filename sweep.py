"""Run an experiment: many trials of one config, each an ordinary run, resumable by running the same command again.

    python sweep.py -c config.json --grid optimizer.args.lr=0.01,0.002 --grid data_loader.args.batch_size=32,64
    python sweep.py -c config.json --random optimizer.args.lr=loguniform:1e-4:1e-1 --trials 8
    python sweep.py -c config.json --seeds 0,1,2 --folds 5 trainer.epochs=5

The sweep and its summary live in ``<save_dir>/sweeps/<name>/``; see :mod:`parts.sweep`.
"""

import sys

from parts.sweep import sweep_command

if __name__ == "__main__":
    sys.exit(sweep_command(sys.argv[1:]))
