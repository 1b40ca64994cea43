"""Copy this template into a fresh project folder.

    python new_project.py ../my_project              everything: the core and every part
    python new_project.py ../my_project --minimal    the core alone: what a default run needs, its tests

Copies the code, configs, tests, tooling and this script itself (the copy's README and its
tests refer to it, so the copy can make copies too); leaves out what a run, an install or
a test made (``.venv``, ``saved/``, ``data/``, benchmark results, caches) and the git
history. The run folders are left out only at the template's top level, so a package or
test fixture folder that happens to be called ``data`` is still copied.

``--minimal`` also leaves out every optional part (the files of each row of
``utils/parts.py``'s table, and ``tests/parts/``) and the benchmarks; ``parts/`` keeps only its
``__init__.py``: ``make train``
and ``make test`` work in the copy, and a part can be copied back later (its files are listed
in that table and in the README).
"""

import argparse
import shutil
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parent
# Paths relative to the template's root.
SKIP_PATHS = {".git", ".venv", "saved", "data", "benchmarks/results"}
# Names anywhere in the tree.
SKIP_NAMES = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
SKIP_SUFFIXES = (".pyc", ".egg-info")
# What --minimal leaves out besides the parts' own files (configs included): their folders and the benchmarks.
MINIMAL_SKIP = {"tests/parts", "benchmarks", "tests/test_benchmarks.py"}


def part_files(source=SOURCE):
    """Every file the optional parts list in ``utils/parts.py`` (read from ``source``'s copy of the table)."""
    sys.path.insert(0, str(source))
    try:
        from utils.parts import PARTS
    finally:
        sys.path.remove(str(source))
    return {path for part in PARTS.values() for path in part.files}


def _ignore_for(source, minimal=False):
    """A ``shutil.copytree`` ignore function for the paths and names above."""
    skipped = SKIP_PATHS | (MINIMAL_SKIP | part_files(source) if minimal else set())

    def ignore(folder, names):
        relative = Path(folder).relative_to(source)
        return {name for name in names
                if (relative / name).as_posix() in skipped or name in SKIP_NAMES or name.endswith(SKIP_SUFFIXES)}
    return ignore


def copy_template(target, minimal=False):
    """Copy the template into ``target``, which must not exist or be an empty folder; returns the files copied."""
    source = Path(__file__).resolve().parent
    target = Path(target).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists and is not an empty folder: choose a new path")
    if target == source or source in target.parents:
        raise FileExistsError(f"{target} is inside the template itself: choose a path outside {source}")
    shutil.copytree(source, target, ignore=_ignore_for(source, minimal), dirs_exist_ok=True)
    return sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file())


def main(argv=None):
    parser = argparse.ArgumentParser(description="Copy this template into a new project folder.")
    parser.add_argument("folder", help="the new project's folder (must not exist, or be empty)")
    parser.add_argument("--minimal", action="store_true", help="the core alone, without the optional parts")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        files = copy_template(args.folder, args.minimal)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Copied {len(files)} files to {Path(args.folder).resolve()}. Next: cd {args.folder} && make test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
