"""`see-ray status` without a cluster: the registry's sequence and a plain "serving is not running" message,
quickly (the running-cluster cases are in cluster/test_serve_config_deploy.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from support import REPO, free_ports, new_expert


def run_status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "see_ray.tools.cli", "status", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})


def test_status_without_a_cluster_lists_the_registry_and_says_serving_is_not_running(tmp_path):
    from see_ray.registry import Registry

    storage = f"file://{tmp_path / 'store'}"
    reg = Registry(storage)
    reg.add(new_expert(tmp_path, "first", task="t1"))
    reg.add(new_expert(tmp_path, "second", task="t2"))
    reg.disable("first")
    (port,) = free_ports(1)  # nothing listens there
    t0 = time.monotonic()
    out = run_status("--storage", storage, "--address", f"127.0.0.1:{port}")
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t0 < 60  # a dead address is probed, not retried for minutes
    text = out.stdout
    assert f"storage     {storage}" in text
    assert re.search(rf"serving is not running: no Ray cluster reachable at \S+:{port}", text), text
    rows = [line.split() for line in text.splitlines() if re.match(r"\s+\d+ ", line)]
    # newest first, with the registry status; no deployment columns without a cluster
    assert [r[:5] for r in rows] == [["1", "second", "t2", "1", "active"], ["2", "first", "t1", "1", "disabled"]]
    assert all(r[5:] == ["-", "-"] for r in rows)

    js = json.loads(run_status("--storage", storage, "--address", f"127.0.0.1:{port}", "--json").stdout)
    assert js["ray"] is None and js["serving"]["running"] is False and js["storage"] == storage
    assert [e["name"] for e in js["experts"]] == ["second", "first"]


def test_status_refuses_a_dashboard_url_as_address(tmp_path):
    out = run_status("--storage", str(tmp_path), "--address", "http://127.0.0.1:8265")
    assert out.returncode == 0
    assert "is not a GCS address" in out.stdout and "(no experts registered)" in out.stdout


def test_status_on_a_broken_registry_names_the_file(tmp_path):
    (tmp_path / "registry.json").write_text("{not json")
    out = run_status("--storage", str(tmp_path), "--address", "127.0.0.1:1")
    assert out.returncode == 2 and "registry.json" in out.stdout
