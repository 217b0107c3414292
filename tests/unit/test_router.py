"""Sequential routing in one process (``core.router.Router``): order, thresholds, calibration, and the learning
test with two really trained experts. The walk's logic alone, without a model: test_walk.py."""

from __future__ import annotations

import random

import pytest

from see_ray.config import RoutingConfig
from see_ray.core.data import Instance, Task
from see_ray.tools.builtin import general_pool, unrelated_queries
from see_ray.core.expert import SEEModel
from see_ray.core.metrics import ood_rejection_rate, routing_accuracy
from see_ray.core.prompts import Query
from see_ray.config.constants import BASE
from see_ray.core.router import Router
from see_ray.core.routing import (
    ExpertSpec,
    RouteResult,
    calibrate,
    calibration_queries,
    ordered,
)


E1 = ExpertSpec("expert1", "arithmetic", "/nowhere/1")
E2 = ExpertSpec("expert2", "shout", "/nowhere/2", threshold=0.8)
E3 = ExpertSpec("expert3", "antonyms", "/nowhere/3")


# -- order --------------------------------------------------------------------------------------------
def test_ordered_newest_first_and_oldest_first():
    experts = [E1, E2, E3]  # registration order
    assert [e.name for e in ordered(experts, "newest_first")] == ["expert3", "expert2", "expert1"]
    assert [e.name for e in ordered(experts, "oldest_first")] == ["expert1", "expert2", "expert3"]
    assert experts == [E1, E2, E3]  # the input is not reordered in place
    assert ordered([], "newest_first") == []


# -- thresholds ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bare_model(tiny_cfg, tiny_model_path):
    """The base model with no adapter: enough for routers that hold no experts."""
    return SEEModel(tiny_cfg, tiny_model_path)


def test_threshold_precedence(bare_model):
    calibrated, uncalibrated = E2, E1
    r = Router(bare_model, [], RoutingConfig(default_threshold=0.6))
    assert r.threshold(calibrated) == 0.8  # calibrated beats default
    assert r.threshold(uncalibrated) == 0.6  # default when nothing was calibrated
    g = Router(bare_model, [], RoutingConfig(threshold=0.3, default_threshold=0.6))
    assert g.threshold(calibrated) == 0.3 and g.threshold(uncalibrated) == 0.3  # global beats both


def test_router_without_experts_sends_everything_to_base(bare_model, pool):
    r = Router(bare_model, [], RoutingConfig(max_new_tokens=4))
    res = r.route(list(pool[:3]))
    assert [x.expert for x in res] == [BASE] * 3
    assert all(x.hops == 0 and x.trace == [] and isinstance(x.answer, str) for x in res)
    assert [x.answer for x in res] == bare_model.generate(list(pool[:3]), None, 4)
    assert all(x.answer is None for x in r.route(list(pool[:3]), generate=False))


class _TableModel:
    """What Router needs of SEEModel, from a table: p(ACCEPT) per (adapter, input); records every call."""

    def __init__(self, p: dict[tuple[str, str], float]):
        self.p, self.adapters, self.calls = p, {"e1": None, "e2": None}, []

    def decide_and_generate(self, queries, adapter, threshold, max_new_tokens):
        self.calls.append((adapter, [q.input for q in queries], threshold))
        ps = [self.p.get((adapter, q.input), 0.0) for q in queries]
        answers = [f"{adapter}:{q.input}" if threshold is not None and p >= threshold else None
                   for q, p in zip(queries, ps)]
        return ps, answers

    def generate(self, queries, adapter, max_new_tokens):
        self.calls.append((adapter, [q.input for q in queries], None))
        return [f"base:{q.input}" for q in queries]


