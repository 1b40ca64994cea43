"""The command line of ``train.py`` (``test.py``'s: trainer/evaluate_cli.py): parse, call one function, turn a user's
mistake into one line.

Both spell the same flags the same way, with ``key.path=VALUE`` overrides anywhere among them; a user error prints
as ``error: ...`` on stderr with exit code 2. Torch is imported only when a command runs, so a Ctrl-C during
start-up is caught like any other.
"""

import argparse
import sys


class CommandParser(argparse.ArgumentParser):
    """argparse reporting a mistake as one ``error:`` line and exit code 2 (not the whole usage first)."""

    def error(self, message):
        self.exit(2, f"error: {message} (python {self.prog} --help lists the flags)\n")

    def add_overrides(self, shortcuts):
        """The ``key.path=VALUE`` overrides, and ``shortcuts`` (rows of :data:`SHORTCUTS`) that each write one."""
        self.add_argument("overrides", nargs="*", metavar="key.path=VALUE",
                          help="change any config key; the value is read as JSON, else as a string")
        group = self.add_argument_group("shortcuts (each writes one key.path=VALUE override)")
        for flags, key, options in shortcuts:
            group.add_argument(*flags, dest=key, **{**options, "help": f"{options['help']} ({key}=...)"})
        return self


# The shortcut flags: (flags, config key, argparse options). Each only writes the override ``KEY=VALUE``, so it
# means what the override means (a deleted part's key gets the same error). The first is every command's.
SHORTCUTS = (
    (("-d", "--device"), "device", {"metavar": "DEVICE", "help": 'device: "auto", "cpu", "cuda", "cuda:N" or "mps"'}),
    (("--lr",), "optimizer.args.lr", {"type": float, "metavar": "LR", "help": "the learning rate"}),
    (("--bs",), "data_loader.args.batch_size", {"type": int, "metavar": "BS", "help": "the batch size per process"}),
    (("--fast-dev-run",), "trainer.fast_dev_run",
     {"type": int, "metavar": "N", "help": "N training and N validation batches, one epoch, nothing written"}),
    (("--overfit-batches",), "trainer.overfit_batches",
     {"type": int, "metavar": "N", "help": "train and validate on the same N batches, unshuffled, unaugmented"}),
    (("--detect-anomaly",), "trainer.detect_anomaly", {"action": "store_const", "const": "true",
     "help": "autograd anomaly mode: name the operation whose backward made a NaN"}),
)


def train_parser():
    parser = CommandParser(description="Train a model from a config file.")
    parser.add_argument("-c", "--config", help="config file (JSON, or YAML ending in .yaml/.yml)")
    parser.add_argument("-r", "--resume", help="checkpoint to continue (its run folder and settings); 'auto' (with -c,"
                        " and --run-id or the config's name alone): the run's newest resumable checkpoint, or a fresh"
                        " start when it has none, so the same command can be re-run after any interruption")
    parser.add_argument("--run-id", help="name of the run folder (default: the start time)")
    parser.add_argument("--init-from", help="start a new run from this checkpoint's model weights (fine-tuning)")
    parser.add_argument("--init-from-strict", choices=("true", "false"), default="true",
                        help="whether --init-from must match every key (default true)")
    parser.add_argument("--overwrite", action="store_true",
                        help="with -r: continue in the checkpoint's folder even if it holds later checkpoints"
                             " (by default such a resume continues in a new folder)")
    return parser.add_overrides(SHORTCUTS)


def parse(parser, argv):
    """Parse with overrides allowed before, between and after the flags."""
    return parser.parse_intermixed_args(argv)


def overrides_of(args):
    """The ``key.path=VALUE`` overrides a command line asks for, the shortcuts' (:data:`SHORTCUTS`) after the rest;
    a shortcut and an override of its key both given is a UserError (which one should win is nobody's guess)."""
    values = vars(args)
    given = {key: flags[-1] for flags, key, _ in SHORTCUTS if values.get(key) is not None}
    if twice := [item for item in args.overrides if item.partition("=")[0] in given]:
        from utils.errors import UserError

        key = twice[0].partition("=")[0]
        raise UserError(f"{given[key]} {values[key]} and the override {twice[0]} both set {key}: give one of them")
    return [*args.overrides, *(f"{key}={values[key]}" for key in given)]


def train_command(argv=None):
    """``python train.py ...``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = train_parser()
    args = parser.parse_intermixed_args(argv)
    if not args.config and not args.resume:
        parser.error("give -c CONFIG to start a run, or -r CHECKPOINT to resume one")
    if args.resume and args.init_from:
        parser.error("-r continues a run and --init-from starts a new one: give one of them")
    if args.resume == "auto" and not args.config:
        parser.error("-r auto needs -c CONFIG: the config's name and trainer.save_dir say where the run is")

    def run():
        from trainer.run import train
        from utils.config import apply_overrides, load_config
        from utils.io import load_checkpoint

        overrides = overrides_of(args)
        if args.config:
            config = apply_overrides(load_config(args.config), overrides)
        elif overrides:
            config = apply_overrides(load_checkpoint(args.resume)["config"], overrides)
        else:
            config = None  # the checkpoint's own
        train(config, resume=args.resume, run_id=args.run_id, init_from=args.init_from,
              init_strict=args.init_from_strict == "true", argv=["train.py", *argv],
              overwrite=args.overwrite and bool(args.resume))

    return run_command(run)


def run_command(fn):
    """Call ``fn``; a user's error is one ``error:`` line per problem and exit 2, a stopped run its own code."""
    try:
        from base.base_trainer import RunStopped
        from utils.errors import UserError

        try:
            fn()
        except UserError as err:
            for problem in err.problems:
                print(f"error: {problem}", file=sys.stderr)
            return getattr(err, "exit_code", 2)  # 2, or a code of its own (a full disk: see utils/errors.py)
        except RunStopped as err:
            if not err.logged:
                print(f"stopped: {err}", file=sys.stderr)
            return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
