"""The playground page (README, Playground) in a real browser.

Headless Chromium loads the page from the gateway itself (Envoy serves it at
`/`, on the API's port) and drives it as a person would: type a prompt, run
it, watch the graph's nodes finish with their tokens; open a run from the
history; replay it on `echo` and read the comparison; reload mid-run and
see the watch resume; cancel. API keys are on, so every call needs the key
field. Screenshots go to each test's tmp_path.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentlab.devstack import ROOT, Stack, free_port
from tests.helpers.browser import chromium_browser
from tests.helpers.stacks import StackFactory

KEY = "playground-key-1"
# Echo streams word by word, 50 ms apart: a run long enough to reload or
# cancel in the middle of it.
SLOW_PROMPT = " ".join(f"word{i}" for i in range(30))
NODES = ["plan", "answer", "review"]
ASSETS = {
    "/playground/app.js": "text/javascript",
    "/playground/app.css": "text/css",
    "/playground/cytoscape.min.js": "text/javascript",
    "/playground/chart.umd.min.js": "text/javascript",
}


@pytest.fixture(scope="module")
def stack(start_module_stack: StackFactory) -> Stack:
    # The default backend is the embedded model (a real one): a run on it
    # replayed on echo gives real differences.
    return start_module_stack(
        {"AGENTLAB_ECHO_TOKEN_DELAY_S": "0.05", "AGENTLAB_DEFAULT_MAX_TOKENS": "24"},
        keys={"researcher": KEY},
    )


@asynccontextmanager
async def playground(stack: Stack, key: str | None = KEY) -> AsyncIterator[Any]:
    """The page, loaded from the gateway, with ``key`` typed in its key field."""
    async with chromium_browser() as browser:
        page = await browser.new_page()
        await page.goto(f"{stack.url}/")
        if key is not None:
            await page.fill("#api-key", key)
            await page.dispatch_event("#api-key", "change")
            await page.wait_for_selector("#model option[value=echo]", state="attached")
        yield page


async def run_streamed(page: Any, prompt: str, model: str | None = None) -> None:
    await page.fill("#prompt", prompt)
    if model is not None:
        await page.select_option("#model", model)
    await page.select_option("#mode", "EXECUTION_MODE_ORCHESTRATION")
    await page.click("#run-stream")


async def node_cards(page: Any) -> list[dict[str, str]]:
    cards: list[dict[str, str]] = await page.eval_on_selector_all(
        ".node-card",
        """cards => cards.map(card => ({node: card.dataset.node, status: card.dataset.status,
                                         tokens: card.querySelector('.tokens').textContent}))""",
    )
    return cards


async def wait_finished(page: Any, timeout_ms: int = 90_000) -> None:
    await page.wait_for_function(
        "['SUCCEEDED', 'FAILED', 'CANCELLED'].includes("
        "document.getElementById('execution-state').textContent)",
        timeout=timeout_ms,
    )


async def api(stack: Stack, method: str, path: str, body: Any = None) -> dict[str, Any]:
    """A REST call with the key, as a test's own check on what the page shows."""
    async with httpx.AsyncClient(
        base_url=f"{stack.url}/api/v1", headers={"authorization": f"Bearer {KEY}"}, timeout=120
    ) as client:
        response = await client.request(method, path, json=body)
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


async def stored(stack: Stack, execution_id: str) -> dict[str, Any]:
    execution: dict[str, Any] = (await api(stack, "GET", f"/executions/{execution_id}"))[
        "execution"
    ]
    return execution


