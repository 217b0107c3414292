"""Serving on a real local Ray (private head) with the tiny model and real HTTP: SEE routing end to end,
forced models, streaming, the official openai client, 4xx errors, and sequential == concurrent."""

from __future__ import annotations

import json

import httpx
import pytest

from see_ray.core.prompts import Query

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
    from see_ray.core.expert import SEEModel
    from see_ray.core.router import Router
    from see_ray.core.routing import ExpertSpec

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
def _sse(served, path: str, body: dict, times: list | None = None) -> list:
    """The events of one SSE response; ``times`` gets each event's arrival (perf_counter) if given."""
    import time

    events = []
    with httpx.stream("POST", served["url"] + path, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
                if times is not None:
                    times.append(time.perf_counter())
    return events


def _pieces(events: list) -> list[str]:
    out = []
    for c in events[:-1]:
        ch = c["choices"][0]
        piece = ch["delta"].get("content") if "delta" in ch else ch["text"]
        if piece:
            out.append(piece)
    return out


def _plain_text(body: dict) -> str:
    ch = body["choices"][0]
    return ch["message"]["content"] if "message" in ch else ch["text"]


STREAM_CASES = [
    # routed by SEE to an expert (it continues after ACCEPT from its own decide pass)
    ("/v1/chat/completions", lambda t: {"model": "see", "max_tokens": 8, "messages": [
        {"role": "system", "content": t[1].definition}, {"role": "user", "content": t[1].test[1].input}]}),
    # routed to the base (every expert rejects a general query)
    ("/v1/chat/completions", lambda t: {"model": "see", "max_tokens": 12, "messages": [
        {"role": "system", "content": "Answer the user's request."}, {"role": "user", "content": "Why is the sky blue?"}]}),
    # forced expert and forced base, completions API
    ("/v1/completions", lambda t: {"model": "expert1", "prompt": t[0].test[0].input, "max_tokens": 8}),
    ("/v1/completions", lambda t: {"model": "base", "prompt": "The capital of France is", "max_tokens": 16}),
]


@pytest.mark.parametrize("case", range(len(STREAM_CASES)))
def test_streaming_matches_non_streaming(served, two_tasks, case):
    """Token-by-token chunks concatenate to exactly the non-streamed answer; same usage, same routing."""
    path, make = STREAM_CASES[case]
    body = make(two_tasks)
    plain = post(served, path, body).json()
    events = _sse(served, path, {**body, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == ("chat.completion.chunk" if "messages" in body else "text_completion") for c in chunks)
    pieces = _pieces(events)
    assert "".join(pieces) == _plain_text(plain)
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert last["usage"] == plain["usage"]
    st, pt = last["see_routing"], plain["see_routing"]
    assert (st["expert"], st["hops"], st["forced"]) == (pt["expert"], pt["hops"], pt["forced"])
    assert [(a["expert"], a["accepted"]) for a in st["asks"]] == [(a["expert"], a["accepted"]) for a in pt["asks"]]
    # one chunk per generated token that adds text (not word pieces of a finished answer)
    if plain["usage"]["completion_tokens"] >= 4:
        assert len(pieces) >= 3, pieces


def test_streaming_first_token_arrives_before_generation_ends(served):
    """A long answer: the first piece arrives long before the last (it is sent as it is generated)."""
    import time

    body = {"model": "base", "prompt": "Tell me a long story about the sea.", "max_tokens": 200, "stream": True}
    times: list[float] = []
    t0 = time.perf_counter()
    events = _sse(served, "/v1/completions", body, times)
    texts = [i for i, c in enumerate(events[:-1]) if c["choices"][0]["text"]]
    assert events[-2]["usage"]["completion_tokens"] >= 100, events[-2]["usage"]  # it really generated a lot
    assert len(texts) >= 50, len(texts)
    first, end = times[texts[0]] - t0, times[-1] - t0
    assert first < 0.5 * end, (first, end)


def test_streaming_applies_stop_strings_like_non_streaming(served):
    base = {"model": "base", "prompt": "The capital of France is", "max_tokens": 16}
    full = _plain_text(post(served, "/v1/completions", base).json())
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2][:3]  # a stop string inside the answer (it may span token pieces)
    plain = post(served, "/v1/completions", {**base, "stop": [stop]}).json()
    events = _sse(served, "/v1/completions", {**base, "stop": [stop], "stream": True})
    assert "".join(_pieces(events)) == _plain_text(plain) == full[: full.index(stop)]
    assert events[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"] == "stop"


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
    msgs = [{"role": "system", "content": two_tasks[0].definition}, {"role": "user", "content": q.input}]
    plain = client.chat.completions.create(model="base", messages=msgs, max_tokens=12)
    stream = client.chat.completions.create(model="base", messages=msgs, max_tokens=12, stream=True)
    pieces = [ch.choices[0].delta.content for ch in stream if ch.choices and ch.choices[0].delta.content]
    assert "".join(pieces) == plain.choices[0].message.content and len(pieces) >= 3, pieces
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
    ("/v1/completions", {"model": "see", "prompt": "x" * 20000}, 400, "prompt_too_long"),
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


# -- Prometheus metrics ---------------------------------------------------------------------------------
def _scrape(port: int) -> list:
    """Every sample Ray's metrics agent exports on the test head (Prometheus text format)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _sum(samples: list, name: str, **labels) -> float:
    """Sum over the series of an application metric (Ray prefixes `ray_`; counters may get `_total` once more)."""
    names = {f"ray_{name}", f"ray_{name}_total"}
    return sum(s.value for s in samples if s.name in names and all(s.labels.get(k) == v for k, v in labels.items()))


def _metric_values(samples: list, expected: dict) -> dict:
    return {k: _sum(samples, name, **labels) for k, (name, labels) in expected.items()}


def test_prometheus_metrics(served, ray_head, mixed_queries):
    """The dispatcher's and replicas' metrics reach Ray's Prometheus endpoint, and grow by exactly this
    test's traffic: requests, accepts and rejects per expert, fallbacks, hops, and the latency histograms."""
    import time

    port = ray_head["metrics_port"]
    # Only this dispatcher's series: other tests on the same head run SEE applications with experts of the
    # same names (the full suite once counted a 19th hop of expert1 here), and Serve tags every metric with
    # its application.
    app = {"application": served["scfg"].app_name}
    keys = {
        "requests": ("see_requests_total", {"endpoint": "chat", "model": "see", **app}),
        "fallbacks": ("see_fallbacks_total", app),
        "hops_count": ("see_hops_count", app),
        "hops_sum": ("see_hops_sum", app),
        "request_ms_count": ("see_request_ms_count", {"endpoint": "chat", **app}),
        "base_generate_count": ("see_base_generate_ms_count", app),
    }
    for e in ("expert1", "expert2"):
        keys[f"accept {e}"] = ("see_expert_decisions_total", {"expert": e, "decision": "accept", **app})
        keys[f"reject {e}"] = ("see_expert_decisions_total", {"expert": e, "decision": "reject", **app})
        keys[f"hop_ms_count {e}"] = ("see_hop_ms_count", {"expert": e, **app})

    # Ray exports application metrics every few seconds: the baseline is taken once the export is quiet
    # (unchanged for three export periods), so the deltas below are this test's traffic alone.
    period = ray_head["metrics_report_s"]
    deadline = time.monotonic() + 120
    base, since = _metric_values(_scrape(port), keys), time.monotonic()
    while time.monotonic() - since < 3 * period:
        assert time.monotonic() < deadline, "metrics export never settled"
        time.sleep(period / 2)
        now = _metric_values(_scrape(port), keys)
        if now != base:
            base, since = now, time.monotonic()

    want = dict.fromkeys(keys, 0.0)
    for q, _ in mixed_queries:
        tr = trace_of(chat(served, q.input, q.definition, max_tokens=3))
        want["requests"] += 1
        want["request_ms_count"] += 1
        want["hops_count"] += 1
        want["hops_sum"] += tr["hops"]
        if tr["expert"] == "base":
            want["fallbacks"] += 1
            want["base_generate_count"] += 1
        for a in tr["asks"]:
            want[f"{'accept' if a['accepted'] else 'reject'} {a['expert']}"] += 1
            want[f"hop_ms_count {a['expert']}"] += 1
    assert want["fallbacks"] and want["accept expert1"] and want["accept expert2"] and want["reject expert2"], want

    deadline = time.monotonic() + 90
    while True:
        m = _scrape(port)
        got = {k: v - base[k] for k, v in _metric_values(m, keys).items()}
        if got == want:
            break
        assert time.monotonic() < deadline, f"metric deltas after 90 s: {got}, expected {want}"
        time.sleep(period / 2)

    # the histograms are real histograms with plausible values
    for e in ("expert1", "expert2"):
        mean_ms = _sum(m, "see_hop_ms_sum", expert=e) / _sum(m, "see_hop_ms_count", expert=e)
        assert 0.1 < mean_ms < 30_000, mean_ms
        assert _sum(m, "see_replica_decide_ms_count", expert=e) >= 1  # from the expert replicas themselves
    assert _sum(m, "see_hops_sum") / _sum(m, "see_hops_count") <= len(served["experts"])
    buckets = sorted((float(s.labels["le"]), s.value) for s in m
                     if s.name == "ray_see_request_ms_bucket" and s.labels.get("endpoint") == "chat")
    assert buckets and all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))  # cumulative buckets
    assert buckets[-1][1] == _sum(m, "see_request_ms_count", endpoint="chat")


