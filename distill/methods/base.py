"""The interface every distillation method implements, and the one method registry.

A method is an ``nn.Module`` (torchdistill/mdistiller style): its trainable parts
(projections, regressors, auxiliary branches, memory banks) are its submodules, optimised
with the student; ``forward(student, teacher, batch)`` returns the loss terms, ``"loss"``
being the total that is back-propagated. A new method is one file with one registered
factory; hyper-parameters are the factory's keyword arguments (``--method-opt key=value``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import HgkdError
from ...registry import Registry
from ..outputs import NetOutputs


@dataclass(frozen=True)
class NetDims:
    """Widths a method sizes its modules by: per-stage channels, embedding width, classes."""

    stage_channels: tuple[int, ...] = ()
    embed_dim: int = 0
    num_classes: int = 0


@dataclass(frozen=True)
class MethodContext:
    student: NetDims
    teacher: NetDims
    num_samples: int = 0  # training images (instance-level methods: CRD's memory bank)


class DistillMethod(nn.Module):
    """One distillation objective; what it needs from the run is declared on the class, so the
    trainer, targets and CLI never name a method.

    Class-level hooks:
    - ``supervised``: which targets and student. True (every baseline): a classifier student
      trained on labels from a frozen classifier teacher (``--teacher-classifier``). False
      (H-GKD): a sparse student against MIM teacher tokens, from ``--cache`` or a live
      ``--online-teacher``.
    - ``teacher_needs``: the :class:`NetOutputs` fields read from the teacher (empty: the
      teacher never runs). ``branch_logits`` are teacher-side modules: the auxiliary branches
      a classifier teacher carries when trained with ``hgkd-distill teacher --branches``.
    - ``config_options``: :class:`DistillConfig` fields passed to the factory as keyword
      options (``--method-opt`` overrides them), for recipes with their own CLI options.
    - :meth:`prefill_size` / :meth:`prefill`: how many pooled teacher embeddings the method
      takes before step one (a queue pre-fill; 0: none) and where they go.

    Supervised methods add ``ce_weight * CE(student logits, y)`` and, with ``kd_weight > 0``,
    Hinton's KD term (e.g. ICD+KD, CRD+KD) through :meth:`supervised_terms`.
    """

    supervised: ClassVar[bool] = True
    teacher_needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    config_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: MethodContext, ce_weight: float = 1.0, kd_weight: float = 0.0,
                 kd_temperature: float = 4.0) -> None:
        super().__init__()
        self.ctx = ctx
        self.ce_weight, self.kd_weight, self.kd_temperature = ce_weight, kd_weight, kd_temperature

    def prefill_size(self) -> int:
        """Pooled teacher embeddings wanted before step one (0: no pre-fill)."""
        return 0

    def prefill(self, pooled_bd: Tensor) -> None:
        """Take the pre-fill embeddings (called once, on a new run, when :meth:`prefill_size` > 0)."""

    def prepare(self, images_bchw: Tensor, labels_b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Turn a batch into what teacher and student see (HSAKD: four rotations)."""
        return images_bchw, labels_b

    def forward(self, student: NetOutputs, teacher: NetOutputs, labels_b: Tensor | None,
                index_b: Tensor | None) -> dict[str, Tensor]:
        teacher = teacher.detach()  # the teacher is frozen: no loss may reach it
        terms = self.supervised_terms(student, teacher, labels_b)
        terms.update(self.distill_terms(student, teacher, labels_b, index_b))
        return with_total(terms)

    def distill_terms(self, student: NetOutputs, teacher: NetOutputs, labels_b: Tensor | None,
                      index_b: Tensor | None) -> dict[str, Tensor]:
        """The method's own weighted terms (without CE/KD)."""
        raise NotImplementedError

    def supervised_terms(self, student: NetOutputs, teacher: NetOutputs,
                         labels_b: Tensor | None) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if self.ce_weight:
            terms["ce"] = self.ce_weight * F.cross_entropy(student.logits, labels_b)
        if self.kd_weight:
            terms["kd"] = self.kd_weight * kd_loss(student.logits, teacher.logits, self.kd_temperature)
        return terms


def with_total(terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add ``"loss"``: the sum of all (already weighted) terms."""
    terms["loss"] = torch.stack(list(terms.values())).sum()
    return terms


def kd_loss(student_logits_bk: Tensor, teacher_logits_bk: Tensor, temperature: float) -> Tensor:
    """Hinton et al. 2015: T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean."""
    log_p_s = F.log_softmax(student_logits_bk / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits_bk / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


METHODS: Registry[DistillMethod] = Registry("distillation method")


def register_method(name: str) -> Callable[[type[DistillMethod]], type[DistillMethod]]:
    """Class decorator: list a method under ``name`` (``--method name``)."""
    return METHODS.register_as(name)  # type: ignore[return-value]


def method_option_names(cls: type[DistillMethod]) -> list[str]:
    """Keyword options of a method: its own ``__init__`` and, through ``**base``, the base's."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or not issubclass(klass, DistillMethod):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names += [p.name for p in params if p.name not in ("self", "ctx") and p.kind is p.POSITIONAL_OR_KEYWORD
                  and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def create_method(name: str, ctx: MethodContext, **options: Any) -> DistillMethod:
    """The registered method ``name`` built for ``ctx``; unknown options are a user error."""
    cls = METHODS.get(name)
    allowed = method_option_names(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise HgkdError(f"--method-opt {', '.join(unknown)}: not an option of method {name} "
                        f"(its options: {', '.join(allowed)})")
    return cls(ctx, **options)


def method_class(name: str) -> type[DistillMethod]:
    """The registered class (to read its class-level hooks before building it)."""
    return METHODS.get(name)  # type: ignore[return-value]


def method_options(name: str, config: Any, method_opts: dict[str, Any]) -> dict[str, Any]:
    """Keyword options of method ``name``: its ``config_options`` read from ``config`` (a
    :class:`DistillConfig`), then ``method_opts`` (``--method-opt``) over them."""
    return {**{key: getattr(config, key) for key in method_class(name).config_options}, **method_opts}


def match_size(feat_bchw: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """Resample a feature map to ``size_hw`` (area-average down, bilinear up): pairs a CNN
    stage with a teacher stage of another resolution (e.g. a ViT's 14x14 token grid)."""
    if tuple(feat_bchw.shape[-2:]) == tuple(size_hw):
        return feat_bchw
    if feat_bchw.shape[-2] >= size_hw[0] and feat_bchw.shape[-1] >= size_hw[1]:
        return F.adaptive_avg_pool2d(feat_bchw, size_hw)
    return F.interpolate(feat_bchw, size=size_hw, mode="bilinear", align_corners=False)


def pick_stages(stages: list[Tensor], which: tuple[int, ...], source: str) -> list[Tensor]:
    """Stages by (possibly negative) index, with a clear error naming ``source``."""
    try:
        return [stages[i] for i in which]
    except IndexError:
        raise HgkdError(f"--method-opt stages {list(which)}: the {source} has {len(stages)} stages") from None
