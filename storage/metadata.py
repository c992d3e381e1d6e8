"""Self-describing cache metadata: everything that decides what a cached view contains.

Stored as the ``hgkd`` attribute of the cache's root Zarr group. ``settings`` holds what must
match for a run to append to (resume) a cache; ``software`` and ``status`` may differ.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT = "hgkd-teacher-cache"
FORMAT_VERSION = 1


@dataclass
class CacheMeta:
    """Settings of a teacher-token cache (H-GKD Sec. 3.2, stage one)."""

    teacher: dict[str, Any]  # name, checkpoint_sha256, embed_dim, patch_size, grid, img_size, ...
    view: dict[str, Any]  # seed, views_per_image, crop/flip params, mask_ratio, granularity, teacher_view
    dataset: dict[str, Any]  # kind, sources (paths + sizes), fingerprint, num_samples
    storage: dict[str, Any]  # codec, compressor, clevel, shard_views, num_views, num_tokens, dim
    software: dict[str, Any] = field(default_factory=dict)
    status: str = "incomplete"  # "incomplete" until every shard has its completion record
    skipped: list[dict[str, Any]] = field(default_factory=list)  # filled when complete

    def settings(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "view": self.view, "dataset": self.dataset, "storage": self.storage}

    def fingerprint(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def differences(self, other: "CacheMeta") -> list[str]:
        """Human-readable ``section.key: mine != theirs`` lines for mismatching settings."""
        lines = []
        for section, mine in self.settings().items():
            theirs = other.settings()[section]
            for key in sorted(set(mine) | set(theirs)):
                if mine.get(key) != theirs.get(key):
                    lines.append(f"{section}.{key}: {theirs.get(key)!r} != {mine.get(key)!r}")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, blob: dict[str, Any]) -> "CacheMeta":
        fields = {k: v for k, v in blob.items() if k not in ("format", "format_version")}
        return cls(**fields)
