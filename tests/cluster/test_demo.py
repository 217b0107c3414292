"""`see-ray demo`'s flow end to end on the session's Ray head with the tiny model: the three demo experts
added by the add-expert job (Ray Train + DeepSpeed), registered, deployed by the same function as `see-ray
serve`, and asked over real HTTP; its routing output must be what SEE's in-process router decides."""

from __future__ import annotations

import pytest

from see_ray.tools.builtin import demo_tasks
from see_ray.tools.demo import demo_queries, run_serve_demo

from support import tiny_overrides

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1500)]

# its own application names and URL prefix: the session's `served` system may run on the same cluster
DEMO_SERVE = ["app_name=demo", "route_prefix=/demo", "base_app=demo-base", "expert_app_prefix=demo-expert-",
              "dispatch.registry_poll_s=1", "base.autoscaling.max_replicas=1", "expert.autoscaling.max_replicas=1"]


def test_demo_flow_through_serve(ray_head, tiny_model_path, tmp_path, pool_file):
    from ray import serve

    from see_ray.config import SEEConfig
    from see_ray.core.expert import SEEModel
    from see_ray.registry import Registry
    from see_ray.core.router import Router
    from see_ray.core.routing import ExpertSpec

    lines: list[str] = []
    storage = str(tmp_path / "registry")
    # 40 steps, not the test config's 120: this test is about the demo's flow, not the tiny model's routing
    # quality, and 40 steps pass the job's validation bars (0.5) by a wide margin
    overrides = tiny_overrides(tiny_model_path, **{"training.steps": 40})
    res = run_serve_demo(
        overrides=overrides, storage=storage, train_per_task=48, queries_per_task=2, workers=1, threads=1,
        min_accept=0.5, min_reject=0.5, address=ray_head["address"], general_pool=str(pool_file),
        serve_overrides=[f"port={ray_head['http_port']}", *DEMO_SERVE], log=lines.append,
    )
    out = "\n".join(lines)

    # every expert went through the job: Ray Train with the shipped DeepSpeed config, validated, registered in
    # sequence, each trained against the rehearsal samples of those before it
    recs = Registry(storage).list()
    assert [r.name for r in recs] == ["arithmetic", "shout", "antonyms"]
    for i, r in enumerate(recs):
        assert r.training["deepspeed"]["zero_optimization"]["stage"] == 2
        assert r.training["ray_train"]["num_workers"] == 1 and r.training["run_name"]
        assert r.validation["accept_rate"] >= 0.5 and r.threshold is not None
        assert sorted(r.trained_against) == sorted(x.name for x in recs[:i])
    assert res["sequence"] == ["antonyms", "shout", "arithmetic"]  # newest first
    # visible progress: each job's training steps (read back from Ray Train's reports) and its timings
    for r in recs:
        assert f"[train {r.name}] step 20/" in out and f"[train {r.name}] done: " in out, out[-3000:]
        assert f"-- expert {r.name!r} registered in" in out

    # the queries went over HTTP to the demo's URL, each printed with its routing trace
    assert res["url"] == f"http://127.0.0.1:{ray_head['http_port']}/demo"
    tasks = demo_tasks(n=48)
    pairs = demo_queries(tasks, 2)
    assert [(r["query"], r["expected"]) for r in res["results"]] == [(q.input, e) for q, e in pairs]
    for r in res["results"]:
        assert f"-> {r['expert']:10}" in out and r["trace"]["hops"] == len(r["trace"]["asks"])
    assert f"routed {res['correct']}/{len(pairs)} as expected" in out
    assert res["correct"] == sum(r["expected"] == r["expert"] for r in res["results"])

    # the decisions are SEE's: the in-process router over the registered adapters decides the same
    reg = Registry(storage)
    cfg = SEEConfig.from_yaml(None, overrides)
    router = Router(SEEModel(cfg, tiny_model_path),
                    [ExpertSpec(r.name, r.task, reg.adapter_path(r), r.threshold) for r in recs], cfg.routing)
    for r, ref in zip(res["results"], router.route([q for q, _ in pairs], generate=False)):
        assert r["expert"] == ref.expert, (r, ref.to_dict())
        assert [(a["expert"], a["accepted"]) for a in r["trace"]["asks"]] == [(a.expert, a.accepted) for a in ref.trace]

    # not --keep-serving: the demo's applications are gone again (the cluster was not the demo's to stop)
    apps = serve.status().applications
    assert not [a for a in apps if a == "demo" or a.startswith("demo-")], list(apps)
