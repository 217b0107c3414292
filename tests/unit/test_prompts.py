"""The prompt template, indicator tokens and the prompt/target encoder, on the real SmolLM2 tokenizer."""

from __future__ import annotations

import logging

import pytest

from see_ray.config import IndicatorConfig
from see_ray.core.model import load_tokenizer
from see_ray.core.prompts import OUTPUT_CUE, IndicatorError, PromptEncoder, Query, resolve_indicators

DEF = "Add the two numbers and answer with the sum only."


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    return load_tokenizer(tiny_model_path)


@pytest.fixture
def enc(tok):
    return PromptEncoder(tok, IndicatorConfig(), max_prompt_tokens=64)


# -- the template -----------------------------------------------------------------------------------------
def test_render_with_definition():
    assert Query("17 + 25", DEF).render() == f"Definition: {DEF}\n\nInput:\n17 + 25\nOutput:"


def test_render_without_definition():
    assert Query("17 + 25").render() == "Input:\n17 + 25\nOutput:"
    assert Query("17 + 25", "").render() == "Input:\n17 + 25\nOutput:"  # empty definition = input-only


# -- indicators -------------------------------------------------------------------------------------------
def test_default_indicators_are_single_distinct_tokens(tok):
    a, r = resolve_indicators(tok, IndicatorConfig())
    assert a != r
    assert tok.encode(" accept", add_special_tokens=False) == [a]
    assert tok.encode(" reject", add_special_tokens=False) == [r]
    assert tok.decode([a]) == " accept" and tok.decode([r]) == " reject"


def test_multi_token_indicator_is_refused(tok):
    with pytest.raises(IndicatorError) as ei:
        resolve_indicators(tok, IndicatorConfig(accept=" acceptance please"))
    msg = str(ei.value)
    assert "indicators.accept" in msg and "acceptance please" in msg and "exactly one token" in msg
    with pytest.raises(IndicatorError, match="indicators.reject"):
        resolve_indicators(tok, IndicatorConfig(reject=" no thank you"))


def test_encoder_refuses_bad_indicators_at_construction(tok):
    with pytest.raises(IndicatorError):
        PromptEncoder(tok, IndicatorConfig(accept=" acceptance please"), 64)


# -- encode_query -----------------------------------------------------------------------------------------
def test_encode_query_round_trips_the_rendered_text(enc, tok):
    for q in (Query("17 + 25", DEF), Query("hello world"), Query("line one\nline two", "Multi\nline def")):
        ids = enc.encode_query(q)
        assert tok.decode(ids) == q.render()
        assert len(ids) <= enc.max_prompt_tokens
    assert enc.truncated == 0


def test_short_prompt_fits_exactly_without_truncation(tok):
    q = Query("17 + 25", DEF)
    n = len(PromptEncoder(tok, IndicatorConfig(), 512).encode_query(q))
    exact = PromptEncoder(tok, IndicatorConfig(), n)
    assert len(exact.encode_query(q)) == n and exact.truncated == 0
    tight = PromptEncoder(tok, IndicatorConfig(), n - 1)
    assert len(tight.encode_query(q)) <= n - 1 and tight.truncated == 1


def test_truncation_keeps_definition_and_cue(tok, caplog):
    enc = PromptEncoder(tok, IndicatorConfig(), max_prompt_tokens=40)
    long_input = " ".join(f"word{i}" for i in range(200))
    q = Query(long_input, DEF)
    with caplog.at_level(logging.WARNING, logger="see_ray.core.prompts"):
        ids = enc.encode_query(q)
    assert len(ids) <= 40
    text = tok.decode(ids)
    assert text.startswith(f"Definition: {DEF}\n\nInput:\nword0 word1")  # definition intact, input head kept
    assert text.endswith(OUTPUT_CUE)
    assert ids[-len(enc._cue) :] == tok.encode(OUTPUT_CUE, add_special_tokens=False)
    assert "word199" not in text  # the input's tail was cut
    assert enc.truncated == 1
    assert "truncated" in caplog.text and "max_prompt_tokens=40" in caplog.text


def test_huge_definition_gets_at_most_half_the_budget(tok):
    enc = PromptEncoder(tok, IndicatorConfig(), max_prompt_tokens=40)
    q = Query("the input text", " ".join(["very long definition"] * 50))
    ids = enc.encode_query(q)
    assert len(ids) <= 40
    text = tok.decode(ids)
    assert text.startswith("Definition: very long definition")
    assert "Input:\nthe input text\nOutput:" in text  # the input survives a huge definition
    assert text.endswith(OUTPUT_CUE)


def test_truncation_counts_and_warns_sparingly(tok, caplog):
    enc = PromptEncoder(tok, IndicatorConfig(), max_prompt_tokens=24)
    long_q = Query(" ".join(["x"] * 100))
    with caplog.at_level(logging.WARNING, logger="see_ray.core.prompts"):
        for _ in range(12):
            assert len(enc.encode_query(long_q)) <= 24
        enc.encode_query(Query("short"))  # not counted
    assert enc.truncated == 12
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 2  # at the 1st and the 10th, not every time


# -- encode_target ----------------------------------------------------------------------------------------
def test_target_reject_is_the_reject_token_alone(enc):
    assert enc.encode_target("reject", None, 8) == [enc.reject_id]
    assert enc.encode_target("reject", "ignored answer", 8) == [enc.reject_id]


def test_target_accept_is_indicator_answer_eos(enc, tok):
    ids = enc.encode_target("accept", "42", 8)
    assert ids[0] == enc.accept_id and ids[-1] == enc.eos_id
    assert ids[1:-1] == tok.encode(" 42", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == " accept 42"


def test_target_without_indicator_is_answer_eos(enc, tok):
    ids = enc.encode_target(None, "  HELLO WORLD ", 16)
    assert ids == tok.encode(" HELLO WORLD", add_special_tokens=False) + [enc.eos_id]
    assert enc.accept_id not in ids and enc.reject_id not in ids


def test_target_respects_max_tokens(enc):
    long_answer = " ".join(str(i) for i in range(100))
    for ind in ("accept", None):
        for m in (2, 5, 8):
            ids = enc.encode_target(ind, long_answer, m)
            assert len(ids) == m and ids[-1] == enc.eos_id
    assert enc.encode_target("accept", long_answer, 2)[0] == enc.accept_id
