"""CLI results for the reliability tests: in-process runs shaped like a subprocess's, and the
one-line user-error check (``error: --option ...``, exit code 2, nothing else on stderr)."""
from __future__ import annotations

import subprocess
import traceback

import click
from click.testing import CliRunner


def invoke(cli: click.Command, args: list[str]) -> subprocess.CompletedProcess:
    """Run ``cli`` in this process (no interpreter start-up); an uncaught exception is exit code 1
    with its traceback appended to stderr, as a separate process would show it."""
    result = CliRunner().invoke(cli, args)
    stderr = result.stderr
    if result.exc_info is not None and not isinstance(result.exc_info[1], SystemExit):  # exit 0: exception is None
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)


def assert_one_line_error(result: subprocess.CompletedProcess, prefix: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: {prefix}"), result.stderr[-3000:]
    assert result.stderr.count("\n") == 1, result.stderr[-3000:]  # no traceback, no warnings
