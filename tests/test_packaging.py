"""The built wheel is complete on its own (issue: a fresh machine and a pip wheel).

The editable install the suite runs under can hide a package missing from the wheel: its
finder resolves any ``hgkd.*`` name from the source tree. Here the wheel is built, installed
into a throwaway folder, and used from a process where the source tree is not on
``sys.path`` and the editable finder is removed.
"""
from __future__ import annotations

import configparser
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run first in the child: drop the editable finder and the checkout from the import system,
# then put only the installed wheel in front.
ISOLATE = """
import sys
site = sys.argv[1]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
root = {root!r}
sys.path[:] = [site] + [p for p in sys.path if p not in ("", ".", root)]  # the venv stays
""".format(root=str(ROOT))

IMPORT_ALL = ISOLATE + """
import importlib, json, pathlib
names = []
for path in sorted((pathlib.Path(site) / "hgkd").rglob("*.py")):
    parts = path.relative_to(site).with_suffix("").parts
    names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
files = {}
for name in names:
    module = importlib.import_module(name)
    files[name] = module.__file__
print(json.dumps(files))
"""

RUN_SCRIPT = ISOLATE + """
import importlib
module_name, func = sys.argv[2].split(":")
sys.argv = [sys.argv[3], *sys.argv[4:]]
getattr(importlib.import_module(module_name), func)()
"""


def source_packages() -> set[str]:
    """Every folder with an ``__init__.py`` under the shipped top-level folders."""
    shipped = {"hgkd"}
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if not rel.parts or rel.parts[0] in ("tests", "benchmarks") or rel.parts[0].startswith((".", "build")):
            continue
        shipped.add(".".join(("hgkd", *rel.parts)))
    return shipped


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("wheel")
    # build from a copy: setuptools reuses an in-tree build/ folder, which can ship stale files
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                              "runs", "demo-out*", "*.zarr", ".whl", ".pytest_cache"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("hgkd-*.whl")
    site = tmp / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    return wheel, site


def wheel_packages(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return {str(Path(name).parent).replace("/", ".") for name in zf.namelist()
                if name.startswith("hgkd/") and name.endswith("/__init__.py")}


def test_wheel_ships_every_package_and_the_pipeline_files(installed_wheel: tuple[Path, Path]) -> None:
    wheel, _ = installed_wheel
    assert wheel_packages(wheel) == source_packages()
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    yamls = {f"hgkd/pipelines/{p.name}" for p in (ROOT / "pipelines").glob("*.yaml")}
    assert yamls and yamls <= names
    assert not any(n.startswith(("hgkd/tests/", "hgkd/benchmarks/", "tests/")) for n in names)
    assert "hgkd/setup.py" not in names


def test_installed_wheel_imports_every_module_without_the_source_tree(installed_wheel: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    _, site = installed_wheel
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL, str(site)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "hgkd.distill.methods" in files and len(files) > 40
    outside = {name: f for name, f in files.items() if not f.startswith(str(site))}
    assert not outside, f"imported from outside the installed wheel: {outside}"


def test_installed_console_scripts_answer_help(installed_wheel: tuple[Path, Path], tmp_path: Path) -> None:
    wheel, site = installed_wheel
    with zipfile.ZipFile(wheel) as zf:
        entry_txt = next(zf.read(n).decode() for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
    parser = configparser.ConfigParser()
    parser.read_string(entry_txt)
    scripts = dict(parser["console_scripts"])
    assert set(scripts) == {"hgkd-extract", "hgkd-distill", "hgkd-evaluate", "hgkd-pipeline"}
    for name, target in scripts.items():
        proc = subprocess.run([sys.executable, "-c", RUN_SCRIPT, str(site), target, name, "--help"],
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, f"{name} --help: {proc.stderr[-2000:]}"
        assert "Usage:" in proc.stdout
        # every subcommand answers too (a missing module surfaces only there)
        commands = [line.split()[0] for line in proc.stdout.split("Commands:")[-1].splitlines()[1:] if line.strip()]
        for command in commands:
            sub = subprocess.run([sys.executable, "-c", RUN_SCRIPT, str(site), target, name, command, "--help"],
                                 capture_output=True, text=True, cwd=tmp_path)
            assert sub.returncode == 0, f"{name} {command} --help: {sub.stderr[-2000:]}"
