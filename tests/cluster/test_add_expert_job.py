"""``jobs/add_expert.py`` submitted with the real ``ray job submit`` to the session's private Ray head.

- two submissions in a row (tiny model, two synthetic tasks): registry, adapters loadable with
  ``PeftModel.from_pretrained``, and the second expert rejects the first task's queries (the figures the
  job's validation step computed and recorded);
- a bad task file: failed job (exit 2), registry unchanged; a bad config override too;
- re-submitting a name is refused, ``--replace`` makes version 2;
- a job stopped (``ray job stop``) mid-training leaves the registry unchanged, and the re-run succeeds;
- a job killed (SIGKILL) during registration, after its files were written and before the registry document
  was swapped: registry unchanged (never half), lock released, the re-run succeeds;
- storage read-only (a read-only bind mount: root ignores file modes, not a read-only mount) from the start,
  and made read-only while the job trains: the job fails with a clear error, nothing is lost, and once the
  storage is writable again the re-run succeeds;
- two concurrent submissions both land, in a defined and recorded order.
The mechanics tests use low validation bars (--min-accept/--min-reject 0) and few steps: they test the
job, not the tiny model's routing quality.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import tiny_overrides

from see_ray.tools.builtin import antonyms_task, arithmetic_task, shout_task
from see_ray.registry import REGISTRY_FILE, Registry

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "SEE_RAY_RESULT "


# -- helpers --------------------------------------------------------------------------------------------
def write_task(folder: Path, task) -> Path:
    """A task folder in the documented JSONL layout (train/dev/test.jsonl + definition.txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "definition.txt").write_text(task.definition)
    for split in ("train", "dev", "test"):
        rows = [json.dumps({"input": x.input, "output": x.outputs[0]}) for x in getattr(task, split)]
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def task_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return {
        "arithmetic": write_task(root / "arithmetic", arithmetic_task(n=80, n_dev=12, n_test=12)),
        "shout": write_task(root / "shout", shout_task(n=80, n_dev=12, n_test=12)),
        "antonyms": write_task(root / "antonyms", antonyms_task(n=80, n_dev=12, n_test=12)),
    }


class Jobs:
    """`ray job submit` against the test head, and the SDK for status, logs and stop."""

    def __init__(self, head: dict, model_path: str):
        from ray.job_submission import JobSubmissionClient

        self.head, self.model_path = head, model_path
        self.client = JobSubmissionClient(head["dashboard"])

    def args(self, task: Path, name: str, storage: Path, steps: int | None = None, bars: float | None = None,
             extra=()):
        """Job arguments: the tiny model's test config (conftest), optionally fewer steps and lower bars."""
        over = {"training.log_every": 10, **({"training.steps": steps} if steps else {})}
        sets = tiny_overrides(self.model_path, **over)
        out = ["--task", str(task), "--name", name, "--storage", str(storage)]
        for s in sets:
            out += ["--set", s]
        if bars is not None:
            out += ["--min-accept", str(bars), "--min-reject", str(bars)]
        return out + list(extra)

    def submit(self, job_args: list[str], wait: bool = True, env: dict[str, str] | None = None
               ) -> tuple[str, subprocess.CompletedProcess | None]:
        sid = f"see-test-{uuid.uuid4().hex[:8]}"
        cmd = [
            "ray", "job", "submit", "--address", self.head["dashboard"], "--working-dir", str(REPO),
            "--submission-id", sid, *([] if wait else ["--no-wait"]),
            *(["--runtime-env-json", json.dumps({"env_vars": env})] if env else []),
            "--", "python", "jobs/add_expert.py", *job_args,
        ]
        proc = subprocess.run(cmd, env=self.head["env"], capture_output=True, text=True, timeout=800, cwd=REPO)
        if not wait:
            assert proc.returncode == 0, proc.stderr[-3000:]
        return sid, proc

    def wait(self, sid: str, timeout: float = 600) -> str:
        from ray.job_submission import JobStatus

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.client.get_job_status(sid)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return status
            time.sleep(1)
        raise TimeoutError(f"job {sid} still running after {timeout} s:\n{self.logs(sid)[-3000:]}")

    def logs(self, sid: str) -> str:
        return self.client.get_job_logs(sid)

    def exit_code(self, sid: str) -> int | None:
        return self.client.get_job_info(sid).driver_exit_code

    def result(self, sid: str) -> dict:
        lines = [ln for ln in self.logs(sid).splitlines() if ln.startswith(RESULT_PREFIX)]
        assert lines, self.logs(sid)[-4000:]
        return json.loads(lines[-1][len(RESULT_PREFIX) :])


@pytest.fixture(scope="module")
def jobs(ray_head, tiny_model_path):
    return Jobs(ray_head, tiny_model_path)


