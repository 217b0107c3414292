"""The prompt template, indicator tokens and the prompt/target encoder, on the real SmolLM2 tokenizer."""

from __future__ import annotations

import logging

import pytest

from see_ray.config import IndicatorConfig
from see_ray.core.prompts import OUTPUT_CUE, IndicatorError, PromptEncoder, Query, resolve_indicators

DEF = "Add the two numbers and answer with the sum only."


# -- the template -----------------------------------------------------------------------------------------
def test_render_with_definition():
    assert Query("17 + 25", DEF).render() == f"Definition: {DEF}\n\nInput:\n17 + 25\nOutput:"


def test_render_without_definition():
    assert Query("17 + 25").render() == "Input:\n17 + 25\nOutput:"
    assert Query("17 + 25", "").render() == "Input:\n17 + 25\nOutput:"  # empty definition = input-only


# -- indicators -------------------------------------------------------------------------------------------
def test_default_indicators_are_single_distinct_tokens(tokenizer):
    a, r = resolve_indicators(tokenizer, IndicatorConfig())
    assert a != r
    assert tokenizer.encode(" accept", add_special_tokens=False) == [a]
    assert tokenizer.encode(" reject", add_special_tokens=False) == [r]
    assert tokenizer.decode([a]) == " accept" and tokenizer.decode([r]) == " reject"


def test_multi_token_indicator_is_refused(tokenizer):
    with pytest.raises(IndicatorError) as ei:
        resolve_indicators(tokenizer, IndicatorConfig(accept=" acceptance please"))
    msg = str(ei.value)
    assert "indicators.accept" in msg and "acceptance please" in msg and "exactly one token" in msg
    with pytest.raises(IndicatorError, match="indicators.reject"):
        resolve_indicators(tokenizer, IndicatorConfig(reject=" no thank you"))


def test_encoder_refuses_bad_indicators_at_construction(tokenizer):
    with pytest.raises(IndicatorError):
        PromptEncoder(tokenizer, IndicatorConfig(accept=" acceptance please"), 64)


# -- encode_query -----------------------------------------------------------------------------------------
def test_encode_query_round_trips_the_rendered_text(encoder, tokenizer):
    for q in (Query("17 + 25", DEF), Query("hello world"), Query("line one\nline two", "Multi\nline def")):
        ids = encoder.encode_query(q)
        assert tokenizer.decode(ids) == q.render()
        assert len(ids) <= encoder.max_prompt_tokens
    assert encoder.truncated == 0


def test_short_prompt_fits_exactly_without_truncation(tokenizer):
    q = Query("17 + 25", DEF)
    n = len(PromptEncoder(tokenizer, IndicatorConfig(), 512).encode_query(q))
    exact = PromptEncoder(tokenizer, IndicatorConfig(), n)
    assert len(exact.encode_query(q)) == n and exact.truncated == 0
    tight = PromptEncoder(tokenizer, IndicatorConfig(), n - 1)
    assert len(tight.encode_query(q)) <= n - 1 and tight.truncated == 1


def test_truncation_keeps_definition_and_cue(tokenizer, caplog):
    encoder = PromptEncoder(tokenizer, IndicatorConfig(), max_prompt_tokens=40)
    long_input = " ".join(f"word{i}" for i in range(200))
    q = Query(long_input, DEF)
    with caplog.at_level(logging.WARNING, logger="see_ray.core.prompts"):
        ids = encoder.encode_query(q)
    assert len(ids) <= 40
    text = tokenizer.decode(ids)
    assert text.startswith(f"Definition: {DEF}\n\nInput:\nword0 word1")  # definition intact, input head kept
    assert text.endswith(OUTPUT_CUE)
    assert ids[-len(encoder._cue) :] == tokenizer.encode(OUTPUT_CUE, add_special_tokens=False)
    assert "word199" not in text  # the input's tail was cut
    assert encoder.truncated == 1
    assert "truncated" in caplog.text and "max_prompt_tokens=40" in caplog.text


def test_huge_definition_gets_at_most_half_the_budget(tokenizer):
    encoder = PromptEncoder(tokenizer, IndicatorConfig(), max_prompt_tokens=40)
    q = Query("the input text", " ".join(["very long definition"] * 50))
    ids = encoder.encode_query(q)
    assert len(ids) <= 40
    text = tokenizer.decode(ids)
    assert text.startswith("Definition: very long definition")
    assert "Input:\nthe input text\nOutput:" in text  # the input survives a huge definition
    assert text.endswith(OUTPUT_CUE)


def test_truncation_counts_and_warns_sparingly(tokenizer, caplog):
    encoder = PromptEncoder(tokenizer, IndicatorConfig(), max_prompt_tokens=24)
    long_q = Query(" ".join(["x"] * 100))
    with caplog.at_level(logging.WARNING, logger="see_ray.core.prompts"):
        for _ in range(12):
            assert len(encoder.encode_query(long_q)) <= 24
        encoder.encode_query(Query("short"))  # not counted
    assert encoder.truncated == 12
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 2  # at the 1st and the 10th, not every time


# -- encode_target ----------------------------------------------------------------------------------------
def test_target_reject_is_the_reject_token_alone(encoder):
    assert encoder.encode_target("reject", None, 8) == [encoder.reject_id]
    assert encoder.encode_target("reject", "ignored answer", 8) == [encoder.reject_id]


def test_target_accept_is_indicator_answer_eos(encoder, tokenizer):
    ids = encoder.encode_target("accept", "42", 8)
    assert ids[0] == encoder.accept_id and ids[-1] == encoder.eos_id
    assert ids[1:-1] == tokenizer.encode(" 42", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == " accept 42"


def test_target_without_indicator_is_answer_eos(encoder, tokenizer):
    ids = encoder.encode_target(None, "  HELLO WORLD ", 16)
    assert ids == tokenizer.encode(" HELLO WORLD", add_special_tokens=False) + [encoder.eos_id]
    assert encoder.accept_id not in ids and encoder.reject_id not in ids


def test_target_respects_max_tokens(encoder):
    long_answer = " ".join(str(i) for i in range(100))
    for ind in ("accept", None):
        for m in (2, 5, 8):
            ids = encoder.encode_target(ind, long_answer, m)
            assert len(ids) == m and ids[-1] == encoder.eos_id
    assert encoder.encode_target("accept", long_answer, 2)[0] == encoder.accept_id