# -- shared base weights --------------------------------------------------------------------------------
def test_replicas_map_one_shared_copy_of_the_base(served):
    """Both experts and the base map the very same read-only copy of the base weights: one object in the
    node's plasma store (shared memory), owned by the node's detached holder, not a private copy each. Read
    from /proc here, not taken from the replicas' word; fails if sharing silently falls back to private copies."""
    import ray
    from ray import serve

    from see_ray.serve.shared_weights import HOLDER_NAMESPACE, mapping_of, pss_mib

    scfg = served["scfg"]
    assert scfg.share_base_weights  # the default
    handles = [serve.get_deployment_handle(n, scfg.expert_app(n)) for n in ("expert1", "expert2")]
    handles.append(serve.get_deployment_handle("base", scfg.base_app))
    infos = [h.memory.remote().result(timeout_s=60) for h in handles]
    assert len({i["pid"] for i in infos}) == 3  # three processes ...
    assert all(i["shared"] for i in infos)
    assert len({i["object_id"] for i in infos}) == 1  # ... one object
    holder = ray.get_actor(infos[0]["holder"], namespace=HOLDER_NAMESPACE)
    assert ray.get(holder.info.remote())["object_id"] == infos[0]["object_id"]

    maps = [mapping_of(i["pid"], i["first_param_ptr"]) for i in infos]
    assert all(m is not None for m in maps), maps
    # the same file-backed mapping (Ray's plasma store, /dev/shm) in every process, not anonymous memory
    assert all(m["inode"] and m["inode"] == maps[0]["inode"] and m["path"] == maps[0]["path"] for m in maps), maps
    assert maps[0]["path"].startswith("/dev/shm") or "plasma" in maps[0]["path"], maps[0]
    weights_kib = infos[0]["weights_bytes"] / 1024
    for m, i in zip(maps, infos):
        # the weights' pages are resident in this process and shared with the others: a private copy would
        # be Private_*, and its PSS would be the full size instead of about a third
        assert m["shared_clean_kib"] + m["shared_dirty_kib"] >= 0.9 * weights_kib, m
        assert m["pss_kib"] <= 0.6 * m["rss_kib"], m
        assert pss_mib(i["pid"]) > 0