def snapshot(storage: Path) -> bytes | None:
    p = storage / REGISTRY_FILE
    return p.read_bytes() if p.exists() else None


# -- acceptance: two experts via `ray job submit` ---------------------------------------------------------
@pytest.fixture(scope="module")
def two_experts(jobs, task_dirs, tmp_path_factory):
    """Expert 1 (arithmetic) then expert 2 (shout) on one registry: the test config's steps, default bars."""
    storage = tmp_path_factory.mktemp("registry")
    out = {"storage": storage, "sids": [], "procs": []}
    for name in ("arithmetic", "shout"):
        sid, proc = jobs.submit(jobs.args(task_dirs[name], name, storage))
        out["sids"].append(sid)
        out["procs"].append(proc)
        if proc.returncode != 0:
            break
    return out


def test_two_submissions_build_the_sequence(jobs, two_experts, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for sid, proc in zip(two_experts["sids"], two_experts["procs"]):
        assert proc.returncode == 0, f"{sid} failed:\n{jobs.logs(sid)[-5000:]}"
        assert jobs.wait(sid) == "SUCCEEDED"
    reg = Registry(str(two_experts["storage"]))
    recs = reg.list()
    assert [(r.name, r.version, r.position, r.status) for r in recs] == [
        ("arithmetic", 1, 1, "active"),
        ("shout", 1, 2, "active"),
    ]
    a, s = recs
    assert a.trained_against == [] and s.trained_against == ["arithmetic"]
    assert reg.rehearsal_buffer().tasks() == ["arithmetic", "shout"]
    assert s.training["examples"]["rehearsal_negatives"] == a.rehearsal_count > 0
    assert s.base_model.fingerprint == a.base_model.fingerprint and len(a.base_model.fingerprint) == 64
    assert s.job["submission_id"] == two_experts["sids"][1]
    for r in recs:  # adapters load with plain peft, from where the registry says they are
        base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        PeftModel.from_pretrained(base, str(reg.adapter_path(r)))
        assert r.training["ray_train"]["deepspeed"] == "zero2"
        assert r.training["deepspeed"]["zero_optimization"]["stage"] == 2
    # the second expert rejects the first task's queries: the job's own held-out validation figures
    v = s.validation
    assert v["reject_rate_per_task"]["arithmetic"] >= v["min_reject"] == 0.8, v
    assert v["accept_rate"] >= v["min_accept"] == 0.8, v
    # logs: training metrics every few steps, the summary, the deploy hook's report
    logs = jobs.logs(two_experts["sids"][1])
    assert "[train shout] step 10/" in logs and "tokens/s" in logs
    assert "=== add_expert summary ===" in logs and "[add_expert] deploy: " in logs
    result = jobs.result(two_experts["sids"][1])
    assert result["sequence"] == ["arithmetic", "shout"]
    # step 6 reports; it never deploys into a Serve app of another registry (test_serve's may be running)
    assert result["deploy"]["deployed"] is False


# -- bad input ------------------------------------------------------------------------------------------
def test_bad_task_file_fails_and_writes_nothing(jobs, two_experts, tmp_path):
    storage = tmp_path / "registry"
    shutil.copytree(two_experts["storage"], storage)
    before = snapshot(storage)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "1 + 1", "output": "2"}\n{"input": "2 + 2"}\n')
    sid, proc = jobs.submit(jobs.args(bad, "broken", storage, extra=["--definition", "Add."]))
    assert proc.returncode != 0
    assert jobs.wait(sid) == "FAILED" and jobs.exit_code(sid) == 2
    assert "bad.jsonl:2: missing field 'output'" in jobs.logs(sid)
    assert snapshot(storage) == before
    assert not (storage / "adapters" / "broken").exists()


# -- --replace -----------------------------------------------------------------------------------------
def test_resubmit_refused_then_replace(jobs, two_experts, task_dirs, tmp_path):
    storage = tmp_path / "registry"
    shutil.copytree(two_experts["storage"], storage)
    before = snapshot(storage)
    sid, proc = jobs.submit(jobs.args(task_dirs["arithmetic"], "arithmetic", storage, steps=20, bars=0))
    assert proc.returncode != 0 and jobs.exit_code(sid) == 2
    assert "already exists" in jobs.logs(sid) and "--replace" in jobs.logs(sid)
    assert snapshot(storage) == before

    sid, proc = jobs.submit(
        jobs.args(task_dirs["arithmetic"], "arithmetic", storage, steps=20, bars=0, extra=["--replace"])
    )
    assert proc.returncode == 0, jobs.logs(sid)[-4000:]
    doc = Registry(str(storage)).load()
    # the new version is trained against every other task and goes to the front of newest-first routing
    assert [(e.name, e.version, e.position) for e in doc.experts] == [("shout", 1, 2), ("arithmetic", 2, 3)]
    assert doc.experts[-1].trained_against == ["shout"]
    assert [(e.name, e.version, e.status) for e in doc.retired] == [("arithmetic", 1, "replaced")]
    assert (storage / "adapters" / "arithmetic" / "v1").is_dir() and (storage / "adapters" / "arithmetic" / "v2").is_dir()
    assert doc.events[-1].op == "replace"


