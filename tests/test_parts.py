"""Every optional part can be deleted: the table in utils/parts.py against the tree.

Fast checks read the code with ``ast`` (no project code runs): the core imports no part, and
deleting a part's files (those of every part that needs it too) leaves no remaining module or
test importing one of them. A copy made by ``new_project.py --minimal`` (the core alone)
trains the default config and collects its tests. The slow checks delete each part on a copy
and train there, and run the minimal copy's whole test suite.
"""

import ast
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from utils.parts import PARTS

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {".venv", ".git", "saved", "data", "__pycache__"}
# A short default run: the config's own model and data, one epoch, nothing shown.
QUICK = ["trainer.epochs=1", "trainer.verbosity=0", "device=cpu", "trainer.test_after_train=false"]


def removed_with(name):
    """The parts deleting part ``name`` deletes: itself and every part that needs it, in the table's order."""
    gone = {name}
    while True:
        more = {other for other, part in PARTS.items() if other not in gone and gone.intersection(part.needs)}
        if not more:
            return [other for other in PARTS if other in gone]
        gone |= more


@functools.lru_cache(maxsize=None)
def python_files(root=ROOT):
    """``{relative path: dotted module name}`` of every .py file of the project, tests and tools included."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".")]
        for file in files:
            if file.endswith(".py"):
                path = (Path(folder) / file).relative_to(root)
                parts = path.with_suffix("").parts
                found[path.as_posix()] = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return found


def module_of(path):
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=None)
def unguarded_imports(path):
    """The dotted names a file imports outside ``try: ... except ImportError`` (a guarded import may fail)."""
    tree = ast.parse((ROOT / path).read_text(), path)
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers):
            guarded |= {id(inner) for stmt in node.body for inner in ast.walk(stmt)}
    package = module_of(path) if path.endswith("__init__.py") else module_of(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and id(node) not in guarded:
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and id(node) not in guarded:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                base = ".".join([*anchor, *([base] if base else [])])
            names |= {base, *(f"{base}.{alias.name}" if base else alias.name for alias in node.names)}
    return names


def part_modules(names):
    """The dotted modules of the files of parts ``names``."""
    return {module_of(f) for n in names for f in PARTS[n].files if f.endswith(".py")}


def test_the_table_matches_the_tree():
    listed = {}
    for name, part in PARTS.items():
        if part.module is not None:  # (a part no config names, such as a batch script, has none)
            path = part.module.replace(".", "/")
            assert f"{path}.py" in part.files or f"{path}/__init__.py" in part.files, \
                f"{name}: its module {part.module} is not among its files"
        present = [f for f in part.files if (ROOT / f).exists()]
        assert present in ([], list(part.files)), \
            f"{name}: a part is wholly here or wholly deleted, but only {present} of {list(part.files)} are here"
        for file in part.files:
            assert file not in listed, f"{file} is listed by both {listed.get(file)} and {name}"
            listed[file] = name
        assert any(f.startswith("tests/") for f in part.files), f"{name}: no tests listed"
        assert set(part.needs) <= set(PARTS), f"{name}: needs an unknown part"
    stray = [p for p in python_files() if p.startswith(("parts/", "tests/parts/")) and p not in listed
             and not p.endswith("__init__.py")]
    assert not stray, f"files under parts/ that no part lists: {stray}"


def test_the_core_imports_no_part():
    core = [p for p in python_files() if not p.startswith(("parts/", "tests/", "benchmarks/", "tools/"))
            and p not in {f for part in PARTS.values() for f in part.files}]
    assert "train.py" in core and "trainer/trainer.py" in core
    for path in core:
        imports = {n for n in unguarded_imports(path) if n == "parts" or n.startswith("parts.")}
        assert not imports, f"{path} (core) imports {sorted(imports)}: the core reaches a part only via utils/parts.py"


@pytest.mark.parametrize("name", list(PARTS))
def test_deleting_a_part_leaves_nothing_importing_it(name):
    gone = removed_with(name)
    gone_files = {f for n in gone for f in PARTS[n].files}
    gone_modules = part_modules(gone)
    for path in python_files():
        if path in gone_files:
            continue
        reaching = sorted(n for n in unguarded_imports(path) if n in gone_modules)
        assert not reaching, f"deleting the {name} part breaks {path}, which imports {reaching}"


def test_the_readme_table_is_the_table_the_code_reads():
    from tools.parts_table import table

    readme = (ROOT / "README.md").read_text()
    between = readme.split("<!-- parts -->\n", 1)[1].split("<!-- /parts -->", 1)[0]
    assert between.strip() == table().strip(), "README.md's table of parts is stale: python tools/parts_table.py"


def test_a_part_uses_the_public_names_of_the_core_and_of_other_parts():
    """A hook or a part reads the Trainer, the loaders and other parts through their public names (the Hook of
    base/base_trainer.py lists what a hook may use): a leading underscore is a module's own business. (torch's own
    are torch's.)"""
    reaching = []
    for path in (p for p in python_files() if p.startswith("parts/")):
        for node in ast.walk(ast.parse((ROOT / path).read_text(), path)):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id not in ("self", "cls", "torch"):
                    reaching.append(f"{path}:{node.lineno} {ast.unparse(node)}")
    assert not reaching, "parts reaching into private names: " + ", ".join(reaching)


def minimal_copy(target):
    out = subprocess.run([sys.executable, str(ROOT / "new_project.py"), str(target), "--minimal"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return target


def train_in(folder, *overrides):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "train.py", "-c", "config.json", *QUICK,
                           f"trainer.save_dir={folder / 'saved'}", *overrides],
                          cwd=folder, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def minimal(tmp_path_factory):
    """A copy made by ``new_project.py --minimal``, shared by the tests below."""
    return minimal_copy(tmp_path_factory.mktemp("new") / "minimal")


def test_the_minimal_copy_holds_no_part_and_trains(minimal):
    copy = minimal
    assert [p.name for p in (copy / "parts").iterdir()] == ["__init__.py"] and not (copy / "tests" / "parts").exists()
    for part in PARTS.values():
        assert not any((copy / f).exists() for f in part.files)
    for kept in ("train.py", "test.py", "config.json", "Makefile", "requirements.txt", "utils/parts.py",
                 "tests/conftest.py", "trainer/trainer.py"):
        assert (copy / kept).is_file(), kept
    out = train_in(copy)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((copy / "saved" / "models").rglob("checkpoint-epoch1.pth"))
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q"], cwd=copy,
                               capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert "error" not in collected.stdout.strip().splitlines()[-1].lower()


def test_a_config_using_a_deleted_part_is_one_line(minimal, tmp_path):
    name, part = next((n, p) for n, p in PARTS.items() if p.keys)
    out = train_in(minimal, f"{part.keys[0]}=true", f"trainer.save_dir={tmp_path / 'saved'}")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"the {name} part" in lines[0], out.stderr
    assert not (tmp_path / "saved").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PARTS))
def test_each_part_deleted_on_a_copy_the_project_still_trains(tmp_path, name):
    copy = tmp_path / "copy"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "saved", "__pycache__"))
    for gone in removed_with(name):
        for file in PARTS[gone].files:
            (copy / file).unlink()
    out = train_in(copy)
    assert out.returncode == 0, out.stderr[-3000:]
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q"], cwd=copy,
                               capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]


@pytest.mark.slow
def test_the_minimal_copy_passes_its_own_tests(tmp_path):
    copy = minimal_copy(tmp_path / "minimal")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x"], cwd=copy, capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stdout[-5000:]
