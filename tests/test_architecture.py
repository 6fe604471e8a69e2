"""The package's shape, checked rather than eyed: the import layers in pyproject.toml hold (import-linter), and no
two modules import each other, directly or round a circle (imports inside functions included)."""

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
