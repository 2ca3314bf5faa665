"""Settings from the environment, and the Envoy configuration the tests and
`make run` derive from gateway/envoy.yaml."""

from __future__ import annotations

import pytest
import yaml

from agentlab.config import ConfigError, Settings
from agentlab.devstack import DESCRIPTOR, Ports, render_envoy_config


def test_defaults_serve_the_frontend_port_layout() -> None:
    settings = Settings.from_env({})
    assert settings.grpc_address == "localhost:50051"
    assert settings.default_backend == "embedded"


def test_values_are_read_and_checked() -> None:
    settings = Settings.from_env(
        {
            "AGENTLAB_DEFAULT_BACKEND": "echo",
            "AGENTLAB_MODEL_SLOTS": "2",
            "AGENTLAB_LOG_LEVEL": "debug",
        }
    )
    assert (settings.default_backend, settings.model_slots, settings.log_level) == (
        "echo",
        2,
        "DEBUG",
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AGENTLAB_DEFAULT_BACKEND", "gpt5"),
        ("AGENTLAB_MODEL_SLOTS", "four"),
        ("AGENTLAB_MODEL_SLOTS", "0"),
        ("AGENTLAB_SHUTDOWN_GRACE_S", "soon"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_envoy_config_is_rendered_for_other_ports() -> None:
    rendered = render_envoy_config(Ports(gateway=18000, service=15051, admin=19901))
    config = yaml.safe_load(rendered)
    assert config["admin"]["address"]["socket_address"]["port_value"] == 19901
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == 18000
    cluster = config["static_resources"]["clusters"][0]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"]["port_value"] == 15051
    assert str(DESCRIPTOR) in rendered

    def port_values(node: object) -> set[int]:
        if isinstance(node, dict):
            found = {node["port_value"]} if "port_value" in node else set()
            return found.union(*(port_values(v) for v in node.values()))
        if isinstance(node, list):
            return set().union(*(port_values(v) for v in node))
        return set()

    assert port_values(config) == {18000, 15051, 19901}