# -- killed mid-training --------------------------------------------------------------------------------
def test_job_stopped_mid_training_leaves_registry_unchanged(jobs, two_experts, task_dirs, tmp_path):
    storage = tmp_path / "registry"
    shutil.copytree(two_experts["storage"], storage)
    before = snapshot(storage)
    args = jobs.args(task_dirs["antonyms"], "antonyms", storage, steps=400, bars=0)
    sid, _ = jobs.submit(args, wait=False)
    deadline = time.monotonic() + 400
    while "[train antonyms] step 10/" not in jobs.logs(sid):  # training is under way
        assert time.monotonic() < deadline, jobs.logs(sid)[-4000:]
        assert jobs.client.get_job_status(sid) in ("PENDING", "RUNNING"), jobs.logs(sid)[-4000:]
        time.sleep(1)
    subprocess.run(["ray", "job", "stop", "--address", jobs.head["dashboard"], sid],
                   env=jobs.head["env"], check=True, capture_output=True, timeout=120)
    assert jobs.wait(sid) == "STOPPED"
    assert snapshot(storage) == before
    assert not (storage / "adapters" / "antonyms").exists()

    # the same job again (fewer steps, and warm-started: training.warm_start) succeeds; the new expert starts from
    # the newest expert's adapter, which each Ray Train worker reads from the registry's storage
    sid, proc = jobs.submit(jobs.args(task_dirs["antonyms"], "antonyms", storage, steps=20, bars=0,
                                      extra=["--set", "training.warm_start=true"]))
    logs = jobs.logs(sid)
    assert proc.returncode == 0, logs[-4000:]
    assert "warm start from expert 'shout' v1" in logs, logs[-4000:]
    assert [e.name for e in Registry(str(storage)).list()] == ["arithmetic", "shout", "antonyms"]
    meta = json.loads((storage / "adapters" / "antonyms" / "v1" / "see_meta.json").read_text())
    assert meta["init_from"] == "shout v1", meta


# -- concurrency ----------------------------------------------------------------------------------------
def test_concurrent_submissions_land_in_a_defined_order(jobs, task_dirs, tmp_path):
    storage = tmp_path / "registry"
    sids = [
        jobs.submit(jobs.args(task_dirs[name], name, storage, steps=20, bars=0), wait=False)[0]
        for name in ("arithmetic", "shout")
    ]
    for sid in sids:
        assert jobs.wait(sid) == "SUCCEEDED", jobs.logs(sid)[-4000:]
    doc = Registry(str(storage)).load()
    assert sorted(e.name for e in doc.experts) == ["arithmetic", "shout"]
    assert [e.position for e in doc.experts] == [1, 2]  # one total order: commit order, recorded
    assert [ev.name for ev in doc.events] == [e.name for e in doc.experts] and doc.generation == 2
    first, second = doc.experts
    # both trained on the same (empty) buffer; the later commit was checked against the earlier one's
    # rehearsal queries under the lock (with bars 0 it passes and is recorded rather than retrained)
    assert first.trained_against == []
    if second.trained_against == []:
        assert first.task in second.validation["checked_at_commit"]
    results = {jobs.result(sid)["name"]: jobs.result(sid) for sid in sids}
    assert results[second.name]["sequence"] == [first.name, second.name]


# -- killed during registration -------------------------------------------------------------------------
def wait_for_log(jobs: Jobs, sid: str, marker: str, timeout: float = 400) -> str:
    deadline = time.monotonic() + timeout
    while True:
        logs = jobs.logs(sid)
        if marker in logs:
            return logs
        assert time.monotonic() < deadline, logs[-4000:]
        assert jobs.client.get_job_status(sid) in ("PENDING", "RUNNING"), logs[-4000:]
        time.sleep(0.5)


def files_of(storage: Path) -> dict[str, bytes]:
    return {str(p.relative_to(storage)): p.read_bytes() for p in sorted(storage.rglob("*"))
            if p.is_file() and p.name != "registry.lock"}


