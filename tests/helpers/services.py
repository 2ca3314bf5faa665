"""External servers some tests need (PostgreSQL, Redis), and what to do when
one is not there: skip on a developer's machine, fail in CI (CI=true), where
a missing server is a broken setup rather than a choice.

TEST_POSTGRES_URL and TEST_REDIS_URL point the tests elsewhere. (Not
AGENTLAB_*: conftest clears those for every test.)
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import asyncpg
import pytest

from agentlab.executions.migrations import quote_ident

__all__ = ["postgres_schema", "postgres_url", "redis_url", "require"]

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

_CONNECT_TIMEOUT_S = 1.0


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
        reason = f"{name} is not reachable at {host}:{port} ({error})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so it must be")
        pytest.skip(reason)
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
