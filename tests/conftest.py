"""Fixtures: the real stack (service and Envoy as processes on free ports).
What tests import lives in tests/helpers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentlab.devstack import Stack
from tests.helpers.stacks import StackFactory, numbered


@pytest.fixture(autouse=True)
def _clean_agentlab_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from AGENTLAB_* variables: tests start from none."""
    for name in list(os.environ):
        if name.startswith("AGENTLAB_"):
            monkeypatch.delenv(name)


@pytest.fixture
def start_stack(tmp_path: Path) -> Iterator[StackFactory]:
    """Starts stacks for one test, under its tmp_path; stops them after it:
    ``start_stack({"AGENTLAB_DEFAULT_BACKEND": "echo"}, keys=..., models=...)``."""
    with StackFactory(numbered(tmp_path)) as factory:
        yield factory


@pytest.fixture(scope="module")
def start_module_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StackFactory]:
    """As start_stack, for stacks that a module's tests share."""
    name = request.module.__name__.rpartition(".")[2]
    with StackFactory(lambda: tmp_path_factory.mktemp(f"{name}-stack")) as factory:
        yield factory


@pytest.fixture(scope="session")
def model_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The real thing, as `make run` starts it: the embedded lab with the
    local model, behind Envoy. One for the session: the model is slow to load."""
    with StackFactory(lambda: tmp_path_factory.mktemp("model-stack")) as start:
        yield start()


@pytest.fixture
def echo_stack(start_stack: StackFactory) -> Stack:
    """A stack of its own for tests that stop or break its processes; the echo
    backend makes it start in a moment."""
    return start_stack({"AGENTLAB_DEFAULT_BACKEND": "echo"})
