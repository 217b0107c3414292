"""Task loading: SuperNI folders, JSONL folders and files, carving of dev/test, and errors naming the file."""

from __future__ import annotations

import json
import logging

import pytest

from see_ray.core.data import Instance, Task, TaskDataError, load_benchmark, load_query_pool, load_task, load_tasks
from see_ray.core.prompts import Query

from support import SUPERNI, superni_file
from support import SUPERNI_DEFINITION as DEF


def jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# -- accepted layouts -----------------------------------------------------------------------------------
def superni_folder(d, n_train: int, n_dev: int, n_test: int):
    """A SuperNI task folder with all three splits (instances numbered apart per split)."""
    d.mkdir()
    superni_file(d / "train.json", n_train)
    superni_file(d / "dev.json", n_dev, start=100)
    superni_file(d / "test.json", n_test, start=200)
    return d


def test_superni_folder(tmp_path):
    d = superni_folder(tmp_path / "task001_add", 8, 3, 2)
    t = load_task(d)
    assert t.name == "task001_add"
    assert t.definition == DEF
    assert (len(t.train), len(t.dev), len(t.test)) == (8, 3, 2)
    assert t.train[0] == Instance("0 + 1", ("1", "1."), "t-0")  # all references kept, first is the target
    assert t.dev[0].input == "100 + 1" and t.test[-1].input == "201 + 1"
    assert t.query(t.train[0]) == Query("0 + 1", DEF)
    assert t.query(t.train[0], with_definition=False) == Query("0 + 1", None)


def test_superni_definition_list_is_joined(tmp_path):
    p = tmp_path / "t.json"
    doc = {"Definition": ["Part one.", "Part two."], "Instances": [{"input": "a", "output": "b"}] * 3}
    p.write_text(json.dumps(doc))
    assert load_task(p).definition == "Part one. Part two."


def test_jsonl_folder_with_definition_txt(tmp_path):
    d = tmp_path / "shout"
    d.mkdir()
    (d / "definition.txt").write_text("Shout it.\n")
    jsonl(d / "train.jsonl", [{"input": f"w{i}", "output": f"W{i}"} for i in range(6)])
    jsonl(d / "dev.jsonl", [{"input": "dv", "output": ["DV", "Dv"]}])
    jsonl(d / "test.jsonl", [{"id": 7, "input": "ts", "output": "TS"}])
    t = load_task(d)
    assert t.name == "shout" and t.definition == "Shout it."
    assert [x.input for x in t.train] == [f"w{i}" for i in range(6)]
    assert t.dev == [Instance("dv", ("DV", "Dv"))]
    assert t.test == [Instance("ts", ("TS",), "7")]  # ids are kept as strings


def test_jsonl_blank_lines_are_skipped(tmp_path):
    p = jsonl(tmp_path / "t.jsonl", [{"input": "a", "output": "b"}, "", "   ", {"input": "c", "output": "d"}])
    t = load_task(p, definition="D", dev_fraction=0, test_fraction=0)
    assert len(t.train) + len(t.dev) + len(t.test) == 2


def test_single_jsonl_file_with_definition_argument(tmp_path):
    p = jsonl(tmp_path / "my-task.jsonl", [{"input": f"q{i}", "output": f"a{i}"} for i in range(20)])
    t = load_task(p, definition="  Answer it.  ")
    assert t.name == "my-task"  # the file stem
    assert t.definition == "Answer it."
    t2 = load_task(p, name="renamed", definition="x")
    assert t2.name == "renamed"


