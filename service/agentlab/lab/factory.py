"""Builds the backends and routes a process serves, from its settings and
the model routing file."""

from __future__ import annotations

from agentlab.config import ConfigError, Settings
from agentlab.lab.base import Backend
from agentlab.lab.echo import EchoModel
from agentlab.lab.http_lab import HttpLabBackend
from agentlab.lab.local import ECHO, LocalBackend, local_model
from agentlab.lab.ollama import OllamaBackend
from agentlab.lab.openai import OpenAIBackend
from agentlab.lab.registry import LabRegistry
from agentlab.routing import BackendConfig, ModelRoute, load_routing

__all__ = ["build_registry"]


def build_registry(settings: Settings) -> LabRegistry:
    """Without a routing file, the default backend serves every model name;
    with one, exactly the configured names. Either way "echo" reaches the
    echo backend unless the file gives that name to a model of its own."""
    if settings.models_file is None:
        default = LocalBackend(settings.default_backend, local_model(settings))
        if default.kind == ECHO:
            return LabRegistry.serving_everything(default)
        return LabRegistry.serving_everything(
            default, **{ECHO: LocalBackend(ECHO, EchoModel(settings.echo_token_delay_s))}
        )

    config = load_routing(settings.models_file)
    backends = {name: _backend(spec, settings) for name, spec in config.backends.items()}
    routes = dict(config.models)
    if ECHO not in routes:
        backends.setdefault(ECHO, LocalBackend(ECHO, EchoModel(settings.echo_token_delay_s)))
        if backends[ECHO].kind == ECHO:
            routes[ECHO] = ModelRoute(
                ECHO, ECHO, ECHO, description="no model: measures the gateway itself"
            )
    return LabRegistry(backends, routes)


def _backend(spec: BackendConfig, settings: Settings) -> Backend:
    match spec.kind:
        case "embedded" | "echo":
            return LocalBackend(spec.name, local_model(settings, spec.kind))
        case "ollama":
            return OllamaBackend(spec.name, spec.url)
        case "openai":
            return OpenAIBackend(spec.name, spec.url, api_key=spec.api_key)
        case "http_lab":
            return HttpLabBackend(spec.name, spec.url)
    raise ConfigError(f"backend {spec.name!r}: unknown kind {spec.kind!r}")
