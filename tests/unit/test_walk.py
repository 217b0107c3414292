"""The routing rule and the dispatcher's walk without Ray or a model: ``core.routing`` (order, thresholds,
calibration queries, the first-accept walk) and ``serve.walk.Walker`` with plain async functions as the
experts' and the base's handles."""

from __future__ import annotations

import asyncio
import random

import pytest

from see_ray.config import RoutingConfig
from see_ray.config.constants import BASE
from see_ray.core.data import Instance, Task
from see_ray.core.prompts import Query
from see_ray.core.routing import ExpertSpec, calibration_queries, ordered, prompt_forms, threshold_of, walk
from see_ray.serve.walk import Entry, Hooks, Walker


# -- fakes ------------------------------------------------------------------------------------------------
class FakeExpert:
    """An expert replica's ``ask``: p(ACCEPT) from a table (default 0), the answer only when p reaches the
    threshold it is sent, as the real replica does. Records every call; ``hold`` makes calls wait until set."""

    def __init__(self, name: str, p: dict[str, float] | None = None, delay_s: float = 0.0):
        self.name, self.p, self.delay_s = name, p or {}, delay_s
        self.calls: list[dict] = []
        self.cancelled = 0
        self.hold: asyncio.Event | None = None

    async def ask(self, req: dict) -> dict:
        self.calls.append(req)
        try:
            if self.hold is not None:
                await self.hold.wait()
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        p = self.p.get(req["input"], 0.0)
        answer = f"{self.name}:{req['input']}" if req["generate"] and p >= req["threshold"] else None
        return {"p": p, "answer": answer, "finish": "stop"}

    def entry(self, threshold: float = 0.5) -> Entry:
        return Entry(self.name, f"task-{self.name}", 1, 0, threshold, f"see-expert-{self.name}", self.ask)


class FakeBase:
    def __init__(self):
        self.calls: list[dict] = []

    async def generate(self, req: dict) -> dict:
        self.calls.append(req)
        return {"answer": f"base:{req['input']}", "finish": "length"}


class RecordingHooks(Hooks):
    def __init__(self):
        self.events: list[tuple] = []

    def hop(self, expert, ms):
        self.events.append(("hop", expert))

    def decision(self, expert, decision):
        self.events.append(("decision", expert, decision))

    def fallback(self):
        self.events.append(("fallback",))

    def base_ms(self, ms):
        self.events.append(("base_ms",))

    def retry(self, target):
        self.events.append(("retry", target))


def walker(experts: list[FakeExpert], base: FakeBase | None = None, **kw) -> Walker:
    w = Walker((base or FakeBase()).generate, **kw)
    w.seq = [e.entry() for e in experts]
    return w


def run(coro):
    return asyncio.run(coro)


def batch_ask(experts: dict[str, dict[int, float]], calls: list[tuple[str, list[int]]]):
    """An ``ask`` for core.routing.walk over a batch: expert name -> p per query index."""

    async def ask(e: ExpertSpec, idx: list[int]) -> list[dict]:
        calls.append((e.name, list(idx)))
        return [{"p": experts[e.name].get(i, 0.0), "answer": f"{e.name}#{i}"} for i in idx]

    return ask


Q = Query("12 + 30")


# -- order and thresholds ---------------------------------------------------------------------------------
@pytest.mark.parametrize("order, expected", [("newest_first", ["c", "b", "a"]), ("oldest_first", ["a", "b", "c"])])
def test_the_walk_asks_in_sequence_order(order, expected):
    registered = [ExpertSpec(n, n, f"/{n}") for n in ("a", "b", "c")]  # registration order: oldest first
    seq = ordered(registered, order)
    calls: list = []
    (d,) = run(walk(seq, [Q], batch_ask({"a": {}, "b": {}, "c": {}}, calls), [0.5] * 3))
    assert [name for name, _ in calls] == expected == [a.expert for a in d.trace]
    assert d.expert is None and d.result is None  # every expert rejected: the base answers
    assert [e.name for e in registered] == ["a", "b", "c"]  # not reordered in place


