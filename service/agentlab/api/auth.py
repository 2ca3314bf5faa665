"""API keys: who is calling. With keys configured, every RPC but health
(and reflection, which describes the public contract) needs
``authorization: Bearer <key>`` as gRPC metadata or, through Envoy, as the
HTTP header. Keys are kept only as SHA-256 digests and never logged.

The keys file (AGENTLAB_API_KEYS_FILE) is YAML::

    keys:
      - caller: frontend
        sha256: 5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8

``python -m agentlab.api.auth`` reads a key on stdin and prints its digest.
"""

from __future__ import annotations

import contextvars
import hashlib
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import yaml

from agentlab.api.interceptors import Unary, UnaryStream, Wrapped, wrap_handler
from agentlab.config import ConfigError
from agentlab.core.errors import Unauthenticated

__all__ = ["ANONYMOUS", "OPEN_PREFIXES", "AuthInterceptor", "current_caller", "digest", "load_keys"]

ANONYMOUS = ""
_caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default=ANONYMOUS)
_DIGEST = re.compile(r"[0-9a-f]{64}")
# Open to anyone: load balancers probe health, and reflection only describes
# the contract (grpcurl list/describe).
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    "/agentlab.v1.LabService/GetHealth",
)


def current_caller() -> str:
    """The caller of the RPC being served ("" when keys are not in use)."""
    return _caller.get()


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(path: Path) -> dict[str, str]:
    """Digest -> caller, from the keys file; every mistake names the file."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read the API keys file: {error}") from None
    if document is None:
        raise ConfigError(
            f"{path}: the API keys file is empty; list the keys' digests in it (README.md, "
            "API keys), or unset AGENTLAB_API_KEYS_FILE to leave the API open"
        )
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: keys: a non-empty list of {{caller, sha256}} is required")
    keys: dict[str, str] = {}
    for index, entry in enumerate(entries):
        caller = entry.get("caller") if isinstance(entry, dict) else None
        hashed = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(caller, str) or not caller.strip():
            raise ConfigError(f"{path}: keys[{index}].caller must be a non-empty string")
        if not isinstance(hashed, str) or not _DIGEST.fullmatch(hashed.lower()):
            raise ConfigError(
                f"{path}: keys[{index}].sha256 must be 64 hex digits (the key's SHA-256; "
                "`python -m agentlab.api.auth` prints it)"
            )
        keys[hashed.lower()] = caller.strip()
    return keys


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks the key and makes the caller known to the handler."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._keys = dict(keys)
        self._wrapped = Wrapped(
            lambda handler, _: wrap_handler(handler, self._unary, self._streaming)
        )

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        return self._wrapped(handler, str(handler_call_details.method))

    def _caller(self, context: Any) -> str:
        metadata = dict(context.invocation_metadata() or ())
        header = str(metadata.get("authorization", ""))
        scheme, _, key = header.partition(" ")
        if not header:
            raise Unauthenticated(
                "an API key is required: send `authorization: Bearer <key>`", "API_KEY_MISSING"
            )
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated(
                "the authorization header must be `Bearer <key>`", "API_KEY_MALFORMED"
            )
        caller = self._keys.get(digest(key.strip()))
        if caller is None:
            raise Unauthenticated("the API key is not valid", "API_KEY_INVALID")
        return caller

    def _unary(self, behaviour: Unary) -> Unary:
        async def checked(request: Any, context: Any) -> Any:
            caller = self._caller(context)  # Unauthenticated: MapErrors answers
            token = _caller.set(caller)
            try:
                return await behaviour(request, context)
            finally:
                _caller.reset(token)

        return checked

    def _streaming(self, behaviour: UnaryStream) -> UnaryStream:
        async def checked(request: Any, context: Any) -> AsyncIterator[Any]:
            caller = self._caller(context)  # Unauthenticated: MapErrors answers
            token = _caller.set(caller)
            try:
                async for response in behaviour(request, context):
                    yield response
            finally:
                _caller.reset(token)

        return checked


def main() -> None:
    key = sys.stdin.readline().strip()
    if not key:
        sys.exit("usage: echo -n '<key>' | python -m agentlab.api.auth")
    print(digest(key))


if __name__ == "__main__":
    main()
