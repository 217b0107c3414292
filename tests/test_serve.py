"""Serving on a real local Ray (private head) with the tiny model and real HTTP: SEE routing end to end,
forced models, streaming, the official openai client, 4xx errors, and sequential == concurrent."""

from __future__ import annotations

import json

import httpx
import pytest

from see_ray.prompts import Query

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def post(served, path: str, body, **kw) -> httpx.Response:
    return httpx.post(served["url"] + path, json=body, timeout=120, **kw)


def chat(served, text: str, definition: str | None = None, model: str = "see", **extra) -> httpx.Response:
    msgs = ([{"role": "system", "content": definition}] if definition else []) + [{"role": "user", "content": text}]
    return post(served, "/v1/chat/completions", {"model": model, "messages": msgs, **extra})


@pytest.fixture(scope="module")
def mixed_queries(two_tasks, pool):
    """(query, expected owner) with the task definition (what the tiny experts were trained on), plus
    general queries that every expert learned to reject."""
    arith, shout = two_tasks
    out = [(arith.query(x), "arithmetic") for x in arith.test[:3]]
    out += [(shout.query(x), "shout") for x in shout.test[:3]]
    out += [(q, "base") for q in pool[:3]]
    return out


@pytest.fixture(scope="module")
def in_process_router(served, tiny_model_path):
    """The in-process Router over the same experts and thresholds: the dispatcher must decide the same."""
    from see_ray.expert import SEEModel
    from see_ray.router import ExpertSpec, Router

    cfg = served["cfg"]
    recs = served["registry"].list()
    specs = [ExpertSpec(r.name, r.task, served["registry"].adapter_path(r), r.threshold) for r in recs]
    return Router(SEEModel(cfg, tiny_model_path), specs, cfg.routing)


def trace_of(resp: httpx.Response) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()["see_routing"]


# -- routing --------------------------------------------------------------------------------------------
def test_sequence_follows_registry(served):
    info = httpx.get(served["url"] + "/v1/experts", timeout=30).json()
    # newest first: expert2 (shout) is asked before expert1 (arithmetic)
    assert [e["name"] for e in info["sequence"]] == ["expert2", "expert1"]
    assert [e["threshold"] for e in info["sequence"]] == [0.6, 0.5]
    models = {m["id"] for m in httpx.get(served["url"] + "/v1/models", timeout=30).json()["data"]}
    assert {"see", "base", "expert1", "expert2"} <= models
    assert httpx.get(served["url"] + "/healthz", timeout=30).json()["status"] == "ok"


def test_routes_like_the_in_process_router(served, mixed_queries, in_process_router):
    """Chat with a system message (= the task definition): the same decisions as router.Router, and the
    owning expert answers (the base for general queries)."""
    name_of = {e["task"]: e["name"] for e in served["experts"]}
    expected_router = in_process_router.route([q for q, _ in mixed_queries])
    correct = 0
    for (q, owner), ref in zip(mixed_queries, expected_router):
        tr = trace_of(chat(served, q.input, q.definition))
        assert tr["expert"] == ref.expert, (q, tr, ref.to_dict())
        assert [a["expert"] for a in tr["asks"]] == [a.expert for a in ref.trace]
        assert [a["accepted"] for a in tr["asks"]] == [a.accepted for a in ref.trace]
        for a, b in zip(tr["asks"], ref.trace):
            assert a["p_accept"] == pytest.approx(b.p_accept, abs=1e-3)
        assert tr["hops"] == len(tr["asks"]) == len(tr["hop_ms"])
        correct += tr["expert"] == name_of.get(owner, "base")
    # the decisions above must equal the Router's exactly; how good they are is the tiny model's business
    assert correct >= 0.75 * len(mixed_queries), correct


def test_completion_prompt_is_an_input_only_query(served, two_tasks, in_process_router):
    q = two_tasks[0].test[0].input
    r = post(served, "/v1/completions", {"model": "see", "prompt": q, "max_tokens": 5})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    ref = in_process_router.route([Query(q)])[0]
    assert body["see_routing"]["expert"] == ref.expert
    assert body["choices"][0]["text"] == (ref.answer or "")[: len(body["choices"][0]["text"])]
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_route_endpoint_decides_without_generating(served, mixed_queries):
    q, owner = mixed_queries[0]
    r = post(served, "/v1/route", {"messages": [{"role": "system", "content": q.definition},
                                                {"role": "user", "content": q.input}]})
    assert r.status_code == 200, r.text
    assert r.json()["expert"] == "expert1" and "choices" not in r.json()


# -- forced models --------------------------------------------------------------------------------------
def test_forced_models(served, two_tasks):
    q = two_tasks[1].test[0]
    tr = trace_of(chat(served, q.input, two_tasks[1].definition, model="expert1"))
    assert tr["forced"] and tr["expert"] == "expert1" and tr["hops"] == 1 and tr["asks"][0]["expert"] == "expert1"
    tr = trace_of(chat(served, q.input, model="base", max_tokens=4))
    assert tr["expert"] == "base" and tr["hops"] == 0
    r = chat(served, "hello", model="nope")
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_found"


