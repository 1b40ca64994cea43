"""The shape of the project: no import cycles, a default run that imports no optional part, a small core.

The module graph is read with ``ast`` (no project code runs): every ``.py`` in the repo except
.venv/, tests/ and benchmarks/, with an edge for each import of another project module,
imports inside functions included. ``import a.b`` and ``from a import b`` also run the
package ``a/__init__.py``, so they point at it too, except from inside ``a`` itself (a
package that re-exports its own modules is not a cycle that bites).
"""

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_PROJECT = {".venv", "tests", "benchmarks"}


def project_modules(root=ROOT):
    """``{dotted name: path}`` of the project's modules."""
    modules = {}
    for folder, dirs, files in os.walk(root):
        top = Path(folder) == root
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (top and d in NOT_PROJECT))
        for file in sorted(f for f in files if f.endswith(".py")):
            parts = (Path(folder) / file).relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = Path(folder) / file
    return modules


def imported_names(path, name):
    """Every dotted name the module ``name`` at ``path`` imports, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".") if package else []
                anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                base = ".".join([*anchor, *([base] if base else [])])
            if base:
                yield base
            yield from (f"{base}.{alias.name}" if base else alias.name for alias in node.names if alias.name != "*")


def module_graph(root=ROOT):
    """``{module: set of the project modules its imports run}``."""
    modules = project_modules(root)
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        for target in imported_names(path, name):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # a.b.c runs a, a.b and a.b.c
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != name and prefix not in own_packages:
                    graph[name].add(prefix)
    return graph


def find_cycle(graph):
    """One cycle of ``graph`` (``{node: successors}``) as ``[a, b, ..., a]``, or None; depth first, in sorted order."""
    state = {}  # node -> "open" while on the current path, "done" once all it reaches is explored
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph.get(start, ())))]
        state[start] = "open"
        while stack:
            node = next(stack[-1], None)
            if node is None:
                state[path.pop()] = "done"
                stack.pop()
            elif state.get(node) == "open":
                return path[path.index(node):] + [node]
            elif node not in state:
                state[node] = "open"
                path.append(node)
                stack.append(iter(sorted(graph.get(node, ()))))
    return None


def test_find_cycle_finds_one_and_passes_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c", "d"}, "c": set(), "d": {"c"}}) is None
    assert find_cycle({}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"d", "b"}, "d": set()}) == ["b", "c", "b"]
    assert find_cycle({"x": {"a"}, "a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_module_graph_reads_every_kind_of_import(tmp_path):
    for rel, text in {"pkg/__init__.py": "", "pkg/a.py": "from . import b\nfrom .sub.c import f\n",
                      "pkg/b.py": "def later():\n    import top\n", "pkg/sub/__init__.py": "from ..b import x\n",
                      "pkg/sub/c.py": "import os\n", "top.py": "from pkg import a\nimport pkg.sub.c as c\n",
                      "tests/test_x.py": "import top\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert module_graph(tmp_path) == {"pkg": set(), "pkg.a": {"pkg.b", "pkg.sub", "pkg.sub.c"}, "pkg.b": {"top"},
                                      "pkg.sub": {"pkg.b"}, "pkg.sub.c": set(),
                                      "top": {"pkg", "pkg.a", "pkg.sub", "pkg.sub.c"}}
    assert find_cycle(module_graph(tmp_path)) == ["pkg.a", "pkg.b", "top", "pkg.a"]


def test_no_import_cycle():
    cycle = find_cycle(module_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.fixture(scope="module")
def default_run():
    """One default run (config.json, 2 epochs) under tools/core_size.py's profiler, shared by the tests below: the
    project files it imported, in order, and the functions it executed."""
    from tools import core_size

    result = core_size.measure()
    assert result is not None and result["exit_code"] == 0, "the default run failed (see its output above)"
    return result


def test_default_run_imports_no_optional_module(default_run):
    from utils.parts import PARTS

    loaded = {file[:-3].replace("/", "."): str(ROOT / file) for file in default_run["files"]}  # module -> path
    loaded = {(m[: -len(".__init__")] if m.endswith(".__init__") else m): f for m, f in loaded.items()}
    found = []
    for name, part in PARTS.items():
        part_files = [ROOT / f for f in getattr(part, "files", ())]
        for module, file in loaded.items():
            path = Path(file).resolve() if file and Path(file).is_absolute() else None
            if (part.module and (module == part.module or module.startswith(part.module + "."))
                    or path is not None and any(path == f or f in path.parents for f in part_files)):
                found.append(f"{module} (part {name})")
    assert not found, "the default run imports optional modules: " + ", ".join(sorted(found))
    # Nor the core's modules that only other runs need: the resume policy, the other built-in data sets and models,
    # a failed write's message and the checkpoint checks, the per-sample data path, the K-fold and stratified splits,
    # torchrun's process group, a stop's last.pth.
    others = {"utils.resume", "data_loader.builtin", "model.builtin", "utils.io_problems", "base.sample_loader",
              "base.splits", "utils.dist_round", "base.stopping", "base.base_hook"}
    assert not others & set(loaded), sorted(others & set(loaded))


def test_core_size_bounds(default_run):
    """Issue 20's bounds on the default run (2 epochs): its modules' lines, the functions it executes and the files
    they are in, the life of a run and the step each on one screen. A change that grows the core past them fails
    here: make room by moving what a default run does not need into a module imported where it is used."""
    from tools import core_size

    assert core_size.main(["--max-lines", "3500", "--max-functions", "130", "--max-files", "15",
                           "--max-function-lines", "40"], result=default_run) == 0
