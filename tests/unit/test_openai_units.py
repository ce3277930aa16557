"""The openai agent's pure parts: SSE decoding, tool-call accumulation, retry policy, history trimming,
settings (no I/O, no server)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings as hsettings
from hypothesis import strategies as st

from workers.agents.openai.history import trim_history, valid_history
from workers.agents.openai.retry import RetryPolicy, parse_retry_after
from workers.agents.openai.settings import OptionError, from_environment
from workers.agents.openai.sse import SSEDecoder
from workers.agents.openai.tool_calls import ToolCallAccumulator


def decode(chunks: list[bytes]) -> list[str]:
    decoder = SSEDecoder()
    events = [e for c in chunks for e in decoder.feed(c)]
    return events + decoder.finish()


# -- SSE ----------------------------------------------------------------------------------------------------

def test_sse_joins_data_lines_and_skips_comments_and_other_fields() -> None:
    stream = b": keepalive\nevent: x\ndata: one\ndata: two\nid: 3\n\ndata:{\"a\":1}\r\n\r\ndata: [DONE]\n\n"
    assert decode([stream]) == ["one\ntwo", '{"a":1}', "[DONE]"]


def test_sse_drops_an_unterminated_event_at_the_end() -> None:
    assert decode([b"data: complete\n\ndata: cut"]) == ["complete"]


_LINE_ENDS = st.sampled_from([b"\n", b"\r\n", b"\r"])
_EVENTS = st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
                           max_size=30), min_size=1, max_size=8)


@st.composite
def stream_and_splits(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    parts = []
    for text in draw(_EVENTS):
        end = draw(_LINE_ENDS)
        comment = draw(st.booleans())
        parts.append((b": ping" + end if comment else b"") + b"data: " + text.encode() + end + end)
    stream = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    return stream, cuts


@hsettings(max_examples=300, deadline=None)
@given(stream_and_splits())
def test_sse_any_split_of_the_bytes_decodes_the_same(case: tuple[bytes, list[int]]) -> None:
    stream, cuts = case
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    assert decode(pieces) == decode([stream])
    assert decode([bytes([b]) for b in stream]) == decode([stream])


# -- tool calls ---------------------------------------------------------------------------------------------

def test_tool_call_fragments_accumulate_by_index_and_the_first_name_wins() -> None:
    acc = ToolCallAccumulator()
    acc.add([{"index": 0, "id": "a", "function": {"name": "shell", "arguments": '{"comm'}}])
    acc.add([{"index": 1, "id": "b", "function": {"name": "delegate", "arguments": ""}}])
    acc.add([{"index": 0, "function": {"name": "shell", "arguments": 'and": "ls"}'}}])  # llama.cpp repeats it
    acc.add([{"index": 1, "id": "b", "function": {"arguments": '{"task": "x"}'}}])
    calls = acc.calls()
    assert [(c.call_id, c.name, c.parsed_arguments()) for c in calls] == [
        ("a", "shell", {"command": "ls"}), ("b", "delegate", {"task": "x"})]


def test_tool_call_without_an_id_gets_one_and_bad_arguments_say_why() -> None:
    acc = ToolCallAccumulator()
    acc.add([{"index": 0, "function": {"name": "shell", "arguments": "{not json"}}, "junk", {"index": "x"}])
    (call,) = acc.calls(id_prefix="call_3")
    assert call.call_id == "call_3_0"
    with pytest.raises(ValueError, match="not valid JSON"):
        call.parsed_arguments()


def test_tool_call_arguments_must_be_an_object_and_empty_means_none() -> None:
    acc = ToolCallAccumulator()
    acc.add([{"index": 0, "id": "a", "function": {"name": "shell", "arguments": "[1]"}},
             {"index": 1, "id": "b", "function": {"name": "shell"}}])
    first, second = acc.calls()
    with pytest.raises(ValueError, match="must be a JSON object"):
        first.parsed_arguments()
    assert second.parsed_arguments() == {}


# -- retry --------------------------------------------------------------------------------------------------

def test_retry_backs_off_on_connect_errors_429_and_5xx_only() -> None:
    policy = RetryPolicy(max_retries=3, base_delay_s=0.5, max_delay_s=30)
    assert [policy.delay(n, None) for n in range(4)] == [0.5, 1.0, 2.0, None]
    assert policy.delay(0, 429) == 0.5 and policy.delay(0, 503) == 0.5
    assert policy.delay(0, 400) is None and policy.delay(0, 401) is None and policy.delay(0, 404) is None


def test_retry_honours_retry_after_up_to_the_cap() -> None:
    policy = RetryPolicy(max_retries=2, max_delay_s=10)
    assert policy.delay(0, 429, "0.2") == 0.2
    assert policy.delay(0, 429, "120") == 10
    assert policy.delay(0, 429, "soon") == 0.5  # unreadable: plain backoff


def test_retry_after_as_an_http_date() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:05 GMT", now=1445412480.0) == pytest.approx(5.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:05 GMT", now=1445412490.0) == 0.0
    assert parse_retry_after(None) is None


# -- history ------------------------------------------------------------------------------------------------

def _msg(role: str, size: int, **extra: object) -> dict:
    return {"role": role, "content": "x" * size, **extra}


def test_trim_drops_the_oldest_and_starts_at_a_user_message() -> None:
    history = [_msg("user", 100), _msg("assistant", 100, tool_calls=[{"id": "a"}]), _msg("tool", 100),
               _msg("assistant", 100), _msg("user", 100), _msg("assistant", 100)]
    trimmed = trim_history(history, 350)
    assert trimmed == history[4:]  # never a tool result without its call
    assert trim_history(history, 10_000) == history


def test_trim_keeps_the_current_turn_even_over_budget() -> None:
    history = [_msg("user", 10), _msg("assistant", 10), _msg("user", 5000)]
    assert trim_history(history, 100) == history[2:]


@given(st.lists(st.tuples(st.sampled_from(["user", "assistant", "tool"]), st.integers(0, 50)), max_size=30),
       st.integers(0, 600))
def test_trim_is_a_suffix_within_budget_or_from_the_last_user(items: list, budget: int) -> None:
    history = [_msg(role, size) for role, size in items]
    trimmed = trim_history(history, budget)
    assert history[len(history) - len(trimmed):] == trimmed
    users = [i for i, m in enumerate(history) if m["role"] == "user"]
    if trimmed and len(trimmed) < len(history):
        assert trimmed[0]["role"] == "user"
    if users:
        assert len(trimmed) >= len(history) - users[-1]


def test_restored_history_is_checked() -> None:
    assert valid_history([{"role": "user", "content": "hi"}]) == [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError):
        valid_history([{"role": "robot"}])
    with pytest.raises(ValueError):
        valid_history("nope")


# -- settings -----------------------------------------------------------------------------------------------

def test_environment_overrides_and_options_win() -> None:
    env = {"OPENAI_BASE_URL": "http://a/v1", "WORKER_GATEWAY_OPENAI_BASE_URL": "http://b/v1",
           "OPENAI_API_KEY": "sk-plain", "WORKER_GATEWAY_OPENAI_API_KEY": "sk-override"}
    settings = from_environment({}, env)
    assert settings.base_url == "http://b/v1" and settings.api_key == "sk-override"
    assert from_environment({"base_url": "http://c:1/v1"}, env).base_url == "http://c:1/v1"
    assert settings.request_headers()["Authorization"] == "Bearer sk-override"


def test_secrets_are_not_in_the_repr() -> None:
    settings = from_environment({"headers": {"X-Proxy-Key": "proxy-secret-value"}}, {"OPENAI_API_KEY": "sk-zzzz-secret"})
    assert "proxy-secret-value" not in repr(settings) and "sk-zzzz-secret" not in repr(settings)
    assert set(settings.secrets()) == {"proxy-secret-value", "sk-zzzz-secret"}


@pytest.mark.parametrize("options, named", [
    ({"temperature": "hot"}, "temperature"), ({"temperature": 3}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"), ({"tools": ["shell", "rm"]}, "tools"), ({"tools": "shell"}, "tools"),
    ({"base_url": "ftp://x"}, "base_url"), ({"max_tool_rounds": True}, "max_tool_rounds"),
    ({"headers": {"X": 1}}, "headers"), ({"modle": "x"}, "modle"), ({"model": ""}, "model"),
])
def test_bad_options_name_the_option(options: dict, named: str) -> None:
    with pytest.raises(OptionError, match=repr(named)):
        from_environment(options, {})


def test_a_bad_header_value_is_never_shown() -> None:
    with pytest.raises(OptionError) as info:
        from_environment({"headers": {"Authorization": "Bearer top-secret\n"}}, {})
    assert "top-secret" not in str(info.value)
