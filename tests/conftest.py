"""Fixtures: the real stack (service and Envoy as processes on free ports),
and the ``e2e`` marker on every test that starts a process. What tests import
lives in tests/helpers."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agentlab.devstack import Stack
from tests.helpers.stacks import StackFactory, numbered

# Fixtures that start processes: a test using one of them, or a fixture built
# on one (echo_stack, a module's own stack), is end-to-end. Marked here, from
# the fixtures a test uses, rather than by hand in each module: a new test on
# echo_stack is marked without anyone thinking of it, and a module that mixes
# in-process and end-to-end tests keeps the first in the quick run. A test
# that starts a process some other way carries @pytest.mark.e2e itself (or its
# module a pytestmark); pytest_runtest_protocol below fails one that does not.
PROCESS_FIXTURES = frozenset({"start_stack", "start_module_stack", "model_stack"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    """A test not marked e2e that starts a process fails, naming it, so that
    ``pytest -m "not e2e"`` stays in this process and quick, and a missing
    marker is found rather than guessed. Around setup, call and teardown: a
    module's fixture set up for its first test is caught too. (Every process,
    asyncio's included, is started by subprocess.Popen.)"""
    if item.get_closest_marker("e2e") is not None:
        return (yield)
    popen_init = subprocess.Popen.__init__

    def refuse(self: subprocess.Popen[Any], args: Any, *rest: Any, **options: Any) -> None:
        command = args if isinstance(args, str) else " ".join(map(str, args))
        pytest.fail(
            f"{item.nodeid} starts a process ({command[:200]}) but is not marked e2e: "
            "mark it @pytest.mark.e2e, or start the stack with a fixture (start_stack, ...)"
        )

    subprocess.Popen.__init__ = refuse  # type: ignore[method-assign]
    try:
        return (yield)
    finally:
        subprocess.Popen.__init__ = popen_init  # type: ignore[method-assign]


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
