"""How much of the project a newcomer must read to follow the default run: ``python tools/core_size.py``.

The template promises a small core: what ``python train.py -c config.json`` executes should
be a few files one can read in an afternoon, with the optional features elsewhere. This
script measures that. It runs ``train.py`` on the default config for 2 epochs (quiet, into a
temporary folder) in a child process that starts profiling before any project module is
imported, so code run while importing counts too, and reports:

- the project files the run imported (files inside the repo, except tests/, benchmarks/,
  tools/ and .venv/), in the order they were first executed (the entry point first), each
  with its physical line count and how many of its functions ran;
- the totals: lines of those files, distinct functions executed, and the files those functions
  are in (an imported file none of whose functions ran, such as an empty package ``__init__.py``,
  is listed and its lines counted, but it is not one of the files the run executes);
- the length of a few named functions (``--function path.py:Qualname``), by default the
  life of a run (``trainer/run.py:train``) and the training step.

"Functions" are ``def`` functions and methods (nested ones too); module and class bodies,
lambdas and comprehensions are not counted. With ``--max-*`` bounds it exits 1 and names
each bound exceeded, else 0 (2 when the run itself fails).
"""

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXCLUDED = ("tests", "benchmarks", "tools", ".venv")
STEP_CANDIDATES = ("Trainer.train_epoch",)  # the method holding the step
CO_OPTIMIZED = 0x1  # set on function code objects; module and class bodies lack it


def project_path(filename):
    """``filename`` relative to the repo as 'a/b.py', or None when it is not project code."""
    if not isinstance(filename, str) or not os.path.isabs(filename):  # "<string>", or a module's made-up name
        return None
    try:
        rel = Path(filename).resolve().relative_to(ROOT)
    except ValueError:
        return None
    return None if rel.parts[0] in EXCLUDED or rel.suffix != ".py" else rel.as_posix()


def start_profiling(seen):
    """Record every code object that starts running, in first-seen order, as keys of the dict ``seen``."""
    monitoring = getattr(sys, "monitoring", None)  # Python >= 3.12: each code object reported once
    if monitoring is not None:
        try:
            monitoring.use_tool_id(monitoring.PROFILER_ID, "core_size")
        except ValueError:  # the profiler slot is taken (a debugger, coverage): fall back on setprofile
            monitoring = None
    if monitoring is not None:
        def on_start(code, offset):
            seen.setdefault(code, None)
            return monitoring.DISABLE
        monitoring.register_callback(monitoring.PROFILER_ID, monitoring.events.PY_START, on_start)
        monitoring.set_events(monitoring.PROFILER_ID, monitoring.events.PY_START)
        return lambda: (monitoring.set_events(monitoring.PROFILER_ID, 0), monitoring.free_tool_id(monitoring.PROFILER_ID))

    import threading

    def profile(frame, event, arg):
        if event == "call":
            seen.setdefault(frame.f_code, None)
    threading.setprofile(profile)  # threads the run starts
    sys.setprofile(profile)
    return lambda: (sys.setprofile(None), threading.setprofile(None))


def child(out, overrides):
    """Run train.py in this process under the profiler; write what ran and what was imported to ``out``."""
    seen = {}
    stop = start_profiling(seen)
    import runpy

    sys.path.insert(0, str(ROOT))
    sys.argv = ["train.py", *overrides]
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        stop()
    imported = {project_path(getattr(m, "__file__", None)) for m in list(sys.modules.values())} - {None}
    imported.add("train.py")  # run as __main__, so not in sys.modules
    seen = list(seen)  # a snapshot: a thread the run left (a writer's) may still be reported while this reads
    order = [project_path(c.co_filename) for c in seen]
    files = list(dict.fromkeys(f for f in order if f in imported))  # first executed first
    files += sorted(imported - set(files))  # imported but never run (none expected)
    functions = sorted({(f, c.co_firstlineno, c.co_qualname if hasattr(c, "co_qualname") else c.co_name)
                        for c, f in zip(seen, order)
                        if f and c.co_flags & CO_OPTIMIZED and not c.co_name.startswith("<")})
    Path(out).write_text(json.dumps({"exit_code": code, "files": files, "functions": functions}))
    return code


