"""The package's shape, checked rather than eyed: the import layers in pyproject.toml hold (import-linter), and no
two modules import each other, directly or round a circle (imports inside functions included), an import of the
package inside a function says why on its line, and no module is far past 500 lines."""

from __future__ import annotations

from pathlib import Path

import grimp
from importlinter.application.use_cases import lint_imports
from importlinter.configuration import configure

REPO = Path(__file__).resolve().parents[1]


def test_imports_follow_the_layers_in_pyproject(monkeypatch):
    monkeypatch.chdir(REPO)  # import-linter reads [tool.importlinter] from the working folder's pyproject.toml
    configure()  # what the lint-imports command does first: register its readers and contract types
    assert lint_imports(config_filename=str(REPO / "pyproject.toml"), cache_dir=None, no_logo=True) is True  # it prints the broken chain


def test_no_module_imports_itself_round_a_circle():
    graph = grimp.build_graph("lora_ft", cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:
                cycles.append(" -> ".join((module,) + tuple(chain)))
    assert cycles == []


def _function_level_package_imports():
    """(module file, line, text) of every import of lora_ft inside a function body."""
    import ast

    found = []
    for path in sorted((REPO / "lora_ft").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                package = (isinstance(inner, ast.ImportFrom) and (inner.level > 0 or (inner.module or "").startswith("lora_ft"))
                           ) or (isinstance(inner, ast.Import) and any(a.name.startswith("lora_ft") for a in inner.names))
                if package:
                    found.append((path.relative_to(REPO), inner.lineno, lines[inner.lineno - 1].strip()))
    return sorted(set(found))


def test_package_imports_sit_at_the_top_unless_marked_lazy_with_a_reason():
    """An import inside a function hides a dependency from the layer check's reader; one stays only where import
    time is measured to matter (a refusal must not pay for torch) or a cycle forces it, and says so on its line."""
    unmarked = [f"{path}:{line}: {text}" for path, line, text in _function_level_package_imports()
                if "# lazy:" not in text]
    assert unmarked == []


def test_no_module_is_far_past_500_lines():
    sizes = {str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines())
             for p in (REPO / "lora_ft").rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 520} == {}
