"""Finding a torchrun rank's process from /proc (no psutil here), for the restart test and
``benchmarks/reliability.py``."""
from __future__ import annotations

from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``."""
    parent_of = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent_of[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, parent in parent_of.items() if parent in frontier]
        found += frontier
    return found


def rank_pid(torchrun_pid: int, rank: int) -> int | None:
    """The process below ``torchrun_pid`` whose environment holds RANK=``rank`` and LOCAL_RANK=``rank``."""
    for pid in descendants(torchrun_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and f"LOCAL_RANK={rank}".encode() in env:
            return pid
    return None
