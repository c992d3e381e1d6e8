"""``benchmarks/device_check.sh`` runs only on a GPU machine lent for minutes, so a stale import
in one of its inline Python parts is found there too late. Its parts are checked here: each
compiles, and every name it imports from hgkd exists (the full CPU run is
``device_check.sh OUT --dry-run``, a few minutes)."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.sh"


def inline_parts() -> list[tuple[int, str]]:
    """(line, source) of every ``<<'EOF'`` heredoc that the script feeds to Python."""
    text = SCRIPT.read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"<<'EOF'\n(.*?)\nEOF\n", text, flags=re.S)]


def test_the_script_has_inline_python_parts():
    assert len(inline_parts()) >= 2


@pytest.mark.parametrize("line, source", inline_parts(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_inline_part_compiles_and_its_hgkd_imports_exist(line, source):
    tree = compile(source, f"{SCRIPT.name}:{line}", "exec", flags=ast.PyCF_ONLY_AST)
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hgkd"):
            module = importlib.import_module(node.module)
            missing += [f"{node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)
                        and not (hasattr(module, "__path__") and importlib.util.find_spec(f"{node.module}.{a.name}"))]
    assert not missing, f"{SCRIPT.name} (part at line {line}) imports names that do not exist: {missing}"