def test_route_runs_the_walk_batched_and_the_base_answers_the_rest():
    """Each expert decides the still-unanswered queries in one call; the base generates the rest in one call;
    route works inside a running event loop too (it does not start one)."""
    import asyncio

    m = _TableModel({("e2", "b"): 0.9, ("e1", "a"): 0.7, ("e1", "c"): 0.3})
    router = Router(m, [ExpertSpec("e1", "t1", "/1", threshold=0.6), ExpertSpec("e2", "t2", "/2")],
                    RoutingConfig(max_new_tokens=4))

    async def inside_a_loop():
        return router.route([Query("a"), Query("b"), Query("c")])

    res = asyncio.run(inside_a_loop())
    assert m.calls == [("e2", ["a", "b", "c"], 0.5), ("e1", ["a", "c"], 0.6), (None, ["c"], None)]
    assert [(r.expert, r.answer, r.hops) for r in res] == [("e1", "e1:a", 2), ("e2", "e2:b", 1), (BASE, "base:c", 2)]
    assert [(a.expert, a.p_accept, a.threshold, a.accepted) for a in res[2].trace] == [
        ("e2", 0.0, 0.5, False), ("e1", 0.3, 0.6, False)]
    m.calls.clear()
    res = router.route([Query("a"), Query("c")], generate=False)
    assert m.calls == [("e2", ["a", "c"], None), ("e1", ["a", "c"], None)]  # decisions only, no base call
    assert [(r.expert, r.answer) for r in res] == [("e1", None), (BASE, None)]


def test_router_refuses_a_broken_adapter_folder(bare_model, tmp_path):
    from see_ray.core.expert import AdapterError

    with pytest.raises(AdapterError, match="does not exist"):
        Router(bare_model, [ExpertSpec("x", "t", str(tmp_path / "missing"))], RoutingConfig())


# -- calibration --------------------------------------------------------------------------------------
def test_calibrate_takes_the_kth_smallest():
    values = [0.6 + 0.006 * i for i in range(50)]
    random.Random(0).shuffle(values)
    c = RoutingConfig(calibration_max_false_rejection=0.02)
    assert calibrate(values, [], c).threshold == pytest.approx(0.606)  # k = floor(0.02 * 50) = 1: 2nd smallest
    # at that threshold exactly one of the 50 own dev queries is falsely rejected (1/50 = 0.02)
    thr = calibrate(values, [], c).threshold
    assert sum(v < thr for v in values) == 1
    assert calibrate(values, [], RoutingConfig(calibration_max_false_rejection=0.0)).threshold == pytest.approx(0.6)
    assert calibrate(values, [], RoutingConfig(calibration_max_false_rejection=0.1)).threshold == pytest.approx(0.63)
    assert calibrate(values[:10], [], c).threshold == min(values[:10])  # floor(0.2) = 0: the smallest


def test_calibrate_clips_into_bounds():
    c = RoutingConfig(calibration_bounds=(0.5, 0.95))
    assert calibrate([0.999] * 20, [], c).threshold == 0.95
    assert calibrate([0.1, 0.2, 0.3], [], c).threshold == 0.5
    c2 = RoutingConfig(calibration_bounds=(0.7, 0.7))
    assert calibrate([0.2, 0.99], [], c2).threshold == 0.7


def test_calibrate_empty_gives_default():
    assert calibrate([], [], RoutingConfig(default_threshold=0.65)).threshold == 0.65


def test_calibrate_separates_held_out_positives_from_negatives():
    """Positives 0.90-0.99 and negatives 0.05-0.60, with one positive (0.55) and one negative (0.97) out of place:
    with at most 2% of 50 positives rejected, the threshold rejects the most negatives, halfway between the highest
    negative below the bound and the bound in log-odds; both error rates are measured at it."""
    import math

    pos = [0.55] + [0.90 + 0.09 * i / 48 for i in range(49)]
    neg = [0.05 + 0.55 * i / 29 for i in range(30)] + [0.97]
    random.Random(1).shuffle(pos)
    cal = calibrate(pos, neg, RoutingConfig(calibration_max_false_rejection=0.02), {"task_a": 20, "general": 11})
    t_max = 0.90  # rejecting 1 of 50 is allowed: the 2nd lowest positive
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert logit(cal.threshold) == pytest.approx((logit(0.60) + logit(t_max)) / 2)
    assert 0.60 < cal.threshold < 0.90
    assert cal.false_rejection == pytest.approx(1 / 50)  # only the 0.55 positive
    assert cal.false_acceptance == pytest.approx(1 / 31)  # only the 0.97 negative
    assert (cal.n_positives, cal.n_negatives) == (50, 31) and cal.negatives_by_source == {"task_a": 20, "general": 11}
    # without negatives the old rule: the largest threshold within the bound
    assert calibrate(pos, [], RoutingConfig(calibration_max_false_rejection=0.02)).threshold == pytest.approx(t_max)
    # calibration_position 1 puts it at the bound, 0 just above the highest negative
    at_bound = calibrate(pos, neg, RoutingConfig(calibration_position=1.0))
    assert at_bound.threshold == pytest.approx(t_max) and at_bound.false_acceptance == pytest.approx(1 / 31)
    low = calibrate(pos, neg, RoutingConfig(calibration_position=0.0))
    assert low.threshold == pytest.approx(0.60) and low.threshold > 0.60  # the 0.60 negative is still rejected


