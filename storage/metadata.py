"""Self-describing cache metadata: everything that decides what a cached view contains.

Stored as the ``hgkd`` attribute of the cache's root Zarr group. ``settings`` holds what must
match for a run to append to (resume) a cache; ``software`` and ``status`` may differ.
``blocks`` records the cache's growth (issue 12): rows ``rows[0]..rows[1]-1`` hold views
``views[0]..views[1]-1`` of every sample, image-major. A cache made at once has one block;
``hgkd-extract run --views-per-image K'`` on a complete cache appends one.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT = "hgkd-teacher-cache"
FORMAT_VERSION = 1
# Views per shard (one file per array) of a cache made with the extractor's defaults.
DEFAULT_SHARD_VIEWS = 256
# Settings that growing a cache changes (issue 12); every other setting must stay equal.
GROWTH_KEYS = (("view", "views_per_image"), ("storage", "num_views"))
# What every cache's ``storage`` section holds (its layout: a damaged file lacking one is refused, issue 21).
STORAGE_KEYS = ("codec", "compressor", "clevel", "shard_views", "num_views", "num_tokens", "dim")
# Why a sample was skipped (the ``reason`` of a ``skipped`` entry, issue 10).
SKIP_NO_IMAGE, SKIP_UNDECODABLE = "no image member", "undecodable image bytes"
# What makes two teachers' tokens the same targets (issue 11): the weights and the token grid.
TEACHER_IDENTITY = ("name", "checkpoint_sha256", "init_seed", "grid")


def teacher_identity(teacher: dict[str, Any]) -> dict[str, Any]:
    """The identity fields of a cache's ``teacher`` metadata (the seed counts only without a checkpoint)."""
    ident = {key: teacher.get(key) for key in TEACHER_IDENTITY}
    if ident["checkpoint_sha256"]:
        ident["init_seed"] = None
    ident["grid"] = list(ident["grid"]) if ident["grid"] is not None else None
    return ident


def skip_reason(entry: dict[str, Any]) -> str:
    """The reason of one ``skipped`` entry; entries written before reasons existed carry only the error."""
    if entry.get("reason"):
        return entry["reason"]
    return SKIP_NO_IMAGE if entry.get("error") == "sample has no image member" else SKIP_UNDECODABLE


@dataclass
class CacheMeta:
    """Settings of a teacher-token cache (H-GKD Sec. 3.2, stage one)."""

    teacher: dict[str, Any]  # name, checkpoint_sha256, embed_dim, patch_size, grid, img_size, ...
    view: dict[str, Any]  # seed, views_per_image, crop/flip params, mask_ratio, granularity, teacher_view
    dataset: dict[str, Any]  # kind, sources (paths + sizes), fingerprint, num_samples
    storage: dict[str, Any]  # codec, compressor, clevel, shard_views, num_views, num_tokens, dim
    software: dict[str, Any] = field(default_factory=dict)
    status: str = "incomplete"  # "incomplete" until every shard has its completion record
    skipped: list[dict[str, Any]] = field(default_factory=list)  # filled when complete, one per sample
    blocks: list[dict[str, Any]] = field(default_factory=list)  # growth steps; empty in caches made before #12

    def settings(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "view": self.view, "dataset": self.dataset, "storage": self.storage}

    def fingerprint(self) -> str:
        """Identity of the cache's teacher, data and view recipe, unchanged when the cache grows.

        Hashes the settings with ``views_per_image`` and ``num_views`` as the cache was
        created (its first block), so completion records and a distillation run started
        before a growth step still match it; views a run already used never change.
        """
        settings = copy.deepcopy(self.settings())
        if self.blocks:
            first = self.blocks[0]
            settings["view"]["views_per_image"] = first["views"][1]
            settings["storage"]["num_views"] = first["rows"][1]
        blob = json.dumps(settings, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def differences(self, other: "CacheMeta", growth: bool = False) -> list[str]:
        """Human-readable ``section.key: theirs != mine`` lines for mismatching settings.

        ``growth``: leave out what growing a cache changes (``GROWTH_KEYS``).
        """
        skip = set(GROWTH_KEYS) if growth else set()
        lines = []
        for section, mine in self.settings().items():
            theirs = other.settings()[section]
            for key in sorted(set(mine) | set(theirs)):
                if (section, key) not in skip and mine.get(key) != theirs.get(key):
                    lines.append(f"{section}.{key}: {theirs.get(key)!r} != {mine.get(key)!r}")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, blob: dict[str, Any]) -> "CacheMeta":
        """The metadata stored by :meth:`to_json`; ValueError naming what is wrong when a damaged
        file parsed as JSON but is not that (issue 21)."""
        fields = {k: v for k, v in blob.items() if k not in ("format", "format_version")}
        sections = ("teacher", "view", "dataset", "storage")
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown or not all(isinstance(fields.get(name), dict) for name in sections):
            raise ValueError(f"unknown keys {unknown}" if unknown else f"a section of {list(sections)} is missing")
        missing = sorted(set(STORAGE_KEYS) - set(fields["storage"]))
        if missing:
            raise ValueError(f"storage lacks {missing}")
        return cls(**fields)