def test_threshold_rule_global_then_calibrated_then_default():
    cfg = RoutingConfig(default_threshold=0.6)
    assert threshold_of(0.8, cfg) == 0.8  # calibrated beats default
    assert threshold_of(None, cfg) == 0.6  # default when nothing was calibrated
    fixed = RoutingConfig(threshold=0.3, default_threshold=0.6)
    assert threshold_of(0.8, fixed) == 0.3 and threshold_of(None, fixed) == 0.3  # global beats both


def test_the_walk_accepts_at_or_above_each_experts_own_threshold():
    seq = [ExpertSpec("x", "x", "/x"), ExpertSpec("y", "y", "/y")]
    p = {"x": {0: 0.7, 1: 0.7, 2: 0.6}, "y": {0: 0.7, 1: 0.7, 2: 0.7}}
    out = run(walk(seq, [Q, Q, Q], batch_ask(p, []), [0.7, 0.65]))
    assert [d.expert.name for d in out] == ["x", "x", "y"]  # p == threshold accepts; 0.6 < 0.7 passes on
    assert [(a.expert, a.threshold, a.accepted) for a in out[2].trace] == [("x", 0.7, False), ("y", 0.65, True)]
    with pytest.raises(ValueError, match="thresholds"):
        run(walk(seq, [Q], batch_ask(p, []), [0.5]))


# -- first accept -------------------------------------------------------------------------------------------
def test_first_accept_wins_and_later_experts_are_not_asked():
    e1, e2, e3 = FakeExpert("e1"), FakeExpert("e2", {Q.input: 0.9}), FakeExpert("e3", {Q.input: 0.99})
    w = walker([e1, e2, e3])
    res, info, entry = run(w.route(Q, 8))
    assert (res.expert, res.answer, entry.name) == ("e2", "e2:12 + 30", "e2")
    assert info["finish"] == "stop"
    assert [(a.expert, a.p_accept, a.accepted) for a in res.trace] == [("e1", 0.0, False), ("e2", 0.9, True)]
    assert len(e1.calls) == len(e2.calls) == 1 and e3.calls == []  # e3 would accept too, but is never asked
    assert e2.calls[0] == {"input": Q.input, "definition": None, "threshold": 0.5, "max_tokens": 8, "generate": True}


def test_a_batch_asks_each_expert_only_the_queries_still_unanswered():
    seq = [ExpertSpec(n, n, f"/{n}") for n in ("n3", "n2", "n1")]
    p = {"n3": {1: 0.9}, "n2": {0: 0.9, 3: 0.9}, "n1": {2: 0.9}}
    calls: list = []
    out = run(walk(seq, [Q] * 5, batch_ask(p, calls), [0.5] * 3))
    assert calls == [("n3", [0, 1, 2, 3, 4]), ("n2", [0, 2, 3, 4]), ("n1", [2, 4])]
    assert [d.expert.name if d.expert else None for d in out] == ["n2", "n3", "n1", "n2", None]
    assert out[0].result == {"p": 0.9, "answer": "n2#0"}
    assert [len(d.trace) for d in out] == [2, 1, 3, 2, 3]


def test_on_ask_sees_every_hop_in_trace_order():
    seq = [ExpertSpec(n, n, f"/{n}") for n in ("a", "b")]
    seen: list = []
    (d,) = run(walk(seq, [Q], batch_ask({"a": {}, "b": {0: 1.0}}, []), [0.5, 0.5], on_ask=seen.append))
    assert seen == d.trace and [a.expert for a in seen] == ["a", "b"]


# -- concurrency window -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_concurrent_windows_give_the_sequential_answers_and_traces(seed):
    rng = random.Random(seed)
    names = [f"x{i}" for i in range(rng.randint(1, 7))]
    seq = [ExpertSpec(n, n, f"/{n}") for n in names]
    n_queries = rng.randint(1, 6)
    p = {n: {i: rng.choice([0.1, 0.4, 0.55, 0.9]) for i in range(n_queries)} for n in names}
    thresholds = [rng.choice([0.5, 0.6]) for _ in names]

    def walked(width):
        out = run(walk(seq, list(range(n_queries)), batch_ask(p, []), thresholds, width))
        return [(d.expert and d.expert.name, d.result, [(a.expert, a.p_accept, a.threshold, a.accepted)
                                                        for a in d.trace]) for d in out]

    sequential = walked(1)
    for width in (2, 3, len(names) + 1):
        assert walked(width) == sequential, width


