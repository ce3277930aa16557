"""The dashboard keeps what the user had open across a reload (headless Chromium via Playwright).

The page remembers its sessions (with what it rendered) and terminals in localStorage, keyed by gateway,
and on load resumes each session from the last seq it rendered (``session.resume``) and reattaches each
terminal (found with ``terminal.list``).  Fixtures: tests/test_browser.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e.test_browser import (  # noqa: F401  (browser, dashboard: pytest fixtures)
    Dashboard, _server_tool_output, browser, dashboard, open_terminal, wait_for_terminal_line,
)
from tests.e2e.test_browser_render import send_prompt

pytestmark = pytest.mark.browser

# The transcript as (block, text) pairs in document order (textContent: independent of layout and scrolling).
_BLOCKS = (".turn-prompt, .turn-time, .reply, .tool, .tool-call-name, .tool-call-args, .reasoning-text, .turn-end, "
           ".slash-cmd, .slash-output, .system-line")
TRANSCRIPT_TEXT = (f"() => [...document.querySelectorAll('#transcript :is({_BLOCKS})')]"
                   ".map(e => e.className + ': ' + e.textContent).join('\\n')")
# ... and as a person sees it (under 64 KiB every segment is laid out, so this does not depend on scrolling).
TRANSCRIPT_SEEN = "() => document.querySelector('#transcript').innerText"


def reload(board: Dashboard, session_id: str | None) -> None:
    """Reload the page and wait until it is connected, owns ``session_id`` again and has rendered."""
    board.page.reload()
    board.expect_state("connected")
    if session_id is not None:
        board.page.wait_for_function("(id) => (window.wgDebug.session(id) || {}).owned", arg=session_id)
    board.page.wait_for_function("() => window.wgDebug.flushed()")


def attached_here(board: Dashboard, title: str) -> None:
    from playwright.sync_api import expect

    item = board.page.locator("#session-list li", has_text=title)
    expect(item.locator(".s-meta")).to_contain_text("· here")


def test_reload_after_the_turn_keeps_the_transcript_and_the_session(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    dashboard.open()
    page = dashboard.page
    session_id = dashboard.create_session("shell", title="kept")
    send_prompt(dashboard, "printf 'first line\\nsecond line\\n'")
    send_prompt(dashboard, "echo '**not markdown in tool output**'")
    # A slash command typed in the prompt box runs as one, and its output stays after a reload.
    page.get_by_label("Prompt").fill("/status")
    page.get_by_label("Prompt").press("Enter")
    expect(page.locator("#transcript .slash .slash-cmd").last).to_have_text("/status")
    expect(page.locator("#transcript .slash-output").last).not_to_be_empty()
    # Shown once, whether it came as a slash.result event, as the slash.exec response, or both.
    expect(page.locator("#transcript .slash")).to_have_count(1)
    assert page.locator("#transcript .turn").count() == 2, "/status went to the agent"
    page.wait_for_function("() => window.wgDebug.flushed()")
    before = page.evaluate(TRANSCRIPT_TEXT)
    seen = page.evaluate(TRANSCRIPT_SEEN)
    stats_before = dashboard.debug(f"session({json.dumps(session_id)})")

    reload(dashboard, session_id)
    assert dashboard.debug("current()") == session_id
    assert page.evaluate(TRANSCRIPT_TEXT) == before
    assert page.evaluate(TRANSCRIPT_SEEN) == seen
    stats = dashboard.debug(f"session({json.dumps(session_id)})")
    assert stats["lastSeq"] == stats_before["lastSeq"] and stats["gaps"] == 0, stats
    attached_here(dashboard, "kept")
    # Still attached: the next prompt streams into this page.
    turn = send_prompt(dashboard, "echo after-reload")
    expect(turn.locator(".tool")).to_have_text("after-reload\n")

    # A closed-and-reopened tab (a new page in the same browser profile) gets it all back too.
    page.close()
    again = Dashboard(dashboard.context.new_page(), dashboard.context, dashboard.gateway)
    again.page.goto(dashboard.gateway.http("/"))
    again.expect_state("connected")
    again.page.wait_for_function("(id) => (window.wgDebug.session(id) || {}).owned", arg=session_id)
    again.page.wait_for_function("() => window.wgDebug.flushed()")
    expect(again.page.locator("#transcript .turn")).to_have_count(3)
    assert again.page.evaluate(TRANSCRIPT_TEXT).startswith(before)
    assert not again.errors, again.errors


def test_reload_in_the_middle_of_a_turn_loses_and_doubles_nothing(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    dashboard.open()
    page = dashboard.page
    session_id = dashboard.create_session("load", title="mid-turn")
    # 48 chunks of 1 KiB over ~6 s of CPU: the reload lands in the middle of the turn, even on a busy machine.
    page.get_by_label("Prompt").fill("output_mb=0.046875 chunk_kb=1 cpu_s=6")
    page.get_by_label("Prompt").press("Enter")
    page.wait_for_function("(id) => window.wgDebug.session(id).lastSeq >= 5", arg=session_id)
    reload(dashboard, session_id)
    assert dashboard.debug(f"session({json.dumps(session_id)}).running"), "the turn ended before the reload"

    turn = page.locator("#transcript .turn").last
    expect(turn.locator(".turn-end")).to_contain_text("turn ok", timeout=45_000)
    page.wait_for_function("() => window.wgDebug.flushed()")
    stats = dashboard.debug(f"session({json.dumps(session_id)})")
    assert stats["gaps"] == 0 and stats["events"] == stats["lastSeq"], stats
    received = dashboard.debug(f"text('tool.output', {json.dumps(session_id)})")
    assert received == _server_tool_output(dashboard.gateway, session_id)
    dom_text = page.evaluate("() => [...document.querySelectorAll('#transcript .tool')]"
                             ".map(e => e.textContent).join('')")
    assert dom_text == received

    before = page.evaluate(TRANSCRIPT_TEXT)
    seen = page.evaluate(TRANSCRIPT_SEEN)
    reload(dashboard, session_id)
    assert page.evaluate(TRANSCRIPT_TEXT) == before
    assert page.evaluate(TRANSCRIPT_SEEN) == seen
    attached_here(dashboard, "mid-turn")


def test_terminals_survive_a_reload_with_their_screens(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    dashboard.open()
    page = dashboard.page
    open_terminal(dashboard)
    page.keyboard.type("echo first-$((20+1))\n")
    wait_for_terminal_line(page, "first-21")
    first = dashboard.debug("terminal()")["id"]
    # A second terminal: several can be open, one is shown at a time.
    page.get_by_role("button", name="Open terminal").click()
    page.wait_for_function("(first) => { const t = window.wgDebug.terminal(); return t && t.id !== first && t.open; }",
                           arg=first)
    page.wait_for_function("() => document.querySelector('#terminal .term-view:not([hidden]) .xterm-rows')"
                           ".innerText.trim() !== ''")
    page.locator("#terminal .term-view:not([hidden]) .xterm").click()
    page.keyboard.type("echo second-$((20+2))\n")
    wait_for_terminal_line(page, "second-22")
    second = dashboard.debug("terminal()")["id"]

    reload(dashboard, None)
    page.get_by_role("tab", name="Terminal").click()
    page.wait_for_function("() => window.wgDebug.terminals().length === 2"
                           " && window.wgDebug.terminals().every(t => t.open)")
    if dashboard.debug("terminalList()") is False:
        # The gateway answered terminal.list with -32601: the page reattached the remembered ids directly.
        pass
    assert {t["id"] for t in dashboard.debug("terminals()")} == {first, second}
    wait_for_terminal_line(page, "second-22")  # the shown one's screen is restored from the gateway's replay
    page.get_by_role("button", name=f"Terminal {first}").click()
    wait_for_terminal_line(page, "first-21")
    page.locator("#terminal .term-view:not([hidden]) .xterm").click()
    page.keyboard.type("echo typed-after-$((40+2))\n")
    wait_for_terminal_line(page, "typed-after-42")
    dashboard.screenshot("terminals")

    page.get_by_role("button", name="Close terminal").click()
    page.wait_for_function("() => window.wgDebug.terminals().length === 1")
    # The page shows the remaining terminal before its Close button refers to it.
    expect(page.locator("#term-status")).to_contain_text(second)
    page.get_by_role("button", name="Close terminal").click()
    page.wait_for_function("() => window.wgDebug.terminals().length === 0")
    expect(page.locator("#term-status")).to_have_text("No terminal open.")
    reload(dashboard, None)
    assert dashboard.debug("terminals()") == []


def test_a_session_closed_meanwhile_is_forgotten_on_reload(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect
    from websockets.sync.client import connect

    dashboard.open()
    session_id = dashboard.create_session("echo", title="gone")
    send_prompt(dashboard, "hello")
    dashboard.page.wait_for_function("() => window.wgDebug.flushed()")
    dashboard.page.close()  # the tab goes away; the session is detached and kept for the grace period
    with connect(dashboard.gateway.url(), open_timeout=10) as ws:
        ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "session.close",
                            "params": {"session_id": session_id}}))
        while json.loads(ws.recv(timeout=10)).get("id") != 1:
            pass
    # The reopened tab remembers the session, but session.resume answers 4001: it says so and forgets it.
    page = dashboard.context.new_page()
    again = Dashboard(page, dashboard.context, dashboard.gateway)
    page.goto(dashboard.gateway.http("/"))
    again.expect_state("connected")
    expect(page.locator("#transcript .system-line").last).to_contain_text("no longer exists")
    expect(page.get_by_role("list", name="Live sessions")).not_to_contain_text("gone")
    page.wait_for_function("(id) => window.wgDebug.session(id).closed", arg=session_id)
    page.reload()
    again.expect_state("connected")
    page.wait_for_function("() => window.wgDebug.flushed()")
    assert again.debug(f"session({json.dumps(session_id)})") is None
    assert not again.errors, again.errors


def test_two_open_tabs_keep_their_own_sessions_across_reloads(dashboard: Dashboard) -> None:
    dashboard.open()
    first_id = dashboard.create_session("echo", title="tab one")
    send_prompt(dashboard, "one")
    other = Dashboard(dashboard.context.new_page(), dashboard.context, dashboard.gateway)
    other.page.goto(dashboard.gateway.http("/"))
    other.expect_state("connected")
    assert other.debug("current()") is None, "a second open tab starts empty: the first tab's sessions are its own"
    second_id = other.create_session("echo", title="tab two")
    send_prompt(other, "two")

    reload(dashboard, first_id)
    reload(other, second_id)
    assert dashboard.debug("current()") == first_id and other.debug("current()") == second_id
    for board, mine, theirs in ((dashboard, first_id, second_id), (other, second_id, first_id)):
        assert board.debug(f"session({json.dumps(mine)}).owned") is True
        assert not board.debug(f"session({json.dumps(theirs)}).owned")
    attached_here(dashboard, "tab one")
    attached_here(other, "tab two")
    assert not other.errors, other.errors


def test_a_terminal_nobody_is_attached_to_is_offered_for_reattach(browser: Any, dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    dashboard.open()
    open_terminal(dashboard)
    dashboard.page.keyboard.type("echo left-$((30+3))\n")
    wait_for_terminal_line(dashboard.page, "left-33")
    terminal_id = dashboard.debug("terminal()")["id"]
    dashboard.page.close()  # its socket closes: the terminal waits for the grace period, unattached

    context = browser.new_context(viewport={"width": 1100, "height": 720})  # another browser profile
    try:
        other = Dashboard(context.new_page(), context, dashboard.gateway)
        other.open()
        other.page.wait_for_function("() => window.wgDebug.terminalList() !== null")
        if other.debug("terminalList()") is False:
            pytest.skip("this gateway answers terminal.list with -32601 (method not found): nothing to discover")
        other.page.get_by_role("tab", name="Terminal").click()
        other.page.get_by_role("button", name=f"Reattach terminal {terminal_id}").click()
        other.page.wait_for_function("(id) => (window.wgDebug.terminal() || {}).id === id"
                                     " && window.wgDebug.terminal().open", arg=terminal_id)
        wait_for_terminal_line(other.page, "left-33")
        expect(other.page.get_by_role("button", name=f"Reattach terminal {terminal_id}")).to_have_count(0)
        assert not other.errors, other.errors
    finally:
        context.close()