def test_job_killed_during_registration_leaves_registry_whole(jobs, two_experts, task_dirs, tmp_path):
    """SIGKILL at the registry's commit point: the adapter and rehearsal files are written, the document is
    not yet swapped (the fault hook SEE_RAY_FAULT_PAUSE holds the job there)."""
    import os
    import re
    import signal

    storage = tmp_path / "registry"
    shutil.copytree(two_experts["storage"], storage)
    before, files_before = snapshot(storage), files_of(storage)
    names_before = [e.name for e in Registry(str(storage)).list()]
    args = jobs.args(task_dirs["antonyms"], "antonyms", storage, steps=10, bars=0)
    sid, _ = jobs.submit(args, wait=False, env={"SEE_RAY_FAULT_PAUSE": "commit:600"})
    logs = wait_for_log(jobs, sid, "[fault] paused at commit pid ")
    pid = int(re.search(r"\[fault\] paused at commit pid (\d+)", logs).group(1))
    assert (storage / "adapters" / "antonyms" / "v1" / "adapter_model.safetensors").is_file()  # files written
    os.kill(pid, signal.SIGKILL)  # the job driver, holding the registry lock, mid-transaction
    assert jobs.wait(sid) == "FAILED"
    assert snapshot(storage) == before  # unchanged: the old document, not half of the new one
    assert [e.name for e in Registry(str(storage)).list()] == names_before
    assert all(files_of(storage)[k] == v for k, v in files_before.items())  # nothing of before was touched

    # re-run: the kernel released the dead job's lock; the orphan folder is overwritten
    sid, proc = jobs.submit(jobs.args(task_dirs["antonyms"], "antonyms", storage, steps=10, bars=0))
    assert proc.returncode == 0, jobs.logs(sid)[-4000:]
    reg = Registry(str(storage))
    assert [(e.name, e.version) for e in reg.list()] == [*((n, 1) for n in names_before), ("antonyms", 1)]
    assert reg.get("antonyms").position == len(names_before) + 1
    reg.adapter_path(reg.get("antonyms"))  # hash-checked: the committed adapter is the re-run's, whole


# -- storage unwritable ---------------------------------------------------------------------------------
@contextlib.contextmanager
def read_only(path: Path):
    """Make ``path`` a read-only bind mount of itself. The tests run as root, which ignores file modes, but
    not a read-only mount: every write below it fails with EROFS, as on a remounted or full volume."""
    r = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"read-only bind mounts need CAP_SYS_ADMIN here: {r.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path), str(path)], check=True, capture_output=True)
        with pytest.raises(OSError, match="Read-only file system"):
            (path / "probe").write_text("x")
        yield
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def test_storage_unwritable_fails_clearly_and_loses_nothing(jobs, two_experts, task_dirs, tmp_path):
    storage = tmp_path / "registry"
    shutil.copytree(two_experts["storage"], storage)
    before, files_before = snapshot(storage), files_of(storage)
    names_before = [e.name for e in Registry(str(storage)).list()]

    def nothing_lost() -> bool:  # every file of before is still there, unchanged (training adds run folders)
        now = files_of(storage)
        return snapshot(storage) == before and all(now.get(k) == v for k, v in files_before.items())

    args = jobs.args(task_dirs["antonyms"], "antonyms", storage, steps=10, bars=0)
    figs = {}

    # 1) read-only from the start: refused before any training
    with read_only(storage):
        t0 = time.monotonic()
        sid, proc = jobs.submit(args)
        figs["readonly_at_start_fail_s"] = round(time.monotonic() - t0, 1)
        logs = jobs.logs(sid)
        assert proc.returncode != 0 and jobs.exit_code(sid) == 1, logs[-3000:]
        assert f"storage {storage} is not writable (Read-only file system); nothing was trained" in logs
        assert "3_train" not in logs
    assert files_of(storage) == files_before  # not even a run folder: it stopped before training

    # 2) read-only from the moment it registers (after training): fails at registration, nothing lost
    sid, _ = jobs.submit(args, wait=False, env={"SEE_RAY_FAULT_PAUSE": "register:20"})
    wait_for_log(jobs, sid, "[fault] paused at register pid ")
    with read_only(storage):
        assert jobs.wait(sid) == "FAILED"
        logs = jobs.logs(sid)
        assert jobs.exit_code(sid) == 1, logs[-3000:]
        assert (f"registering 'antonyms' failed: storage {storage} is not writable (Read-only file system); "
                "nothing was registered, the registry is unchanged") in logs
        assert "Traceback" not in logs.split("[fault] paused at register")[-1]
    assert nothing_lost()

    # 3) writable again: the same job succeeds
    sid, proc = jobs.submit(args)
    assert proc.returncode == 0, jobs.logs(sid)[-4000:]
    assert [e.name for e in Registry(str(storage)).list()] == [*names_before, "antonyms"]
    print(f"\nFIGURES fault_storage_readonly {json.dumps(figs)}", flush=True)
