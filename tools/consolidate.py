"""One ordinary .pth from a sharded checkpoint (a folder written under ``trainer.strategy: "fsdp"``, utils/sharded.py):
``python tools/consolidate.py saved/models/<name>/<run_id>/model_best.pth [-o model_best.full.pth]``.

The file holds what a checkpoint of an unsharded run holds (whole weights, the optimizer state by position, the
config, counters and RNG states), so ``test.py``, ``--init-from``, a resume under ``"ddp"`` and any script that
``torch.load``s it work as with every other .pth. (``test.py``, ``predict.py``, ``export.py`` and a resume also
read the folder itself; this is for what reads files only.) One process; no process group.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a sharded checkpoint: the folder")
    parser.add_argument("-o", "--output", type=Path, help="the .pth to write (default: beside it, .full.pth)")
    args = parser.parse_args(argv)
    from utils import sharded
    from utils.io import save_checkpoint

    out = args.output or args.checkpoint.with_name(f"{args.checkpoint.stem}.full.pth")
    if not sharded.is_sharded(args.checkpoint):
        print(f"error: {args.checkpoint} is no sharded checkpoint (a folder holding .metadata and"
              f" {sharded.STATE_FILE}); give one a run of trainer.strategy \"fsdp\" wrote", file=sys.stderr)
        return 2
    if out.resolve() == args.checkpoint.resolve() or out.is_dir():
        print(f"error: -o {out}: a folder; give the path of the .pth file to write", file=sys.stderr)
        return 2
    save_checkpoint(sharded.consolidate(args.checkpoint), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
