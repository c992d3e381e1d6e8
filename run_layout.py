"""The distillation run directory's format, read by distill (writes, resumes, exports) and evaluate.

``RUN/checkpoints/last.pt`` holds ``{"model": state_dict, "config": ..., ...}``; in the model's
state dict the student encoder sits under ``encoder.`` and its dense timm backbone under
``encoder.body.`` (the keys a plain ``timm.create_model(arch, num_classes=0)`` loads).

Issue 21: each checkpoint has a ``sha256sum``-style sidecar (``last.pt.sha256``), and the one
before it is kept as ``prev.pt`` (with ``prev.pt.sha256``) until a new ``last.pt`` is complete
and verified. :func:`last_checkpoint` is the newest intact one (what a resume reads);
:func:`final_checkpoint` is ``last.pt`` or a one-line refusal (what an export reads).
``RUN/.lock`` is held (a POSIX lock) by the process that trains in the run directory.
Torch-free, so any room (and a CLI's ``--help``) may import it.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from .errors import HgkdError

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
PREV = "prev.pt"  # the checkpoint before last.pt, kept until a new last.pt is complete and verified
CHECKPOINT_NAMES = (LAST, PREV)  # newest first
CHECKSUM_SUFFIX = ".sha256"
RUN_LOCK = ".lock"  # RUN/.lock: locked (lockf) by the process training in RUN
RUN_CHECKPOINT = Path(CHECKPOINT_DIR) / LAST  # relative to the run directory
ENCODER_PREFIX = "encoder."  # the student encoder's weights (``hgkd-distill export``)
BACKBONE_PREFIX = ENCODER_PREFIX + "body."  # its dense timm backbone (``hgkd-evaluate --model RUN``)

# what checkpoint_state() finds: intact = matches its checksum; unverified = no checksum (a run written
# before issue 21); damaged = differs from its checksum; missing = no file
INTACT, UNVERIFIED, DAMAGED, MISSING = "intact", "unverified", "damaged", "missing"

log = logging.getLogger(__name__)


def checkpoint_dir(run_dir: str | Path) -> Path:
    """``RUN/checkpoints``."""
    return Path(run_dir) / CHECKPOINT_DIR


def checksum_path(checkpoint: Path) -> Path:
    """``last.pt`` -> ``last.pt.sha256`` (``sha256sum -c`` reads it in the checkpoint folder)."""
    return checkpoint.with_name(checkpoint.name + CHECKSUM_SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def recorded_sha256(checkpoint: Path) -> str | None:
    """The digest in the checkpoint's sidecar (None: no sidecar, or not a digest)."""
    try:
        words = checksum_path(checkpoint).read_text(errors="replace").split()
    except OSError:
        return None
    return words[0] if words and len(words[0]) == 64 else None


def checkpoint_state(checkpoint: Path) -> str:
    """INTACT, UNVERIFIED, DAMAGED or MISSING (reads the whole file when it has a checksum)."""
    if not checkpoint.is_file():
        return MISSING
    if not checksum_path(checkpoint).exists():
        return UNVERIFIED
    want = recorded_sha256(checkpoint)
    try:
        return INTACT if want is not None and file_sha256(checkpoint) == want else DAMAGED
    except OSError:
        return DAMAGED


def checkpoints_present(run_dir: str | Path) -> list[Path]:
    """The checkpoint files in ``RUN/checkpoints``, newest first, whatever their state."""
    return [p for p in (checkpoint_dir(run_dir) / n for n in CHECKPOINT_NAMES) if p.is_file()]


def newest_intact_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[Path]]:
    """(the newest checkpoint not known to be damaged, the damaged ones newer than it)."""
    damaged: list[Path] = []
    for path in checkpoints_present(run_dir):
        if checkpoint_state(path) == DAMAGED:
            damaged.append(path)
        else:
            return path, damaged
    return None, damaged


def last_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint a resume reads (a pipeline's runs): ``RUN/checkpoints/last.pt``, or the
    previous one (with one warning line) when ``last.pt`` is damaged or missing (issue 21).
    Where no intact one exists, ``last.pt``'s path (its reader then says what is wrong)."""
    found, damaged = newest_intact_checkpoint(run_dir)
    if found is None:
        return Path(run_dir) / RUN_CHECKPOINT
    if damaged:
        log.warning("%s is damaged (differs from its checksum %s); reading %s instead", damaged[0],
                    checksum_path(damaged[0]).name, found)
    return found


def refuse_damaged(checkpoint: Path, label: str = "") -> None:
    """One line (``label`` first) when ``checkpoint`` differs from its checksum, naming the
    previous one: a use of the trained model never takes an older one in its place."""
    if checkpoint_state(checkpoint) != DAMAGED:
        return
    previous = checkpoint.with_name(PREV)
    hint = f"; {previous} is the one before it" if previous.is_file() else ""
    raise HgkdError(f"{label}{checkpoint} differs from its checksum {checksum_path(checkpoint).name} (damaged){hint}")


def final_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint an export or a use of the trained model reads: ``RUN/checkpoints/last.pt``,
    refused when damaged (a resume falls back to ``prev.pt``, :func:`last_checkpoint`; an export must not)."""
    last = Path(run_dir) / RUN_CHECKPOINT
    refuse_damaged(last)
    return last
