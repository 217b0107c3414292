"""Token streaming without a cluster: the stop-string scanner, the incremental detokenizer, and SEEModel.stream
against the batched path (the pieces must concatenate to exactly the batched answer)."""

from __future__ import annotations

import random

import pytest

from see_ray.serve.schema import StopScanner, apply_stop
from see_ray.core.expert import SEEModel, StreamText
from see_ray.core.prompts import Query



@pytest.mark.parametrize("seed", range(20))
def test_stop_scanner_equals_apply_stop_on_any_split(seed):
    rng = random.Random(seed)
    alphabet = "ab c\n."
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))]
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    sc, out = StopScanner(stops), ""
    for p in pieces:
        got, hit = sc.feed(p)
        out += got
        if hit:
            break
    out += sc.flush()
    expected, stopped = apply_stop(text, stops)
    assert (out, sc.stopped) == (expected, stopped), (text, stops, pieces)


@pytest.fixture(scope="module")
def tiny(tiny_cfg, tiny_model_path):
    return SEEModel(tiny_cfg, tiny_model_path)


def test_stream_text_is_exactly_the_stripped_decode(tiny):
    tok = tiny.tokenizer
    # multi-byte characters split across byte-level tokens, inner and outer whitespace
    text = "  Héllo wörld 🙂🙂 ok \n  done  "
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    st = StreamText(tok)
    pieces = [st.push(i) for i in ids] + [st.finish()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True).strip() == st.sent
    assert "\ufffd" not in "".join(pieces)
    assert sum(1 for p in pieces if p) >= 5 and st.generated == len(ids) - 1


def test_model_stream_equals_batched_generation(tiny):
    queries = [Query("12 + 30", "Add the two numbers."), Query("apple river stone"), Query("Why is the sky blue?")]
    batched = [tiny.generate([q], None, 12)[0] for q in queries]
    for q, expected in zip(queries, batched):
        items = list(tiny.stream(q, None, None, 12))
        assert items[0] == {"p": None}
        pieces = [i["text"] for i in items if "text" in i]
        assert "".join(pieces) == items[-1]["answer"] == expected
        assert len(pieces) >= 3  # one piece per generated token (the random model never stops early)
