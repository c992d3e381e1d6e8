"""Results files are written only by the scripts that measured them (issue 22): every top-level
key of a committed ``benchmarks/results/*.json`` must be a key its writer script can produce (it
appears there as a string literal), so a hand-added block (a ``measured`` or ``source`` note,
a figure from elsewhere) fails here instead of reading as measured."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = sorted((BENCH / "results").glob("*.json"))


WRITERS = {"faults": "reliability.py"}  # results named for what they hold, not for their script


def writer_of(result: Path) -> Path:
    """``gpu_run<N>.json``: ``device_check.sh``; ``faults.json``: ``reliability.py``; ``<name>.json``: ``<name>.py``."""
    if re.fullmatch(r"gpu_run\d+", result.stem):
        return BENCH / "device_check.sh"
    return BENCH / WRITERS.get(result.stem, f"{result.stem}.py")


def string_literals(script: Path) -> set[str]:
    """Every string constant of a Python script; of a shell script, those of its Python heredocs
    and every quoted word."""
    text = script.read_text()
    if script.suffix == ".py":
        return string_literals_of_source(text)
    words = set(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", text))
    for block in re.findall(r"<<'EOF'\n(.*?)\nEOF\n", text, flags=re.S):
        words |= string_literals_of_source(block)
    return words


def string_literals_of_source(source: str) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)}


def test_every_results_file_has_a_writer():
    assert RESULTS and all(writer_of(r).exists() for r in RESULTS), [r.name for r in RESULTS if not writer_of(r).exists()]


@pytest.mark.parametrize("result", RESULTS, ids=lambda p: p.name)
def test_committed_keys_are_keys_its_script_writes(result):
    keys = set(json.loads(result.read_text()))
    unknown = sorted(keys - string_literals(writer_of(result)))
    assert not unknown, f"{result.name} holds {unknown}, which {writer_of(result).name} never writes: written by hand?"
