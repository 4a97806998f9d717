"""The graph of medvlm-internal imports, read from src/medvlm with `ast` (nothing is imported).

Every `import` / `from ... import` counts, at module level and inside functions alike: a function-local import
still ties the two modules together (it only defers the cost). Relative imports are resolved. An import of
`medvlm.x.y` is an edge to module medvlm.x.y when that module exists, else to the package it names; `from
medvlm.x import y` is an edge to medvlm.x.y when y is a submodule, else to medvlm.x. A package whose __init__.py
lists its own modules with `pkgutil.iter_modules` (a registry such as medvlm.strategies) imports each of them whose
name does not start with "_": the registry's import of them is by name, so `ast` would not see it otherwise.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "medvlm"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module and package under src/medvlm."""
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The deepest existing medvlm module `name` refers to (medvlm.x.y -> medvlm.x.y, else medvlm.x, ...)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def imports_in(tree: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    """medvlm modules imported anywhere inside `tree`, a piece of `module`'s code (relative imports resolve
    against `module`, a package when `is_package`)."""
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    targets: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    targets.add(resolve(alias.name, known))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin != PACKAGE and not origin.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                # `from medvlm.model import vision` names a submodule; `from medvlm.model import X` a package member
                targets.add(resolve(f"{origin}.{alias.name}", known))
    targets.discard(None)
    targets.discard(module)
    return targets  # type: ignore[return-value]


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def discovered(package: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules a registry package imports by listing itself (see the module docstring); none for others."""
    if path.name != "__init__.py" or "pkgutil.iter_modules" not in path.read_text():
        return set()
    return {m for m in known if m.rpartition(".")[0] == package and not m.rpartition(".")[2].startswith("_")}


def graph() -> dict[str, set[str]]:
    """Module -> the medvlm modules it imports anywhere in its file."""
    known = modules()
    return {name: imports_in(parse(path), name, path.name == "__init__.py", known) | discovered(name, path, known)
            for name, path in known.items()}
