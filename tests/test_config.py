"""Settings from the environment, and the Envoy configuration the tests and
`make run` derive from gateway/envoy.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from buf.validate import validate_pb2

from agentlab import preflight
from agentlab.config import (
    CONTRACT_MAX_PROMPT_CHARS,
    MAX_DURATION_S,
    ConfigError,
    RateLimit,
    Settings,
    redact_url,
)
from agentlab.devstack import DESCRIPTOR, ROOT, Ports, free_port, render_envoy_config
from agentlab.v1 import lab_service_pb2
from tests.helpers.tools import run_service


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
    ("value", "limit"),
    [
        ("off", RateLimit()),
        (" OFF ", RateLimit()),
        ("", RateLimit()),  # the default
        ("100", RateLimit(100, 200)),
        ("100/150", RateLimit(100, 150)),
        ("0.2/3", RateLimit(0.2, 3)),
        ("0.2", RateLimit(0.2, 1)),
    ],
)
def test_the_rate_limit_is_off_or_a_rate_with_a_burst(value: str, limit: RateLimit) -> None:
    parsed = Settings.from_env({"AGENTLAB_RATE_LIMIT": value}).rate_limit
    assert parsed == limit
    # As the README and make run print it, and read back the same.
    assert RateLimit.parse(str(parsed)) == parsed


def _rate_limit_filters(config: str) -> list[object]:
    return [
        f
        for f in yaml.safe_load(config)["static_resources"]["listeners"][0]["filter_chains"][0][
            "filters"
        ][0]["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.local_ratelimit"
    ]


def test_the_rate_limit_is_rendered_into_envoys_bucket_or_removed_when_off() -> None:
    ports = Ports(gateway=18000, service=15051, admin=19901)
    [limiter] = _rate_limit_filters(render_envoy_config(ports, rate_limit=RateLimit(0.2, 3)))
    assert limiter["typed_config"]["descriptors"][0]["token_bucket"] == {  # type: ignore[index]
        "max_tokens": 3,
        "tokens_per_fill": 1,
        "fill_interval": "5.000s",
    }
    off = render_envoy_config(ports, rate_limit=RateLimit())
    assert _rate_limit_filters(off) == []
    # Nor does any route still configure it (health's exemption).
    assert "local_ratelimit" not in off


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AGENTLAB_DEFAULT_BACKEND", "gpt5"),
        ("AGENTLAB_MODEL_SLOTS", "four"),
        ("AGENTLAB_MODEL_SLOTS", "0"),
        ("AGENTLAB_SHUTDOWN_GRACE_S", "soon"),
        # The contract's prompt maximum can only be lowered.
        ("AGENTLAB_MAX_PROMPT_CHARS", "5000000"),
        ("AGENTLAB_REDIS_URL", "http://127.0.0.1:6379"),
        ("AGENTLAB_REDIS_URL", "u:hunter2@localhost:6379"),
        ("AGENTLAB_DATABASE_URL", "u:hunter2@localhost:5432/db"),
        ("AGENTLAB_DATABASE_URL", "postgresql:/u:hunter2@localhost/db"),
        ("AGENTLAB_DATABASE_URL", "postgresql://u:hunter2@[::1/db"),
        ("AGENTLAB_RATE_LIMIT", "fast"),
        ("AGENTLAB_RATE_LIMIT", "0"),
        ("AGENTLAB_RATE_LIMIT", "-5"),
        ("AGENTLAB_RATE_LIMIT", "100/0"),
        ("AGENTLAB_RATE_LIMIT", "100/lots"),
        ("AGENTLAB_RATE_LIMIT", "100/200/300"),
        ("AGENTLAB_RATE_LIMIT", "nan"),
        ("AGENTLAB_RATE_LIMIT", "1e9"),
        ("AGENTLAB_RATE_LIMIT", "inf"),
        ("AGENTLAB_RATE_LIMIT", "5/"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name) as refused:
        Settings.from_env({name: value})
    assert "hunter2" not in str(refused.value)


def test_the_prompt_limit_agrees_with_the_contract() -> None:
    rules = lab_service_pb2.ExecuteRequest.DESCRIPTOR.fields_by_name["prompt"].GetOptions()
    # protoc's .pyi types the extension as a plain FieldDescriptor, not the
    # extension descriptor that Extensions[] is typed to take.
    field_rules: validate_pb2.FieldRules = rules.Extensions[validate_pb2.field]  # type: ignore[index]
    assert field_rules.string.max_len == CONTRACT_MAX_PROMPT_CHARS
    limit = Settings.from_env({"AGENTLAB_MAX_PROMPT_CHARS": str(CONTRACT_MAX_PROMPT_CHARS)})
    assert limit.max_prompt_chars == CONTRACT_MAX_PROMPT_CHARS


def test_envoy_config_is_rendered_for_other_ports() -> None:
    rendered = render_envoy_config(Ports(gateway=18000, service=15051, admin=19901, metrics=19464))
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

    assert port_values(config) == {18000, 15051, 19901, 19464}


def test_a_misspelt_variable_is_refused_naming_the_right_one() -> None:
    # Ignored, it would leave the API open without a word.
    with pytest.raises(ConfigError, match=r"AGENTLAB_API_KEY_FILE .*AGENTLAB_API_KEYS_FILE"):
        Settings.from_env({"AGENTLAB_API_KEY_FILE": "keys.yaml"})


def test_an_unknown_log_level_is_refused() -> None:
    with pytest.raises(ConfigError, match="AGENTLAB_LOG_LEVEL"):
        Settings.from_env({"AGENTLAB_LOG_LEVEL": "verbose"})


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:s3cr%40t@db:5432/lab", "postgresql://app:***@db:5432/lab"),
        ("redis://:s3cr%40t@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        (
            "postgresql://db/lab?user=app&password=s3cr%40t",
            "postgresql://db/lab?user=app&password=***",
        ),
        ("postgresql://app@db/lab", "postgresql://app@db/lab"),
        ("sqlite:////var/lib/agentlab/x.db", "sqlite:////var/lib/agentlab/x.db"),
        # Not scheme://: where a password would be cannot be told, so all is hidden.
        ("u:hunter2@localhost:6379", "*** (not a scheme:// URL; hidden)"),
        ("postgresql://u:hunter2@[::1/db", "*** (not a scheme:// URL; hidden)"),
    ],
)
def test_urls_are_shown_without_their_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_the_applied_configuration_shows_no_secret(tmp_path: Path) -> None:
    env = {
        "AGENTLAB_DATABASE_URL": "postgresql://app:s3cret@db:5432/lab",
        "AGENTLAB_REDIS_URL": "redis://:s3cret@127.0.0.1:6379/0",
        "AGENTLAB_MAX_RUNNING_EXECUTIONS": "3",
    }
    lines = preflight.check(Settings.from_env(env), env).lines()
    text = "\n".join(lines)
    assert "s3cret" not in text
    assert "AGENTLAB_DATABASE_URL" in text
    assert "postgresql://app:***@db:5432/lab" in text
    [running] = [line for line in lines if line.startswith("AGENTLAB_MAX_RUNNING_EXECUTIONS ")]
    assert running.split() == ["AGENTLAB_MAX_RUNNING_EXECUTIONS", "3"]
    [queued] = [line for line in lines if line.startswith("AGENTLAB_MAX_QUEUED_EXECUTIONS ")]
    assert queued.split() == ["AGENTLAB_MAX_QUEUED_EXECUTIONS", "64", "[default]"]
    assert {line.split()[0] for line in lines} == set(Settings.variables())


def test_docker_compose_passes_every_setting_through() -> None:
    """docker-compose.yml hands the user's AGENTLAB_* variables to both
    service replicas (an unset one arrives empty, read as the default), all
    but the address and data directory, which the compose file and the image
    fix, and the store and bus, which default to compose's own PostgreSQL and
    Redis. (tests/test_deploy.py checks the rest of the compose file.)"""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    passed = {name: f"${{{name}:-}}" for name in Settings.variables()}
    del passed["AGENTLAB_GRPC_ADDRESS"], passed["AGENTLAB_DATA_DIR"]
    del passed["AGENTLAB_DATABASE_URL"], passed["AGENTLAB_REDIS_URL"]
    # Each replica serves its metrics on a port of its own (Prometheus
    # scrapes both: deploy/prometheus.yml).
    del passed["AGENTLAB_METRICS_ADDRESS"]
    replicas = (("service", 50051, 9464), ("service-2", 50052, 9465))
    for name, port, metrics_port in replicas:
        environment = compose["services"][name]["environment"]
        assert environment["AGENTLAB_GRPC_ADDRESS"] == f"127.0.0.1:{port}"
        assert environment["AGENTLAB_METRICS_ADDRESS"] == f"127.0.0.1:{metrics_port}"
        assert environment["AGENTLAB_DATABASE_URL"].startswith("${AGENTLAB_DATABASE_URL:-")
        assert environment["AGENTLAB_REDIS_URL"].startswith("${AGENTLAB_REDIS_URL:-")
        assert passed.items() <= environment.items()
        assert "./config:/app/config:ro" in compose["services"][name]["volumes"]
    assert "ENV AGENTLAB_DATA_DIR=/var/lib/agentlab" in (ROOT / "Dockerfile").read_text()
    assert Settings.from_env(dict.fromkeys(passed, "")) == Settings()


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AGENTLAB_API_KEYS_FILE": "{tmp}/keys.yaml"}, "the API keys file is empty"),
        ({"AGENTLAB_API_KEYS_FILE": "{tmp}/missing.yaml"}, "cannot read the API keys file"),
        ({"AGENTLAB_MODELS_FILE": "{tmp}/keys.yaml"}, "models"),
        ({"AGENTLAB_API_KEY_FILE": "{tmp}/keys.yaml"}, "did you mean AGENTLAB_API_KEYS_FILE"),
        ({"AGENTLAB_RATE_LIMIT": "100/s"}, "AGENTLAB_RATE_LIMIT must be off or"),
        # Once a hang without a word (recovery's date arithmetic overflowed),
        # and a start-up whose every retention sweep failed.
        ({"AGENTLAB_EXECUTION_LEASE_S": "inf"}, "AGENTLAB_EXECUTION_LEASE_S must be at most"),
        ({"AGENTLAB_RETENTION_MAX_AGE": "1000000d"}, "it must be at most 36500d"),
    ],
)
def test_python_m_agentlab_refuses_what_it_cannot_honour(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    (tmp_path / "keys.yaml").write_text("")
    port = free_port()
    done = run_service(
        {
            "AGENTLAB_GRPC_ADDRESS": f"127.0.0.1:{port}",
            "AGENTLAB_DEFAULT_BACKEND": "echo",
            "AGENTLAB_DATA_DIR": str(tmp_path / "data"),
            **{name: value.format(tmp=tmp_path) for name, value in env.items()},
        }
    )
    assert done.returncode != 0
    assert "agentlab: configuration error: " in done.stderr
    assert message in done.stderr, done.stderr
    assert not (tmp_path / "data").exists()  # stopped before it opened anything


@pytest.mark.e2e
def test_a_bus_that_cannot_be_reached_stops_start_up_in_one_line(tmp_path: Path) -> None:
    """Redis (or the database) refusing the first connection stops the
    service before it serves, with a message naming the settings, no
    traceback and no password."""
    closed = free_port()  # nothing listens there
    done = run_service(
        {
            "AGENTLAB_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
            "AGENTLAB_DEFAULT_BACKEND": "echo",
            "AGENTLAB_DATA_DIR": str(tmp_path / "data"),
            "AGENTLAB_REDIS_URL": f"redis://:hunter2@127.0.0.1:{closed}/0",
        }
    )
    assert done.returncode != 0
    assert "agentlab: cannot open the execution store or the event bus" in done.stderr
    assert "AGENTLAB_REDIS_URL" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "hunter2" not in done.stderr


@pytest.mark.parametrize("value", ["inf", "nan", "1e300", "3153600001"])
@pytest.mark.parametrize(
    "variable",
    [
        "AGENTLAB_EXECUTION_HEARTBEAT_S",
        "AGENTLAB_EXECUTION_LEASE_S",
        "AGENTLAB_HEALTH_INTERVAL_S",
        "AGENTLAB_SHUTDOWN_GRACE_S",
        "AGENTLAB_ECHO_TOKEN_DELAY_S",
        "AGENTLAB_RETENTION_INTERVAL_S",
    ],
)
def test_durations_are_finite_and_at_most_a_century(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable) as raised:
        Settings.from_env({variable: value})
    message = str(raised.value)
    assert "must be a number" in message or "at most 3153600000 (100 years)" in message


def test_the_longest_duration_is_accepted() -> None:
    settings = Settings.from_env({"AGENTLAB_EXECUTION_LEASE_S": str(MAX_DURATION_S)})
    assert settings.execution_lease_s == MAX_DURATION_S
