"""The layering of DESIGN.md, enforced: dsl/ knows no backend, compiler/ never imports torch or tvm,
dsl/ and backends/ never import each other, and nothing below specc/ imports the public package."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports(folder: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    yield path, a.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, node.module


FORBIDDEN = {
    "dsl": ("torch", "tvm", "specc.compiler", "specc.backends", "compiler", "backends", "specc.api", "specc.cli"),
    "compiler": ("torch", "tvm", "specc.backends", "backends", "specc.api", "specc.cli"),
    "backends": ("specc.dsl", "dsl", "specc.api", "specc.cli"),
}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layer_imports(folder):
    bad = [f"{p.relative_to(ROOT)} imports {m}" for p, m in imports(folder)
           if any(m == f or m.startswith(f + ".") for f in FORBIDDEN[folder])]
    assert not bad, "\n".join(bad)


def test_no_eval_or_exec_in_front_end():
    for folder in ("dsl", "compiler", "specc"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                    assert node.func.id not in ("eval", "exec"), f"{path}: {node.func.id}()"
