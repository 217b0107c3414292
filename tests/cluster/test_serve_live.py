"""Serving while the system changes: an expert added by `ray job submit jobs/add_expert.py` under a steady
client loop (zero failed requests, used afterwards), autoscaling of one busy expert, and live removal."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest

from see_ray.tools.builtin import antonyms_task
from see_ray.tools.demo import write_task_folder

from support import REPO, load_driver, running_replicas

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1500)]
chat_body = load_driver().chat_body  # (text, model, definition, max_tokens)


class ClientLoop(threading.Thread):
    """Steady load: one request at a time, bounded by count AND time; records every failure."""

    def __init__(self, url: str, bodies: list[dict], max_requests: int = 5000, max_s: float = 900):
        super().__init__(daemon=True)
        self.url, self.bodies, self.max_requests, self.max_s = url, bodies, max_requests, max_s
        self.stop = threading.Event()
        self.ok, self.failures, self.experts = 0, [], []

    def run(self):
        t0 = time.monotonic()
        with httpx.Client(timeout=120) as c:
            i = 0
            while not self.stop.is_set() and i < self.max_requests and time.monotonic() - t0 < self.max_s:
                body = self.bodies[i % len(self.bodies)]
                i += 1
                try:
                    r = c.post(self.url + "/v1/chat/completions", json=body)
                    if r.status_code == 200:
                        self.ok += 1
                        self.experts.append(r.json()["see_routing"]["expert"])
                    else:
                        self.failures.append((r.status_code, r.text[:200]))
                except Exception as e:  # noqa: BLE001 - every failure counts
                    self.failures.append(("exception", repr(e)))


def test_live_add_by_job_under_load_then_used(served, jobs, two_tasks, tmp_path):
    task = antonyms_task(n=80, n_dev=12, n_test=12)
    folder = write_task_folder(task, tmp_path / "antonyms")
    arith, shout = two_tasks
    bodies = [chat_body(x.input, "see", arith.definition, 3) for x in arith.test[:3]]
    bodies += [chat_body(x.input, "see", shout.definition, 3) for x in shout.test[:3]]
    bodies += [chat_body(x.input, "see", task.definition, 3) for x in task.test[:3]]
    loop = ClientLoop(served["url"], bodies)
    loop.start()
    # 60 steps: the new expert must route its own queries (asserted below), which the tiny model learns well
    # within 40 steps on these synthetic tasks (test_demo.py), not only pass the job's 0.5 bars
    args = jobs.args(folder, "antonyms", served["storage"], steps=60, bars=0.5,
                     extra=["--workers", "1", "--set", "ray_train.deepspeed=null"])
    try:
        sid, job = jobs.submit(args)
    finally:
        time.sleep(3)  # a few requests after the addition, too
        loop.stop.set()
        loop.join(timeout=180)
    assert job.returncode == 0, jobs.logs(sid)[-4000:]
    result = jobs.result(sid)
    assert result["deploy"]["deployed"], result["deploy"]
    assert loop.ok > 0 and loop.failures == [], loop.failures[:5]

    info = httpx.get(served["url"] + "/v1/experts", timeout=30).json()
    assert [e["name"] for e in info["sequence"]][0] == "antonyms"  # newest first
    used = [httpx.post(served["url"] + "/v1/chat/completions", json=chat_body(x.input, "see", task.definition, 3),
                       timeout=120).json()["see_routing"]["expert"] for x in task.test[:4]]
    assert used.count("antonyms") >= 3, used
    # the experts that were running were never redeployed: still one replica each, same applications
    assert running_replicas(served["scfg"].expert_app("expert1"), "expert1") >= 1


def test_autoscaling_one_busy_expert(served):
    scfg = served["scfg"]
    target, others = "expert1", ["expert2"]
    assert running_replicas(scfg.expert_app(target), target) == scfg.expert.autoscaling.min_replicas
    body = chat_body("12 + 30", target, None, 8)
    loops = [ClientLoop(served["url"], [body], max_requests=2000, max_s=240) for _ in range(6)]
    for lp in loops:
        lp.start()
    peak, others_max = 0, 0
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            peak = max(peak, running_replicas(scfg.expert_app(target), target))
            others_max = max(others_max, *(running_replicas(scfg.expert_app(o), o) for o in others))
            if peak >= scfg.expert.autoscaling.max_replicas:
                break
            time.sleep(1)
    finally:
        for lp in loops:
            lp.stop.set()
        for lp in loops:
            lp.join(timeout=180)
    assert peak == scfg.expert.autoscaling.max_replicas, peak
    assert others_max == scfg.expert.autoscaling.min_replicas
    assert sum(len(lp.failures) for lp in loops) == 0
    deadline = time.monotonic() + 180
    while running_replicas(scfg.expert_app(target), target) > scfg.expert.autoscaling.min_replicas:
        assert time.monotonic() < deadline, "did not scale back down after the load stopped"
        time.sleep(2)


def registry_cli(served, ray_head, *args: str) -> subprocess.CompletedProcess:
    """`see-ray registry ... --address` as a user runs it: its own process, connecting to the serving cluster."""
    cmd = [sys.executable, "-m", "see_ray.tools.cli", "registry", "--storage", served["storage"],
           "--address", ray_head["address"], "--app", served["scfg"].app_name, *args]
    out = subprocess.run(cmd, env=ray_head["env"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_registry_cli_disable_enable_remove_live(served, ray_head, two_tasks):
    """`see-ray registry disable/remove NAME` take the expert out of the live sequence first, then tear its
    deployment down (zero failed requests from a client loop that asks it on every request), and `enable` brings
    it back. Runs last (it changes the served sequence)."""
    from ray import serve

    scfg = served["scfg"]
    app = scfg.expert_app("expert2")
    shout = two_tasks[1]
    bodies = [chat_body(x.input, "see", shout.definition, 3) for x in shout.test[:3]]
    loop = ClientLoop(served["url"], bodies, max_s=300)
    loop.start()
    try:
        time.sleep(2)
        n_before = len(loop.experts)
        out = registry_cli(served, ray_head, "disable", "expert2")
        n_after = len(loop.experts)
        assert "taken out of the sequence" in out.stdout, out.stdout
        assert app not in serve.status().applications
        seq = [e["name"] for e in httpx.get(served["url"] + "/v1/experts", timeout=30).json()["sequence"]]
        assert "expert2" not in seq
        time.sleep(3)  # requests after the teardown, too
        n_while_disabled = len(loop.experts)

        out = registry_cli(served, ray_head, "enable", "expert2")
        assert "put into the sequence" in out.stdout, out.stdout
        seq = [e["name"] for e in httpx.get(served["url"] + "/v1/experts", timeout=30).json()["sequence"]]
        assert "expert2" in seq and app in serve.status().applications
        time.sleep(2)

        out = registry_cli(served, ray_head, "remove", "expert2")
        assert "taken out of the sequence" in out.stdout, out.stdout
        time.sleep(2)
    finally:
        loop.stop.set()
        loop.join(timeout=180)
    assert loop.ok > 0 and loop.failures == [], loop.failures[:5]
    # while it was out, nobody asked it; after removal likewise
    tr = httpx.post(served["url"] + "/v1/route", json={"prompt": shout.test[0].input}, timeout=60).json()
    assert "expert2" not in [a["expert"] for a in tr["asks"]]
    assert app not in serve.status().applications
    assert served["registry"].load().find("expert2") is None
    # it answered before it was disabled (it owns these queries), and not once between its teardown and enable
    assert "expert2" in loop.experts[:n_before], loop.experts[:n_before]
    assert loop.experts[n_after + 1 : n_while_disabled] and "expert2" not in loop.experts[n_after + 1 : n_while_disabled]
