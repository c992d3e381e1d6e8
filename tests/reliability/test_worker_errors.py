"""A user error raised inside a DataLoader worker process (a remote store gone down, a tar changed
in place) is still one ``error:`` line: torch re-raises it in the main process wrapped in the
worker's traceback, and ``user_errors`` prints only the message (issue 21)."""
from __future__ import annotations

import pytest
from torch.utils.data import DataLoader, Dataset

from hgkd.errors import HgkdError, user_errors
from hgkd.remote import RemoteUnreachable


class FailsAt(Dataset):
    def __init__(self, error: HgkdError) -> None:
        self.error = error

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        if index == 2:
            raise self.error
        return index


@pytest.mark.parametrize("error", [HgkdError("--data part-001.tar changed since this run indexed it; re-extract"),
                                   RemoteUnreachable("http://store/x.tar: unreachable after 9 tries")],
                         ids=["HgkdError", "RemoteUnreachable"])
@pytest.mark.parametrize("workers", [0, 1])
def test_an_error_from_a_loader_worker_is_one_line(capsys, error, workers):
    @user_errors
    def command() -> None:
        list(DataLoader(FailsAt(error), batch_size=1, num_workers=workers))

    with pytest.raises(SystemExit) as stopped:
        command()
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"error: {error}\n"