# -- the learning test ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def specs(see_experts, tiny_cfg, tiny_model_path, two_tasks, pool):
    """The two experts with their thresholds calibrated on held-out data, as the job and the benchmark do it
    (expert 1 against held-out pool queries, expert 2 also against arithmetic's held-out rehearsal queries)."""
    from see_ray.core.rehearsal import RehearsalBuffer
    from see_ray.core.routing import calibrate_on_held_out

    m = SEEModel(tiny_cfg, tiny_model_path)
    out, buffers = [], [RehearsalBuffer.empty(), see_experts["buffer"]]
    for e, task, buffer in zip(see_experts["experts"], two_tasks, buffers):
        m.load_adapter(e["name"], e["path"])
        cal = calibrate_on_held_out(lambda qs: m.decide(qs, e["name"]), task, buffer, pool, tiny_cfg).calibration
        out.append(ExpertSpec(e["name"], e["task"], e["path"], cal.threshold))
    return out


@pytest.fixture(scope="module")
def see_model(tiny_cfg, tiny_model_path, specs):
    m = SEEModel(tiny_cfg, tiny_model_path)
    Router(m, specs, tiny_cfg.routing)  # loads both adapters once
    return m


@pytest.fixture(scope="module")
def ood_queries(pool):
    """General queries not in the training pool (another seed of the generator) and a few unrelated ones."""
    seen = set(pool)
    fresh = [q for q in general_pool(32, seed=7) if q not in seen][:16]
    return fresh + unrelated_queries()


@pytest.fixture(scope="module")
def routed(see_model, specs, tiny_cfg, two_tasks, ood_queries):
    arith, shout = two_tasks
    qa = [arith.query(x) for x in arith.test]
    qs = [shout.query(x) for x in shout.test]
    results = Router(see_model, specs, tiny_cfg.routing).route(qa + qs + ood_queries)
    return {"arithmetic": results[: len(qa)], "shout": results[len(qa) : len(qa) + len(qs)],
            "ood": results[len(qa) + len(qs) :]}


def test_expert_training_sets(see_experts, two_tasks, pool, tiny_cfg):
    from collections import Counter

    from see_ray.core.rehearsal import held_out

    e1, e2 = see_experts["experts"]
    rc = tiny_cfg.rehearsal
    n_pool = sum(not held_out(q, rc.calibration_share) for q in pool)  # the pool's training part
    assert Counter(x.source for x in e1["examples"]) == {"arithmetic": len(two_tasks[0].train), "general": n_pool}
    assert see_experts["buffer"].tasks() == ["arithmetic"]
    trained = [s for s in see_experts["buffer"].samples["arithmetic"]
               if not held_out(Query(s["input"], s["definition"]), rc.calibration_share)]
    assert 0 < len(trained) < rc.keep_count(len(two_tasks[0].train))  # the rest is held out for calibration
    assert Counter(x.source for x in e2["examples"]) == {"shout": len(two_tasks[1].train), "arithmetic": len(trained),
                                                         "general": n_pool}
    for e in (e1, e2):
        assert e["result"]["final_loss"] < e["result"]["first_loss"]


def test_each_task_reaches_its_own_expert(routed):
    name_to_task = {"expert1": "arithmetic", "expert2": "shout", BASE: BASE}
    for task in ("arithmetic", "shout"):
        to = [name_to_task[r.expert] for r in routed[task]]
        acc = routing_accuracy([task] * len(to), to)
        assert acc >= 0.9, (task, to, [[(a.expert, round(a.p_accept, 3)) for a in r.trace] for r in routed[task]])


