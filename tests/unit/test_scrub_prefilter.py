"""The prefiltered scrubber (issue 18 §4) gives exactly the results of the scrubber before it, with every
backend, and redacts the extra secrets it is given (the gateway's token, issue 13 §6)."""

from __future__ import annotations

import threading

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import scrub_v1_reference as reference
from test_scrub import ANTHROPIC, AWS, GITHUB, GITHUB_PAT, OPENAI, PATHOLOGICAL, PEM, PLAIN_SK, SLACK
from workers import scrub as scrub_module
from workers.agents.load import _chunk_text, fake_secrets
from workers.scrub import MIN_EXTRA_SECRET_CHARS, REDACTED, PrefilterKind, Scrubber, set_extra_secrets


def _installed(kind: PrefilterKind) -> bool:
    try:
        Scrubber(prefilter=kind)
    except ImportError:
        return False
    return True


BACKENDS = [kind for kind in (PrefilterKind.HYPERSCAN, PrefilterKind.RE2, PrefilterKind.NONE) if _installed(kind)]
NATIVE = [kind for kind in BACKENDS if kind is not PrefilterKind.NONE]
SCRUBBERS = {kind: Scrubber(prefilter=kind) for kind in BACKENDS}
SECRETS = [AWS, OPENAI, ANTHROPIC, PLAIN_SK, GITHUB_PAT, PEM, *GITHUB.values(), *SLACK.values(),
           *(s.text for s in fake_secrets(18)), "Authorization: Bearer eyJhbGciOi.J9.abc-_~+/=",
           "authorization: bearer 0123456789abcdef", "https://alice:s3cr3t-pw@github.example/x.git",
           "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nQUJD="]
# Pieces of secrets and their hints without the rest: the prefilter finds them, the rules must not match.
NEAR_MISSES = ["sk-", "ask-", "://", "://a:", "Bearer ", "bearer x", "AKIA", "ASIA12", "ghp_", "gho_x",
               "github_pat_", "xoxb-", "xoxz-", "-----BEGIN", "-----BEGIN PUBLIC KEY-----", "-----END",
               "risk-assessment-framework-version-two", "mask-", "[REDACTED]", "@", ":"]
CORPUS = [
    "", "plain text\n", "h\u00e9llo \u4e2d \U0001f600", _chunk_text("unit 1/1 chunk 1", 65536, []),
    _chunk_text("unit 1/1 chunk 2", 65536, fake_secrets(9)), "\n".join(SECRETS), " ".join(NEAR_MISSES),
    "lone \ud800 surrogate " + OPENAI, "mask-" + OPENAI, ("filler line\n" * 3000 + AWS + "\n") * 3,
    *(f"before {s} after" for s in SECRETS), *(f"x{m}y" for m in NEAR_MISSES),
]


def test_hyperscan_is_the_default_backend_where_it_installs() -> None:
    pytest.importorskip("hyperscan")
    assert Scrubber().prefilter is PrefilterKind.HYPERSCAN


@pytest.mark.parametrize("kind", BACKENDS, ids=lambda k: k.value)
def test_corpus_scrubs_exactly_as_before(kind: PrefilterKind) -> None:
    scrubber = SCRUBBERS[kind]
    for text in CORPUS:
        assert scrubber.scrub(text) == reference.scrub(text), text[:60]
        if "\ud800" not in text:  # the old chunker raised UnicodeEncodeError on a lone surrogate
            assert list(scrubber.scrub_chunks(text, 1000)) == list(reference.scrub_chunks(text, 1000)), text[:60]


def test_chunks_of_text_with_a_lone_surrogate_are_cut_instead_of_raising() -> None:
    text = ("\u00e9\ud800x" * 700) + " " + OPENAI
    chunks = list(Scrubber().scrub_chunks(text, 1000))
    assert "".join(c for c, _ in chunks) == scrub_module.scrub(text)[0]
    assert all(len(c.encode("utf-8", "surrogatepass")) <= 1000 for c, _ in chunks)
    assert sum(n for _, n in chunks) == 1


_noise = st.text(st.characters(codec=None), max_size=40)  # any code point, lone surrogates included
_embedded = st.lists(st.one_of(_noise, st.sampled_from(SECRETS), st.sampled_from(NEAR_MISSES)), max_size=8)


