"""Import layers of src/medvlm, read with `ast` (nothing is imported); the graph and what counts as an import
are in import_graph.py.

Checked: (a) the graph of medvlm-internal imports has no cycle; (b) medvlm.model.* imports nothing of medvlm
outside medvlm.model except medvlm.errors, the settings (medvlm.config, its sections) and the strategy modules;
(c) the core modules (settings with the strategy modules, errors, paths, manifest) import only one another.
"""

from __future__ import annotations

from import_graph import SRC, graph as _graph

# The strategy modules (medvlm.strategies: each one's settings section and the code that marks / wraps the LM's
# parameters) belong to the settings layer: config_sections builds TrainConfig from them, so they may import only
# core modules (torch / peft only inside their functions, or in _modules.py which those functions import:
# settings load stays light).
STRATEGIES = {"medvlm.strategies", *(f"medvlm.strategies.{p.stem}" for p in (SRC / "medvlm" / "strategies").glob("*.py")
                                    if p.stem != "__init__")}
# medvlm.config stays allowed below medvlm.model: the model builders take the typed settings
# (ModelConfig, Config) that config.py defines, and config.py itself sits on errors only.
MODEL_MAY_IMPORT = {"medvlm.errors", "medvlm.config", "medvlm.config_sections", "medvlm.settings_base", *STRATEGIES}
# The bottom layer: settings, errors, paths and the manifest format. They may use one another, nothing else.
CORE = {"medvlm.errors", "medvlm.manifest", "medvlm.config", "medvlm.config_sections", "medvlm.settings_base",
        "medvlm.paths", "medvlm.env", *STRATEGIES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _a_cycle(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete loop through the component, start -> ... -> start, for the failure message."""
    members = set(component)
    start = component[0]
    path = [start]
    seen = {start}
    while True:
        nexts = sorted(graph[path[-1]] & members)
        if start in nexts and len(path) > 1:
            return path + [start]
        step = next((n for n in nexts if n not in seen), None)
        if step is None:  # dead end inside the component: fall back to listing it
            return component
        path.append(step)
        seen.add(step)


def test_the_graph_sees_the_modules():
    graph = _graph()
    assert "medvlm.cli" in graph and "medvlm.model.medvlm" in graph
    assert "medvlm.config" in graph["medvlm.paths"]  # a module-level import is seen
    assert graph["medvlm.cli"], "cli imports medvlm modules inside its commands; none were found"
    # the registry imports its strategy modules by listing its package, not by name: still edges
    assert {"medvlm.strategies.freeze", "medvlm.strategies.lora"} <= graph["medvlm.strategies"]
    assert "medvlm.strategies._modules" not in graph["medvlm.strategies"]


def test_no_import_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles in src/medvlm:\n" + "\n".join(
        f"  {' -> '.join(_a_cycle(c, graph))}   (modules: {', '.join(c)})" for c in cycles
    )


def test_model_depends_only_on_model_errors_config():
    graph = _graph()
    bad = {
        module: sorted(t for t in targets if not t.startswith("medvlm.model") and t not in MODEL_MAY_IMPORT)
        for module, targets in graph.items()
        if module == "medvlm.model" or module.startswith("medvlm.model.")
    }
    bad = {module: targets for module, targets in bad.items() if targets}
    assert not bad, "medvlm.model imports from above it: " + "; ".join(
        f"{module} -> {', '.join(targets)}" for module, targets in sorted(bad.items())
    )


def test_core_modules_import_only_core():
    graph = _graph()
    bad = {module: sorted(graph[module] - CORE) for module in CORE if module in graph}
    bad = {module: targets for module, targets in bad.items() if targets}
    assert not bad, "core modules import from above them: " + "; ".join(
        f"{module} -> {', '.join(targets)}" for module, targets in sorted(bad.items())
    )
