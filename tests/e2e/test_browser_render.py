"""The dashboard renders untrusted agent output richly and safely (headless Chromium via Playwright).

Markdown replies go through marked and DOMPurify, ANSI colours in tool output through ansi_up; the echo
agent (it echoes the prompt as its reply) carries the hostile input.  Fixtures: tests/test_browser.py.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.e2e.test_browser import Dashboard, browser, dashboard  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.browser


def send_prompt(board: Dashboard, text: str) -> Any:
    """Send ``text`` and wait for its turn to end; returns the turn's locator."""
    from playwright.sync_api import expect

    page = board.page
    before = page.locator("#transcript .turn").count()
    page.get_by_label("Prompt").fill(text)
    page.get_by_label("Prompt").press("Enter")
    turn = page.locator("#transcript .turn").nth(before)
    expect(turn.locator(".turn-end")).to_contain_text("turn ok")
    page.wait_for_function("() => window.wgDebug.flushed()")
    return turn


def test_markdown_renders_and_script_or_javascript_links_do_not_run(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    dashboard.open()
    page = dashboard.page
    assert dashboard.debug("rich()") is True, "gateway/static/vendor/ is missing: run `make browser-deps`"
    dashboard.create_session("echo", title="markdown")
    turn = send_prompt(dashboard, "**bold** and `code` and [a site](https://example.com/x)")
    reply = turn.locator(".reply")
    expect(reply.locator("strong")).to_have_text("bold")
    expect(reply.locator("code")).to_have_text("code")
    expect(reply.locator("a")).to_have_attribute("href", "https://example.com/x")
    expect(reply.locator("a")).to_have_attribute("rel", re.compile("noopener"))

    hostile = ('<script>window.__pwned = "script"</script> <img src="x" onerror="window.__pwned = \'img\'"> '
               '[click me](javascript:window.__pwned=1) <a href="javascript:window.__pwned=2">raw link</a> '
               '<iframe src="javascript:parent.__pwned=3"></iframe> <svg><script>window.__pwned=4</script></svg>')
    turn = send_prompt(dashboard, hostile)
    reply = turn.locator(".reply")
    expect(reply).to_contain_text("click me")
    assert reply.locator("script, iframe, [onerror]").count() == 0
    hrefs = reply.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert hrefs and not any(h and h.strip().lower().startswith("javascript:") for h in hrefs), hrefs
    reply.get_by_text("click me").click()
    reply.get_by_text("raw link").click()
    # The prompt line shows the text as typed (textContent), never as markup.
    expect(turn.locator(".turn-prompt")).to_have_text(hostile)
    assert page.evaluate("() => window.__pwned") is None
    dashboard.screenshot("markdown")


def test_tool_calls_reasoning_ansi_colours_and_usage(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    dashboard.open()
    page = dashboard.page
    page.get_by_text("Options", exact=True).click()
    page.get_by_label("Factory").fill("tests.dashboard_agents:ToolCaller")
    page.get_by_role("button", name="Create session").click()
    page.wait_for_function("() => window.wgDebug.current()")
    turn = send_prompt(dashboard, "the haystack")

    call = turn.locator("details.tool-call")
    expect(call.locator(".tool-call-name")).to_have_text("grep")
    expect(call.locator(".tool-call-args")).to_contain_text('"pattern": "needle"')
    # The call's output sits in the call's box, coloured: ansi_up turned SGR 32 into an inline colour.
    output = call.locator(".tool")
    expect(output).to_have_text("needle found in hay.txt\n")
    green = output.locator("span[style*='color']").first
    expect(green).to_have_text("needle")
    assert green.evaluate("e => getComputedStyle(e).color") == "rgb(0, 187, 0)"

    reasoning = turn.locator("details.reasoning")
    expect(reasoning).to_contain_text("thinking about the haystack")
    assert reasoning.evaluate("d => d.open") is False, "reasoning starts collapsed"
    expect(turn.locator(".reply strong")).to_have_text("needle")
    expect(turn.locator(".turn-end")).to_contain_text("tokens: prompt 12, completion 3, total 15")
    expect(turn.locator(".turn-time")).to_have_text(re.compile(r"^\d\d:\d\d:\d\d$"))
    expect(turn.locator(".turn-end")).to_contain_text(re.compile(r"\d+(\.\d)? m?s"))
    dashboard.screenshot("tool-call")


def test_tool_output_is_collapsible_and_coloured_for_a_shell_command(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    dashboard.open()
    dashboard.create_session("shell", title="colours")
    turn = send_prompt(dashboard, r"printf '\033[31mred\033[0m plain\n'")
    box = turn.locator("details.tool-box")
    expect(box.locator(".tool")).to_have_text("red plain\n")
    red = box.locator(".tool span[style*='color']").first
    expect(red).to_have_text("red")
    assert red.evaluate("e => getComputedStyle(e).color") == "rgb(187, 0, 0)"
    expect(box.locator(".tool")).to_be_visible()
    box.locator("summary").click()
    expect(box.locator(".tool")).to_be_hidden()
    box.locator("summary").click()
    expect(box.locator(".tool")).to_be_visible()


def test_without_vendor_files_output_is_plain_text(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    page = dashboard.page
    page.route("**/static/vendor/**", lambda route: route.fulfill(status=404, body="not found"))
    dashboard.open()
    assert dashboard.debug("rich()") is False
    dashboard.create_session("shell")
    turn = send_prompt(dashboard, r"printf '\033[31mred\033[0m **not bold**\n'")
    expect(turn.locator(".tool")).to_have_text("red **not bold**\n")  # escape sequences removed, no markup
    assert turn.locator(".tool span").count() == 0
    dashboard.create_session("echo")
    turn = send_prompt(dashboard, "**stays** <b>literal</b>")
    expect(turn.locator(".reply")).to_have_text("**stays** <b>literal</b>")
    assert turn.locator(".reply strong, .reply b").count() == 0


def test_create_form_sends_cwd_and_refuses_bad_options_json(dashboard: Dashboard, tmp_path: Any) -> None:
    from playwright.sync_api import expect

    dashboard.open()
    page = dashboard.page
    page.get_by_label("Agent").select_option("shell")
    page.get_by_text("Options", exact=True).click()
    options = page.get_by_label("Options (JSON")
    options.fill("[1, 2]")
    page.get_by_role("button", name="Create session").click()
    expect(page.locator("#options-error")).to_contain_text("must be a JSON object")
    expect(options).to_be_focused()
    options.fill('{"a": ')
    page.get_by_role("button", name="Create session").click()
    expect(page.locator("#options-error")).to_contain_text("not valid JSON")
    assert dashboard.debug("current()") is None, "no session is created from a bad form"

    options.fill("")
    page.get_by_label("Working directory").fill(str(tmp_path))
    page.get_by_role("button", name="Create session").click()
    expect(page.locator("#options-error")).to_be_hidden()
    page.wait_for_function("() => window.wgDebug.current()")
    turn = send_prompt(dashboard, "pwd")
    expect(turn.locator(".tool")).to_have_text(f"{tmp_path}\n")


def test_module_attr_agent_with_options_reaches_the_worker(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    dashboard.open()
    page = dashboard.page
    page.get_by_text("Options", exact=True).click()
    page.get_by_label("Factory").fill("tests.agents_for_tests:options_echo")
    page.get_by_label("Model").fill("tiny-model")
    page.get_by_label("System message").fill("Be brief.")
    page.get_by_label("Options (JSON").fill('{"temperature": 0.5}')
    page.get_by_role("button", name="Create session").click()
    page.wait_for_function("() => window.wgDebug.current()")
    turn = send_prompt(dashboard, "report")
    expect(turn.locator(".reply")).to_contain_text(
        "[('model', 'tiny-model'), ('system', 'Be brief.'), ('temperature', 0.5)]")


def test_a_module_attr_default_agent_is_shown_and_selectable(browser: Any, gateway_factory: Any) -> None:
    from playwright.sync_api import expect

    gateway = gateway_factory("--agent", "tests.agents_for_tests:options_echo")
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    try:
        board = Dashboard(context.new_page(), context, gateway)
        board.open()
        page = board.page
        select = page.get_by_label("Agent")
        expect(select).to_have_value("tests.agents_for_tests:options_echo")
        expect(page.locator("#agent-default")).to_have_text("Default: tests.agents_for_tests:options_echo")
        select.select_option("echo")
        select.select_option("tests.agents_for_tests:options_echo")
        page.get_by_role("button", name="Create session").click()
        page.wait_for_function("() => window.wgDebug.current()")
        turn = send_prompt(board, "which agent")
        expect(turn.locator(".reply")).to_contain_text("[]")  # options_echo reports its (empty) options
        expect(page.locator("#chat-title")).to_contain_text("options_echo")
        assert not board.errors, board.errors
    finally:
        context.close()
