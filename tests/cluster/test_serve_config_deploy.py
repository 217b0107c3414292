"""`serve deploy cluster/serve-config.yaml` on the session's Ray head (the file's static checks are in
unit/test_cluster_configs.py), and `see-ray status` against the running application."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from ray import serve

from see_ray.registry import Registry

from support import CLUSTER, SERVE_TEST_OVERRIDES, grafana_metrics, register_expert, tiny_overrides

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def test_serve_config_deploys_and_answers_on_a_local_cluster(ray_head, see_expert1, tiny_cfg, tiny_model_path,
                                                            tmp_path):
    """`serve deploy cluster/serve-config.yaml` with only the local differences (tiny model on CPU, a file://
    storage URI, the test's port, names that cannot clash with other tests' applications): the builder deploys
    the registry's expert and the base, the SEE application starts and answers over HTTP; re-applying the file
    restarts nothing; `see-ray status` reports it; the dashboard's metric names are really exported."""
    storage = f"file://{tmp_path / 'storage'}"
    register_expert(Registry(storage), see_expert1, tiny_cfg, threshold=0.5)

    conf = yaml.safe_load((CLUSTER / "serve-config.yaml").read_text())
    app = conf["applications"][0]
    app.update(name="see-cfg", route_prefix="/cfg")
    app["args"]["storage"] = storage
    app["args"]["set"] = tiny_overrides(tiny_model_path)
    # the file's settings, minus what this 2-core machine without a GPU cannot give
    local = {"expert.num_gpus": "0", "base.num_gpus": "0", "expert.num_cpus": "0.25", "base.num_cpus": "0.25",
             "expert.threads": "1", "base.threads": "1", "dispatcher_replicas": "1", "dispatcher_num_cpus": "0.1",
             "app_name": "see-cfg", "route_prefix": "/cfg"}
    sets = [s for s in app["args"]["serve_set"] if s.split("=")[0] not in local]
    sets += [f"{k}={v}" for k, v in local.items()]
    sets += SERVE_TEST_OVERRIDES + ["base_app=see-cfg-base", "expert_app_prefix=see-cfg-expert-",
                                    f"port={ray_head['http_port']}", "expert.autoscaling.max_replicas=1"]
    app["args"]["serve_set"] = sets
    conf["http_options"] = {"host": "127.0.0.1", "port": ray_head["http_port"]}
    path = tmp_path / "serve-config.yaml"
    path.write_text(yaml.safe_dump(conf))
    url = f"http://127.0.0.1:{ray_head['http_port']}/cfg"
    apps = ["see-cfg", "see-cfg-base", "see-cfg-expert-expert1"]

    def deploy():
        serve_cli = str(Path(sys.executable).parent / "serve")  # Ray's `serve` command of this environment
        r = subprocess.run([serve_cli, "deploy", str(path), "-a", ray_head["dashboard"]],
                           env=ray_head["env"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr

    def wait_running(timeout_s=600):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = serve.status().applications.get("see-cfg")
            state = str(getattr(st.status, "value", st.status)) if st else None
            if state == "RUNNING":
                return
            assert state not in ("DEPLOY_FAILED", "UNHEALTHY"), st.message
            time.sleep(2)
        raise AssertionError(f"see-cfg not RUNNING after {timeout_s} s: {serve.status().applications.get('see-cfg')}")

    try:
        t0 = time.monotonic()
        deploy()
        wait_running()
        print(f"serve deploy -> RUNNING in {time.monotonic() - t0:.0f} s")
        # the builder waited for the models: the expert is in the sequence from the first request on
        info = httpx.get(url + "/v1/experts", timeout=60).json()
        assert [e["name"] for e in info["sequence"]] == ["expert1"] and info["registry"] == storage
        r = httpx.post(url + "/v1/completions", json={"model": "see", "prompt": "12 + 30", "max_tokens": 4},
                       timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["see_routing"]["hops"] >= 1
        r = httpx.post(url + "/v1/completions", json={"model": "expert1", "prompt": "12 + 30", "max_tokens": 4},
                       timeout=120)
        assert r.status_code == 200 and r.json()["see_routing"]["expert"] == "expert1", r.text
        pid = serve.get_deployment_handle("expert1", "see-cfg-expert-expert1").info.remote().result(timeout_s=60)["pid"]

        # re-applying the same file keeps the running model replicas (build_app compares fingerprints)
        deploy()
        time.sleep(3)
        wait_running()
        again = serve.get_deployment_handle("expert1", "see-cfg-expert-expert1").info.remote().result(timeout_s=60)
        assert again["pid"] == pid

        # see-ray status against this cluster, with the application running
        out = subprocess.run([sys.executable, "-m", "see_ray.tools.cli", "status", "--address", ray_head["address"],
                              "--app", "see-cfg"], env=ray_head["env"], capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        text = out.stdout
        print(text)
        assert storage in text and ray_head["dashboard"] in text and f"{url}/v1" in text
        row = next(line for line in text.splitlines() if " expert1 " in line)
        assert "RUNNING" in row and re.search(r"RUNNING\s+1\s+yes", row), row
        # the same cluster asked for an application that is not there: a clear message, the registry still listed
        out = subprocess.run([sys.executable, "-m", "see_ray.tools.cli", "status", "--address", ray_head["address"],
                              "--app", "see-absent", "--storage", storage], env=ray_head["env"],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        assert "serving is not running" in out.stdout and "no SEE application 'see-absent'" in out.stdout
        assert re.search(r"expert1\s+arithmetic\s+1\s+active\s+-\s+-", out.stdout), out.stdout

        # every metric the Grafana dashboard queries is exported by this cluster (scraped like Prometheus)
        for _ in range(3):
            httpx.post(url + "/v1/completions", json={"model": "see", "prompt": "hello there", "max_tokens": 2},
                       timeout=120)
        bad = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=60)
        assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]  # counted by see_errors_total
        wanted = {re.sub(r"_(bucket|sum|count)$", "", n) for n in grafana_metrics()}
        deadline, missing = time.monotonic() + 90, wanted
        while time.monotonic() < deadline and missing:
            body = httpx.get(f"http://127.0.0.1:{ray_head['metrics_port']}/metrics", timeout=30).text
            missing = {n for n in wanted if not re.search(rf"^{n}(_bucket|_sum|_count)?{{", body, re.M)}
            time.sleep(ray_head["metrics_report_s"])
        assert not missing, f"the dashboard queries metrics the cluster does not export: {sorted(missing)}"
        from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

        sd = json.loads((Path(ray_head["temp_dir"]) / PROMETHEUS_SERVICE_DISCOVERY_FILE).read_text())
        # what the `ray` scrape job reads: this node's metrics port (under the node's IP, which Ray picks itself)
        assert any(t.endswith(f":{ray_head['metrics_port']}") for entry in sd for t in entry["targets"]), sd
    finally:
        for name in apps:
            if name in serve.status().applications:
                serve.delete(name)
