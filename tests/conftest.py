"""Fixtures: the real stack (service and Envoy as processes on free ports).
What tests import lives in tests/helpers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentlab.devstack import Stack


@pytest.fixture(autouse=True)
def _clean_agentlab_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from AGENTLAB_* variables: tests start from none."""
    for name in list(os.environ):
        if name.startswith("AGENTLAB_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def model_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The real thing, as `make run` starts it: the embedded lab with the
    local model, behind Envoy."""
    stack = Stack.start(tmp_path_factory.mktemp("model-stack"))
    yield stack
    stack.stop()


@pytest.fixture
def echo_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack of its own for tests that stop or break its processes; the echo
    backend makes it start in a moment."""
    stack = Stack.start(tmp_path, {"AGENTLAB_DEFAULT_BACKEND": "echo"})
    yield stack
    stack.stop()
