"""External servers some tests need (PostgreSQL, Redis), and what to do when
one (or any program a test needs) is not there: skip on a developer's
machine, fail in CI (CI set to true, 1 or yes, in any case), where a missing
dependency is a broken setup rather than a choice. `missing` is that rule,
for every such test.

TEST_POSTGRES_URL and TEST_REDIS_URL point the tests elsewhere. (Not
AGENTLAB_*: conftest clears those for every test.)
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import NoReturn
from urllib.parse import urlsplit

import asyncpg
import pytest

from agentlab.executions.migrations import quote_ident

__all__ = ["in_ci", "missing", "postgres_schema", "postgres_url", "redis_url", "require"]

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

_CONNECT_TIMEOUT_S = 1.0


# The spellings CI systems use: GitHub Actions and GitLab set CI=true, others 1.
_TRUTHY = ("true", "1", "yes")


def in_ci(environ: Mapping[str, str] | None = None) -> bool:
    """Whether CI (``environ``, default os.environ) is set to a truthy value."""
    value = (os.environ if environ is None else environ).get("CI", "")
    return value.strip().lower() in _TRUTHY


def missing(reason: str, environ: Mapping[str, str] | None = None) -> NoReturn:
    """A dependency of the test is missing, ``reason`` saying which and how
    to get it: the test fails in CI and is skipped elsewhere."""
    if in_ci(environ):
        pytest.fail(f"{reason}; CI is set, so it must be there")
    pytest.skip(reason)


def postgres_url() -> str:
    return require("PostgreSQL", os.environ.get("TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL, 5432)


def redis_url() -> str:
    return require("Redis", os.environ.get("TEST_REDIS_URL") or DEFAULT_REDIS_URL, 6379)


def require(name: str, url: str, default_port: int) -> str:
    """``url`` if something accepts connections at its host and port; else
    skip the test, or fail it in CI."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S):
            pass
    except OSError as error:
        missing(f"{name} is not reachable at {host}:{port} ({error})")
    return url


@contextmanager
def postgres_schema(prefix: str) -> Iterator[str]:
    """A schema of its own in the test database (``prefix`` + random), dropped
    afterwards: tests that share the server do not see each other's rows."""
    url = postgres_url()
    name = f"{prefix}_{secrets.token_hex(6)}"

    async def run(statement: str) -> None:
        connection = await asyncpg.connect(url)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run(f"CREATE SCHEMA {quote_ident(name)}"))
    try:
        yield name
    finally:
        asyncio.run(run(f"DROP SCHEMA IF EXISTS {quote_ident(name)} CASCADE"))
