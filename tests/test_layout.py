"""The package's layering: the library never imports the command line, and no module imports itself back."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import boatvit

PACKAGE = Path(boatvit.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports_of(path: Path, modules: Set[str]) -> Set[str]:
    """The boatvit modules ``path`` imports by name, anywhere in the file (lazy imports too); a parent package is
    not counted as imported unless named."""
    name = module_name(path)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.rsplit('.', node.level - 1)[0] if node.level > 1 else package
                base = f'{anchor}.{base}' if base else anchor
            found.add(base)
            found.update(f'{base}.{a.name}' for a in node.names)  # `from . import x` names a module
    return {m for m in found if m in modules and m != name}


def import_graph() -> Dict[str, Set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob('*.py')}
    return {name: imports_of(path, set(files)) for name, path in files.items()}


def test_the_graph_sees_known_imports():
    graph = import_graph()
    assert 'boatvit.weights' in graph['boatvit.cli.eval'] or 'boatvit.evaluation' in graph['boatvit.cli.eval']
    assert 'boatvit.checkpoint' in graph['boatvit.models.base']
    assert 'boatvit.errors' in graph['boatvit.safe_load']


def test_only_the_command_line_imports_the_command_line():
    graph = import_graph()
    offenders = {
        m: sorted(i for i in imports if i.startswith('boatvit.cli'))
        for m, imports in graph.items()
        if not m.startswith(('boatvit.cli', 'boatvit.__main__'))
    }
    assert not {m: i for m, i in offenders.items() if i}


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: Dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                raise AssertionError('import cycle: ' + ' -> '.join(path[path.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_errors_is_the_bottom():
    assert import_graph()['boatvit.errors'] == set()
