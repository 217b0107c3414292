"""The built-in general pool (``see_ray.tools.builtin``): the instruction pool's size, families, both query forms,
determinism and subsets; nothing in it looks like a demo task or a benchmark input; the default pool and the demo's
unrelated queries. No model."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from support import SHARED

from see_ray.tools.builtin import (
    INSTRUCTION_FAMILIES,
    POOL_PER_FAMILY,
    builtin_pool,
    default_pool,
    general_pool,
    instruction_pool,
    instruction_pool_labelled,
    unrelated_queries,
)

DATASETS = [SHARED / "data" / "superni-cl", SHARED / "data" / "superni-pool"]


@pytest.fixture(scope="module")
def labelled():
    return instruction_pool_labelled()


@pytest.fixture(scope="module")
def whole(labelled):
    return [q for _, q in labelled]


def test_whole_pool_has_at_least_360_distinct_queries_and_inputs(whole):
    assert len(whole) >= 360
    assert len(set(whole)) == len(whole)
    assert len({q.input for q in whole}) == len(whole)  # so no (input, definition) pair twice either
    assert all(q.input.strip() for q in whole)


def test_at_least_36_families_of_the_required_types(labelled):
    names = [f.name for f in INSTRUCTION_FAMILIES]
    assert len(names) >= 36 and len(set(names)) == len(names)
    assert len({f.definition for f in INSTRUCTION_FAMILIES}) == len(names)
    assert {f.group for f in INSTRUCTION_FAMILIES} == {
        "qa", "math", "code", "translation", "extraction", "classification", "rewriting", "dialogue",
        "summarisation", "formatting", "word_games", "reasoning", "generation"}
    assert Counter(name for name, _ in labelled) == {n: POOL_PER_FAMILY for n in names}


def test_every_family_appears_with_and_without_its_definition_half_and_half(labelled):
    definition = {f.name: f.definition for f in INSTRUCTION_FAMILIES}
    for fam in INSTRUCTION_FAMILIES:
        qs = [q for name, q in labelled if name == fam.name]
        with_def = [q for q in qs if q.definition is not None]
        assert all(q.definition == definition[fam.name] for q in with_def)
        assert len(with_def) == len(qs) - len(with_def) == POOL_PER_FAMILY // 2, fam.name
    assert sum(q.definition is None for _, q in labelled) == len(labelled) // 2


def test_pool_is_deterministic_for_a_seed_and_differs_across_seeds(whole):
    assert instruction_pool(seed=0) == whole
    other = instruction_pool(seed=1)
    assert len(other) == len(whole) and other != whole
    assert len({q.input for q in other} & {q.input for q in whole}) < len(whole) // 2


def test_n_gives_a_prefix_that_covers_the_families_round_robin(whole):
    n_fam = len(INSTRUCTION_FAMILIES)
    for k in (1, n_fam, n_fam + 7, 2 * n_fam + 3, len(whole)):
        labelled_k = instruction_pool_labelled(k)
        assert [q for _, q in labelled_k] == instruction_pool(k) == whole[:k]
        counts = Counter(name for name, _ in labelled_k)
        assert len(counts) == min(k, n_fam)
        assert max(counts.values()) - min(counts.values()) <= 1
    assert len({name for name, _ in instruction_pool_labelled(n_fam)}) == n_fam
    more = instruction_pool(len(whole) + 40)  # beyond the whole pool: more rounds, same prefix, still distinct
    assert len(more) == len(whole) + 40 and more[: len(whole)] == whole and len(set(more)) == len(more)


# The demo's tasks: "17 + 25" -> "42", "apple river stone" -> "APPLE RIVER STONE", "Opposite of: hot" -> "cold".
ADDITION = re.compile(r"\d\s*\+\s*\d")
SHOUT_SHAPE = re.compile(r"^[a-z]+( [a-z]+)+$")  # lowercase words only, as the shout task's inputs
DEMO_WORDS = ("opposite", "antonym", "capital letter", "uppercase", "upper case", "all caps", "shout")
SENTIMENT_WORDS = ("sentiment", "emotion", "polarity", "positive", "negative", "feeling", "mood")


def test_no_query_looks_like_a_demo_task_or_a_sentiment_task(whole):
    for q in whole:
        text = f"{q.input}\n{q.definition or ''}".lower()
        assert not ADDITION.search(q.input), q
        assert not SHOUT_SHAPE.match(q.input), q
        assert not any(w in text for w in DEMO_WORDS), q
    for fam in INSTRUCTION_FAMILIES:
        text = f"{fam.name} {fam.definition}".lower()
        assert not any(w in text for w in SENTIMENT_WORDS + DEMO_WORDS), fam.name


def test_default_pool_is_64_chat_requests_and_the_whole_instruction_pool(whole):
    pool = default_pool()
    assert pool == general_pool(n=64) + whole
    assert default_pool(seed=3) == general_pool(n=64, seed=3) + instruction_pool(seed=3)
    assert builtin_pool("default", per_task=5) == pool


def test_builtin_pool_kinds():
    assert builtin_pool("builtin", 6) == general_pool(n=12)
    mixed = builtin_pool("builtin-instructions", 6)
    assert len(mixed) == 12 and mixed[:6] == general_pool(n=6)
    with pytest.raises(ValueError, match="'default'"):
        builtin_pool("nope", 6)


def test_unrelated_queries_are_not_in_the_default_pool_and_not_demo_tasks():
    queries = unrelated_queries()
    assert len(queries) == 7 and all(q.definition is None for q in queries)
    pool_inputs = {q.input for q in default_pool()}
    for q in queries:
        assert q.input not in pool_inputs, q
        assert not ADDITION.search(q.input) and not SHOUT_SHAPE.match(q.input), q
        assert not any(w in q.input.lower() for w in DEMO_WORDS), q


def _dataset_inputs(folder) -> set[str]:
    """Every instance input (and example input) of the JSON and JSONL files under ``folder``."""
    docs = []
    for f in sorted(folder.rglob("*.json")):
        docs.append(json.loads(f.read_text(encoding="utf-8")))
    for f in sorted(folder.rglob("*.jsonl")):
        docs += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    inputs = set()
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        if isinstance(doc.get("input"), str):
            inputs.add(doc["input"].strip())
        for key in ("Instances", "Positive Examples", "Negative Examples"):
            inputs |= {x["input"].strip() for x in doc.get(key, []) if isinstance(x, dict) and "input" in x}
    return inputs


@pytest.mark.skipif(not any(d.is_dir() for d in DATASETS), reason=f"no SuperNI data under {SHARED / 'data'}")
def test_no_pool_input_is_an_input_of_the_superni_data(whole):
    inputs = set().union(*(_dataset_inputs(d) for d in DATASETS if d.is_dir()))
    assert inputs  # the files were read
    assert not [q.input for q in whole if q.input.strip() in inputs]
    assert not [q.input for q in unrelated_queries() if q.input.strip() in inputs]


def test_the_add_expert_job_defaults_to_the_builtin_pool(tmp_path):
    """`jobs/add_expert.py` without --general-pool trains against the default pool; with it, against the file."""
    import json

    from see_ray.training.add_expert import load_general_pool

    assert load_general_pool(None) == default_pool()
    f = tmp_path / "pool.jsonl"
    f.write_text(json.dumps({"input": "hello there"}) + "\n")
    assert [q.input for q in load_general_pool(str(f))] == ["hello there"]
