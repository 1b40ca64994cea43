"""Copy this template into a fresh project folder.

    python new_project.py ../my_project              everything: the core and every part
    python new_project.py ../my_project --minimal    the core alone: what a default run needs, its tests

What is copied: in a git checkout of the template, the files git tracks (``git ls-files``), as
they are in the working tree, so your own untracked files (configs, notes, data) stay behind;
otherwise (a downloaded archive, or no git) the template's folder, less what a run, an install
or a test made (``.venv``, ``saved/``, ``data/``, benchmark results, caches). Either way the
git history is left out, and this script is copied too (the copy's README and tests refer to it,
so the copy can make copies). The run folders are left out only at the template's top level, so
a package or test fixture folder that happens to be called ``data`` is still copied.

``--minimal`` also leaves out every optional part (the files of each row of
``utils/parts.py``'s table, and ``tests/parts/``) and the benchmarks; ``parts/`` keeps only its
``__init__.py``: ``make train`` and ``make test`` work in the copy, and a part can be copied
back later (its files are listed in that table and in the README).

Then, where git is installed, the copy becomes a git repository with the copied files as its
first commit; and the two commands to run next are printed.
"""

import argparse
import os
import shutil
import subprocess
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
FIRST_COMMIT = "A new project from the PyTorch template"


def part_files(source=SOURCE):
    """Every file the optional parts list in ``utils/parts.py`` (read from ``source``'s copy of the table)."""
    sys.path.insert(0, str(source))
    try:
        from utils.parts import PARTS
    finally:
        sys.path.remove(str(source))
    return {path for part in PARTS.values() for path in part.files}


def _git(*args, cwd):
    """``git args`` in ``cwd``: the completed process, or None when git is not installed."""
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    except OSError:
        return None


def tracked_files(source):
    """The files git tracks in ``source`` (relative paths, present in the working tree), or None when ``source``
    is not a git checkout of the template (or git is missing)."""
    out = _git("ls-files", "-z", "--cached", cwd=source)
    if out is None or out.returncode != 0:
        return None
    names = [name for name in out.stdout.split("\0") if name]
    if "new_project.py" not in names:  # a template unpacked inside another repository, which does not track it
        return None
    return [name for name in names if (source / name).is_file()]


def _skipped(relative, minimal_skip):
    """Whether the file or folder at ``relative`` (a posix path) is left out."""
    parts = relative.split("/")
    if any(p in SKIP_NAMES or p.endswith(SKIP_SUFFIXES) for p in parts):
        return True
    return any(relative == s or relative.startswith(s + "/") for s in SKIP_PATHS | minimal_skip)


def copy_template(target, minimal=False, source=SOURCE):
    """Copy the template into ``target``, which must not exist or be an empty folder; returns ``(files copied, how)``,
    ``how`` saying whether git's list of tracked files or the template's folder was copied."""
    source, target = Path(source).resolve(), Path(target).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists and is not an empty folder: choose a new path")
    if target == source or source in target.parents:
        raise FileExistsError(f"{target} is inside the template itself: choose a path outside {source}")
    minimal_skip = MINIMAL_SKIP | part_files(source) if minimal else set()
    names = tracked_files(source)
    how = "the files git tracks in the template"
    if names is None:
        how = "the template's folder (not a git checkout: files you added to it are copied too)"
        names = []
        for root, dirs, files in os.walk(source):
            here = Path(root).relative_to(source)
            dirs[:] = [d for d in dirs if not _skipped((here / d).as_posix(), minimal_skip)]
            names += [(here / f).as_posix() for f in files]
    names = sorted({n for n in names if n != "new_project.py" and not _skipped(n, minimal_skip)} | {"new_project.py"})
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, target / name)
    return [Path(n) for n in names], how


def start_repository(target):
    """``git init`` and a first commit of everything in ``target``; returns the line saying what was done."""
    steps = (("init", "-q"), ("add", "-A"), ("commit", "-q", "-m", FIRST_COMMIT))
    for step in steps:
        out = _git(*step, cwd=target)
        if out is None:
            return "git is not installed: no repository was started (run git init there later)"
        if out.returncode != 0:
            reason = " ".join((out.stderr or out.stdout).split())[:200]
            return f"git {step[0]} failed ({reason}): the files are copied; start the repository by hand"
    return f"Started a git repository there, with the copied files as its first commit ({FIRST_COMMIT!r})"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="new_project.py", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:3]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the new project's folder (must not exist, or be empty)")
    parser.add_argument("--minimal", action="store_true", help="the core alone, without the optional parts")
    parser.add_argument("--no-git", action="store_true", help="do not start a git repository in the copy")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        files, how = copy_template(args.folder, args.minimal)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    target = Path(args.folder).resolve()
    print(f"Copied {len(files)} files to {target}: {how}")
    if not args.no_git:
        print(start_repository(target))
    print("Next:")
    print(f"    cd {args.folder}")
    print("    make test     (creates .venv from requirements.txt, then runs the fast tests; make train trains)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
