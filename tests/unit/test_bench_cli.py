"""`see-ray bench quality` argument checks: the OOD tasks must be out of distribution (never trained on, never
used as negatives), and unknown names are refused before anything is loaded into a model."""

from __future__ import annotations

import pytest

from see_ray.tools.cli import main

from support import REPO, set_args, superni_file, tiny_overrides


@pytest.fixture
def bench_dir(tmp_path):
    names = ["task001_a", "task002_b", "task003_c", "task004_d"]
    for i, n in enumerate(names):
        d = tmp_path / n
        d.mkdir()
        superni_file(d / "train.json", 6, definition=f"Definition {i}.")
        superni_file(d / "test.json", 3, definition=f"Definition {i}.", start=100)
    (tmp_path / "order.txt").write_text("\n".join(names) + "\n")
    return tmp_path


def run(bench_dir, *args):
    with pytest.raises(SystemExit) as e:
        main(["bench", "quality", "--data", str(bench_dir), "--tasks", "2", *args])
    return str(e.value)


def test_ood_task_in_the_sequence_is_refused(bench_dir):
    msg = run(bench_dir, "--ood-tasks", "task002_b")
    assert "--ood-tasks" in msg and "task002_b" in msg and "not out of distribution" in msg


def test_ood_task_in_the_general_pool_is_refused(bench_dir):
    msg = run(bench_dir, "--general-pool-tasks", "task003_c", "--ood-tasks", "task003_c,task004_d")
    assert "task003_c" in msg and "not out of distribution" in msg


def test_unknown_ood_task_is_refused(bench_dir):
    assert "unknown task 'task999_x'" in run(bench_dir, "--general-pool-tasks", "builtin", "--ood-tasks", "task999_x")


def test_reuse_adapters_reevaluates_the_same_experts(bench_dir, tmp_path, tiny_model_path):
    """--reuse-adapters takes the experts of an earlier run instead of training them: the report lists every
    reused adapter, and with nothing changed at inference time the figures are the earlier run's."""
    import json

    sets = set_args(tiny_overrides(tiny_model_path, **{"training.steps": 2}))
    common = ["bench", "quality", "--data", str(bench_dir), "--tasks", "2", "--general-pool-tasks", "builtin",
              "--pool-per-task", "2", "--train-per-task", "4", "--dev-per-task", "1", "--test-per-task", "2",
              "--methods", "SEE,Oracle", "--no-cache", *sets]
    assert main([*common, "--out", str(tmp_path / "first")]) == 0
    first = json.loads((tmp_path / "first" / "quality.json").read_text())
    assert "reused_adapters" not in first
    adapters = tmp_path / "first" / "adapters"
    assert main([*common, "--out", str(tmp_path / "again"), "--reuse-adapters", str(adapters)]) == 0
    again = json.loads((tmp_path / "again" / "quality.json").read_text())
    assert sorted(again["reused_adapters"]) == sorted(p.name for p in adapters.iterdir())
    for r in (first, again):
        r["methods"]["SEE"].pop("eval_wall_s")  # a timing, the one figure that differs
    assert again["methods"] == first["methods"]
    assert not (tmp_path / "again" / "adapters" / "see-task001_a").exists()  # nothing was trained


