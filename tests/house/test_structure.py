"""The house rules, checked: imports point down the layers of ../shared/DESIGN.md with no cycle between modules
or between folders (function-level imports included), and no module in the library folders or benchmarks/ is
over 500 lines."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dpsel", "peft_train", "flows")
SIZED = PACKAGES + ("benchmarks",)   # the 500-line rule covers the benchmarks too
MAX_LINES = 500
FOLDER_DEPTH = 2   # dpsel.curation, dpsel.config, flows.tasks, peft_train.training, ...

# DESIGN.md's layers, top first: a folder may import its own layer or any below it, never one above.
LAYERS = (
    ("dpsel", "dpsel.__main__", "dpsel.cli", "dpsel.api", "dpsel.demo", "dpsel.demo_base", "dpsel.demo_estimate"),
    ("flows",),
    ("dpsel.curation", "dpsel.tuning", "dpsel.report", "dpsel.outputs", "dpsel.runlock", "dpsel.synth"),
    ("dpsel.config",),
    ("dpsel.select", "dpsel.stages", "dpsel.engines"),
    ("dpsel.models", "dpsel.loading"),
    ("dpsel.data", "dpsel.parallel", "dpsel.resume", "dpsel.io", "dpsel.errors", "dpsel.signals", "dpsel.progress",
     "dpsel.threads", "dpsel.numbers", "dpsel.version", "dpsel.stop_words"),
    ("peft_train",),
)
# Methods, stages and engines sit side by side and never import one another (engines: models and data only).
APART = {"dpsel.select", "dpsel.stages", "dpsel.engines"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def library_modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imported_names(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):   # every import, at module level or inside a function
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.add(full if full in modules else base)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = library_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = {_resolve(n, modules) for n in _imported_names(module, path, modules)}
        # a package's own __init__ is implied by importing a submodule; an import of a parent package by
        # its child is the usual package pattern and only counts when the parent imports the child back
        graph[module] = {t for t in targets if t and t != module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def folder_of(module: str, depth: int = FOLDER_DEPTH) -> str:
    return ".".join(module.split(".")[:depth])


def folder_graph(graph: dict[str, set[str]], depth: int = FOLDER_DEPTH) -> dict[str, set[str]]:
    """The module graph seen folder by folder: an edge between two folders for any import between them."""
    folders: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = folder_of(module, depth)
        folders.setdefault(source, set()).update(folder_of(t, depth) for t in targets)
        folders[source].discard(source)
    return folders


def layer_of(folder: str) -> int:
    """A folder's layer: its own entry, else its top package's (`flows.tasks` -> `flows`)."""
    for name in (folder, folder.split(".")[0]):
        for rank, members in enumerate(LAYERS):
            if name in members:
                return rank
    raise AssertionError(f"{folder} is in no layer of tests/house/test_structure.py's LAYERS: place it there")


def upward_imports(folders: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, or between the folders kept apart."""
    wrong = []
    for source, targets in sorted(folders.items()):
        for target in sorted(targets):
            if layer_of(target) < layer_of(source) or (source in APART and target in APART):
                wrong.append(f"{source} -> {target}")
    return wrong


def test_library_import_graph_has_no_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_cycle_between_folders():
    cycles = find_cycles(folder_graph(import_graph()))
    assert not cycles, "folder cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_imports_point_down_the_layers():
    wrong = upward_imports(folder_graph(import_graph()))
    assert not wrong, "imports up the layers (or between methods, stages and engines): " + "; ".join(wrong)


def test_no_module_is_over_500_lines_benchmarks_included():
    files = [p for pkg in SIZED for p in sorted((ROOT / pkg).rglob("*.py"))]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_a_planted_folder_cycle_fails_though_no_module_cycle_does():
    # dpsel.config.x -> dpsel.curation.y and dpsel.curation.z -> dpsel.config.w: acyclic module by module
    graph = {"dpsel.config.x": {"dpsel.curation.y"}, "dpsel.curation.y": set(),
             "dpsel.curation.z": {"dpsel.config.w"}, "dpsel.config.w": set()}
    assert find_cycles(graph) == []
    assert find_cycles(folder_graph(graph)) == [["dpsel.config", "dpsel.curation"]]


def test_the_layer_check_finds_a_planted_upward_import():
    graph = {"dpsel.engines.ray_engine": {"dpsel.select.scorers", "dpsel.models.lm"},
             "dpsel.models.lm": {"dpsel.resume.checkpoints"}, "dpsel.select.scorers": set(),
             "dpsel.resume.checkpoints": {"dpsel.curation.run"}, "dpsel.curation.run": set()}
    assert upward_imports(folder_graph(graph)) == ["dpsel.engines -> dpsel.select", "dpsel.resume -> dpsel.curation"]
