"""The dashboard page in a real browser: headless Debian Chromium driven by Playwright for Python.

Each test starts a real gateway (the ``gateway`` fixture: ``python -m gateway serve --port 0 --token ...``),
opens the dashboard URL the gateway printed, and uses the page the way a person would, through labelled
controls.  Screenshots go to ``test-artifacts/`` (git-ignored) for a person to look at.

``make test`` installs what this needs (``make browser-deps``: Playwright, Debian's chromium, xterm.js in
``gateway/static/vendor/``).  Playwright's own browser download is never used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from gateway.auth import cookie_name
from support import ROOT, TOKEN, GatewayProcess, wait_for

pytestmark = pytest.mark.browser

ARTIFACTS = ROOT / "test-artifacts"
VENDOR = ROOT / "gateway" / "static" / "vendor"
# The flags that keep Chromium quiet on a machine with a closed network (no background connections).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 15_000
#: The rows of the terminal on show (several can be open; the others are hidden).
TERM_ROWS = "#terminal .term-view:not([hidden]) .xterm-rows"


def _chromium() -> str | None:
    explicit = os.environ.get("WG_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    if executable is None:
        pytest.skip("Chromium not found (no /usr/bin/chromium, WG_CHROMIUM unset): `make browser-deps` installs it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # not a skip: `make test` installs it, so its absence is a broken set-up
        pytest.fail("playwright is not installed: run `make browser-deps` (pip install -e '.[browser]')")
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as pw:
        # launch() gives every browser a fresh temporary profile (user-data-dir) and adds --headless.
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class Dashboard:
    """One page on one gateway, with the helpers the tests share."""

    def __init__(self, page: Any, context: Any, gateway: GatewayProcess) -> None:
        self.page = page
        self.context = context
        self.gateway = gateway
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.set_default_timeout(TIMEOUT_MS)

    def open(self) -> None:
        response = self.page.goto(printed_dashboard_url(self.gateway))
        assert response is not None and response.status == 200, response and response.status
        self.expect_state("connected")
        from playwright.sync_api import expect

        expect(self.page.get_by_label("Agent")).to_be_enabled()  # gateway.info answered

    def expect_state(self, state: str) -> None:
        from playwright.sync_api import expect

        expect(self.page.locator("#conn-status")).to_have_attribute("data-state", state)

    def debug(self, expression: str) -> Any:
        return self.page.evaluate(f"() => window.wgDebug.{expression}")

    def create_session(self, agent: str, title: str = "") -> str:
        page = self.page
        page.get_by_label("Agent").select_option(agent)
        if title:
            page.get_by_label("Title").fill(title)
        before = self.debug("current()")
        page.get_by_role("button", name="Create session").click()
        page.wait_for_function("(before) => window.wgDebug.current() && window.wgDebug.current() !== before",
                               arg=before)
        return self.debug("current()")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"browser-{name}.png"
        self.page.screenshot(path=str(path))
        return path


def printed_dashboard_url(gateway: GatewayProcess) -> str:
    """The URL the gateway printed for people (``dashboard: http://...?token=...`` on stderr)."""
    match = wait_for(lambda: re.search(r"dashboard: (http://\S+)", gateway.stderr()), 10,
                     what="the dashboard URL in the gateway's log")
    url = match.group(1)
    assert url.startswith(f"http://127.0.0.1:{gateway.port}/") and "token=" in url, url
    return url


@pytest.fixture
def dashboard(browser: Any, gateway: GatewayProcess) -> Iterator[Dashboard]:
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    page = context.new_page()
    board = Dashboard(page, context, gateway)
    try:
        yield board
    finally:
        context.close()
    assert not board.errors, f"JavaScript errors on the page: {board.errors}"


def test_token_moves_from_the_address_bar_to_an_httponly_cookie(dashboard: Dashboard) -> None:
    dashboard.open()
    assert "token" not in dashboard.page.url
    cookies = {c["name"]: c for c in dashboard.context.cookies()}
    name = cookie_name(dashboard.gateway.port)
    assert cookies[name]["httpOnly"] is True and cookies[name]["sameSite"] == "Strict"
    assert TOKEN not in cookies[name]["value"]  # useless to any other server on this host
    # The WebSocket authenticated with the cookie alone: the page knows the server's agents.
    options = dashboard.page.get_by_label("Agent").locator("option").all_text_contents()
    assert {"echo", "shell", "load"} <= set(options)


def test_page_without_token_explains_how_to_sign_in(browser: Any, gateway: GatewayProcess) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        response = page.goto(gateway.http("/"))
        assert response is not None and response.status == 403
        assert "?token=" in page.content()
        assert context.request.get(gateway.http("/static/js/main.js")).status == 403
    finally:
        context.close()


def test_sign_in_form_takes_the_token_without_putting_it_in_a_url(browser: Any, gateway: GatewayProcess) -> None:
    from playwright.sync_api import expect

    context = browser.new_context()
    try:
        page = context.new_page()
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(gateway.http("/"))
        page.get_by_label("Access token").fill("not-the-token")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("alert")).to_contain_text("not this gateway's token")
        assert not context.cookies()
        assert gateway.token
        page.get_by_label("Access token").fill(gateway.token)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#conn-status")).to_have_attribute("data-state", "connected")
        expect(page.get_by_label("Agent")).to_be_enabled()
        assert page.url == gateway.http("/")
        assert not any(gateway.token in url for url in requested), requested
        cookie = {c["name"]: c for c in context.cookies()}[cookie_name(gateway.port)]
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and gateway.token not in cookie["value"]
        assert not errors, errors
    finally:
        context.close()