def test_cached_evaluation_equals_recomputation(bench_dir, tmp_path, tiny_model_path):
    """--cache keeps every (expert, query) decision and answer and every trained adapter: a second run over the same
    cache trains nothing and computes nothing, and both give the matrices and routing figures of a run that
    recomputes every decision and answer (--no-cache) with the same adapters."""
    import json

    sets = set_args(tiny_overrides(tiny_model_path, **{"training.steps": 3, "rehearsal.input_only_share": 0.5}))
    common = ["bench", "quality", "--data", str(bench_dir), "--tasks", "2", "--general-pool-tasks", "builtin",
              "--pool-per-task", "4", "--train-per-task", "4", "--dev-per-task", "2", "--test-per-task", "3",
              "--methods", "SEE,Oracle", *sets]
    cache = str(tmp_path / "cache")
    assert main([*common, "--cache", cache, "--out", str(tmp_path / "first")]) == 0
    assert main([*common, "--cache", cache, "--out", str(tmp_path / "second")]) == 0
    assert main([*common, "--no-cache", "--reuse-adapters", str(tmp_path / "first" / "adapters"),
                 "--out", str(tmp_path / "recomputed")]) == 0
    first, second, recomputed = (json.loads((tmp_path / r / "quality.json").read_text())
                                 for r in ("first", "second", "recomputed"))
    assert first["adapters_from_cache"] == [] and sorted(second["adapters_from_cache"]) == ["see-task001_a", "see-task002_b"]
    counts = second["methods"]["SEE"]["eval_cache"]
    assert counts["decide"]["misses"] == 0 and counts["generate"]["misses"] == 0 and counts["decide"]["disk_hits"] > 0
    assert recomputed["methods"]["SEE"]["eval_cache"]["decide"]["disk_hits"] == 0
    # --recompute: the adapters from the cache, every decision and answer computed again
    assert main([*common, "--cache", cache, "--recompute", "--out", str(tmp_path / "fresh")]) == 0
    fresh = json.loads((tmp_path / "fresh" / "quality.json").read_text())
    assert sorted(fresh["adapters_from_cache"]) == ["see-task001_a", "see-task002_b"]
    counts = fresh["methods"]["SEE"]["eval_cache"]
    assert counts["decide"]["disk_hits"] == 0 and counts["decide"]["misses"] > 0

    def figures(r: dict) -> dict:
        see = r["methods"]["SEE"]
        return {"SEE": see["matrix"], "Oracle": r["methods"]["Oracle"]["matrix"], "routing": see["routing"],
                "thresholds": see["thresholds"]}

    assert figures(first) == figures(second) == figures(fresh)
    got, want = figures(first), figures(recomputed)
    assert got["SEE"] == want["SEE"] and got["Oracle"] == want["Oracle"] and got["routing"] == want["routing"]
    assert got["thresholds"] == pytest.approx(want["thresholds"], abs=1e-5)


def test_reuse_adapters_must_be_a_folder(bench_dir, tmp_path):
    msg = run(bench_dir, "--general-pool-tasks", "builtin", "--reuse-adapters", str(tmp_path / "nope"))
    assert "--reuse-adapters" in msg and "nope" in msg


def test_merge_quality_runs(tmp_path, monkeypatch):
    """benchmarks/merge_quality.py: runs that split the methods merge into one table, complete once every method
    is in; a baselines-only run may lack fields that act only on SEE's answers; other differences are refused.
    The script runs once as a command; the other merges call its main() in this process (each command would
    import torch and transformers again, seconds each)."""
    import importlib.util
    import json
    import subprocess
    import sys

    from see_ray.config import SEEConfig

    def method(ap: float) -> dict:  # a finished method's summary, as a run reports it
        return {"ap": ap, "bwt": -1.0, "fra": 1.0, "matrix": [[ap, None], [ap - 1, ap + 1]]}

    keep = {"tasks": ["task001_a", "task002_b"], "general_pool_tasks": ["default"], "ood_tasks": ["task003_c"],
            "subsample": {"train": 4, "dev": 1, "test": 2}, "machine": "test", "timings_s": {"total": 1.0},
            "command": "see-ray bench quality ..."}
    see_cfg = SEEConfig().model_dump(mode="json")
    see_cfg["indicators"]["keep_out_of_answers"] = True
    old_cfg = json.loads(json.dumps(see_cfg))
    old_cfg["indicators"].pop("keep_out_of_answers", None)  # a run that predates the field
    runs = {
        "see": {**keep, "config": see_cfg, "complete": True,
                "methods": {"SEE": {**method(30.0), "routing": {}}, "Oracle": method(31.0)}},
        "base": {**keep, "config": old_cfg, "complete": False, "methods": {"SeqFT": method(20.0)}},
        "mtl": {**keep, "config": old_cfg, "complete": True, "methods": {"MTL": {"ap": 35.0, "bwt": None, "fra": None}}},
        "replay": {**keep, "config": old_cfg, "complete": True, "methods": {"Replay": method(28.0)}},
    }
    for name, r in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    script = REPO / "benchmarks" / "merge_quality.py"
    spec = importlib.util.spec_from_file_location("merge_quality", script)
    merge_quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_quality)

    def argv(*names) -> list[str]:
        return [*(str(tmp_path / f"{n}.json") for n in names), "--out", str(tmp_path / "m")]

    def merge(*names) -> str | None:
        """None when the runs merged, else why they were refused."""
        with monkeypatch.context() as m:
            m.setattr(sys, "argv", [str(script), *argv(*names)])
            try:
                merge_quality.main()
            except SystemExit as e:
                return str(e)
        return None

    p = subprocess.run([sys.executable, str(script), *argv("see", "base", "mtl")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "m" / "quality.json").read_text())["complete"] is False  # no Replay yet
    assert merge("see", "base", "mtl", "replay") is None
    merged = json.loads((tmp_path / "m" / "quality.json").read_text())
    assert merged["complete"] is True and set(merged["methods"]) == {"SEE", "Oracle", "SeqFT", "MTL", "Replay"}
    assert merged["config"]["indicators"]["keep_out_of_answers"] is True
    # an SEE run whose answers were decoded differently is not comparable with another SEE run
    runs["see2"] = {**runs["see"], "config": old_cfg}
    (tmp_path / "see2.json").write_text(json.dumps(runs["see2"]))
    assert "'config' differs" in merge("see", "see2")
    runs["odd"] = {**runs["mtl"], "subsample": {"train": 1, "dev": 1, "test": 1}}
    (tmp_path / "odd.json").write_text(json.dumps(runs["odd"]))
    assert "'subsample' differs" in merge("see", "odd")
    # which negatives SEE's experts learn from (how many per earlier task, which pool) never reaches the baselines
    fewer = json.loads(json.dumps(see_cfg))
    fewer["rehearsal"].update(negatives_per_task=4, general_pool_size=8)
    runs["see3"] = {**runs["see"], "config": fewer, "general_pool_tasks": ["another pool"]}
    (tmp_path / "see3.json").write_text(json.dumps(runs["see3"]))
    assert merge("see3", "base", "mtl", "replay") is None
    assert "differs" in merge("see", "see3")  # but two SEE runs with different negatives are different methods


