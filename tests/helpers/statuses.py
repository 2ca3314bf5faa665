"""Reading google.rpc.Status bodies as Envoy's transcoder writes them."""

from __future__ import annotations

from typing import Any


def details_of(body: dict[str, Any], type_name: str) -> list[dict[str, Any]]:
    """The details of one type (e.g. "BadRequest", "ErrorInfo") in a JSON status."""
    suffix = f"/google.rpc.{type_name}"
    return [d for d in body.get("details", []) if d["@type"].endswith(suffix)]