def test_the_gateway_serves_the_page_and_its_libraries(stack: Stack) -> None:
    page = httpx.get(f"{stack.url}/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<title>Agent Lab playground</title>" in page.text
    for path, content_type in ASSETS.items():
        asset = httpx.get(f"{stack.url}{path}", timeout=10)
        assert asset.status_code == 200, path
        assert asset.headers["content-type"].startswith(content_type), path
        assert asset.content == (ROOT / "build" / path.lstrip("/")).read_bytes(), path
    # The page is public; the API behind it still wants the key.
    assert httpx.get(f"{stack.url}/api/v1/models", timeout=10).status_code == 401


async def test_a_streamed_run_lights_up_each_node_with_its_tokens(
    stack: Stack, tmp_path: Path
) -> None:
    async with playground(stack) as page:
        options = await page.eval_on_selector_all(
            "#model option", "options => options.map(o => o.textContent)"
        )
        assert any(option.startswith("echo (echo") for option in options), options
        await run_streamed(page, "Name three prime numbers.")
        # Tokens show while their node still runs: streamed, not drawn at the end.
        await page.wait_for_function(
            "[...document.querySelectorAll('.node-card[data-status=running] .tokens')]"
            ".some(tokens => tokens.textContent.length > 0)",
            timeout=60_000,
        )
        await page.screenshot(path=tmp_path / "running.png", full_page=True)
        await wait_finished(page)
        await page.screenshot(path=tmp_path / "finished.png", full_page=True)

        assert await page.text_content("#execution-state") == "SUCCEEDED"
        cards = await node_cards(page)
        assert [card["node"] for card in cards] == NODES
        assert all(card["status"] == "finished" for card in cards), cards
        assert all(card["tokens"].strip() for card in cards), cards
        # The graph is cytoscape's, the chart chart.js's, fed from the same run.
        graph = await page.evaluate(
            "playground.cy.nodes().map(n => [n.data('name'), n.data('status')])"
        )
        assert graph == [[node, "finished"] for node in NODES]
        assert await page.evaluate("playground.cy.edges().length") == 2
        chart = await page.evaluate(
            "({labels: playground.chart.data.labels,"
            " ttft: playground.chart.data.datasets[0].data,"
            " rate: playground.chart.data.datasets[1].data})"
        )
        assert chart["labels"] == NODES
        assert all(value > 0 for value in chart["ttft"] + chart["rate"]), chart

        # What the page streamed is what the lab stored, token for token.
        execution_id = await page.text_content("#execution-id")
        record = await stored(stack, execution_id)
        assert record["state"] == "EXECUTION_STATE_SUCCEEDED"
        assert [card["tokens"] for card in cards] == [s["output"] for s in record["result"]["flow"]]
        assert await page.text_content("#output") == record["result"]["output"]


async def test_a_run_opened_from_the_history_replays_on_echo_side_by_side(
    stack: Stack, tmp_path: Path
) -> None:
    executed = await api(
        stack, "POST", "/execute", {"prompt": "Say hello.", "mode": "EXECUTION_MODE_ORCHESTRATION"}
    )
    source = executed["execution_id"]
    async with playground(stack) as page:
        await page.select_option("#history-state", "EXECUTION_STATE_SUCCEEDED")
        # Only once the filtered page is shown: a click on a row an earlier
        # answer drew could land on the next page's row in its place.
        row = page.locator(f"#history:not([aria-busy]) tr[data-id='{source}']")
        await row.wait_for()
        await row.locator("button.open").click()
        await page.wait_for_function(
            f"document.getElementById('execution-id').textContent === '{source}'"
        )
        await wait_finished(page)
        assert [card["status"] for card in await node_cards(page)] == ["finished"] * 3

        await page.select_option("#replay-model", "echo")
        await page.click("#replay")
        await page.wait_for_selector("#compare-panel:not([hidden])", timeout=90_000)
        await page.screenshot(path=tmp_path / "compare.png", full_page=True)

        headings = await page.eval_on_selector_all(
            "#compare th", "cells => cells.map(c => c.textContent)"
        )
        assert headings[0].startswith("baseline: ")
        assert source in headings[0]
        assert headings[1].startswith("replay: echo (SUCCEEDED)")
        rows = await page.eval_on_selector_all(
            "#compare tr[data-node]",
            """rows => rows.map(row => ({node: row.dataset.node,
                 delta: row.querySelector('td.compared .delta')?.textContent ?? '',
                 marked: row.querySelectorAll('td.compared ins, td.compared del').length}))""",
        )
        assert [row["node"] for row in rows] == [*NODES, "total"]
        for row in rows[:3]:
            assert row["delta"].startswith("Δ tokens "), row
            # The model's words and echo's differ: the diff marks some.
            assert row["marked"] > 0, row
        # The page's numbers are the comparison's.
        replay_id = headings[1].rsplit(" ", 1)[1]
        comparison = await api(
            stack, "POST", "/executions:compare", {"execution_ids": [source, replay_id]}
        )
        delta = comparison["nodes"][0]["versions"][1]["delta"]
        assert f"Δ tokens {delta['completion_tokens']:+d} " in rows[0]["delta"]


async def test_a_reload_mid_run_resumes_the_watch_where_it_stopped(
    stack: Stack, tmp_path: Path
) -> None:
    async with playground(stack) as page:
        watches: list[dict[str, str]] = []
        page.on(
            "request",
            lambda request: watches.append(request.headers) if ":watch" in request.url else None,
        )
        await run_streamed(page, SLOW_PROMPT, model="echo")
        await page.wait_for_selector(".node-card[data-node=plan][data-status=finished]")
        seen_before = await page.evaluate("playground.view().lastSequence")
        await asyncio.sleep(0.3)  # the view is saved at most every 200 ms
        await page.reload()
        await wait_finished(page)
        await page.screenshot(path=tmp_path / "resumed.png", full_page=True)

        assert watches, "the page did not resume through the watch route"
        resumed_from = int(watches[0]["last-event-id"])
        assert resumed_from >= seen_before
        cards = await node_cards(page)
        assert [card["status"] for card in cards] == ["finished"] * 3
        record = await stored(stack, await page.text_content("#execution-id"))
        # Nothing lost and nothing twice across the reload.
        assert [card["tokens"] for card in cards] == [s["output"] for s in record["result"]["flow"]]
        assert record["last_sequence"] > resumed_from
        # The history, loaded while it ran, shows its end.
        await page.wait_for_function(
            f"document.querySelector(\"#history tr[data-id='{record['execution_id']}']\")"
            "?.cells[2].textContent === 'SUCCEEDED'"
        )


async def test_cancel_stops_the_open_run(stack: Stack) -> None:
    async with playground(stack) as page:
        await run_streamed(page, SLOW_PROMPT, model="echo")
        await page.wait_for_selector(".node-card[data-status=running]")
        await page.click("#cancel")
        await wait_finished(page)
        assert await page.text_content("#execution-state") == "CANCELLED"
        record = await stored(stack, await page.text_content("#execution-id"))
        assert record["state"] == "EXECUTION_STATE_CANCELLED"
        # The cut node shows the tokens it streamed (it showed "tokens 0").
        [cut] = [s for s in record["result"]["flow"] if s["status"] == "STEP_STATUS_CANCELLED"]
        streamed = len(cut["output"].split())
        assert streamed > 0, cut
        assert cut["metrics"]["completion_tokens"] == streamed, cut
        metrics = await page.text_content(
            f".node-card[data-node={cut['node']}][data-status=cancelled] .metrics"
        )
        assert metrics.startswith(f"tokens {streamed} · "), metrics


async def test_a_missing_or_wrong_key_shows_the_error(stack: Stack, tmp_path: Path) -> None:
    async with playground(stack, key=None) as page:
        await page.wait_for_selector("#error:not([hidden])")
        assert (await page.text_content("#error")).startswith("401")
        await page.fill("#api-key", "not-the-key")
        await page.dispatch_event("#api-key", "change")
        await page.fill("#prompt", "hello")
        await page.evaluate("document.getElementById('error').hidden = true")
        async with page.expect_response(lambda r: r.url.endswith("/api/v1/orchestrate")) as sent:
            await page.click("#run-stream")
        answer = await sent.value
        assert answer.status == 401
        assert answer.request.headers["authorization"] == "Bearer not-the-key"
        await page.wait_for_selector("#error:not([hidden])")
        assert await page.text_content("#error") == "401: the API key is not valid"
        await page.screenshot(path=tmp_path / "wrong-key.png", full_page=True)
        assert await page.text_content("#execution-id") == ""


async def test_execute_shows_the_whole_run_at_its_end(stack: Stack) -> None:
    async with playground(stack) as page:
        await page.fill("#prompt", "one two three")
        await page.select_option("#model", "echo")
        await page.select_option("#mode", "EXECUTION_MODE_INFERENCE")
        await page.click("#run-execute")
        await wait_finished(page)
        cards = await node_cards(page)
        assert cards == [{"node": "inference", "status": "finished", "tokens": "one two three"}]
        assert await page.text_content("#output") == "one two three"


async def test_the_history_pages_and_filters(stack: Stack) -> None:
    # Eleven quick runs on echo: more than one page of ten whatever else the
    # module's tests ran.
    for number in range(11):
        await api(stack, "POST", "/execute", {"prompt": f"run {number}", "model": "echo"})
    rows_js = (
        "rows => rows.map(row => [row.dataset.id, row.cells[1].textContent,"
        " row.cells[2].textContent])"
    )
    async with playground(stack) as page:
        await page.fill("#history-model", "echo")
        await page.dispatch_event("#history-model", "change")
        await page.select_option("#history-state", "EXECUTION_STATE_SUCCEEDED")
        await page.wait_for_function(
            "!document.getElementById('history').hasAttribute('aria-busy')"
            " && [...document.querySelectorAll('#history tbody tr')].length === 10"
            " && [...document.querySelectorAll('#history tbody tr')]"
            ".every(row => row.cells[2].textContent === 'SUCCEEDED')"
        )
        first = await page.eval_on_selector_all("#history tbody tr", rows_js)
        assert {(model, state) for _, model, state in first} == {("echo", "SUCCEEDED")}
        await page.click("#history-next")
        await page.wait_for_function(
            f"!{[row[0] for row in first]!r}.includes("
            "document.querySelector('#history tbody tr')?.dataset.id ?? 'none')"
        )
        second = await page.eval_on_selector_all("#history tbody tr", rows_js)
        assert second
        assert not {row[0] for row in second} & {row[0] for row in first}
        assert {(model, state) for _, model, state in second} == {("echo", "SUCCEEDED")}
        # And back: the first page again, as it was.
        await page.click("#history-previous")
        await page.wait_for_function(
            f"document.querySelector('#history tbody tr')?.dataset.id === {first[0][0]!r}"
            " && !document.getElementById('history').hasAttribute('aria-busy')"
        )
        assert await page.eval_on_selector_all("#history tbody tr", rows_js) == first
        assert await page.is_disabled("#history-previous")
        assert not await page.is_disabled("#history-next")


async def test_the_model_picker_shows_which_models_are_unreachable(
    start_stack: StackFactory,
) -> None:
    routing = (
        "backends:\n"
        f"  down: {{kind: ollama, url: 'http://127.0.0.1:{free_port()}'}}\n"
        "models:\n"
        "  gone: {backend: down, model: 'mistral:7b'}\n"
    )
    stack = await asyncio.to_thread(
        start_stack, {"AGENTLAB_DEFAULT_BACKEND": "echo"}, keys={"researcher": KEY}, models=routing
    )
    for _ in range(100):  # the service finds the backend down on its first probe
        models = {m["name"]: m["ready"] for m in (await api(stack, "GET", "/models"))["models"]}
        if models["gone"] is False:
            break
        await asyncio.sleep(0.1)
    assert models == {"gone": False, "echo": True}
    async with playground(stack) as page:
        options = await page.eval_on_selector_all(
            "#model option",
            "options => options.map(o => [o.value, o.textContent, o.disabled])",
        )
        assert ["gone", "gone (down, unreachable)", True] in options
        assert ["echo", "echo (echo)", False] in options
        # With a routing file a model is required (400 without one): the page
        # offers no "service's default" and starts on a model that can run.
        assert sorted(value for value, _, _ in options) == ["echo", "gone"]
        assert await page.input_value("#model") == "echo"
        await page.fill("#prompt", "left as chosen")
        await page.select_option("#mode", "EXECUTION_MODE_INFERENCE")
        await page.click("#run-execute")
        await wait_finished(page)
        assert await page.text_content("#execution-state") == "SUCCEEDED"
        assert await page.text_content("#output") == "left as chosen"


async def test_the_page_asks_for_nothing_the_gateway_lacks(stack: Stack) -> None:
    # A browser asks for /favicon.ico unless the page names an icon: a 404
    # in the console of every visit.
    # (Playwright reports that request only as a console error.) The key is
    # in sessionStorage before the page loads, so no 401 is expected either.
    errors: list[str] = []

    def on_console(message: Any) -> None:
        if message.type == "error":
            errors.append(f"{message.text} {message.location.get('url')}")

    async with chromium_browser() as browser:
        page = await browser.new_page()
        await page.add_init_script(f"sessionStorage.setItem('agentlab.apiKey', '{KEY}')")
        page.on("console", on_console)
        await page.goto(f"{stack.url}/", wait_until="load")
        await page.wait_for_selector("#model option[value=echo]", state="attached")
        await page.wait_for_timeout(1000)
    assert errors == []


async def test_a_double_click_on_run_starts_one_run(stack: Stack) -> None:
    prompt = f"once {secrets.token_hex(4)} " + SLOW_PROMPT
    async with playground(stack) as page:
        await page.fill("#prompt", prompt)
        await page.select_option("#model", "echo")
        await page.select_option("#mode", "EXECUTION_MODE_INFERENCE")
        await page.dblclick("#run-execute")
        # Disabled while the run is under way, the other run button too.
        assert await page.is_disabled("#run-execute")
        assert await page.is_disabled("#run-stream")
        await wait_finished(page)
        await page.wait_for_function("!document.getElementById('run-execute').disabled")
    listed = await api(stack, "GET", "/executions?model=echo&page_size=100")
    runs = [e for e in listed["executions"] if e.get("prompt") == prompt]
    assert len(runs) == 1, runs


async def test_a_reload_keeps_the_run_form(stack: Stack) -> None:
    async with playground(stack) as page:
        await page.fill("#prompt", "kept across a reload")
        await page.select_option("#model", "echo")
        await page.select_option("#mode", "EXECUTION_MODE_INFERENCE")
        await page.fill("#temperature", "0.3")
        await page.fill("#max-tokens", "7")
        await page.fill("#seed", "42")
        await page.reload()
        await page.wait_for_selector("#model option[value=echo]", state="attached")
        assert await page.input_value("#prompt") == "kept across a reload"
        assert await page.input_value("#model") == "echo"
        assert await page.input_value("#mode") == "EXECUTION_MODE_INFERENCE"
        assert await page.input_value("#temperature") == "0.3"
        assert await page.input_value("#max-tokens") == "7"
        assert await page.input_value("#seed") == "42"


async def test_the_pickers_never_offer_the_catch_all_route_as_a_model(stack: Stack) -> None:
    # Without a routing file ListModels names the catch-all route "*": sent
    # as a model, a run or a replay would be recorded under the name "*".
    names = {m["name"] for m in (await api(stack, "GET", "/models"))["models"]}
    assert "*" in names
    async with playground(stack) as page:
        for picker in ("#model", "#replay-model"):
            values = await page.eval_on_selector_all(
                f"{picker} option", "options => options.map(o => o.value)"
            )
            assert "*" not in values, (picker, values)
            assert values[0] == "", (picker, values)  # the default, or the run's own
        # A replay on "the run's own model" runs on the source's model.
        source = (await api(stack, "POST", "/execute", {"prompt": "a b c", "model": "echo"}))[
            "execution_id"
        ]
        await page.goto(f"{stack.url}/#/executions/{source}")
        await page.reload()
        await wait_finished(page)
        assert await page.input_value("#replay-model") == ""
        await page.click("#replay")
        await page.wait_for_selector("#compare-panel:not([hidden])", timeout=90_000)
        headings = await page.eval_on_selector_all(
            "#compare th", "cells => cells.map(c => c.textContent)"
        )
        assert headings[1].startswith("replay: echo (SUCCEEDED)"), headings
