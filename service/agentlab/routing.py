"""The model routing file: which backend serves each model name the frontend
sends, under which of the backend's own model names, with what defaults.

The file is YAML (``models.example.yaml`` documents every key)::

    backends:
      local-ollama: {kind: ollama, url: "http://127.0.0.1:11434"}
    models:
      mistral7b: {backend: local-ollama, model: "mistral:7b", max_tokens: 512}

Reading it is pure: nothing connects to anything here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agentlab.config import ConfigError
from agentlab.core.types import GenerationOptions

__all__ = ["KINDS", "RESERVED", "BackendConfig", "ModelRoute", "RoutingConfig", "load_routing"]

KINDS = ("embedded", "echo", "ollama", "openai", "http_lab")
RESERVED = "echo"
"""The model name every routing file serves from the echo backend, unless it
names a model so itself."""
_REMOTE = ("ollama", "openai", "http_lab")


@dataclass(frozen=True)
class BackendConfig:
    name: str
    kind: str
    url: str = ""
    # The key itself never sits in the file: it names an environment variable.
    api_key: str | None = None


@dataclass(frozen=True)
class ModelRoute:
    name: str
    backend: str
    backend_model: str
    defaults: GenerationOptions = field(default_factory=GenerationOptions)
    timeout_s: float | None = None
    description: str = ""


@dataclass(frozen=True)
class RoutingConfig:
    backends: dict[str, BackendConfig]
    models: dict[str, ModelRoute]


def load_routing(path: Path, env: Mapping[str, str] | None = None) -> RoutingConfig:
    """Read and check the file; every mistake is a ConfigError naming the
    file and the key."""
    env = os.environ if env is None else env
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the model routing file: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    where = _Where(path)
    document = where.mapping(raw, "the file")
    where.only(document, "the file", {"backends", "models"})
    backends = {
        name: _backend(where, name, value, env)
        for name, value in where.mapping(document.get("backends"), "backends").items()
    }
    models = {
        name: _model(where, name, value, backends)
        for name, value in where.mapping(document.get("models"), "models").items()
    }
    if not models:
        raise ConfigError(f"{path}: models: at least one model must be configured")
    reserved = backends.get(RESERVED)
    if reserved is not None and reserved.kind != "echo" and RESERVED not in models:
        # The model name "echo" routes to the backend of that name: another
        # kind there would take the name from the echo backend unannounced.
        raise where.error(
            f"backends.{RESERVED}",
            f"the name {RESERVED!r} is reserved for the echo backend (kind: echo), "
            f"not a {reserved.kind} one, unless a model is named {RESERVED!r}",
        )
    return RoutingConfig(backends, models)


class _Where:
    """Error messages that say where in the file the mistake is."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {problem}")

    def mapping(self, value: Any, key: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise self.error(key, "must be a mapping of names")
        return value

    def only(self, value: dict[str, Any], key: str, allowed: set[str]) -> None:
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.error(
                key, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
            )

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, "must be a non-empty string")
        return value.strip()

    def number(self, value: Any, key: str, low: float, high: float = math.inf) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, "must be a number")
        if not low <= value <= high:
            raise self.error(key, f"must be between {low:g} and {high:g}")
        return float(value)


def _backend(where: _Where, name: str, raw: Any, env: Mapping[str, str]) -> BackendConfig:
    key = f"backends.{name}"
    value = where.mapping(raw, key)
    where.only(value, key, {"kind", "url", "api_key_env"})
    kind = where.text(value.get("kind"), f"{key}.kind")
    if kind not in KINDS:
        raise where.error(f"{key}.kind", f"{kind!r} is not one of {', '.join(KINDS)}")
    url = ""
    if kind in _REMOTE:
        url = where.text(value.get("url"), f"{key}.url")
        if not url.startswith(("http://", "https://")):
            raise where.error(f"{key}.url", f"{url!r} must start with http:// or https://")
    elif "url" in value:
        raise where.error(f"{key}.url", f"a {kind} backend runs in this process: no url")
    api_key = None
    if "api_key_env" in value:
        variable = where.text(value["api_key_env"], f"{key}.api_key_env")
        api_key = env.get(variable)
        if not api_key:
            raise where.error(f"{key}.api_key_env", f"the environment variable {variable} is unset")
    return BackendConfig(name=name, kind=kind, url=url, api_key=api_key)


def _model(where: _Where, name: str, raw: Any, backends: dict[str, BackendConfig]) -> ModelRoute:
    key = f"models.{name}"
    value = where.mapping(raw, key)
    where.only(
        value,
        key,
        {"backend", "model", "temperature", "max_tokens", "seed", "timeout_s", "description"},
    )
    backend = where.text(value.get("backend"), f"{key}.backend")
    if backend not in backends:
        known = ", ".join(backends) or "none"
        raise where.error(f"{key}.backend", f"no backend {backend!r} (backends: {known})")
    temperature = value.get("temperature")
    max_tokens = value.get("max_tokens")
    seed = value.get("seed")
    timeout = value.get("timeout_s")
    return ModelRoute(
        name=name,
        backend=backend,
        backend_model=where.text(value.get("model", name), f"{key}.model"),
        defaults=GenerationOptions(
            temperature=None
            if temperature is None
            else where.number(temperature, f"{key}.temperature", 0, 2),
            max_tokens=None
            if max_tokens is None
            else int(where.number(max_tokens, f"{key}.max_tokens", 1, 1_000_000)),
            seed=None if seed is None else int(where.number(seed, f"{key}.seed", -(2**31), 2**31)),
        ),
        timeout_s=None if timeout is None else where.number(timeout, f"{key}.timeout_s", 0.001),
        description=str(value.get("description", "")),
    )