@settings(max_examples=300, deadline=None)
@given(_embedded, st.sampled_from(["", " ", "\n", "-", "_", "x", ":", "@"]))
def test_random_text_with_embedded_secrets_scrubs_exactly_as_before(parts: list[str], glue: str) -> None:
    text = glue.join(parts)
    expected = reference.scrub(text)
    for kind in BACKENDS:
        assert SCRUBBERS[kind].scrub(text) == expected, kind


@pytest.mark.parametrize("kind", NATIVE, ids=lambda k: k.value)
@pytest.mark.parametrize("name", ["sk runs", "url prefixes", "pem headers without end", "near-miss tokens"])
def test_hostile_input_gives_the_same_result(kind: PrefilterKind, name: str) -> None:
    text = PATHOLOGICAL[name][:1_000_000]
    assert SCRUBBERS[kind].scrub(text) == reference.scrub(text)


def test_threads_scrubbing_at_once_each_get_their_own_result() -> None:
    scrubber = Scrubber()
    texts = [f"thread {i} {s} " + "pad " * 5000 for i, s in enumerate(SECRETS[:8])]
    results: dict[int, list[tuple[str, int]]] = {}

    def work(index: int) -> None:
        results[index] = [scrubber.scrub(texts[index]) for _ in range(30)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for index, text in enumerate(texts):
        assert results[index] == [reference.scrub(text)] * 30


# -- extra secrets (the gateway's token) --------------------------------------------------------------------

TOKEN = "wg_" + "Q7-x_" * 6


@pytest.mark.parametrize("kind", BACKENDS, ids=lambda k: k.value)
def test_extra_secret_is_redacted_wherever_it_appears(kind: PrefilterKind) -> None:
    scrubber = Scrubber(extra_secrets=[TOKEN], prefilter=kind)
    assert scrubber.scrub(f"echo {TOKEN}; curl -H 'Bearer {TOKEN}' http://u:{TOKEN}@h/") == (
        f"echo {REDACTED}; curl -H 'Bearer {REDACTED}' http://u:{REDACTED}@h/", 3)
    assert scrubber.scrub(f"x{TOKEN}{TOKEN}y") == (f"x{REDACTED}{REDACTED}y", 2)
    assert scrubber.scrub(TOKEN[:-1]) == (TOKEN[:-1], 0)


@pytest.mark.parametrize("kind", BACKENDS, ids=lambda k: k.value)
def test_extra_secrets_do_not_change_anything_else(kind: PrefilterKind) -> None:
    scrubber = Scrubber(extra_secrets=[TOKEN, "another-secret-value"], prefilter=kind)
    for text in CORPUS:
        assert scrubber.scrub(text) == reference.scrub(text)


def test_short_secrets_are_ignored_and_non_ascii_ones_still_redacted() -> None:
    short = "x" * (MIN_EXTRA_SECRET_CHARS - 1)
    scrubber = Scrubber(extra_secrets=["", short, "clé-secrète-\u4e2d"])
    assert scrubber.scrub(f"{short} and clé-secrète-\u4e2d!") == (f"{short} and {REDACTED}!", 1)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=MIN_EXTRA_SECRET_CHARS,
               max_size=48), _noise, _noise)
def test_any_token_is_redacted_whatever_its_characters(token: str, before: str, after: str) -> None:
    assume("\ue000" not in token)
    for kind in NATIVE:
        out, count = Scrubber(extra_secrets=[token], prefilter=kind).scrub(before + token + after)
        assert count >= 1
        assert token not in out.replace(REDACTED, "\ue000")  # "[REDACTE" is a token the marker contains


def test_set_extra_secrets_reaches_the_module_functions() -> None:
    try:
        set_extra_secrets([TOKEN])
        assert scrub_module.scrub(f"t={TOKEN}") == (f"t={REDACTED}", 1)
        assert list(scrub_module.scrub_chunks(f"t={TOKEN}")) == [(f"t={REDACTED}", 1)]
    finally:
        set_extra_secrets([])
    assert scrub_module.scrub(f"t={TOKEN}") == (f"t={TOKEN}", 0)
