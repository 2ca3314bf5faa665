"""The configuration a process is about to serve with, checked before
anything listens: the settings, and the files they name read as the service
reads them (the same functions). A setting that cannot be honoured raises
ConfigError, so a process stops instead of serving open or half-configured.

`make run` prints the result; ``python -m agentlab`` logs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agentlab.api.auth import load_keys
from agentlab.config import ConfigError, Settings
from agentlab.executions.stores import open_store
from agentlab.routing import load_routing

__all__ = ["Applied", "check"]


@dataclass(frozen=True)
class Applied:
    """Each setting as (variable, value as shown, whether the environment
    set it, what it means); nothing secret is in it."""

    rows: list[tuple[str, str, bool, str]]

    def lines(self) -> list[str]:
        width = max(len(variable) for variable, *_ in self.rows)
        return [
            f"{variable:<{width}}  {shown}"
            + (f"  ({meaning})" if meaning else "")
            + ("" if from_env else "  [default]")
            for variable, shown, from_env, meaning in self.rows
        ]

    def from_env(self) -> str:
        """The settings the environment gave, on one line."""
        given = [f"{variable}={shown}" for variable, shown, from_env, _ in self.rows if from_env]
        return ", ".join(given) or "all defaults"


def check(settings: Settings, env: Mapping[str, str]) -> Applied:
    """``settings`` (read from ``env``) with the keys file, the routing file,
    the database URL and the model file checked; raises ConfigError naming
    the variable or file of the first problem."""
    meaning: dict[str, str] = {}
    if settings.api_keys_file is not None:
        keys = load_keys(settings.api_keys_file)
        callers = sorted(set(keys.values()))
        meaning["AGENTLAB_API_KEYS_FILE"] = (
            f"{len(keys)} key(s); callers: {', '.join(callers)}; every RPC but health needs one"
        )
    else:
        meaning["AGENTLAB_API_KEYS_FILE"] = "no keys: the API is open"
    if settings.models_file is not None:
        routing = load_routing(settings.models_file, env)
        meaning["AGENTLAB_MODELS_FILE"] = "models: " + ", ".join(
            f"{name} -> {route.backend}" for name, route in sorted(routing.models.items())
        )
    else:
        meaning["AGENTLAB_MODELS_FILE"] = (
            f"no routing file: {settings.default_backend} answers every model name"
        )
    limit = settings.rate_limit
    meaning["AGENTLAB_RATE_LIMIT"] = (
        "Envoy limits no client address"
        if limit.off
        else f"Envoy: {limit.per_second:g} requests/s per client address, bursts of {limit.burst}"
    )
    age, count = settings.retention_max_age, settings.retention_max_count
    meaning["AGENTLAB_RETENTION_MAX_AGE"] = (
        "finished executions are kept whatever their age"
        if age.seconds is None
        else f"finished executions created more than {age} ago are deleted"
    )
    if count is not None:
        meaning["AGENTLAB_RETENTION_MAX_COUNT"] = f"only the newest {count:,} finished are kept"
    # The form of the URL only: connecting is the service's first step.
    open_store(settings.database_url, settings.data_dir)
    if settings.model_path is not None and not settings.model_path.is_file():
        raise ConfigError(f"AGENTLAB_MODEL_PATH: {settings.model_path} is not a file")
    return Applied(
        [
            (variable, shown, from_env, meaning.get(variable, ""))
            for variable, shown, from_env in settings.described(env)
        ]
    )