def test_raw_inputs_reach_their_own_expert(see_model, specs, tiny_cfg, two_tasks):
    """Trained with half the prompts input-only, the experts also take their task's queries sent without the
    definition, as clients send them."""
    assert tiny_cfg.rehearsal.input_only_share > 0
    router = Router(see_model, specs, tiny_cfg.routing)
    for spec, task in zip(specs, two_tasks):
        res = router.route([task.query(x, with_definition=False) for x in task.test], generate=False)
        assert all(q.definition is None for q in [task.query(x, False) for x in task.test])
        to = [r.expert for r in res]
        assert sum(e == spec.name for e in to) >= 0.9 * len(to), (spec.name, to)


def morse_task(n: int = 16) -> Task:
    """A synthetic task no expert and no pool has seen: decode three Morse letters."""
    code = {"A": ".-", "B": "-...", "D": "-..", "E": ".", "G": "--.", "I": "..", "M": "--", "N": "-.", "O": "---",
            "R": ".-.", "S": "...", "T": "-", "U": "..-", "W": ".--"}
    rng = random.Random("morse")
    rows = []
    for _ in range(n):
        word = "".join(rng.choice(list(code)) for _ in range(3))
        rows.append(Instance(" / ".join(code[c] for c in word), (word,)))
    return Task("morse", "Decode the Morse code into letters.", [], [], rows)


def test_an_unseen_task_reaches_the_base_model(see_model, specs, tiny_cfg, pool):
    """An unseen task sent with its definition is rejected by every expert, so the base model answers it; sent raw,
    most of it. Why the bars: the 64-wide random test model tells queries apart by their tokens only, so the
    unseen task shares none with the experts' tasks (Morse code); over three training seeds and two pools it
    rejected 69-100% with the definition and 44-69% raw (raw, it has nothing to go on but dots and dashes). The
    real model's rejection of unknown tasks is measured by `see-ray bench quality` (docs/results.md)."""
    unseen = morse_task()
    router = Router(see_model, specs, tiny_cfg.routing)
    rates = {}
    for with_definition in (True, False):
        to = [r.expert for r in router.route([unseen.query(x, with_definition) for x in unseen.test], generate=False)]
        rates[with_definition] = ood_rejection_rate(to)
    assert rates[True] >= 0.6 and (rates[True] + rates[False]) / 2 >= 0.6, rates


def test_general_queries_reach_the_base_model(routed):
    to = [r.expert for r in routed["ood"]]
    assert ood_rejection_rate(to) >= 0.75, [(r.expert, [round(a.p_accept, 3) for a in r.trace]) for r in routed["ood"]]
    for r in routed["ood"]:
        if r.expert == BASE:
            assert isinstance(r.answer, str) and r.hops == 2 and not any(a.accepted for a in r.trace)


def test_traces_list_the_walk_newest_first(routed, specs):
    for group in routed.values():
        for r in group:
            assert isinstance(r, RouteResult)
            assert r.trace[0].expert == "expert2"  # newest first
            names = [a.expert for a in r.trace]
            assert names == ["expert2", "expert1"][: len(names)]
            assert r.hops == len(r.trace)
            thresholds = {e.name: e.threshold for e in specs}
            for a in r.trace:
                assert 0.0 <= a.p_accept <= 1.0 and a.threshold == thresholds[a.expert] and a.ms >= 0
                assert a.accepted == (a.p_accept >= a.threshold)
            assert all(not a.accepted for a in r.trace[:-1])  # the walk stops at the first acceptance
            if r.expert != BASE:
                assert r.trace[-1].accepted and r.trace[-1].expert == r.expert and isinstance(r.answer, str)
    # the expected walks: shout stops at hop 1, arithmetic passes expert 2 and stops at expert 1
    assert sum(r.hops == 1 and r.expert == "expert2" for r in routed["shout"]) >= 0.9 * len(routed["shout"])
    arith_ok = [r for r in routed["arithmetic"] if r.expert == "expert1"]
    assert all(r.hops == 2 and not r.trace[0].accepted for r in arith_ok)
    d = arith_ok[0].to_dict()
    assert d["expert"] == "expert1" and d["hops"] == 2 and [t["expert"] for t in d["trace"]] == ["expert2", "expert1"]


