"""Which ExecutionStore a database URL names."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from agentlab.config import ConfigError
from agentlab.executions.model import ExecutionStore
from agentlab.executions.postgres_store import PostgresStore
from agentlab.executions.sqlite_store import SqliteStore

__all__ = ["DEFAULT_SQLITE_NAME", "open_store"]

DEFAULT_SQLITE_NAME = "agentlab.db"

_VARIABLE = "AGENTLAB_DATABASE_URL"


def open_store(database_url: str | None, data_dir: Path) -> ExecutionStore:
    """The store for ``database_url``, not yet opened: none means a SQLite
    file in ``data_dir``; ``sqlite:///abs/path.db`` a SQLite file there;
    ``postgresql://...`` (or ``postgres://...``) a PostgreSQL database."""
    if not database_url:
        return SqliteStore(data_dir / DEFAULT_SQLITE_NAME)
    # Only the scheme goes into messages: the rest may hold a password.
    scheme, _, rest = database_url.partition("://")
    if scheme in ("postgresql", "postgres") and rest:
        return PostgresStore(database_url)
    if scheme == "sqlite" and rest:
        parts = urlsplit(database_url)
        path = unquote(parts.path)
        # sqlite:///abs/path.db has an empty host and an absolute path; a
        # relative one would depend on the working directory of the day.
        if parts.netloc or not path.startswith("/") or path.endswith("/") or parts.query:
            raise ConfigError(
                f"{_VARIABLE}: a SQLite URL must be sqlite:///absolute/path/to/file.db"
            )
        return SqliteStore(Path(path))
    given = f"a {scheme}:// URL" if rest else "something else"
    raise ConfigError(
        f"{_VARIABLE} must be a postgresql://, postgres:// or sqlite:/// URL, not {given}"
    )
