"""Package list, derived so it cannot go stale: the checkout's root is the import package
``hgkd`` (``package_dir hgkd = .`` in setup.cfg) and every folder below it with an
``__init__.py`` ships as ``hgkd.<folder>``, except the tests and benchmarks. Everything
else is declared in setup.cfg."""
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

SUBPACKAGES = find_packages(".", exclude=["tests", "tests.*", "benchmarks", "benchmarks.*", "build", "build.*"])


class BuildPy(build_py):
    """The root folder is package ``hgkd``: keep this script out of it."""

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (package == "hgkd" and m[1] == "setup")]


setup(packages=["hgkd", *(f"hgkd.{name}" for name in SUBPACKAGES)], cmdclass={"build_py": BuildPy})
