"""dvc.yaml lists, per stage, exactly the src/medvlm modules the stage's command runs: every module it imports is
a dep (a change to it re-runs the stage) and no dep is a module it never imports (a change to that would re-run
the stage for nothing). Data and params deps are not checked here.

What a stage runs is derived, nothing is listed by hand:
  stages       as DVC itself expands dvc.yaml (foreach / matrix included): name, cmd, deps;
  entry        `medvlm <verb> ...` resolved to its command function by the CLI's own command tree (typer/click);
               the modules that function imports (its body is where the stage's implementation is imported
               lazily), the ones imported by the CLI helpers and decorators it uses (e.g. `_config` ->
               medvlm.config, medvlm.paths), by the group callbacks on the way, and the CLI module's own
               module-level imports, which run for every command;
  closure      every medvlm module reachable from the entry in the import graph (import_graph.py: module-level
               and function-local imports alike), plus the packages above each module, whose __init__.py runs
               on import (importing medvlm.model.encoder runs medvlm/model/__init__.py and all it imports).
The CLI module itself is the shell every command shares, not a stage's implementation: it is not in the closure
(a stage listing src/medvlm/cli.py is reported as stale), or every help-text edit would re-run the whole pipeline.
A dep covers a module when it is the module's file or a folder holding it; a folder dep must hold only modules
the stage imports.
"""

from __future__ import annotations

import ast
import inspect
import shlex
from collections import deque
from pathlib import Path

import pytest

from import_graph import PACKAGE, SRC, graph, imports_in, modules, parse

REPO = SRC.parent
SOURCE = (SRC / PACKAGE).relative_to(REPO).as_posix()  # "src/medvlm": deps under it are checked


def _dvc_stages() -> list[tuple[str, str, list[str]]]:
    """(name, cmd, deps) for every stage, as DVC resolves dvc.yaml (foreach/matrix expanded, ${...} filled in)."""
    repo_mod = pytest.importorskip("dvc.repo")
    with repo_mod.Repo(str(REPO)) as repo:
        stages = [(s.addressing, s.cmd, [Path(d.def_path).as_posix() for d in s.deps]) for s in repo.index.stages]
    assert stages, "DVC found no stages in dvc.yaml"
    return stages


def _command_functions(cmd: str) -> list:
    """The Python functions `cmd` runs through the medvlm CLI: each group callback on the way, then the command."""
    import typer.main

    from medvlm.cli import app

    tokens = shlex.split(cmd if isinstance(cmd, str) else " && ".join(cmd))
    assert tokens and tokens[0] == PACKAGE, f"`{cmd}` is not a `{PACKAGE} ...` command"
    command = typer.main.get_command(app)
    functions = []
    path = [PACKAGE]
    for token in tokens[1:]:
        if not hasattr(command, "commands"):  # a command, not a group (typer vendors its own click: no isinstance)
            break  # the rest are the command's arguments
        if command.callback is not None:
            functions.append(inspect.unwrap(command.callback))
        assert token in command.commands, f"`{cmd}`: `{' '.join(path)}` has no command {token!r}"
        command = command.commands[token]
        path.append(token)
    assert not hasattr(command, "commands"), f"`{cmd}` names a command group, not a command"
    functions.append(inspect.unwrap(command.callback))
    return functions


def _entry_modules(functions: list, known: dict[str, Path]) -> tuple[str, set[str]]:
    """(the CLI module, the medvlm modules that running `functions` imports directly): their own imports, those
    of the same-module functions they use (helpers, decorators; followed transitively) and the module-level
    imports of their module."""
    owners = {f.__module__ for f in functions}
    assert len(owners) == 1, f"the command's functions live in several modules: {sorted(owners)}"
    (cli_module,) = owners
    path = known[cli_module]
    is_package = path.name == "__init__.py"
    tree = parse(path)
    defs = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    entry = set()
    for node in tree.body:  # what importing the CLI module runs
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            entry |= imports_in(node, cli_module, is_package, known)
    todo = [f.__name__ for f in functions]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        node = defs[name]
        entry |= imports_in(node, cli_module, is_package, known)  # the body and the decorators
        todo += [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in defs]
    entry.discard(cli_module)
    return cli_module, entry