def function_lines(spec):
    """Lines of ``path.py:Outer.inner`` from its ``def`` line to its last (decorators excluded), or None."""
    path, _, qualname = spec.partition(":")
    try:
        nodes = ast.parse((ROOT / path).read_text()).body
    except (OSError, SyntaxError):
        return None
    for name in qualname.split("."):
        node = next((n for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == name), None)
        if node is None:
            return None
        nodes = node.body
    return node.end_lineno - node.lineno + 1


def default_functions():
    step = next((s for s in STEP_CANDIDATES if function_lines(f"trainer/trainer.py:{s}")), STEP_CANDIDATES[-1])
    return ["trainer/run.py:train", f"trainer/trainer.py:{step}"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tools/core_size.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--function", action="append", metavar="PATH.py:QUALNAME",
                   help="a function whose length to report (repeatable; default: the run and the training step)")
    p.add_argument("--max-lines", type=int, help="bound on the lines of the default run's modules")
    p.add_argument("--max-functions", type=int, help="bound on the distinct project functions executed")
    p.add_argument("--max-files", type=int, help="bound on the files holding the executed functions")
    p.add_argument("--max-function-lines", type=int, help="bound on each named function's length")
    p.add_argument("--child", metavar="OUT.json", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key.path=VALUE", help="more config overrides, as train.py takes")
    return p.parse_args(argv)


def measure(overrides=()):
    """Run the default config for 2 epochs (quiet, into a temporary folder) in a child process under the profiler;
    ``{"exit_code", "files", "functions"}`` (see :func:`child`), or None when the run failed (its output printed)."""
    with tempfile.TemporaryDirectory(prefix="core_size_") as tmp:
        out = os.path.join(tmp, "measure.json")
        overrides = ["-c", "config.json", "trainer.epochs=2", f"trainer.save_dir={tmp}/saved",
                     "trainer.verbosity=0", *overrides]
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", out, "--", *overrides],
                              cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            print(proc.stdout + proc.stderr, end="", file=sys.stderr)
            print(f"error: the default run failed (exit code {proc.returncode})", file=sys.stderr)
            return None
        return json.loads(Path(out).read_text())


def main(argv=None, result=None):
    """The report, and the exit code of the bounds; ``result``: an earlier :func:`measure`'s, else measured now."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        return child(args.child, args.overrides)
    result = result or measure(args.overrides)
    if result is None:
        return 2

    per_file = {f: 0 for f in result["files"]}
    for path, _, _ in result["functions"]:
        per_file[path] = per_file.get(path, 0) + 1
    lines = {f: len((ROOT / f).read_text().splitlines()) for f in result["files"]}
    print("Project files of the default run (train.py -c config.json, 2 epochs), in import order:")
    print(f"{'lines':>6} {'funcs':>6}  file")
    for f in result["files"]:
        print(f"{lines[f]:6d} {per_file[f]:6d}  {f}")
    figures = {"lines": sum(lines.values()), "functions": len(result["functions"]),
               "files": sum(1 for f in result["files"] if per_file[f])}
    print(f"\nlines of the default run's modules: {figures['lines']}")
    print(f"functions executed: {figures['functions']}")
    print(f"files the functions are in: {figures['files']} (files imported: {len(result['files'])})")

    failed = [f"bound exceeded: {name} {figures[name]} > {bound}" for name, bound in
              (("lines", args.max_lines), ("functions", args.max_functions), ("files", args.max_files))
              if bound is not None and figures[name] > bound]
    print("\nlength of the named functions:")
    for spec in args.function or default_functions():
        length = function_lines(spec)
        print(f"{'not found' if length is None else length:>9}  {spec}")
        if length is None:
            failed.append(f"error: {spec}: no such function")
        elif args.max_function_lines is not None and length > args.max_function_lines:
            failed.append(f"bound exceeded: {spec} {length} lines > {args.max_function_lines}")
    if failed:
        print()
    for problem in failed:
        print(problem)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
