"""Structure facts about the selfdistill package, from its source alone (ast, no imports run).

    python scripts/structure.py            # print the facts; exit 1 if any rule is broken
    python scripts/structure.py --graph    # also print every module's imports inside the package

Rules checked:
- no import circle between modules, counting imports inside functions and a submodule that imports
  from its own package's __init__ (which imports it back);
- no import circle between folders (each package, or module at the package root, one node), so that
  folders of one layer do not lean on each other both ways either;
- no import from a lower layer to a higher one (LAYERS below, lowest first);
- no function longer than MAX_FUNCTION_LINES lines.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "selfdistill"
MAX_FUNCTION_LINES = 60

# Lowest first. A module may import from its own layer or any layer below it, never above.
# Each entry names a folder (package) or a module at the package root, below `selfdistill.`: a whole
# folder sits in one layer, so a module that belongs higher moves to a folder that is higher.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["errors", "files", "precision", "config", "registry", "options"]),
    ("models and data", ["models", "data", "progress"]),
    ("sampling and distillation", ["sampling", "distillation"]),
    ("methods", ["methods"]),
    ("training", ["training"]),
    ("tasks", ["tasks"]),
    ("evaluation", ["eval"]),
    ("workflows", ["continual", "diagnosis", "memory_plan"]),
    ("reports", ["report"]),
    ("learner", ["learner"]),
    ("serve", ["serve"]),
    ("api", ["api"]),
    ("cli", ["cli", "commands"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that `name` imports anywhere in its source (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text(), str(path))
    type_checking = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for n in ast.walk(block)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(name, path.name == "__init__.py", node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    # Importing a.b.c runs a/__init__ and a/b/__init__ first.
    for target in list(found):
        parts = target.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in known and parent != name and not name.startswith(parent + "."):
                found.add(parent)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                result.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return result


def folder_of(name: str) -> str:
    """The folder (or root module) a module is in: selfdistill.eval.graders -> eval."""
    return name.removeprefix("selfdistill").lstrip(".").partition(".")[0]


def layer_of(name: str) -> int | None:
    folder = folder_of(name)
    return next((number for number, (_, folders) in enumerate(LAYERS) if folder in folders), None)


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between folders: an edge wherever a module of one imports a module of another."""
    folders: dict[str, set[str]] = {folder_of(name): set() for name in graph if name != "selfdistill"}
    for name, targets in graph.items():
        for target in targets:
            if name != "selfdistill" and target != "selfdistill" and folder_of(target) != folder_of(name):
                folders[folder_of(name)].add(folder_of(target))
    return folders


def long_functions(paths: dict[str, Path]) -> list[tuple[str, int]]:
    found = []
    for name, path in paths.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append((f"{name}.{node.name} ({path.relative_to(PACKAGE.parent)}:{node.lineno})", length))
    return sorted(found, key=lambda item: -item[1])


def main() -> int:
    paths = modules()
    known = set(paths)
    graph = {name: imports_of(name, path, known) for name, path in paths.items()}
    if "--graph" in sys.argv:
        for name in sorted(graph):
            print(name, "->", ", ".join(sorted(graph[name])) or "-")
    circles = cycles(graph)
    folder_circles = cycles(folder_graph(graph))
    unlayered = sorted(name for name in paths if name != "selfdistill" and layer_of(name) is None)
    upward = sorted(
        f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
        for a, targets in graph.items()
        for b in targets
        if layer_of(a) is not None and layer_of(b) is not None and layer_of(b) > layer_of(a)
    )
    long = long_functions(paths)
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    print(f"modules: {len(paths)} ({len(root)} at the package root: {', '.join(root)})")
    print("layers, lowest first: " + " < ".join(f"{n} [{', '.join(p)}]" for n, p in LAYERS))
    print(f"import circles: {len(circles)}")
    for circle in circles:
        print("  " + " <-> ".join(circle))
    print(f"import circles between folders: {len(folder_circles)}")
    for circle in folder_circles:
        print("  " + " <-> ".join(circle))
    print(f"modules in no layer: {len(unlayered)}" + (f" ({', '.join(unlayered)})" if unlayered else ""))
    print(f"imports from a lower layer to a higher one: {len(upward)}")
    for line in upward:
        print("  " + line)
    print(f"functions over {MAX_FUNCTION_LINES} lines: {len(long)}")
    for where, length in long:
        print(f"  {length:4d}  {where}")
    return 1 if circles or folder_circles or upward or long or unlayered else 0


if __name__ == "__main__":
    raise SystemExit(main())
