"""Find a learning rate: ``python tools/lr_find.py -c CONFIG [key.path=VALUE ...]``.

Runs the exponential learning-rate range test (parts/lr_finder.py, the lr_finder part)
on a copy of the config's model and optimizer: the learning rate rises geometrically from
``--min-lr`` to ``--max-lr`` over ``--steps`` training batches, until the loss diverges.
Prints the suggested learning rate (a tenth of where the smoothed loss falls fastest: see
parts/lr_finder.py's ``suggest`` for why, and what it was measured on) and the command that
trains with it, and writes a plot of loss against learning rate as a PNG
(``<save_dir>/lr_find/<name>.png`` unless ``--out`` says where). Nothing else is written.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's packages come first


def parser():
    from trainer.cli import CommandParser

    p = CommandParser(prog="tools/lr_find.py", description="Learning-rate range test: suggest a learning rate for a config.")
    p.add_argument("-c", "--config", required=True, help="config file (JSON, or YAML ending in .yaml/.yml)")
    p.add_argument("-d", "--device", help='device: "auto", "cpu", "cuda", "cuda:N" or "mps"')
    p.add_argument("--min-lr", type=float, default=1e-7, help="the first learning rate tried (default 1e-7)")
    p.add_argument("--max-lr", type=float, default=10.0, help="the last learning rate tried (default 10)")
    p.add_argument("--steps", type=int, default=100, help="training batches, one learning rate each (default 100)")
    p.add_argument("--out", help="where to write the PNG plot (default <save_dir>/lr_find/<name>.png)")
    p.add_argument("overrides", nargs="*", metavar="key.path=VALUE", help="change any config key, as train.py does")
    return p


def main(argv=None):
    """The command line; returns the exit code."""
    from trainer.cli import run_command, overrides_of

    args = parser().parse_intermixed_args(argv)
    if args.steps < 3 or not 0 < args.min_lr < args.max_lr:
        parser().error("needs --steps >= 3 and 0 < --min-lr < --max-lr")

    def run():
        from parts.lr_finder import SAFETY, find_lr
        from utils.config import apply_overrides, load_config

        config = apply_overrides(load_config(args.config), overrides_of(args))
        suggestion, out, lrs = find_lr(config, args.min_lr, args.max_lr, args.steps, args.out)
        print(f"Tried {len(lrs)} learning rates from {lrs[0]:.3g} to {lrs[-1]:.3g}"
              + (" (stopped early: the loss diverged)" if len(lrs) < args.steps else ""))
        if suggestion is None:
            print("No suggestion: too few steps before the loss diverged; raise --steps or lower --max-lr")
        else:
            print(f"Suggested learning rate: {suggestion:.3g} (1/{SAFETY} of {suggestion * SAFETY:.3g},"
                  " where the smoothed loss fell fastest)")
            print(f"    python train.py -c {args.config} optimizer.args.lr={suggestion:.3g}")
        print(f"Plot: {out}")

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
