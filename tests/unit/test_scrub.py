"""Secret redaction: every kind is caught, ordinary text is left alone, and scanning stays linear."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.agents.load import fake_secrets
from workers.scrub import MAX_CHUNK_BYTES, REDACTED, StreamBuffer, scrub, scrub_chunks

# Built by concatenation so no literal in the repository looks like a live credential.
AWS = "AKIA" + "IOSFODNN7EXAMPLE"
OPENAI = "sk-" + "proj-" + "Ab3" * 15
ANTHROPIC = "sk-" + "ant-api03-" + "Zz9_" * 10
PLAIN_SK = "sk-" + "a1B2" * 12
GITHUB = {prefix: prefix + "_" + "x1Y2" * 9 for prefix in ("ghp", "gho", "ghu", "ghs", "ghr")}
GITHUB_PAT = "github_pat_" + "11ABCDEFG0" * 3 + "_" + "q" * 40
SLACK = {f"xox{c}": f"xox{c}-" + "123456789012-" + "abcDEF123" * 3 for c in "abprs"}
PEM = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAx4Ujk+/=\nQm9vbGVhbnMgYXJlIG5vdCBrZXlz\n"
       "-----END RSA PRIVATE KEY-----")


@pytest.mark.parametrize("secret", [AWS, OPENAI, ANTHROPIC, PLAIN_SK, GITHUB_PAT, *GITHUB.values(),
                                    *SLACK.values(), PEM], ids=lambda s: s[:8])
def test_each_token_kind_is_redacted(secret: str) -> None:
    text, count = scrub(f"before {secret} after")
    assert (text, count) == (f"before {REDACTED} after", 1)


def test_bearer_token_keeps_the_scheme_word() -> None:
    assert scrub("Authorization: Bearer eyJhbGciOi.J9.abc-_~+/=") == ("Authorization: Bearer [REDACTED]", 1)
    assert scrub("authorization: bearer 0123456789abcdef") == ("authorization: bearer [REDACTED]", 1)


def test_url_password_keeps_scheme_user_and_host() -> None:
    assert scrub("git clone https://alice:s3cr3t-pw@github.example/x.git") == (
        "git clone https://alice:[REDACTED]@github.example/x.git", 1)
    assert scrub("redis://:hunter2@cache:6379/0") == ("redis://:[REDACTED]@cache:6379/0", 1)


def test_unterminated_private_key_is_still_redacted() -> None:
    text, count = scrub("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nQUJD=")
    assert count == 1 and "b3BlbnNz" not in text and "QUJD" not in text


@pytest.mark.parametrize("text", [
    "risk-assessment-framework-version-two is a kebab-case word",
    "see http://localhost:8080/path@v2 and https://example.com/a?b=c",
    "Bearer tokens are described in RFC 6750",
    "a task-list-of-things-to-do-today-and-tomorrow",
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----",
    "plain [REDACTED] text the user typed",
    "",
])
def test_ordinary_text_is_untouched(text: str) -> None:
    assert scrub(text) == (text, 0)


def test_key_hidden_after_a_word_that_ends_in_sk_is_found() -> None:
    text, count = scrub("mask-" + OPENAI)
    assert (text, count) == ("mask-" + REDACTED, 1)


def test_many_secrets_are_all_counted() -> None:
    secrets = [AWS, OPENAI, GITHUB["ghp"], SLACK["xoxb"], PEM, "Bearer abcdefgh12345678"]
    text, count = scrub("\n".join(secrets * 3))
    assert count == 18
    assert not any(s in text for s in secrets[:5])


def test_fake_secrets_of_the_load_agent_are_all_caught() -> None:
    secrets = fake_secrets(18)  # two of every kind
    text, count = scrub("\n".join(s.text for s in secrets))
    assert count == 18
    for secret in secrets:
        assert secret.value not in text, secret.kind


# -- chunking ---------------------------------------------------------------------------------------------

def test_chunks_are_bounded_and_add_up() -> None:
    body = ("filler line\n" * 3000 + AWS + "\n") * 20
    chunks = list(scrub_chunks(body))
    assert all(len(c.encode()) <= MAX_CHUNK_BYTES for c, _ in chunks)
    assert "".join(c for c, _ in chunks) == scrub(body)[0]
    assert sum(n for _, n in chunks) == 20
    assert all(c.count(REDACTED) == n for c, n in chunks)


def test_a_secret_across_a_chunk_boundary_is_redacted_first() -> None:
    body = "x" * (MAX_CHUNK_BYTES - 5) + " " + OPENAI + " tail"
    chunks = list(scrub_chunks(body))
    assert OPENAI[:10] not in "".join(c for c, _ in chunks)
    assert sum(n for _, n in chunks) == 1


def test_chunks_never_split_a_character() -> None:
    body = "\u00e9\u4e2d\U0001f600" * 40000
    chunks = list(scrub_chunks(body, max_bytes=1000))
    assert "".join(c for c, _ in chunks) == body
    assert all(len(c.encode()) <= 1000 for c, _ in chunks)


# -- streaming --------------------------------------------------------------------------------------------

def _scrub_stream(parts: list[str]) -> str:
    buffer = StreamBuffer()
    out = [scrub(buffer.feed(p))[0] for p in parts]
    out.append(scrub(buffer.flush())[0])
    return "".join(out)


def test_stream_buffer_holds_a_token_split_across_reads() -> None:
    line = f"export KEY={OPENAI}\n"
    for cut in range(1, len(line)):
        assert OPENAI[3:] not in _scrub_stream([line[:cut], line[cut:]])


def test_stream_buffer_holds_a_private_key_until_its_end() -> None:
    parts = ["log start\n", PEM[:40], PEM[40:90], PEM[90:] + "\nlog end\n"]
    out = _scrub_stream(parts)
    assert out == f"log start\n{REDACTED}\nlog end\n"


def test_stream_buffer_is_bounded_on_endless_lines() -> None:
    buffer = StreamBuffer(max_pending=1000)
    released = "".join(buffer.feed("z" * 300) for _ in range(100))
    assert buffer.pending <= 1000 + 300
    assert len(released) + buffer.pending == 30000


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from([AWS, OPENAI, GITHUB["ghs"], SLACK["xoxp"], PEM, GITHUB_PAT]), max_size=4),
       st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60),
       st.lists(st.integers(min_value=0, max_value=400), max_size=5))
def test_no_secret_survives_any_surrounding_text_or_split(secrets: list[str], noise: str,
                                                          cuts: list[int]) -> None:
    body = "\n".join(f"{noise} {s} {noise}" for s in secrets) + "\n"
    bounds = [0, *sorted(min(c, len(body)) for c in cuts), len(body)]
    out = _scrub_stream([body[a:b] for a, b in zip(bounds, bounds[1:])])
    for secret in secrets:
        core = secret.splitlines()[1] if secret.startswith("-----") else secret
        assert core not in out


# -- linear time ------------------------------------------------------------------------------------------

PATHOLOGICAL = {
    "sk runs": "ask-" * 2_500_000,
    "url prefixes": "://a:" * 2_000_000,
    "url without @": "https://u:" + "p" * 10_000_000,
    "pem headers without end": "-----BEGIN RSA PRIVATE KEY-----" * 330_000,
    "bearer words": "Bearer " * 1_400_000,
    "one long word": "a" * 10_000_000,
    "near-miss tokens": ("AKIA" + "x" * 15 + " ghp_" + "y" * 29 + " xoxb-1 ") * 200_000,
}


@pytest.mark.parametrize("name", PATHOLOGICAL)
def test_pathological_10mb_input_scans_in_linear_time(name: str) -> None:
    big = PATHOLOGICAL[name]
    small = big[: len(big) // 10]
    start = time.perf_counter()
    scrub(small)
    small_s = time.perf_counter() - start
    start = time.perf_counter()
    scrub(big)
    big_s = time.perf_counter() - start
    # Generous bounds: a super-linear pattern would take minutes here, not seconds.
    assert big_s < 20
    assert big_s < 40 * small_s + 2.0, (small_s, big_s)