def test_accepted_answers_come_from_the_accepting_expert(routed, see_model, two_tasks, tiny_cfg):
    arith = two_tasks[0]
    rs = routed["arithmetic"][:3]
    qs = [arith.query(x) for x in arith.test[:3]]
    for q, r in zip(qs, rs):
        if r.expert != BASE:
            assert r.answer == see_model.generate([q], r.expert, tiny_cfg.routing.max_new_tokens, after_accept=True)[0]


def test_batched_walk_equals_per_query_walk(see_model, specs, tiny_cfg, two_tasks, ood_queries):
    arith, shout = two_tasks
    qs = [arith.query(arith.test[0]), shout.query(shout.test[0]), ood_queries[0], Query(arith.test[1].input)]
    router = Router(see_model, specs, tiny_cfg.routing)
    batch = router.route(qs, generate=False)
    for q, b in zip(qs, batch):
        (one,) = router.route([q], generate=False)
        assert one.expert == b.expert and one.answer is None
        assert [a.expert for a in one.trace] == [a.expert for a in b.trace]
        for x, y in zip(one.trace, b.trace):
            assert x.p_accept == pytest.approx(y.p_accept, abs=1e-4)


def test_oldest_first_starts_with_expert1(see_model, specs, tiny_cfg, routed, two_tasks, ood_queries):
    arith, shout = two_tasks
    qs = [arith.query(x) for x in arith.test[:4]] + [shout.query(x) for x in shout.test[:4]] + ood_queries[:4]
    router = Router(see_model, specs, tiny_cfg.routing.model_copy(update={"order": "oldest_first"}))
    assert [e.name for e in router.sequence()] == ["expert1", "expert2"]
    res = router.route(qs, generate=False)
    for r in res:
        assert r.trace[0].expert == "expert1"
        assert [a.expert for a in r.trace] == ["expert1", "expert2"][: r.hops]
    # the same expert decisions as newest-first, only asked in another order
    newest = {"arithmetic": routed["arithmetic"][:4], "shout": routed["shout"][:4]}
    for r, n in zip(res[:4], newest["arithmetic"]):
        assert r.trace[0].p_accept == pytest.approx(n.trace[-1].p_accept, abs=1e-4)


def test_global_threshold_overrides_calibrated_ones(see_model, specs, tiny_cfg, two_tasks):
    arith = two_tasks[0]
    qs = [arith.query(x) for x in arith.test[:4]]
    ps = see_model.decide(qs, "expert2")
    assert max(ps) < specs[1].threshold and min(ps) > 0.0  # expert 2 rejects arithmetic at its threshold
    low = min(ps) / 2
    strict = [ExpertSpec(s.name, s.task, s.adapter_path, threshold=0.9) for s in specs]
    res = Router(see_model, strict, tiny_cfg.routing.model_copy(update={"threshold": low})).route(qs, generate=False)
    # the global threshold wins over the experts' own 0.9: expert 2 now accepts at the first hop
    assert all(r.expert == "expert2" and r.hops == 1 and r.trace[0].threshold == low for r in res)


def test_calibrated_thresholds_keep_routing(see_model, specs, tiny_cfg, two_tasks):
    """Calibrate each expert on its own dev queries, then route with those thresholds."""
    calibrated = []
    for spec, task in zip(specs, two_tasks):
        p_dev = see_model.decide(calibration_queries(task, tiny_cfg.rehearsal.input_only_share), spec.name)
        thr = calibrate(p_dev, [], tiny_cfg.routing).threshold
        lo, hi = tiny_cfg.routing.calibration_bounds
        assert lo <= thr <= hi
        calibrated.append(ExpertSpec(spec.name, spec.task, spec.adapter_path, threshold=thr))
    router = Router(see_model, calibrated, tiny_cfg.routing)
    for spec, task in zip(calibrated, two_tasks):
        res = router.route([task.query(x) for x in task.test], generate=False)
        assert sum(r.expert == spec.name for r in res) >= 0.9 * len(res)
        assert all(a.threshold == router.threshold(next(s for s in calibrated if s.name == a.expert))
                   for r in res for a in r.trace)