def test_definition_argument_wins_over_file(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    superni_file(d / "train.json", 4)
    assert load_task(d, definition="Override.").definition == "Override."


def test_dev_and_test_are_carved_when_absent(tmp_path):
    p = jsonl(tmp_path / "t.jsonl", [{"input": f"q{i}", "output": f"a{i}"} for i in range(50)])
    t = load_task(p, definition="D", dev_fraction=0.1, test_fraction=0.2)
    assert (len(t.dev), len(t.test)) == (5, 9)  # 10% of 50; then 20% of the 45 left
    assert len(t.train) == 36
    inputs = [x.input for x in t.train + t.dev + t.test]
    assert sorted(inputs) == sorted(f"q{i}" for i in range(50))  # a partition: nothing lost or duplicated
    # deterministic for a seed, different for another
    again = load_task(p, definition="D", dev_fraction=0.1, test_fraction=0.2)
    assert again.dev == t.dev and again.test == t.test and again.train == t.train
    other = load_task(p, definition="D", dev_fraction=0.1, test_fraction=0.2, seed=1)
    assert other.dev != t.dev


def test_carving_keeps_one_training_instance(tmp_path):
    p = jsonl(tmp_path / "t.jsonl", [{"input": "q1", "output": "a"}, {"input": "q2", "output": "b"}])
    t = load_task(p, definition="D")
    assert len(t.train) == 1 and len(t.dev) == 1 and t.test == []
    one = load_task(jsonl(tmp_path / "one.jsonl", [{"input": "q", "output": "a"}]), definition="D")
    assert len(one.train) == 1 and one.dev == [] and one.test == []


def test_only_missing_splits_are_carved(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    superni_file(d / "train.json", 20)
    superni_file(d / "test.json", 4, start=100)
    t = load_task(d)
    assert len(t.test) == 4 and len(t.dev) == 2 and len(t.train) == 18


def test_superni_instance_with_empty_answer_is_skipped(tmp_path, caplog):
    p = superni_file(tmp_path / "t.json", 5, extra=[{"id": "e", "input": "x", "output": [""]}])
    with caplog.at_level(logging.WARNING, logger="see_ray.core.data"):
        t = load_task(p, dev_fraction=0, test_fraction=0)
    assert len(t.train) + len(t.dev) + len(t.test) == 5
    assert "skipped 1" in caplog.text and str(p) in caplog.text


def test_subsample_takes_the_first_k(tmp_path):
    d = superni_folder(tmp_path / "t", 10, 5, 5)
    s = load_task(d).subsample(train=3, test=2)
    assert [x.input for x in s.train] == ["0 + 1", "1 + 1", "2 + 1"]
    assert len(s.dev) == 5 and [x.input for x in s.test] == ["200 + 1", "201 + 1"]


# -- errors ---------------------------------------------------------------------------------------------
def err(path, **kw) -> str:
    with pytest.raises(TaskDataError) as ei:
        load_task(path, **kw)
    return str(ei.value)


def test_missing_folder(tmp_path):
    msg = err(tmp_path / "nope")
    assert str(tmp_path / "nope") in msg and "no such file" in msg


def test_folder_without_train_split(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    superni_file(d / "dev.json", 2)
    msg = err(d)
    assert str(d) in msg and "train.json" in msg


def test_both_json_and_jsonl(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    superni_file(d / "train.json", 2)
    jsonl(d / "train.jsonl", [{"input": "a", "output": "b"}])
    assert "keep one" in err(d)


def test_unsupported_file_type(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("a,b\n")
    msg = err(p, definition="D")
    assert str(p) in msg and ".csv" in msg


def test_malformed_json(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "train.json").write_text('{"Definition": ["x"], "Instances": [')
    msg = err(d)
    assert str(d / "train.json") in msg and "not valid JSON" in msg


def test_superni_structure_errors(tmp_path):
    p = tmp_path / "t.json"
    p.write_text("[1, 2]")
    assert "SuperNI task object" in err(p)
    p.write_text(json.dumps({"Definition": ["x"]}))
    assert "'Instances'" in err(p)
    p.write_text(json.dumps({"Definition": ["x"], "Instances": {"a": 1}}))
    assert "must be a list" in err(p)


def test_jsonl_bad_line_names_the_line(tmp_path):
    p = jsonl(tmp_path / "t.jsonl", [{"input": "a", "output": "b"}, {"input": "c", "output": "d"}, "{oops"])
    msg = err(p, definition="D")
    assert f"{p}:3" in msg and "not valid JSON" in msg


def test_jsonl_unknown_field(tmp_path):
    p = jsonl(tmp_path / "t.jsonl", [{"input": "a", "output": "b"}, {"input": "c", "ouput": "d"}])
    msg = err(p, definition="D")
    assert f"{p}:2" in msg and "unknown field" in msg and "ouput" in msg


def test_jsonl_non_object_line(tmp_path):
    p = jsonl(tmp_path / "t.jsonl", ['"just a string"'])
    assert f"{p}:1" in err(p, definition="D")


def test_instance_without_output(tmp_path):
    p = superni_file(tmp_path / "t.json", 3, extra=[{"id": "x", "input": "q"}])
    msg = err(p)
    assert str(p) in msg and "Instances[3]" in msg and "missing field 'output'" in msg
    q = jsonl(tmp_path / "t.jsonl", [{"input": "q"}])
    assert f"{q}:1" in err(q, definition="D")


def test_instance_without_input(tmp_path):
    p = jsonl(tmp_path / "t.jsonl", [{"output": "a"}])
    assert "missing field 'input'" in err(p, definition="D")
    p2 = jsonl(tmp_path / "t2.jsonl", [{"input": "  ", "output": "a"}])
    assert "non-empty string" in err(p2, definition="D")


@pytest.mark.parametrize("output, problem", [("", "is empty"), ([], "non-empty list"), ([1], "list of strings")])
def test_empty_or_bad_output(tmp_path, output, problem):
    p = jsonl(tmp_path / "t.jsonl", [{"input": "a", "output": "b"}, {"input": "q", "output": output}])
    msg = err(p, definition="D")
    assert f"{p}:2" in msg and problem in msg


def test_empty_task(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n\n")
    msg = err(p, definition="D")
    assert str(p) in msg and "empty" in msg
    s = superni_file(tmp_path / "s.json", 0)
    assert "empty" in err(s)


def test_missing_definition(tmp_path):
    p = jsonl(tmp_path / "t.jsonl", [{"input": "a", "output": "b"}])
    msg = err(p)
    assert str(p) in msg and "definition" in msg
    d = tmp_path / "d"
    d.mkdir()
    jsonl(d / "train.jsonl", [{"input": "a", "output": "b"}])
    (d / "definition.txt").write_text("   \n")
    assert "definition" in err(d)
    s = superni_file(tmp_path / "s.json", 2, definition="   ")
    assert "'Definition'" in err(s)


def test_duplicate_task_names(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    pa = superni_file(a / "same.json", 3)
    pb = superni_file(b / "same.json", 3)
    with pytest.raises(TaskDataError) as ei:
        load_tasks([pa, pb])
    msg = str(ei.value)
    assert "'same'" in msg and str(pa) in msg and str(pb) in msg
    assert [t.name for t in load_tasks([pa], name=None)] == ["same"]


@pytest.mark.parametrize("bad", ["../x", "a/b", "x;rm -rf", "$(id)", "a b", "-lead", "é", "x" * 65])
def test_invalid_task_name(tmp_path, bad):
    p = superni_file(tmp_path / "t.json", 3)
    msg = err(p, name=bad)
    assert str(p) in msg and "task name" in msg and "invalid" in msg


def test_invalid_name_from_folder(tmp_path):
    d = tmp_path / "bad;name"
    d.mkdir()
    superni_file(d / "train.json", 3)
    msg = err(d)
    assert "bad;name" in msg and "invalid" in msg


def test_load_benchmark_errors(tmp_path):
    with pytest.raises(TaskDataError, match="benchmark folder not found"):
        load_benchmark(tmp_path / "nope")
    (tmp_path / "b" / "t1").mkdir(parents=True)
    superni_file(tmp_path / "b" / "t1" / "train.json", 3)
    with pytest.raises(TaskDataError, match="unknown task"):
        load_benchmark(tmp_path / "b", names=["t2"])
    # without order.txt: sorted folder names
    (tmp_path / "b" / "t0").mkdir()
    superni_file(tmp_path / "b" / "t0" / "train.json", 3)
    assert [t.name for t in load_benchmark(tmp_path / "b")] == ["t0", "t1"]
    (tmp_path / "b" / "order.txt").write_text("t1\n\nt0\n")
    assert [t.name for t in load_benchmark(tmp_path / "b")] == ["t1", "t0"]
    assert [t.name for t in load_benchmark(tmp_path / "b", names=["t0"])] == ["t0"]


# -- the shipped SuperNI-CL benchmark ----------------------------------------------------------------------
# Split sizes from the benchmark's README. task511's train.json holds 1000 instances, six with an empty
# answer (skipped with a warning), so 994 remain.
README_SIZES = {
    "task1572_samsum_summary": (160, 20, 20),
    "task363_sst2_polarity_classification": (1000, 100, 100),
    "task1290_xsum_summarization": (1000, 100, 100),
    "task181_outcome_extraction": (338, 43, 43),
    "task1510_evalution_relation_extraction": (1000, 100, 100),
    "task073_commonsenseqa_answer_generation": (975, 100, 100),
    "task511_reddit_tifu_long_text_summarization": (994, 100, 100),
    "task591_sciq_answer_generation": (1000, 100, 100),
    "task1687_sentiment140_classification": (1000, 100, 100),
    "task875_emotion_classification": (1000, 100, 100),
}


@pytest.mark.skipif(not SUPERNI.is_dir(), reason=f"SuperNI-CL data not present at {SUPERNI}")
def test_load_superni_benchmark():
    tasks = load_benchmark(SUPERNI)
    order = [ln.strip() for ln in (SUPERNI / "order.txt").read_text().splitlines() if ln.strip()]
    assert len(tasks) == 10
    assert [t.name for t in tasks] == order == list(README_SIZES)
    for t in tasks:
        assert isinstance(t, Task)
        assert (len(t.train), len(t.dev), len(t.test)) == README_SIZES[t.name], t.name
        assert t.definition.strip()
        assert all(x.outputs[0].strip() for x in t.train + t.dev + t.test)
    sst2 = tasks[1]
    assert set(x.outputs[0] for x in sst2.test) <= {"POS", "NEG"}
    sub = load_benchmark(SUPERNI, names=["task875_emotion_classification"])
    assert [t.name for t in sub] == ["task875_emotion_classification"]


# -- general query pools (add_expert --general-pool) -------------------------------------------------------
def test_query_pool_reads_objects_and_bare_strings(tmp_path):
    f = tmp_path / "pool.jsonl"
    f.write_text('{"input": "What is 2+2?", "definition": "Answer."}\n\n"Tell me a joke."\n')
    assert load_query_pool(f) == [Query("What is 2+2?", "Answer."), Query("Tell me a joke.", None)]


@pytest.mark.parametrize("text, error", [
    ('{"input": "ok"}\nnot json\n', r"pool.jsonl:2: not valid JSON"),
    ('{"inputs": "typo"}\n', r"pool.jsonl:1: expected \{'input'"),
    ('{"input": "ok", "definition": 3}\n', r"pool.jsonl:1: 'definition' must be a string"),
    ("\n\n", r"pool.jsonl: the general pool is empty"),
])
def test_query_pool_errors_name_file_line_and_field(tmp_path, text, error):
    f = tmp_path / "pool.jsonl"
    f.write_text(text)
    with pytest.raises(TaskDataError, match=error):
        load_query_pool(f)
    with pytest.raises(TaskDataError, match="no such file"):
        load_query_pool(tmp_path / "missing.jsonl")

