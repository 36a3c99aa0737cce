"""The layout's rules, read from the source: imports go one way between packages, no module imports itself back
through others, and the model files that ship with the weights import only each other."""

import ast
from pathlib import Path

from tests.helpers import REPO

# Each package may import the ones listed (besides itself): the data -> training -> checkpoints -> eval flow, with
# cli under everything and the demo and the app on top.
ALLOWED = {
    "cli": set(),
    "modeling": {"cli"},
    "data": {"cli"},
    "eval": {"cli", "modeling", "data"},
    "training": {"cli", "modeling", "data", "eval"},
    "demo": {"cli", "modeling", "data", "eval", "training"},
    "app": {"cli", "modeling", "data", "eval"},
    "benchmarks": {"cli", "modeling", "data", "eval", "training"},
}
# Saved with the weights by save_pretrained: only sibling relative imports are followed there.
SHIPPED = ("configuration_qformer", "configuration_vlm", "modeling_qformer", "modeling_vlm", "processing_vlm",
           "qformer_losses")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Project modules imported by `path` (relative imports resolved), as dotted names."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in ALLOWED}


def _project_modules() -> dict[str, set[str]]:
    modules = {}
    for package in ALLOWED:
        for path in sorted((REPO / package).rglob("*.py")):
            modules[_module_name(path)] = _imports(path)
    # Keep only names that are modules (an imported function's "module.name" is not one).
    return {name: {i for i in imports if i in modules} for name, imports in modules.items()}


def test_packages_import_only_the_layers_below_them():
    wrong = [f"{module} imports {target}" for module, imports in _project_modules().items() for target in imports
             if target.split(".")[0] not in ALLOWED[module.split(".")[0]] | {module.split(".")[0]}]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = _project_modules()
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, trail: list[str]):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*trail[trail.index(target):], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_shipped_model_files_import_only_each_other():
    for name in SHIPPED:
        path = REPO / "modeling" / f"{name}.py"
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in SHIPPED, f"{name}: from {'.' * node.level}{node.module}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not {n.split(".")[0] for n in names} & set(ALLOWED), f"{name} imports {names}"