def test_concurrent_window_cancels_the_asks_after_the_acceptor():
    async def scenario():
        slow = [FakeExpert(f"slow{i}") for i in range(2)]
        for e in slow:
            e.hold = asyncio.Event()  # never set: only cancellation ends these asks
        first = FakeExpert("first", delay_s=0.01)
        acceptor = FakeExpert("acceptor", {Q.input: 0.8}, delay_s=0.02)
        later = FakeExpert("later", {Q.input: 0.9})  # the next window: never asked
        w = walker([first, acceptor, *slow, later], mode="concurrent", width=4)
        res, _, _ = await asyncio.wait_for(w.route(Q, 4), 5)
        await asyncio.sleep(0)  # let the cancellations be delivered (read here: asyncio.run cancels leftovers)
        return res, [len(e.calls) for e in slow], [e.cancelled for e in slow], later.calls, dict(w.inflight)

    res, slow_calls, slow_cancelled, later_calls, inflight = run(scenario())
    assert res.expert == "acceptor" and res.answer == "acceptor:12 + 30"
    assert [a.expert for a in res.trace] == ["first", "acceptor"]  # the same trace as the sequential walk
    assert res.trace[1].ms >= res.trace[0].ms  # hop latencies count from the window's start
    assert slow_calls == [1, 1] and slow_cancelled == [1, 1]  # asked at once, then cancelled
    assert later_calls == []
    assert inflight == {"first": 0, "acceptor": 0, "slow0": 0, "slow1": 0}


def test_walker_modes_agree_and_the_mode_can_be_switched():
    experts = [FakeExpert("e1"), FakeExpert("e2"), FakeExpert("e3", {Q.input: 0.7})]
    w = walker(experts)
    seq_res, _, _ = run(w.route(Q, 4))
    assert w.set_mode("concurrent", 2) == {"mode": "concurrent", "width": 2}
    con_res, _, _ = run(w.route(Q, 4))
    strip = lambda r: (r.expert, r.answer, [(a.expert, a.p_accept, a.accepted) for a in r.trace])  # noqa: E731
    assert strip(con_res) == strip(seq_res)
    assert strip(run(w.route(Q, 4, mode="sequential"))[0]) == strip(seq_res)
    with pytest.raises(ValueError, match="unknown dispatch mode"):
        w.set_mode("parallel")
    with pytest.raises(ValueError, match="width"):
        w.set_mode(width=0)


# -- the base ---------------------------------------------------------------------------------------------
def test_the_base_answers_when_every_expert_rejects():
    base, hooks = FakeBase(), RecordingHooks()
    e1, e2 = FakeExpert("e1", {Q.input: 0.49}), FakeExpert("e2")
    w = walker([e1, e2], base, hooks=hooks)
    res, info, entry = run(w.route(Q, 6))
    assert (res.expert, res.answer, entry, info["finish"]) == (BASE, "base:12 + 30", None, "length")
    assert [(a.expert, a.accepted) for a in res.trace] == [("e1", False), ("e2", False)]
    assert base.calls == [{"input": Q.input, "definition": None, "max_tokens": 6}]
    assert hooks.events == [("hop", "e1"), ("decision", "e1", "reject"), ("hop", "e2"),
                            ("decision", "e2", "reject"), ("fallback",), ("base_ms",)]
    # decisions only (/v1/route, streaming): the base is not called
    res, info, entry = run(w.route(Q, 1, generate=False))
    assert (res.expert, res.answer, info, entry) == (BASE, None, {}, None) and len(base.calls) == 1
    assert all(c["generate"] is False for c in e1.calls[1:] + e2.calls[1:])


def test_an_empty_sequence_goes_straight_to_the_base():
    base = FakeBase()
    res, _, _ = run(walker([], base).route(Q, 3))
    assert (res.expert, res.hops, len(base.calls)) == (BASE, 0, 1)


