"""Copy this template into a fresh project folder: ``python new_project.py ../my_project``.

Copies the code, configs, tests, tooling and this script itself (the copy's README and its
tests refer to it, so the copy can make copies too); leaves out what a run, an install or
a test made (``.venv``, ``saved/``, ``data/``, benchmark results, caches) and the git
history. The run folders are left out only at the template's top level, so a package or
test fixture folder that happens to be called ``data`` is still copied.
"""

import shutil
import sys
from pathlib import Path

# Paths relative to the template's root.
SKIP_PATHS = {".git", ".venv", "saved", "data", "benchmarks/results"}
# Names anywhere in the tree.
SKIP_NAMES = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
SKIP_SUFFIXES = (".pyc", ".egg-info")


def _ignore_for(source):
    """A ``shutil.copytree`` ignore function for the paths and names above."""
    def ignore(folder, names):
        relative = Path(folder).relative_to(source)
        return {name for name in names
                if (relative / name).as_posix() in SKIP_PATHS or name in SKIP_NAMES or name.endswith(SKIP_SUFFIXES)}
    return ignore


def copy_template(target):
    """Copy the template into ``target``, which must not exist or be an empty folder; returns the files copied."""
    source = Path(__file__).resolve().parent
    target = Path(target).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists and is not an empty folder: choose a new path")
    if target == source or source in target.parents:
        raise FileExistsError(f"{target} is inside the template itself: choose a path outside {source}")
    shutil.copytree(source, target, ignore=_ignore_for(source), dirs_exist_ok=True)
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
