"""The package's layering (issue 14), read from the source with ``ast``: no import circles,
evaluation needs neither extraction nor distillation, distillation takes only the teachers
from extraction, and the run-directory and device helpers each have one home."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"tests", "benchmarks", "build", ".venv", "demo-out", "runs"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["hgkd", *parts])


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP_DIRS or rel.name == "setup.py" or any(p.startswith(".") for p in rel.parts):
            continue
        found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """hgkd modules imported by ``name`` (relative imports resolved; ``from pkg import mod``
    counts as importing ``pkg.mod`` when that is a module)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # `if TYPE_CHECKING:` blocks never run
        nodes = [n for n in nodes if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.dump(n.test))]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hgkd"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("hgkd"):
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES)
    return {m for m in found if m in MODULES}


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    return {name: _imports(name, path, top_level_only) - {name} for name, path in MODULES.items()}


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_source_tree_is_parsed():
    assert {"hgkd.data.sources", "hgkd.distill.train", "hgkd.evaluate.tasks", "hgkd.storage.cache"} <= set(MODULES)
    graph = _graph(top_level_only=False)
    assert "hgkd.data.views" in graph["hgkd.distill.data"]  # the parser sees relative imports


@pytest.mark.parametrize("top_level_only", [True, False], ids=["import-time", "with-imports-inside-functions"])
def test_no_import_circles(top_level_only):
    """Cycles between modules (a package's ``__init__`` importing its own children is not one:
    Python finishes the package first); also through imports inside functions, which hide a
    circle instead of removing it (issue 20: data.sources <-> data.sample_index)."""
    graph = _graph(top_level_only=top_level_only)
    for name in graph:
        if name in MODULES and MODULES[name].name == "__init__.py":
            graph[name] = {m for m in graph[name] if not _is_under(m, name)}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("room, forbidden", [
    ("hgkd.evaluate", ("hgkd.extract", "hgkd.distill", "hgkd.pipelines")),
    ("hgkd.data", ("hgkd.extract", "hgkd.distill", "hgkd.evaluate", "hgkd.pipelines")),
    ("hgkd.storage", ("hgkd.extract", "hgkd.distill", "hgkd.evaluate", "hgkd.pipelines", "hgkd.data")),
    ("hgkd.extract", ("hgkd.distill", "hgkd.evaluate", "hgkd.pipelines")),
    ("hgkd.distill", ("hgkd.evaluate", "hgkd.pipelines")),
])
def test_rooms_do_not_import_the_rooms_above(room, forbidden):
    graph = _graph(top_level_only=False)
    bad = sorted(f"{m} -> {t}" for m, targets in graph.items() if _is_under(m, room)
                 for t in targets if any(_is_under(t, f) for f in forbidden))
    assert not bad, bad


def test_distillation_takes_only_the_teachers_from_extraction():
    graph = _graph(top_level_only=False)
    bad = sorted(f"{m} -> {t}" for m, targets in graph.items() if _is_under(m, "hgkd.distill")
                 for t in targets if _is_under(t, "hgkd.extract") and not _is_under(t, "hgkd.extract.teachers")
                 and t != "hgkd.extract")
    assert not bad, bad


def test_one_home_for_the_device_choice_and_the_checkpoint_folder():
    defs = [name for name, path in MODULES.items()
            if any(isinstance(n, ast.FunctionDef) and n.name == "resolve_device" for n in ast.walk(ast.parse(path.read_text())))]
    assert defs == ["hgkd.devices"]
    spelled = [name for name, path in MODULES.items()
               if any(isinstance(n, ast.Constant) and n.value in ("checkpoints", "last.pt")
                      for n in ast.walk(ast.parse(path.read_text())))]
    assert spelled == ["hgkd.run_layout"]


# Method-agnostic distillation (issue 14): what a method needs is declared on its class
# (``supervised``, ``teacher_needs``, ``config_options``, ``prefill_size``), so the trainer,
# the targets, the CLI and the config never name one.
METHOD_MODULES = sorted(m for m in MODULES if _is_under(m, "hgkd.distill.methods")
                        and m not in ("hgkd.distill.methods", "hgkd.distill.methods.base"))
METHOD_AGNOSTIC = sorted(m for m in MODULES if _is_under(m, "hgkd.distill") and not _is_under(m, "hgkd.distill.methods"))


def _names_a_method(name: str, source: str) -> list[str]:
    """Method names spelled as string literals, and imports of one method's module."""
    from hgkd.registry import METHOD_NAMES

    package = name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and node.value in METHOD_NAMES:
            found.append(f"literal {node.value!r} (line {node.lineno})")
        elif isinstance(node, ast.Import):
            targets = {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)] if node.level else []
            target = ".".join(parts + ([node.module] if node.module else []))
            targets = {target, *(f"{target}.{a.name}" for a in node.names)}
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found += [f"import of {t} (line {node.lineno})" for t in sorted(targets & set(METHOD_MODULES))]
    return found


def test_the_method_name_check_can_fail():
    source = 'from .methods.hsakd import rotate_batch\nif cfg.method == "hgkd":\n    pass\n'
    assert len(_names_a_method("hgkd.distill.train", source)) == 2
    assert "hgkd.distill.methods.hgkd" in METHOD_MODULES and "hgkd.distill.train" in METHOD_AGNOSTIC


@pytest.mark.parametrize("module", METHOD_AGNOSTIC)
def test_trainer_targets_cli_and_config_never_name_a_method(module):
    assert _names_a_method(module, MODULES[module].read_text()) == []
