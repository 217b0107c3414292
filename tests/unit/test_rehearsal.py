"""Task reconstruction, the rehearsal buffer and the plain-SFT baselines' training sets."""

from __future__ import annotations

from collections import Counter

import pytest

from see_ray.config import RehearsalConfig
from see_ray.core.data import Instance, Task
from see_ray.tools.builtin import antonyms_task
from see_ray.core.prompts import Query
from see_ray.core.rehearsal import (
    Example,
    RehearsalBuffer,
    calibration_negatives,
    general_pool_from_tasks,
    held_out,
    plain_sft,
    reconstruct,
)


def cfg(**kw) -> RehearsalConfig:
    """Reconstruction without held-out negatives or pool sampling unless a test asks for them."""
    base = {"per_task_min": 10, "input_only_share": 0.0, "calibration_share": 0.0, "general_pool_size": None}
    base.update(kw)
    return RehearsalConfig(**base)


@pytest.fixture(scope="module")
def arith(two_tasks):
    return two_tasks[0]


@pytest.fixture(scope="module")
def shout(two_tasks):
    return two_tasks[1]


@pytest.fixture(scope="module")
def antonyms():
    return antonyms_task(n=40, n_dev=4, n_test=4)


@pytest.fixture
def buffer(arith, shout):
    b = RehearsalBuffer.empty()
    b.add_task(arith, cfg())
    b.add_task(shout, cfg())
    return b


# -- reconstruct ----------------------------------------------------------------------------------------
def test_first_task_positives_and_general_negatives(arith, pool):
    ex = reconstruct(arith, RehearsalBuffer.empty(), pool, cfg())
    pos = [e for e in ex if e.indicator == "accept"]
    neg = [e for e in ex if e.indicator == "reject"]
    assert len(pos) == len(arith.train) and len(neg) == len(pool) and len(ex) == len(pos) + len(neg)
    # every training instance is a positive, with its answer and its definition
    assert Counter((e.query, e.answer) for e in pos) == Counter(
        (Query(x.input, arith.definition), x.outputs[0]) for x in arith.train
    )
    assert all(e.source == "arithmetic" for e in pos)
    assert all(e.answer is None and e.source == "general" for e in neg)
    assert Counter(e.query for e in neg) == Counter(pool)


def test_rehearsal_negatives_come_from_other_tasks(antonyms, buffer, pool):
    ex = reconstruct(antonyms, buffer, pool, cfg())
    neg = [e for e in ex if e.indicator == "reject"]
    by_source = Counter(e.source for e in neg)
    assert by_source == {"arithmetic": 10, "shout": 10, "general": len(pool)}
    for name in ("arithmetic", "shout"):
        want = Counter(Query(s["input"], s["definition"]) for s in buffer.samples[name])
        assert Counter(e.query for e in neg if e.source == name) == want
    assert all(e.answer is None for e in neg)
    assert Counter(e.indicator for e in ex)["accept"] == len(antonyms.train)


def test_own_rehearsal_samples_are_never_negatives(shout, buffer, pool):
    ex = reconstruct(shout, buffer, pool, cfg())  # the buffer already holds shout's own samples
    neg_sources = {e.source for e in ex if e.indicator == "reject"}
    assert "shout" not in neg_sources and neg_sources == {"arithmetic", "general"}
    own_inputs = {s["input"] for s in buffer.samples["shout"]}
    assert not any(e.query.input in own_inputs for e in ex if e.indicator == "reject")


def test_exclude_drops_named_tasks(antonyms, buffer, pool):
    ex = reconstruct(antonyms, buffer, pool, cfg(), exclude={"arithmetic"})
    assert {e.source for e in ex if e.indicator == "reject"} == {"shout", "general"}


