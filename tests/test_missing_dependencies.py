"""The rule for a test whose dependency (a server, a program) is missing:
skipped on a developer's machine with the reason, failed in CI."""

from __future__ import annotations

import pytest

from agentlab.devstack import free_port
from tests.helpers.services import in_ci, missing, require

REASON = "redis-server is not installed (apt-get install redis-server)"
# Caught together: a skip escaping a test that expects a failure would show
# as a skip, not as the failure it is.
OUTCOMES = (pytest.fail.Exception, pytest.skip.Exception)


@pytest.mark.parametrize("value", ["true", "TRUE", "True", "1", "yes", "YES", " true\n"])
def test_under_a_truthy_ci_a_missing_dependency_fails(value: str) -> None:
    assert in_ci({"CI": value})
    with pytest.raises(OUTCOMES) as failed:
        missing(REASON, {"CI": value})
    assert failed.type is pytest.fail.Exception
    assert REASON in str(failed.value)


@pytest.mark.parametrize("environ", [{}, {"CI": ""}, {"CI": "0"}, {"CI": "false"}, {"CI": "no"}])
def test_elsewhere_it_skips_saying_why(environ: dict[str, str]) -> None:
    assert not in_ci(environ)
    with pytest.raises(OUTCOMES) as skipped:
        missing(REASON, environ)
    assert skipped.type is pytest.skip.Exception
    assert str(skipped.value) == REASON


@pytest.mark.parametrize(
    ("ci", "outcome"), [("1", pytest.fail.Exception), (None, pytest.skip.Exception)]
)
def test_an_unreachable_server_follows_the_rule(
    monkeypatch: pytest.MonkeyPatch, ci: str | None, outcome: type[BaseException]
) -> None:
    """require reads CI from the environment, as the tests that use it do."""
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    port = free_port()  # nothing listens there
    with pytest.raises(OUTCOMES) as raised:
        require("Redis", f"redis://127.0.0.1:{port}/0", 6379)
    assert raised.type is outcome
    assert f"Redis is not reachable at 127.0.0.1:{port}" in str(raised.value)
