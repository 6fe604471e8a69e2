"""The package's shape, checked rather than eyed: no two modules import each other, directly or round a circle
(imports inside functions included)."""

from __future__ import annotations

import grimp


def test_no_module_imports_itself_round_a_circle():
    graph = grimp.build_graph("lora_ft", cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:
                cycles.append(" -> ".join((module,) + tuple(chain)))
    assert cycles == []