def test_negatives_per_task_and_general_pool_caps(antonyms, buffer, pool):
    ex = reconstruct(antonyms, buffer, pool, cfg(negatives_per_task=3, general_pool_size=5))
    assert Counter(e.source for e in ex if e.indicator == "reject") == {"arithmetic": 3, "shout": 3, "general": 5}
    assert len({e.query for e in ex if e.source == "general"}) <= 5
    # caps larger than what exists keep everything; 0 keeps nothing
    big = reconstruct(antonyms, buffer, pool, cfg(negatives_per_task=1000, general_pool_size=1000))
    assert Counter(e.source for e in big if e.indicator == "reject") == {"arithmetic": 10, "shout": 10, "general": len(pool)}
    none = reconstruct(antonyms, buffer, pool, cfg(negatives_per_task=0, general_pool_size=0))
    assert all(e.indicator == "accept" for e in none)


def test_held_out_negatives_are_never_trained_on_and_feed_calibration(antonyms, buffer, pool):
    c = cfg(calibration_share=0.3)
    ex = reconstruct(antonyms, buffer, pool, c)
    held = calibration_negatives(buffer, pool, c, exclude={antonyms.name})
    trained = {e.query for e in ex if e.indicator == "reject"}
    all_negatives = [Query(s["input"], s["definition"]) for t in ("arithmetic", "shout") for s in buffer.samples[t]]
    all_negatives += pool
    held_set = {q for qs in held.values() for q in qs}
    # every negative is either trained on or held out, never both
    assert trained.isdisjoint(held_set) and trained | held_set == set(all_negatives)
    assert 0 < len(held_set) < len(all_negatives)
    assert set(held) <= {"arithmetic", "shout", "general"} and "general" in held
    # the choice depends on the text only: the same for every expert and every seed
    assert held == calibration_negatives(buffer, pool, c.model_copy(update={"seed": 5}), exclude={antonyms.name})
    assert all(held_out(q, 0.3) for q in held_set) and not any(held_out(q, 0.0) for q in all_negatives)
    # tasks named in exclude give no calibration negatives
    assert "shout" not in calibration_negatives(buffer, pool, c, exclude={"shout"})


def test_input_only_share(antonyms, buffer, pool):
    keep = reconstruct(antonyms, buffer, pool, cfg(input_only_share=0.0))
    defs_pool = [q for q in pool if q.definition]
    assert all(e.query.definition for e in keep if e.source != "general")
    assert sum(1 for e in keep if e.source == "general" and e.query.definition) == len(defs_pool)
    strip = reconstruct(antonyms, buffer, pool, cfg(input_only_share=1.0))
    assert all(e.query.definition is None for e in strip)
    assert Counter(e.query.input for e in strip) == Counter(e.query.input for e in keep)  # same data, no defs
    half = reconstruct(antonyms, buffer, pool, cfg(input_only_share=0.5))
    stripped = sum(1 for e in half if e.source != "general" and e.query.definition is None)
    n = sum(1 for e in half if e.source != "general")
    assert 0.3 * n < stripped < 0.7 * n


def test_reconstruct_is_deterministic(antonyms, buffer, pool):
    c = cfg(input_only_share=0.5, negatives_per_task=4, general_pool_size=7)
    a = reconstruct(antonyms, buffer, pool, c)
    assert a == reconstruct(antonyms, buffer, pool, c)
    b = reconstruct(antonyms, buffer, pool, c.model_copy(update={"seed": 1}))
    assert a != b


def test_reconstruct_shuffles(arith, pool):
    ex = reconstruct(arith, RehearsalBuffer.empty(), pool, cfg())
    first = [e.indicator for e in ex[: len(arith.train)]]
    assert "reject" in first  # not all positives first


def test_example_dict_round_trip(antonyms, buffer, pool):
    for e in reconstruct(antonyms, buffer, pool, cfg(input_only_share=0.5))[:20]:
        assert Example.from_dict(e.to_dict()) == e


