"""The README's main job on the embedded default data set."""
from conftest import run_cli


def test_demo_extracts_verifies_and_reports(tmp_path):
    result = run_cli(["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "verify: 3 shards, 88 views ok, 0 problems" in result.output
    assert "cae_tiny_patch16" in result.output and "(complete; 3/3 shards)" in result.output
