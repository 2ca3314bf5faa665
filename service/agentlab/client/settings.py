"""Where the client calls and with which key: arguments first, then the
environment (AGENTLAB_TARGET, AGENTLAB_API_KEY), then the local default."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

__all__ = [
    "API_KEY_VARIABLE",
    "DEFAULT_TARGET",
    "TARGET_VARIABLE",
    "resolve_api_key",
    "resolve_target",
]

# Envoy's port under `make run`: REST and gRPC on one listener.
DEFAULT_TARGET = "localhost:8000"
TARGET_VARIABLE = "AGENTLAB_TARGET"
API_KEY_VARIABLE = "AGENTLAB_API_KEY"
DEFAULT_PORT = DEFAULT_TARGET.rsplit(":", 1)[1]
# A bare host name or IPv4 address: gRPC would dial it on 443 (its default
# for a dns: target), never where the gateway listens.
_BARE_HOST = re.compile(r"[A-Za-z0-9.-]+")


def resolve_target(target: str | None, env: Mapping[str, str] | None = None) -> str:
    """``host:port`` to dial. An ``http://`` prefix (a REST URL pasted from
    the README) is dropped: the gateway serves gRPC on the same port. A host
    without a port gets the gateway's (8000), not gRPC's default of 443;
    other gRPC target forms (``unix:``, ``dns:///``, ``[::1]:8000``) pass
    as they are."""
    env = os.environ if env is None else env
    chosen = (target or env.get(TARGET_VARIABLE, "").strip() or DEFAULT_TARGET).strip()
    for scheme in ("http://", "grpc://"):
        if chosen.startswith(scheme):
            chosen = chosen.removeprefix(scheme)
    chosen = chosen.rstrip("/")
    if _BARE_HOST.fullmatch(chosen):
        chosen = f"{chosen}:{DEFAULT_PORT}"
    return chosen


def resolve_api_key(api_key: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The key to send as ``authorization: Bearer <key>``, or None (an open API)."""
    env = os.environ if env is None else env
    return api_key or env.get(API_KEY_VARIABLE, "").strip() or None