# -- the buffer -------------------------------------------------------------------------------------------
def test_add_task_size_follows_keep_count(arith):
    for c in (cfg(), cfg(per_task_min=0, per_task_fraction=0.25), cfg(per_task_max=3), cfg(per_task_min=500)):
        b = RehearsalBuffer.empty()
        kept = b.add_task(arith, c)
        assert len(kept) == c.keep_count(len(arith.train)) == len(b.samples["arithmetic"])
    assert len(kept) == len(arith.train)  # min 500 > 80: the whole task, never more


def test_add_task_samples_are_training_instances(arith):
    b = RehearsalBuffer.empty()
    kept = b.add_task(arith, cfg())
    train = {(x.input, x.outputs[0]) for x in arith.train}
    assert all((s["input"], s["output"]) in train for s in kept)
    assert all(s["definition"] == arith.definition for s in kept)
    # seeded: the same samples every time, others for another seed
    assert RehearsalBuffer.empty().add_task(arith, cfg()) == kept
    assert RehearsalBuffer.empty().add_task(arith, cfg(seed=3)) != kept


def test_add_task_replaces_and_remove(arith, shout):
    b = RehearsalBuffer.empty()
    b.add_task(arith, cfg())
    b.add_task(shout, cfg())
    b.add_task(arith, cfg(per_task_min=4))
    assert b.tasks() == ["arithmetic", "shout"] and len(b.samples["arithmetic"]) == 4
    b.remove_task("arithmetic")
    b.remove_task("never-there")
    assert b.tasks() == ["shout"]


def test_buffer_json_round_trip(buffer):
    text = buffer.to_json()
    again = RehearsalBuffer.from_json(text)
    assert again == buffer and again.samples == buffer.samples
    assert again.tasks() == ["arithmetic", "shout"]
    assert RehearsalBuffer.from_json(RehearsalBuffer.empty().to_json()).tasks() == []


def test_buffer_json_keeps_unicode():
    t = Task("u", "Übersetze.", [Instance("café ☕", ("kaffee",))])
    b = RehearsalBuffer.empty()
    b.add_task(t, cfg())
    assert "café ☕" in b.to_json()
    assert RehearsalBuffer.from_json(b.to_json()).samples["u"][0]["input"] == "café ☕"


# -- baselines --------------------------------------------------------------------------------------------
def test_plain_sft_without_buffer(arith):
    ex = plain_sft(arith, cfg())
    assert len(ex) == len(arith.train)
    assert all(e.indicator is None and e.source == "arithmetic" for e in ex)
    assert Counter((e.query.input, e.answer) for e in ex) == Counter((x.input, x.outputs[0]) for x in arith.train)


def test_plain_sft_replay_mixes_answers_of_earlier_tasks(antonyms, buffer):
    ex = plain_sft(antonyms, cfg(), buffer)
    by_source = Counter(e.source for e in ex)
    assert by_source == {"antonyms": len(antonyms.train), "arithmetic": 10, "shout": 10}
    assert all(e.indicator is None and e.answer for e in ex)  # rehearsal comes with its answers
    for name in ("arithmetic", "shout"):
        want = Counter((s["input"], s["output"]) for s in buffer.samples[name])
        assert Counter((e.query.input, e.answer) for e in ex if e.source == name) == want
    # the task's own samples in the buffer are not mixed in twice
    own = plain_sft(antonyms, cfg(), _with_own(buffer, antonyms))
    assert Counter(e.source for e in own)["antonyms"] == len(antonyms.train)
    assert plain_sft(antonyms, cfg(), buffer) == ex  # deterministic


def _with_own(buffer: RehearsalBuffer, task: Task) -> RehearsalBuffer:
    b = RehearsalBuffer.from_json(buffer.to_json())
    b.add_task(task, cfg())
    return b


def test_general_pool_from_tasks(arith, shout):
    p = general_pool_from_tasks([arith, shout], per_task=5)
    assert len(p) == 10
    assert p[0] == Query(arith.train[0].input, arith.definition) and p[5].definition == shout.definition
    assert len(general_pool_from_tasks([arith])) == len(arith.train)
