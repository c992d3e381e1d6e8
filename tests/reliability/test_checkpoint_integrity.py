"""Checkpoints that survive a bad write or a bad disk (issue 21, item 5): a damaged last.pt
(flipped byte, truncated) is passed over for prev.pt with one warning line."""
from __future__ import annotations

import logging

import pytest
import torch

from hgkd.distill.checkpoint import resume_checkpoint, save_checkpoint
from hgkd.errors import HgkdError
from hgkd.run_layout import last_checkpoint


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    for step in (1, 2):
        save_checkpoint(tmp_path, {"global_step": step, "w": torch.full((1000,), float(step))})
    last = tmp_path / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    last.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        path, payload = resume_checkpoint(tmp_path)
    assert path.name == "prev.pt" and payload["global_step"] == 1
    assert len(caplog.records) == 1 and "last.pt is damaged" in caplog.records[0].getMessage()
    assert last_checkpoint(tmp_path).name == "prev.pt"  # export/evaluate read the intact one
    save_checkpoint(tmp_path, {"global_step": 3})  # the damaged last.pt is not rotated over prev.pt
    assert resume_checkpoint(tmp_path)[1]["global_step"] == 3
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"x")
    (tmp_path / "checkpoints" / "prev.pt").write_bytes(b"y")
    with pytest.raises(HgkdError, match="every checkpoint is damaged"):
        resume_checkpoint(tmp_path)


def test_evaluating_a_run_whose_last_checkpoint_is_damaged_is_one_line_naming_prev(tmp_path):
    """An evaluation never scores an older model in the final one's place: it stops and names prev.pt."""
    from hgkd.evaluate.models import load_student

    for step in (1, 2):
        save_checkpoint(tmp_path, {"global_step": step, "model": {}})
    last = tmp_path / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:-10])
    with pytest.raises(HgkdError, match=r"last\.pt differs from its checksum last\.pt\.sha256 \(damaged\); "
                                        r".*prev\.pt is the one before it"):
        load_student(str(tmp_path))


def test_the_run_lock_dies_with_its_trainer_not_with_its_forked_workers(tmp_path):
    """A killed trainer's loader workers (forked, still alive) must not keep its run locked: torchrun's
    restart of that rank would be refused."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from hgkd.distill.checkpoint import RunLock

    script = (f"import os, time\nfrom hgkd.distill.checkpoint import RunLock\nRunLock({str(tmp_path)!r}).acquire()\n"
              "if os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\nprint('locked', flush=True)\ntime.sleep(60)\n")
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        assert trainer.stdout.readline().strip() == "locked"
        with pytest.raises(HgkdError, match=f"is being trained by process {trainer.pid} on "):
            RunLock(tmp_path).acquire()
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait()
        time.sleep(0.2)
        lock = RunLock(tmp_path)
        lock.acquire()  # the forked child still lives, and the lock is free
        assert lock.held
        lock.release()
    finally:
        os.killpg(trainer.pid, signal.SIGKILL)


def test_export_of_a_run_whose_last_checkpoint_is_damaged_is_refused_not_taken_from_prev(tmp_path):
    from hgkd.distill.export_run import export_run

    for step in (1, 2):
        save_checkpoint(tmp_path, {"global_step": step, "model": {}})
    last = tmp_path / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 1
    last.write_bytes(bytes(data))
    with pytest.raises(HgkdError, match=r"last\.pt differs from its checksum last\.pt\.sha256 \(damaged\); "
                                        r".*prev\.pt is the one before it"):
        export_run(tmp_path, tmp_path / "student.safetensors")
    assert not (tmp_path / "student.safetensors").exists()