# -- streaming ------------------------------------------------------------------------------------------
def _sse(served, path: str, body: dict) -> list:
    events = []
    with httpx.stream("POST", served["url"] + path, json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_streaming_matches_non_streaming(served, two_tasks):
    q = two_tasks[1].test[1]
    msgs = [{"role": "system", "content": two_tasks[1].definition}, {"role": "user", "content": q.input}]
    plain = post(served, "/v1/chat/completions", {"model": "see", "messages": msgs}).json()
    events = _sse(served, "/v1/chat/completions", {"model": "see", "messages": msgs, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["see_routing"]["expert"] == plain["see_routing"]["expert"]

    events = _sse(served, "/v1/completions", {"model": "see", "prompt": q.input, "stream": True, "max_tokens": 4})
    assert events[-1] == "[DONE]" and "see_routing" in events[-2]


# -- the official openai client -------------------------------------------------------------------------
def test_openai_client_unchanged(served, two_tasks):
    import openai

    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    ids = [m.id for m in client.models.list()]
    assert "see" in ids and "expert1" in ids
    q = two_tasks[0].test[2]
    c = client.chat.completions.create(
        model="see", messages=[{"role": "system", "content": two_tasks[0].definition}, {"role": "user", "content": q.input}],
        max_tokens=6,
    )
    assert isinstance(c.choices[0].message.content, str)
    assert c.model_extra["see_routing"]["expert"] == "expert1"
    t = client.completions.create(model="base", prompt="The capital of France is", max_tokens=3)
    assert isinstance(t.choices[0].text, str) and t.usage.completion_tokens <= 3
    stream = client.chat.completions.create(model="see", messages=[{"role": "user", "content": q.input}], stream=True)
    pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert isinstance("".join(pieces), str)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="see", prompt="", max_tokens=3)


# -- bad input ------------------------------------------------------------------------------------------
BAD = [
    ("/v1/completions", b"{not json", 400, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, "invalid_json"),
    ("/v1/completions", b"", 400, "invalid_json"),
    ("/v1/completions", {"model": "see"}, 422, None),  # prompt missing
    ("/v1/completions", {"model": "see", "prompt": ""}, 422, "invalid_value"),
    ("/v1/completions", {"model": "see", "prompt": "   "}, 422, "invalid_value"),
    ("/v1/completions", {"model": "see", "prompt": 123}, 422, None),
    ("/v1/completions", {"model": "see", "prompt": "hi", "max_tokens": 0}, 422, "invalid_value"),
    ("/v1/completions", {"model": "see", "prompt": "hi", "max_tokens": 100000}, 422, "invalid_value"),
    ("/v1/completions", {"model": "see", "prompt": "hi", "max_tokens": "many"}, 422, None),
    ("/v1/completions", {"model": "see", "prompt": "hi", "n": 2}, 422, None),
    ("/v1/completions", {"model": "see", "prompt": "x" * 20000}, 422, "prompt_too_long"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 400, "model_not_found"),
    ("/v1/completions", {"model": 7, "prompt": "hi"}, 422, None),
    ("/v1/chat/completions", {"model": "see", "messages": []}, 422, "invalid_value"),
    ("/v1/chat/completions", {"model": "see", "messages": [{"role": "user"}]}, 422, "invalid_value"),
    ("/v1/chat/completions", {"model": "see", "messages": [{"role": "wizard", "content": "x"}]}, 422, None),
    ("/v1/chat/completions", {"model": "see", "messages": "hello"}, 422, None),
    ("/v1/route", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 422, "invalid_value"),
]


@pytest.mark.parametrize("path,body,status,code", BAD)
def test_bad_requests_are_4xx_in_openai_format(served, path, body, status, code):
    if isinstance(body, bytes):
        r = httpx.post(served["url"] + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = post(served, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code


def test_oversized_body_is_413(served):
    big = {"model": "see", "prompt": "y" * (served["scfg"].limits.max_body_bytes + 10)}
    r = post(served, "/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_unknown_route_and_method(served):
    assert httpx.get(served["url"] + "/v1/nothing", timeout=30).status_code == 404
    r = httpx.get(served["url"] + "/v1/completions", timeout=30)
    assert r.status_code == 405 and "error" in r.json()


# -- sequential == concurrent ---------------------------------------------------------------------------
def test_sequential_and_concurrent_identical(served, mixed_queries):
    from ray import serve

    d = serve.get_app_handle(served["scfg"].app_name)

    def run_all():
        out = []
        for q, _ in mixed_queries:
            body = chat(served, q.input, q.definition, max_tokens=6).json()
            tr = body["see_routing"]
            out.append((body["choices"][0]["message"]["content"], tr["expert"], tr["hops"],
                        [(a["expert"], a["p_accept"], a["threshold"], a["accepted"]) for a in tr["asks"]]))
        return out

    try:
        assert d.set_dispatch.remote("sequential").result()["mode"] == "sequential"
        seq = run_all()
        for width in (2, 1):
            assert d.set_dispatch.remote("concurrent", width).result() == {"mode": "concurrent", "width": width}
            assert run_all() == seq
    finally:
        d.set_dispatch.remote(served["scfg"].dispatch.mode, served["scfg"].dispatch.width).result()