def test_warm_start_starts_each_expert_from_the_previous_one(bench_dir, tmp_path, tiny_model_path):
    """training.warm_start: SEE's second expert is trained from a copy of the first one's adapter (recorded in its
    see_meta.json), and the first adapter is left as it was."""
    import json

    sets = set_args(tiny_overrides(tiny_model_path, **{"training.steps": 2, "training.warm_start": "true"}))
    out = tmp_path / "warm"
    assert main(["bench", "quality", "--data", str(bench_dir), "--tasks", "2", "--general-pool-tasks", "builtin",
                 "--pool-per-task", "2", "--train-per-task", "4", "--dev-per-task", "1", "--test-per-task", "2",
                 "--methods", "SEE", "--no-cache", *sets, "--out", str(out)]) == 0
    first, second = out / "adapters" / "see-task001_a", out / "adapters" / "see-task002_b"
    assert "init_from" not in json.loads((first / "see_meta.json").read_text())
    assert json.loads((second / "see_meta.json").read_text())["init_from"] == str(first)
    assert (first / "adapter_model.safetensors").read_bytes() != (second / "adapter_model.safetensors").read_bytes()


def test_builtin_instructions_pool_mixes_requests_and_instruction_tasks(bench_dir, monkeypatch):
    """--general-pool-tasks builtin-instructions: half the pool is the chat pool, half instruction-style tasks of
    other families, each family with and without its definition."""
    import see_ray.tools.bench as bench
    from see_ray.tools.builtin import _INSTRUCTION_TASKS, general_pool

    seen = {}

    class Stop(Exception):
        pass

    def capture(self, tasks, pool, ood, cfg, out, **kw):
        seen["pool"] = pool
        raise Stop

    monkeypatch.setattr(bench.QualityBench, "__init__", capture)
    with pytest.raises(Stop):
        main(["bench", "quality", "--data", str(bench_dir), "--tasks", "2", "--general-pool-tasks",
              "builtin-instructions", "--pool-per-task", "32"])
    pool = seen["pool"]
    assert len(pool) == 64 and pool[:32] == general_pool(n=32)
    definitions = {d for d, _ in _INSTRUCTION_TASKS}
    instr = pool[32:]
    assert {q.definition for q in instr if q.definition} == definitions  # every family, with its definition
    assert sum(q.definition is None for q in instr) == 16  # and as many raw inputs
