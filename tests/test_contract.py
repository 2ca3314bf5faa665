"""The contract is linted and formatted with buf, as `make lint` does."""

from __future__ import annotations

from tests.conftest import run, tool


def test_buf_lint_is_clean() -> None:
    """STANDARD and COMMENTS (buf.yaml): every element of the contract documented."""
    result = run([tool("buf"), "lint"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format_is_clean() -> None:
    result = run([tool("buf"), "format", "--diff", "--exit-code"])
    assert result.returncode == 0, result.stdout + result.stderr