def _closure(entry: set[str], cli_module: str, edges: dict[str, set[str]]) -> dict[str, list[str]]:
    """Every module that importing `entry` runs -> one import chain that reaches it (for the failure message)."""

    def with_packages(module: str) -> list[str]:  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        parts = module.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts))] + [module]

    chains: dict[str, list[str]] = {}
    queue = deque()
    for module in sorted(entry):
        for step in with_packages(module):
            if step not in chains:
                chains[step] = [step]
                queue.append(step)
    while queue:
        module = queue.popleft()
        for target in sorted(edges[module]):
            for step in with_packages(target):
                if step not in chains:
                    chains[step] = chains[module] + [step]
                    queue.append(step)
    chains.pop(cli_module, None)
    return chains


def _mismatch(needed: set[str], deps: list[str], source: Path = REPO) -> tuple[list[str], list[str]]:
    """(needed module files no dep covers, deps under src/medvlm naming modules outside `needed`); files are
    repo-relative posix paths, `source` the folder they are relative to."""

    def covers(dep: str, file: str) -> bool:
        return file == dep or file.startswith(dep + "/")

    ours = [d.rstrip("/") for d in deps if covers(SOURCE, d.rstrip("/"))]
    missing = sorted(f for f in needed if not any(covers(d, f) for d in ours))
    stale = []
    for dep in ours:
        where = source / dep
        if where.is_dir():
            held = (p.relative_to(source).as_posix() for p in where.rglob("*.py"))
            extra = sorted(f for f in held if f not in needed)
            if extra:
                stale.append(f"{dep}/ (holds {', '.join(extra)})")
        elif dep.endswith(".py") and dep not in needed:
            stale.append(dep)
    return missing, stale


def _needed_files(cmd: str, known: dict[str, Path], edges: dict[str, set[str]]) -> dict[str, list[str]]:
    cli_module, entry = _entry_modules(_command_functions(cmd), known)
    return {known[m].relative_to(REPO).as_posix(): chain for m, chain in _closure(entry, cli_module, edges).items()}


def test_every_stage_depends_on_exactly_the_modules_it_imports():
    known, edges = modules(), graph()
    problems = []
    for name, cmd, deps in _dvc_stages():
        needed = _needed_files(cmd, known, edges)
        missing, stale = _mismatch(set(needed), deps)
        lines = [f"    missing {f}   (imports {' -> '.join(needed[f])})" for f in missing]
        lines += [f"    stale   {d}   (`{cmd}` never imports it)" for d in stale]
        if lines:
            problems.append(f"  stage {name}:\n" + "\n".join(lines))
    assert not problems, "dvc.yaml deps differ from what the stages import:\n" + "\n".join(problems)


def test_the_entry_is_the_command_function_and_what_it_imports():
    """`medvlm data split` runs cli.data_split (after the app callback), which imports medvlm.data.split; the CLI's
    `_config` adds medvlm.config and medvlm.paths, its module-level import medvlm.errors."""
    known = modules()
    functions = _command_functions("medvlm data split")
    assert [f.__name__ for f in functions] == ["main", "data_split"]
    cli_module, entry = _entry_modules(functions, known)
    assert cli_module == "medvlm.cli"
    assert entry == {"medvlm.data.split", "medvlm.config", "medvlm.paths", "medvlm.errors"}
    closure = _closure(entry, cli_module, graph())
    assert {"medvlm", "medvlm.env", "medvlm.data", "medvlm.data.validate"} <= set(closure)  # packages, transitive
    assert "medvlm.cli" not in closure and not any(m.startswith("medvlm.model") for m in closure)
    assert closure["medvlm.data.validate"] == ["medvlm.data.split", "medvlm.data.validate"]
    with pytest.raises(AssertionError, match="no command 'nope'"):
        _command_functions("medvlm data nope")


def test_the_check_reports_missing_and_stale_deps(tmp_path):
    for file in ("src/medvlm/a.py", "src/medvlm/sub/b.py", "src/medvlm/sub/c.py"):
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_text("")
    needed = {"src/medvlm/a.py", "src/medvlm/sub/b.py"}
    assert _mismatch(needed, ["data/x", "src/medvlm/a.py", "src/medvlm/sub/b.py"], tmp_path) == ([], [])
    assert _mismatch(needed, ["src/medvlm/sub/b.py"], tmp_path) == (["src/medvlm/a.py"], [])
    assert _mismatch(needed, ["src/medvlm/a.py", "src/medvlm/sub"], tmp_path) == (
        [], ["src/medvlm/sub/ (holds src/medvlm/sub/c.py)"])
    assert _mismatch({"src/medvlm/a.py"}, ["src/medvlm/a.py", "src/medvlm/sub/c.py"], tmp_path) == (
        [], ["src/medvlm/sub/c.py"])
