"""The code's layers: bench → scheduler → worker → storage, no import running back up, no circle.

Every import counts, the ones inside functions too (a lazy import is how a circle hides). The graph
is read from the source with `ast`, so it sees every import whatever runs."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["storage", "worker", "scheduler", "bench"]      # each may import only itself and those before it


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that module `name` imports (anywhere in its source)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, the module mod.
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:       # `import a.b.c` where only a.b is ours
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_no_module_imports_a_layer_above_its_own():
    upward = sorted(f"{source} imports {target}" for source, targets in import_graph().items()
                    for target in targets if layer(target) > layer(source))
    assert upward == []


def test_no_import_circle():
    graph = import_graph()
    circles, state = [], {}                              # state: 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" → ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_the_command_line_is_imported_by_nothing():
    importers = sorted(source for source, targets in import_graph().items() if "scheduler.cli" in targets)
    assert importers == []


def test_the_graph_sees_imports_inside_functions_and_relative_imports():
    # The reader itself: a lazy relative import and a `from package import module` are edges.
    graph = import_graph()
    assert "worker.output" in graph["worker.postprocess"]          # from .output import encode_id_png
    assert "storage.objects" in graph["scheduler.submit"]          # from storage import objects
    assert "scheduler.dispatch" in graph["scheduler.cli"]          # inside a function: from .dispatch import …


# A file longer than this says at its top (its first TOP_LINES lines) why it must be one file, in a
# sentence that starts "Why one file:"; otherwise it is split by idea (as storage/jobs/ was).
LONG_FILE_LINES = 500
TOP_LINES = 30


def test_a_long_file_says_at_its_top_why_it_is_one_file():
    unexplained = []
    for path in project_modules().values():
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > LONG_FILE_LINES and not any("Why one file:" in line for line in lines[:TOP_LINES]):
            unexplained.append(path.relative_to(ROOT).as_posix())
    assert unexplained == []
