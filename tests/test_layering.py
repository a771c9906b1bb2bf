"""The package's layers, read from the source: the core library ``flamingo`` imports neither the evaluation package
nor the training one, evaluation never imports training, and no module imports itself through a circle.

Every import counts, at the top of a file or inside a function (a deferred import is still a dependency); only
imports under ``if TYPE_CHECKING:`` do not, since they never run. The checker itself is tested on small fake trees.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Folder -> import name (pyproject.toml's package-dir), lowest floor first: a module may import its own floor and
# those below it.
FLOORS = {"flamingo": "flamingo", "eval": "flamingo_eval", "training": "flamingo_train"}


def module_files(root: Path, floors: dict[str, str]) -> dict[str, Path]:
    """``{module name: file}`` for every .py file of the packages (a package's own name maps to its __init__)."""
    modules = {}
    for folder, package in floors.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = [package, *path.relative_to(root / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _runtime_imports(tree: ast.AST):
    """Import nodes that run: everything but the bodies of ``if TYPE_CHECKING:`` blocks."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skipped:
            yield node


def import_graph(root: Path, floors: dict[str, str] = FLOORS) -> dict[str, set[str]]:
    """``{module: the package modules it imports}``; ``from a.b import c`` means module ``a.b.c`` if that is one."""
    modules = module_files(root, floors)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in _runtime_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                targets.add(candidate if candidate in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def floor_violations(graph: dict[str, set[str]], floors: dict[str, str] = FLOORS) -> list[str]:
    """``"a imports b"`` for every import of a higher floor than the importer's own."""
    rank = {package: i for i, package in enumerate(floors.values())}

    def floor(module: str) -> int:
        return rank[module.split(".")[0]]

    return sorted(f"{a} imports {b}" for a, targets in graph.items() for b in targets if floor(b) > floor(a))


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other in a circle (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
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
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


# ------------------------------------------------------------------------------------------------ the package
def test_the_core_library_imports_neither_evaluation_nor_training_and_evaluation_never_imports_training():
    assert floor_violations(import_graph(ROOT)) == []


def test_no_module_imports_itself_through_a_circle():
    assert import_cycles(import_graph(ROOT)) == []


def test_the_checker_sees_every_module_of_the_three_packages():
    graph = import_graph(ROOT)
    assert {"flamingo.modeling", "flamingo.pretrained", "flamingo_eval.runner", "flamingo_train.train"} <= set(graph)
    assert "flamingo.pretrained" in graph["flamingo.modeling"]  # a relative import, resolved
    assert "flamingo.modeling" in graph["flamingo.factory"]


# ------------------------------------------------------------------------------------------------ the checker
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_checker_finds_a_circle_made_by_an_import_inside_a_function(tmp_path):
    root = _tree(tmp_path, {
        "flamingo/__init__.py": "",
        "flamingo/factory.py": "from .modeling import Model\n",
        "flamingo/modeling.py": "def save():\n    from .pretrained import save_model\n",
        "flamingo/pretrained.py": "from flamingo.factory import build\n",
        "flamingo/leaf.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .factory import build\n",
    })
    graph = import_graph(root, {"flamingo": "flamingo"})
    assert import_cycles(graph) == [["flamingo.factory", "flamingo.modeling", "flamingo.pretrained"]]
    assert graph["flamingo.leaf"] == set()  # a TYPE_CHECKING import never runs


def test_the_checker_finds_a_core_module_that_imports_a_higher_floor(tmp_path):
    root = _tree(tmp_path, {
        "flamingo/__init__.py": "",
        "flamingo/demo.py": "from flamingo_eval.runner import Evaluator\nfrom flamingo_train.recipes import micro\n",
        "eval/__init__.py": "",
        "eval/runner.py": "import flamingo.demo\n",
        "training/__init__.py": "",
        "training/recipes/__init__.py": "",
        "training/recipes/micro.py": "from flamingo_eval import runner\n",
    })
    graph = import_graph(root)
    assert floor_violations(graph) == [
        "flamingo.demo imports flamingo_eval.runner", "flamingo.demo imports flamingo_train.recipes.micro",
    ]
    assert import_cycles(graph) == [["flamingo.demo", "flamingo_eval.runner", "flamingo_train.recipes.micro"]]
