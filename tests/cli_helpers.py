"""Calling the CLI in-process from tests, and the shape every user error must have."""

from __future__ import annotations

from typer.testing import CliRunner

import cli

runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(cli.app, [str(a) for a in args], env=env)


def one_line_error(result, *needles):
    """Exit status 1, one `error:` line on stderr naming every needle, no traceback."""
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert "Traceback" not in result.output
    for n in needles:
        assert n in err, err