def _post_sign_in(gateway: GatewayProcess, body: bytes, origin: str | None) -> tuple[int, dict[str, str]]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if origin:
        headers["Origin"] = origin
    try:
        conn.request("POST", "/", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def test_sign_in_post_checks_origin_size_and_token(gateway: GatewayProcess) -> None:
    from urllib.parse import urlencode

    good = urlencode({"token": gateway.token}).encode()
    same_origin = f"http://127.0.0.1:{gateway.port}"
    status, headers = _post_sign_in(gateway, good, same_origin)
    assert status == 303 and headers["location"] == "./" and "httponly" in headers["set-cookie"].lower()
    assert _post_sign_in(gateway, good, "http://evil.example")[0] == 403  # a cross-site form
    assert _post_sign_in(gateway, urlencode({"token": "x" * 5000}).encode(), same_origin)[0] == 403
    status, headers = _post_sign_in(gateway, b"token=wrong", same_origin)
    assert status == 403 and "set-cookie" not in headers


def test_echo_reply_streams_into_the_chat(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    dashboard.open()
    page = dashboard.page
    session_id = dashboard.create_session("echo", title="browser echo")
    expect(page.get_by_role("list", name="Live sessions")).to_contain_text("browser echo")
    prompt = page.get_by_label("Prompt")
    prompt.fill("hello from the browser, streamed word by word")
    prompt.press("Enter")
    turn = page.locator("#transcript .turn").last
    expect(turn.locator(".reply")).to_have_text("hello from the browser, streamed word by word")
    expect(turn.locator(".turn-end")).to_contain_text("turn ok")
    assert dashboard.debug(f"session({json.dumps(session_id)}).gaps") == 0
    expect(prompt).to_have_value("")
    dashboard.screenshot("chat")


def test_subagent_events_nest_under_their_turn(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    dashboard.open()
    page = dashboard.page
    dashboard.create_session("load", title="subagents")
    prompt = page.get_by_label("Prompt")
    prompt.fill("subagents=2 output_mb=0.004 chunk_kb=1")
    prompt.press("Enter")
    turn = page.locator("#transcript .turn").last
    expect(turn.locator(".turn-end")).to_contain_text("turn ok")
    subagents = turn.locator(":scope > details.subagent")
    expect(subagents).to_have_count(2)
    for index in (0, 1):
        sub = subagents.nth(index)
        expect(sub.locator("summary")).to_contain_text(f"load-{index + 1}")
        expect(sub.locator("summary")).to_contain_text("(ok)")
        expect(sub.locator(".tool")).to_contain_text(f"[unit {index + 1}/2 chunk 1]")
    dashboard.screenshot("subagents")


def test_interrupt_button_stops_a_running_turn(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    dashboard.open()
    page = dashboard.page
    dashboard.create_session("load")
    page.get_by_label("Prompt").fill("cpu_s=60")
    page.get_by_label("Prompt").press("Enter")
    interrupt = page.get_by_role("button", name="Interrupt")
    expect(interrupt).to_be_enabled()
    interrupt.click()
    expect(page.locator("#transcript .turn-end").last).to_contain_text("turn interrupted")
    expect(interrupt).to_be_disabled()


def test_help_slash_command_shows_its_output(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    dashboard.open()
    page = dashboard.page
    dashboard.create_session("echo")
    slash = page.get_by_label("Slash command")
    slash.fill("/help")
    slash.press("Enter")
    block = page.locator("#transcript .slash").last
    expect(block.locator(".slash-cmd")).to_have_text("/help")
    expect(block.locator(".slash-output")).to_contain_text("/help")
    expect(block).not_to_have_class(re.compile(r"failed"))
    page.wait_for_function("() => window.wgDebug.flushed()")
    expect(page.locator("#transcript .slash")).to_have_count(1)
    dashboard.screenshot("slash-help")


def test_terminal_runs_a_typed_command_and_follows_the_window_size(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    dashboard.open()
    page = dashboard.page
    open_terminal(dashboard)
    page.keyboard.type("echo hi-from-browser\n")
    # The command's output on a line of its own (the typed command line also contains the text).
    wait_for_terminal_line(page, "hi-from-browser")
    dashboard.screenshot("terminal")

    before = dashboard.debug("terminal()")
    page.set_viewport_size({"width": 800, "height": 560})
    page.wait_for_function("(cols) => window.wgDebug.terminal().cols < cols", arg=before["cols"])
    size = dashboard.debug("terminal()")
    page.keyboard.type("stty size\n")
    wait_for_terminal_line(page, f"{size['rows']} {size['cols']}")

    page.get_by_role("button", name="Close terminal").click()
    expect(page.locator("#term-status")).to_have_text("No terminal open.")


def test_terminal_screen_is_restored_after_a_reconnect(dashboard: Dashboard) -> None:
    dashboard.open()
    page = dashboard.page
    open_terminal(dashboard)
    page.keyboard.type("echo before-$((40+2))\n")
    wait_for_terminal_line(page, "before-42")
    dashboard.context.set_offline(True)
    page.wait_for_function("() => !window.wgDebug.terminal().open")
    dashboard.context.set_offline(False)
    page.wait_for_function("() => window.wgDebug.terminal().open")
    # The gateway replays the terminal's recent output into a reset screen: shown once, not twice.
    wait_for_terminal_line(page, "before-42")
    assert terminal_lines(page).count("before-42") == 1
    page.locator("#terminal .term-view:not([hidden]) .xterm").click()
    page.keyboard.type("echo after-$((40+3))\n")
    wait_for_terminal_line(page, "after-43")


def open_terminal(dashboard: Dashboard) -> None:
    """Open a terminal from the Terminal tab and wait for the shell's first output (its prompt)."""
    if not (VENDOR / "xterm.js").is_file():
        pytest.fail("gateway/static/vendor/xterm.js is missing: run `make browser-deps`")
    page = dashboard.page
    page.get_by_role("tab", name="Terminal").click()
    page.get_by_role("button", name="Open terminal").click()
    page.wait_for_function("() => (window.wgDebug.terminal() || {}).open"
                           " || /Could not/.test(document.querySelector('#term-status').textContent)")
    assert dashboard.debug("terminal()"), page.locator("#term-status").text_content()
    page.wait_for_function(f"() => document.querySelector({TERM_ROWS!r}).innerText.trim() !== ''")
    page.locator("#terminal .term-view:not([hidden]) .xterm").click()


def terminal_lines(page: Any) -> list[str]:
    return [row.strip() for row in page.locator(TERM_ROWS).inner_text().split("\n")]


def wait_for_terminal_line(page: Any, line: str) -> None:
    """Wait until the terminal shows ``line`` as a whole line (xterm's rows, as rendered text)."""
    page.wait_for_function(
        "(line) => document.querySelector('#terminal .term-view:not([hidden]) .xterm-rows').innerText.split('\\n')"
        ".some(row => row.trim() === line)", arg=line)


def test_reconnect_resumes_the_stream_without_a_gap_or_duplicate(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    dashboard.open()
    page = dashboard.page
    session_id = dashboard.create_session("load", title="reconnect")
    # 256 chunks of 4 KiB spread over ~3 s of CPU, so both drops below land in the middle of the turn.
    prompt = page.get_by_label("Prompt")
    prompt.fill("output_mb=1 chunk_kb=4 cpu_s=3")
    prompt.press("Enter")
    page.wait_for_function("(id) => window.wgDebug.session(id).lastSeq >= 10", arg=session_id)

    # 1) The server drops the page's socket: a frame over the 1 MiB limit makes it close with 1009.
    dashboard.debug("sendRaw('x'.repeat(1100 * 1024))")
    page.wait_for_function("() => window.wgDebug.connects() >= 2")
    dashboard.expect_state("connected")
    # 2) The network goes away and comes back.
    dashboard.context.set_offline(True)
    dashboard.expect_state("offline")
    dashboard.context.set_offline(False)
    page.wait_for_function("() => window.wgDebug.connects() >= 3")
    dashboard.expect_state("connected")
    assert dashboard.debug("states()")[:5] == ["connecting", "connected", "reconnecting", "connected", "offline"]
    assert dashboard.debug(f"session({json.dumps(session_id)}).running"), "the turn ended before the drops"

    turn = page.locator("#transcript .turn").last
    expect(turn.locator(".turn-end")).to_contain_text("turn ok", timeout=45_000)
    stats = dashboard.debug(f"session({json.dumps(session_id)})")
    assert stats["gaps"] == 0, stats
    assert not stats["running"], stats
    assert stats["events"] == stats["lastSeq"], stats  # every seq from 1 on, each rendered once

    received = dashboard.debug(f"text('tool.output', {json.dumps(session_id)})")
    assert received == _server_tool_output(dashboard.gateway, session_id)
    assert len(received) == 1024 * 1024
    labels = [int(n) for n in re.findall(r"\[unit 1/1 chunk (\d+)\]", received)]
    assert labels == list(range(1, 257))

    # The DOM holds a capped tail; "Show all" renders everything that arrived, in order.
    dom_text = page.evaluate("() => [...document.querySelectorAll('#transcript .tool')].map(e => e.textContent).join('')")
    assert 0 < len(dom_text) < len(received) and received.endswith(dom_text)
    page.get_by_role("button", name=re.compile(r"^Show all")).click()
    page.wait_for_function("() => window.wgDebug.flushed()")
    dom_text = page.evaluate("() => [...document.querySelectorAll('#transcript .tool')].map(e => e.textContent).join('')")
    assert dom_text == received
    expect(page.get_by_role("button", name="Show recent only")).to_be_visible()
    dashboard.screenshot("reconnect")


def test_a_resume_cut_off_by_a_drop_is_retried_on_the_next_connect(dashboard: Dashboard) -> None:
    """The socket goes while session.resume is out: the session stays the page's and the next connect resumes it.

    The CI flake this pins: a second drop right after a reconnect failed the resume in flight, the page
    dropped the session, and the turn it was streaming never finished on screen.
    """
    from playwright.sync_api import expect

    cut = {"resumes": 0}

    def relay(route: Any) -> None:
        server = route.connect_to_server()

        def from_page(message: str | bytes) -> None:
            if isinstance(message, str) and '"session.resume"' in message and cut["resumes"] == 0:
                cut["resumes"] += 1
                route.close(code=4000, reason="cut during resume")  # the call never reaches the gateway
                return
            server.send(message)

        route.on_message(from_page)

    dashboard.page.route_web_socket(re.compile(r"/ws(\?|$)"), relay)
    dashboard.open()
    page = dashboard.page
    session_id = dashboard.create_session("echo", title="cut resume")
    dashboard.debug("sendRaw('x'.repeat(1100 * 1024))")  # the gateway closes with 1009; the page reconnects
    page.wait_for_function("() => window.wgDebug.connects() >= 3")
    assert cut["resumes"] == 1
    page.wait_for_function("(id) => window.wgDebug.session(id).owned", arg=session_id)
    expect(page.locator(".notice, [role=alert]").filter(has_text="Could not resume")).to_have_count(0)

    page.get_by_label("Prompt").fill("still mine")
    page.get_by_label("Prompt").press("Enter")
    expect(page.locator("#transcript .turn-end").last).to_contain_text("turn ok")
    assert dashboard.debug(f"session({json.dumps(session_id)})")["gaps"] == 0


def _server_tool_output(gateway: GatewayProcess, session_id: str) -> str:
    """The session's tool output as the gateway buffered it, read by an independent client."""
    from websockets.sync.client import connect

    with connect(gateway.url(), max_size=None, open_timeout=10) as ws:
        ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "session.events.since",
                            "params": {"session_id": session_id, "after_seq": 0}}))
        while True:
            msg = json.loads(ws.recv(timeout=10))
            if msg.get("id") == 1:
                break
    result = msg["result"]
    assert not result["truncated"]
    return "".join(e["payload"]["text"] for e in result["events"] if e["type"] == "tool.output")


def test_another_page_resumes_a_session_with_its_history_and_closes_it(
        browser: Any, dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    dashboard.open()
    first = dashboard.page
    dashboard.create_session("echo", title="handed over")
    first.get_by_label("Prompt").fill("said on the first page")
    first.get_by_label("Prompt").press("Enter")
    expect(first.locator("#transcript .turn-end").last).to_contain_text("turn ok")

    context = browser.new_context(viewport={"width": 1100, "height": 720})
    try:
        second = Dashboard(context.new_page(), context, dashboard.gateway)
        second.open()
        page = second.page
        page.get_by_role("button", name=re.compile(r"^Resume session handed over")).click()
        expect(page.locator("#transcript .turn .reply").last).to_have_text("said on the first page")
        # The first page is told that it no longer owns the session.
        expect(first.locator("#notice")).to_contain_text("Another window resumed this session")
        expect(first.locator("#transcript .system-line").last).to_contain_text("superseded")

        page.get_by_role("button", name="Close session handed over").click()
        expect(page.get_by_role("list", name="Live sessions")).not_to_contain_text("handed over")
        first.get_by_role("button", name="Refresh the session list").click()
        expect(first.get_by_role("list", name="Live sessions")).not_to_contain_text("handed over")
        assert not second.errors, second.errors
    finally:
        context.close()


def test_keyboard_alone_creates_a_session_and_chats(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    dashboard.open()
    page = dashboard.page
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.outerHTML)""")
    assert unlabelled == []

    order = []
    for _ in range(7):
        page.keyboard.press("Tab")
        order.append(page.evaluate("() => document.activeElement.id || document.activeElement.className"))
    assert order[:6] == ["skip-link", "agent-select", "title-input", "create-more-summary", "create-button",
                         "refresh-button"], order
    outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none"), "the focused control has no visible focus outline"

    page.get_by_label("Agent").focus()
    page.keyboard.type("echo")  # a select takes typed letters
    page.keyboard.press("Tab")
    page.keyboard.type("keyboard only")
    page.keyboard.press("Enter")  # submits the create form
    expect(page.get_by_label("Prompt")).to_be_focused()
    page.keyboard.type("typed without a mouse")
    page.keyboard.press("Enter")
    expect(page.locator("#transcript .turn .reply").last).to_contain_text("typed without a mouse")
    page.keyboard.press("Tab")  # Send
    page.keyboard.press("Tab")  # Slash command
    expect(page.get_by_label("Slash command")).to_be_focused()
    page.keyboard.type("/help")
    page.keyboard.press("Enter")
    expect(page.locator("#transcript .slash-output").last).to_contain_text("/help")
    dashboard.screenshot("keyboard")  # the picture in docs/dashboard.md and the README
    # Tabs follow the ARIA pattern: arrow keys move between them.
    page.get_by_role("tab", name="Chat").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Terminal")).to_have_attribute("aria-selected", "true")


def test_page_without_xterm_says_why_the_terminal_is_missing(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    page = dashboard.page
    page.route("**/static/vendor/**", lambda route: route.fulfill(status=404, body="not found"))
    dashboard.open()
    expect(page.get_by_role("tab", name="Terminal (unavailable)")).to_be_visible()
    page.get_by_role("tab", name="Terminal (unavailable)").click()
    expect(page.locator("#term-status")).to_contain_text("make browser-deps")
    expect(page.get_by_role("button", name="Open terminal")).to_be_disabled()
    # The rest of the page still works.
    page.get_by_role("tab", name="Chat").click()
    dashboard.create_session("echo")
    page.get_by_label("Prompt").fill("still works")
    page.get_by_label("Prompt").press("Enter")
    expect(page.locator("#transcript .turn .reply").last).to_contain_text("still works")
