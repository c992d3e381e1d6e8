"""Reliability of stage one's inputs and output path: data without images, an --out that cannot
be a directory (issue #6). Each case must end in one ``error: --option ...`` line, exit code 2,
and leave nothing that reads as a valid cache."""
from __future__ import annotations

import pytest
import webdataset as wds

from hgkd.extract.cli import main as extract_cli
from hgkd.storage.cache import FeatureCache

from cli_results import assert_one_line_error, invoke
from conftest import extract_args, run_cli, run_cli_subprocess


def test_tar_without_any_image_member_is_a_one_line_error_and_no_valid_cache(tmp_path):
    tar = tmp_path / "docs.tar"
    with wds.TarWriter(str(tar)) as sink:
        for i in range(6):
            sink.write({"__key__": f"doc/{i:03d}", "txt": b"not an image", "json": b'{"label": 1}'})
    out = tmp_path / "c.zarr"
    result = run_cli_subprocess(extract_args(str(tar), str(out)))  # the real command, real stderr
    assert_one_line_error(result, f"--data {tar}")
    assert not FeatureCache.exists(str(out)) or not FeatureCache.open(str(out)).is_complete()
    assert run_cli(["verify", str(out)]).exit_code != 0


@pytest.mark.parametrize("where", ["parent-is-a-file", "out-is-a-file"])
def test_out_that_cannot_be_a_directory_is_a_one_line_error_even_as_root(photo_tars, tmp_path, where):
    """Runs under root too (CI): no permission bits involved, mkdir itself fails."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"a regular file\n")
    out = blocker / "c.zarr" if where == "parent-is-a-file" else blocker
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke(extract_cli, extract_args(photo_tars, str(out)))
    assert_one_line_error(result, f"--out {out}: cannot create the cache directory")
    assert blocker.read_bytes() == b"a regular file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no cache, no .locks folder beside it
