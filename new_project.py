"""Copy this template into a fresh project folder: ``python new_project.py ../my_project``.

Copies the code, configs, tests and tooling; leaves out what a run or an install made
(``.venv``, ``saved/``, ``data/``, caches, git history).
"""

import shutil
import sys
from pathlib import Path

SKIP = {".git", ".venv", "saved", "data", "__pycache__", ".pytest_cache", "results", "new_project.py"}


def copy_template(target):
    """Copy the template into ``target``, which must not exist or be an empty folder; returns the files copied."""
    source = Path(__file__).resolve().parent
    target = Path(target).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists and is not an empty folder: choose a new path")
    if target == source or source in target.parents:
        raise FileExistsError(f"{target} is inside the template itself: choose a path outside {source}")
    ignore = shutil.ignore_patterns(*SKIP, "*.pyc")
    shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)
    return sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python new_project.py NEW_PROJECT_FOLDER", file=sys.stderr)
        return 2
    try:
        files = copy_template(argv[0])
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Copied {len(files)} files to {Path(argv[0]).resolve()}. Next: cd {argv[0]} && make test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
