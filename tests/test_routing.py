"""The model routing file: what it accepts, what it refuses (naming the key),
and how the registry routes with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentlab.config import ConfigError
from agentlab.core.errors import ModelNotFound
from agentlab.core.runner import Runner
from agentlab.core.types import ExecutionMode, GenerationOptions, Task
from agentlab.lab.echo import EchoModel
from agentlab.lab.local import LocalBackend
from agentlab.lab.registry import LabRegistry
from agentlab.routing import load_routing
from tests.helpers.runs import run_to_end

ECHO_X = "backends: {x: {kind: echo}}\n"
OLLAMA_X = "backends: {x: {kind: ollama, url: 'ftp://h'}}\n"
EXAMPLE = Path(__file__).resolve().parents[1] / "models.example.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def test_the_documented_example_loads() -> None:
    config = load_routing(EXAMPLE)
    assert config.backends["local-ollama"].kind == "ollama"
    route = config.models["mistral7b"]
    assert (route.backend, route.backend_model, route.timeout_s) == (
        "local-ollama",
        "mistral:7b",
        120,
    )
    assert route.defaults == GenerationOptions(temperature=0.7, max_tokens=512)
    # model: defaults to the route's own name.
    assert config.models["smollm2"].backend_model == "smollm2"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("models: {a: {backend: nowhere}}", "models.a.backend"),
        ("backends: {x: {kind: gpt}}\nmodels: {a: {backend: x}}", "backends.x.kind"),
        ("backends: {x: {kind: ollama}}\nmodels: {a: {backend: x}}", "backends.x.url"),
        (
            "backends: {x: {kind: ollama, url: 'ftp://h'}}\nmodels: {a: {backend: x}}",
            "backends.x.url",
        ),
        (
            ECHO_X + "models: {a: {backend: x, temperature: 3}}",
            "models.a.temperature",
        ),
        (
            ECHO_X + "models: {a: {backend: x, max_tokens: many}}",
            "models.a.max_tokens",
        ),
        (ECHO_X + "models: {a: {backend: x, colour: red}}", "models.a"),
        (ECHO_X + "models: {}", "models"),
        (
            "backends: {x: {kind: openai, url: 'http://h/v1', api_key_env: NO_SUCH_VAR_HERE}}\n"
            "models: {a: {backend: x}}",
            "backends.x.api_key_env",
        ),
        ("backends: [1, 2]", "backends"),
        (": : :", "not valid YAML"),
    ],
)
def test_mistakes_are_refused_naming_where(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_routing(write(tmp_path, text), env={})
    assert where in str(raised.value)
    assert "models.yaml" in str(raised.value)


def test_api_key_comes_from_the_environment(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "backends: {x: {kind: openai, url: 'http://h/v1', api_key_env: KEY}}\n"
        "models: {a: {backend: x}}",
    )
    assert load_routing(path, env={"KEY": "s3cret"}).backends["x"].api_key == "s3cret"


async def test_routes_defaults_and_unknown_models(tmp_path: Path) -> None:
    config = load_routing(
        write(
            tmp_path,
            "backends: {one: {kind: echo}, two: {kind: echo}}\n"
            "models:\n"
            "  first: {backend: one, max_tokens: 2, timeout_s: 30}\n"
            "  second: {backend: two}\n",
        )
    )
    backends = {name: LocalBackend(name, EchoModel()) for name in config.backends}
    registry = LabRegistry(backends, config.models)
    await registry.start()
    runner = Runner(registry.route, default_max_tokens=50)

    def task(model: str, **options: object) -> Task:
        return Task("a b c d e", model, ExecutionMode.INFERENCE, GenerationOptions(**options))  # type: ignore[arg-type]

    first = await run_to_end(runner, task("first"))
    assert (first.metrics.backend, first.metrics.completion_tokens) == ("echo", 2)
    # A request's own option wins over the model's default.
    assert (await run_to_end(runner, task("first", max_tokens=4))).metrics.completion_tokens == 4
    assert (await run_to_end(runner, task("second"))).metrics.completion_tokens == 5

    with pytest.raises(ModelNotFound) as raised:
        await run_to_end(runner, task("mistral7b"))
    assert "first, second" in raised.value.message

    assert [(m.name, m.backend, m.ready) for m in registry.models()] == [
        ("first", "one", True),
        ("second", "two", True),
    ]
    await registry.close()