# -- forced model -----------------------------------------------------------------------------------------
def test_a_forced_expert_answers_whatever_its_p():
    hooks = RecordingHooks()
    e1, e2 = FakeExpert("e1", {Q.input: 0.99}), FakeExpert("e2", {Q.input: 0.1})
    w = walker([e1, e2], hooks=hooks)
    res, info, entry = run(w.forced("e2", Q, 5))
    assert (res.expert, res.answer, entry.name) == ("e2", "e2:12 + 30", "e2")
    assert e2.calls[0]["threshold"] == 0.0 and e1.calls == []  # no walk: e1 would have accepted
    (a,) = res.trace
    assert (a.expert, a.p_accept, a.threshold, a.accepted) == ("e2", 0.1, 0.5, False)  # reported, not applied
    assert ("decision", "e2", "forced") in hooks.events


def test_a_forced_base_answers_without_asking_any_expert():
    base, e1 = FakeBase(), FakeExpert("e1", {Q.input: 0.99})
    res, info, entry = run(walker([e1], base).forced(BASE, Q, 5))
    assert (res.expert, res.answer, res.trace, entry) == (BASE, "base:12 + 30", [], None)
    assert e1.calls == [] and len(base.calls) == 1


# -- re-sent calls ----------------------------------------------------------------------------------------
class ReplicaDied(Exception):
    pass


def flaky(fails: int, exc: type[BaseException] = ReplicaDied):
    """An expert ask that raises ``exc`` on its first ``fails`` calls, then accepts."""
    state = {"calls": 0}

    async def ask(req):
        state["calls"] += 1
        if state["calls"] <= fails:
            raise exc("replica died")
        return {"p": 0.9, "answer": "ok", "finish": "stop"}

    return ask, state


def retry_walker(ask, max_retries: int, hooks: Hooks | None = None) -> Walker:
    w = Walker(FakeBase().generate, retryable=(ReplicaDied,), max_retries=max_retries, backoff_s=(0.0,), hooks=hooks)
    w.seq = [Entry("e", "t", 1, 0, 0.5, "see-expert-e", ask)]
    return w


def test_a_retryable_error_is_re_sent_until_it_succeeds():
    ask, state = flaky(2)
    hooks = RecordingHooks()
    w = retry_walker(ask, max_retries=2, hooks=hooks)
    res, _, _ = run(w.route(Q, 4))
    assert (res.expert, res.answer, state["calls"], w.retries) == ("e", "ok", 3, 2)
    assert hooks.events.count(("retry", "e")) == 2 and w.inflight == {"e": 0}


def test_retries_exhausted_re_raise_the_error():
    ask, state = flaky(10)
    w = retry_walker(ask, max_retries=2)
    with pytest.raises(ReplicaDied):
        run(w.route(Q, 4))
    assert (state["calls"], w.retries, w.inflight) == (3, 2, {"e": 0})


def test_other_errors_are_not_re_sent():
    ask, state = flaky(1, RuntimeError)
    w = retry_walker(ask, max_retries=3)
    with pytest.raises(RuntimeError):
        run(w.route(Q, 4))
    assert (state["calls"], w.retries) == (1, 0)


def test_the_backoff_grows_and_stays_at_its_last_step(monkeypatch):
    waits: list[float] = []

    async def no_sleep(s):
        waits.append(s)

    monkeypatch.setattr("see_ray.serve.walk.asyncio.sleep", no_sleep)
    ask, _ = flaky(4)
    w = Walker(FakeBase().generate, retryable=(ReplicaDied,), max_retries=4, backoff_s=(0.1, 0.5, 2.0))
    assert run(w.call(ask, {}, "e"))["answer"] == "ok"
    assert waits == [0.1, 0.5, 2.0, 2.0]


# -- calibration queries ----------------------------------------------------------------------------------
def test_calibration_queries_are_the_dev_set_in_the_trained_prompt_forms():
    task = Task("shout", "Repeat in capitals.", [Instance("a", ("A",))], dev=[Instance("b c", ("B C",)),
                                                                           Instance("d", ("D",))])
    with_def, bare = Query("b c", "Repeat in capitals."), Query("b c")
    assert calibration_queries(task, 0.5)[:2] == [with_def, bare]  # both forms, per dev instance
    assert len(calibration_queries(task, 0.5)) == 4
    assert calibration_queries(task, 0.0) == [with_def, Query("d", "Repeat in capitals.")]
    assert calibration_queries(task, 1.0) == [bare, Query("d")]
    assert prompt_forms([Query("x")], 0.5) == [Query("x")]  # no definition: one form only
