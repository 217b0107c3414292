"""Two Ray "nodes" on one machine: the session's test head plus a second `ray start --address` worker process
with a custom resource. An expert pinned to that resource (``per_expert.<name>.resources``) must run on the
second node, load its adapter there from the storage URI, and answer over HTTP through the dispatcher."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from support import SERVE_TEST_OVERRIDES, register_expert

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def test_expert_pinned_to_second_node_loads_adapter_from_storage_and_answers(
    ray_head, second_node, see_expert1, tiny_cfg, tmp_path
):
    import ray
    from ray import serve

    from see_ray.config.serve import ServeConfig
    from see_ray.registry import Registry
    from see_ray.serve import deploy_all

    head_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] and
                   n["Resources"].get("node:__internal_head__"))
    assert second_node["node_id"] != head_id
    resource = second_node["resource"]
    storage = f"file://{tmp_path / 'storage'}"
    rec = register_expert(Registry(storage), see_expert1, tiny_cfg, threshold=0.5)
    scfg = ServeConfig.from_yaml(None, [
        f"port={ray_head['http_port']}", *SERVE_TEST_OVERRIDES,
        # own application names and route: other tests' applications on the same head stay untouched
        "app_name=see-mn", "route_prefix=/mn", "base_app=see-mn-base", "expert_app_prefix=see-mn-expert-",
        f"per_expert.expert1.resources.{resource}=1", "per_expert.expert1.autoscaling.max_replicas=1",
    ])
    assert scfg.expert_settings("expert1").actor_options()["resources"] == {resource: 1.0}
    apps = ["see-mn", "see-mn-base", "see-mn-expert-expert1"]
    try:
        info = deploy_all(tiny_cfg, scfg, storage)
        assert [e["name"] for e in info["sequence"]] == ["expert1"]
        # the replica runs on the second node, and loaded the adapter the registry recorded there
        rep = serve.get_deployment_handle("expert1", "see-mn-expert-expert1").info.remote().result(timeout_s=60)
        assert rep["node_id"] == second_node["node_id"], (rep, second_node)
        assert rep["version"] == rec.version
        assert Path(rep["adapter_path"]) == tmp_path / "storage" / "adapters" / "expert1" / f"v{rec.version}"
        base = serve.get_deployment_handle("base", "see-mn-base").info.remote().result(timeout_s=60)
        assert base["node_id"] != second_node["node_id"]  # unpinned replicas do not need the resource
        url = f"http://127.0.0.1:{ray_head['http_port']}/mn"
        r = httpx.post(url + "/v1/completions", json={"model": "expert1", "prompt": "12 + 30", "max_tokens": 4},
                       timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["see_routing"]["expert"] == "expert1"
        q = see_expert1["examples"][0].query
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "see", "max_tokens": 4,
            "messages": [{"role": "system", "content": q.definition}, {"role": "user", "content": q.input}]})
        assert r.status_code == 200, r.text
        assert r.json()["see_routing"]["asks"][0]["expert"] == "expert1"
    finally:
        for name in apps:
            if name in serve.status().applications:
                serve.delete(name)
