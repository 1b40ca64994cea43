"""``python test.py -r CKPT ...``: the command line of test.py, with train.py's flag spelling and error handling
(trainer/cli.py). Imported only by test.py and tools, not by a training run."""

import sys

from trainer.cli import SHORTCUTS, CommandParser, overrides_of, parse, run_command


def test_parser():
    parser = CommandParser(description="Evaluate a checkpoint on the test split of its config.")
    parser.add_argument("-r", "--resume", dest="checkpoint", required=True,
                        help="checkpoint to evaluate (spelled -r, as in victoresque's template)")
    return parser.add_overrides(SHORTCUTS[:1])


def test_command(argv=None):
    """``python test.py -r CKPT ...``; returns the exit code."""
    args = parse(test_parser(), sys.argv[1:] if argv is None else list(argv))

    def run():
        from pathlib import Path

        from trainer.run import evaluate_checkpoint
        from utils.errors import UserError

        scores = Path(args.checkpoint).with_suffix(".test.json")
        if scores.is_dir() or scores.exists() and not scores.is_file():  # found before scoring, not after
            raise UserError(f"{scores}: test.py writes the scores there, but that is a folder or a special file,"
                            " not a file of scores; move or rename it")
        metrics = evaluate_checkpoint(args.checkpoint, overrides_of(args))
        print(f"Scored {args.checkpoint} on its test split:")
        for key, value in metrics.items():
            print(f"    {key:15s}: {value:.6g}" if isinstance(value, float) else f"    {key:15s}: {value}")
        print(f"Written to {Path(args.checkpoint).with_suffix('.test.json')}")

    return run_command(run)
