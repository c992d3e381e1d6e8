"""One registry mechanism for every kind of pluggable part (teachers, students, methods).

Mirrors timm's `register_model`: factories are registered by name and looked up from the CLI.
The names of the registries whose home needs torch (teachers, students, methods, and the probe
heads) are also declared below, in this torch-free module, so that every ``--help`` lists them
without importing torch, timm or zarr; ``tests/test_cli_usability.py`` checks each list equals
the real one. Names whose home is torch-free are imported from it instead (the token codecs
and compressors: ``hgkd.storage.codecs``).
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import HgkdError

T = TypeVar("T")

# Names the CLIs offer, declared for --help. Adding a teacher, student, method or probe head: add its name here too.
TEACHER_NAMES = ("beit_large_patch16", "beit_tiny_patch16", "cae_large_patch16", "cae_tiny_patch16",
                 "mae_vit_large_patch16", "mae_vit_mini_patch16", "mae_vit_tiny_patch16")  # hgkd.extract.teachers
STUDENT_NAMES = ("resnet18", "resnet34", "resnet50")  # hgkd.distill.students.STUDENT_ENCODERS
METHOD_NAMES = ("at", "crd", "dist", "fitnet", "hgkd", "hsakd", "icd", "kd", "pkt", "rkd", "sp",
                "vanilla")  # hgkd.distill.methods.METHODS
DEFAULT_METHOD = "hgkd"  # the paper's method: DistillConfig.method's default
PROBE_HEAD_NAMES = ("mlp", "linear")  # hgkd.evaluate.probe.HEADS


class Registry(Generic[T]):
    """Name -> factory mapping for one kind of component (e.g. ``"teacher"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, fn: Callable[..., T]) -> Callable[..., T]:
        """Decorator: register ``fn`` under its function name."""
        return self.register_as(fn.__name__)(fn)

    def register_as(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register a factory (or class) under ``name``."""
        def add(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = fn
            return fn
        return add

    def names(self) -> list[str]:
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._factories[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise HgkdError(f"unknown {self.kind} {name!r}; choose one of: {known}") from None

    def create(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._factories
