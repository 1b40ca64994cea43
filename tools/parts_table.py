"""The README's table of optional parts, made from utils/parts.py: ``python tools/parts_table.py``.

The README holds this table between its ``<!-- parts -->`` markers; tests/test_parts.py checks that it is
the table this prints, so the README and the table the code reads never disagree.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.parts import PARTS  # noqa: E402


def _config(part):
    commands = [f"`python train.py -c {f}`" if f.startswith("configs/examples/") else f"`python {f}`"
                if f.endswith(".py") else f"`sbatch {f}`" for f in part.files
                if f.startswith("configs/examples/")  # a worked example (examples/): its config
                or f.endswith((".py", ".sbatch")) and not f.startswith(("parts/", "tests/", "examples/"))]
    said = [*commands, *(f"`{k}`" for k in part.keys), *(f"`data_loader.type` {n}" for n in part.loaders),
            *(f"`arch.type` {p}…" for p in part.archs), *(f"`metrics` {p}…" for p in part.metrics),
            *(f"`trainer.loggers` {n}" for n in part.loggers)]
    return ", ".join(said)


def table():
    lines = ["| part | what it does | turned on by | its files (delete these to remove it) |", "|---|---|---|---|"]
    for name, part in PARTS.items():
        needs = f" (needs {', '.join(part.needs)}: deleted with it)" if part.needs else ""
        files = ", ".join(f"`{f}`" for f in part.files)
        lines.append(f"| {name} | {part.about}{needs} | {_config(part)} | {files} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
