"""new_project.py: --help is usage, not a destination; a git checkout's copy holds what git tracks and none of the
user's untracked files; the copy starts its own git repository (or says in one line why not); the next commands."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def new_project(*args, cwd=None, env=None, script=ROOT / "new_project.py"):
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def git(cwd, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, env=env).stdout


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_copies_nothing(tmp_path, flag):
    out = new_project(flag, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: new_project.py") and "--minimal" in out.stdout
    assert "python new_project.py ../my_project" in out.stdout  # the examples of the module's docstring
    assert list(tmp_path.iterdir()) == []


@needs_git
def test_a_git_checkout_copies_what_git_tracks_and_starts_a_repository(tmp_path):
    template = tmp_path / "template"
    for path in ("train.py", "model/model.py", ".gitignore", "tests/data/fixture.csv", "new_project.py"):
        (template / path).parent.mkdir(parents=True, exist_ok=True)
        (template / path).write_text("saved/\n" if path == ".gitignore" else "x")
    shutil.copy(ROOT / "new_project.py", template / "new_project.py")
    git(template, "init", "-q")
    git(template, "add", "-A")
    git(template, "commit", "-q", "-m", "template")
    (template / "my_config.json").write_text("{}")  # the user's own files, untracked
    (template / "model" / "my_model.py").write_text("x")
    (template / "saved").mkdir()
    (template / "saved" / "run.pth").write_text("x")  # ignored
    (template / "train.py").write_text("edited")  # a tracked file with uncommitted edits: copied as it is

    target = tmp_path / "new"
    out = new_project(target, script=template / "new_project.py")
    assert out.returncode == 0, out.stderr
    copied = sorted(p.relative_to(target).as_posix() for p in target.rglob("*")
                    if p.is_file() and ".git" not in p.relative_to(target).parts)
    assert copied == [".gitignore", "model/model.py", "new_project.py", "tests/data/fixture.csv", "train.py"]
    assert (target / "train.py").read_text() == "edited"
    assert "the files git tracks" in out.stdout
    # A repository of its own, the copy as its first (and only) commit, nothing left uncommitted.
    assert git(target, "log", "--format=%s").splitlines() == ["A new project from the PyTorch template"]
    assert sorted(git(target, "ls-files").split()) == copied
    assert git(target, "status", "--porcelain") == ""
    lines = out.stdout.splitlines()
    assert lines[-3:] == ["Next:", f"    cd {target}", lines[-1]] and lines[-1].lstrip().startswith("make test")


def test_without_git_it_copies_the_folder_and_says_so_in_one_line(tmp_path):
    template = tmp_path / "template"
    for path in ("train.py", "saved/run.pth", "data/x.csv"):
        (template / path).parent.mkdir(parents=True, exist_ok=True)
        (template / path).write_text("x")
    shutil.copy(ROOT / "new_project.py", template / "new_project.py")
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    env["PATH"] = str(tmp_path / "no-bin")  # no git to be found
    out = new_project(tmp_path / "new", script=template / "new_project.py", env=env)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "new").rglob("*")) == ["new_project.py", "train.py"]
    assert [line for line in out.stdout.splitlines() if "git" in line and "not installed" in line]
    assert "cd " in out.stdout and "make test" in out.stdout
