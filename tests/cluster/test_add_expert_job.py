"""``jobs/add_expert.py`` submitted with the real ``ray job submit`` to the session's private Ray head.

- two submissions in a row (tiny model, two synthetic tasks): registry, adapters loadable with
  ``PeftModel.from_pretrained``, and the second expert rejects the first task's queries (the figures the
  job's validation step computed and recorded);
- a bad task file: failed job (exit 2), registry unchanged;
- re-submitting a name is refused without ``--replace``;
- faults, one after the other on one registry, each leaving it unchanged: a job stopped (``ray job stop``)
  mid-training; a job killed (SIGKILL) during registration, after its files were written and before the
  registry document was swapped (never half, lock released); storage read-only (a read-only bind mount: root
  ignores file modes, not a read-only mount) from the start, and made read-only while the job trains (a clear
  error, nothing lost); then the same job succeeds, and as a ``--replace`` it makes version 2;
- two concurrent submissions both land, in a defined and recorded order.

The mechanics tests use low validation bars (--min-accept/--min-reject 0) and few steps: they test the job, not
the tiny model's routing quality, and start from a registry of the session's two in-process trained experts.
Every job pays Ray Train's start-up (about half a minute here) and then keeps about one of the machine's two
cores busy (one worker with one thread), so one job run serves as many assertions as it can, and the runs that
need no interaction (the two in a row, the two at once) train while the interactive tests run.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from see_ray.core.prompts import Query
from see_ray.core.rehearsal import held_out
from see_ray.registry import REGISTRY_FILE, Registry
from see_ray.tools.builtin import arithmetic_task, shout_task
from see_ray.tools.demo import write_task_folder

from support import register_expert

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900), pytest.mark.usefixtures("background_jobs")]

@pytest.fixture(scope="module")
def task_dirs(tmp_path_factory):
    """The two synthetic tasks as task folders in the documented JSONL layout."""
    root = tmp_path_factory.mktemp("tasks")
    return {
        "arithmetic": write_task_folder(arithmetic_task(n=80, n_dev=12, n_test=12), root / "arithmetic"),
        "shout": write_task_folder(shout_task(n=80, n_dev=12, n_test=12), root / "shout"),
    }


def snapshot(storage: Path) -> bytes | None:
    p = storage / REGISTRY_FILE
    return p.read_bytes() if p.exists() else None


@pytest.fixture
def registry_of_two(tmp_path, see_experts, tiny_cfg) -> Path:
    """A registry holding the session's two in-process trained experts: expert1 (task arithmetic), then
    expert2 (task shout), with the tiny base's real fingerprint."""
    storage = tmp_path / "registry"
    registry = Registry(str(storage))
    for expert in see_experts["experts"]:
        register_expert(registry, expert, tiny_cfg)
    return storage


@pytest.fixture(scope="module")
def background_jobs(jobs, task_dirs, tmp_path_factory):
    """The job runs that need no interaction, started when the module's first test starts (every test asks for
    this fixture) so that they train while the interactive tests run:
    - ``two_experts``: a future of expert 1 (arithmetic) then expert 2 (shout) on one registry, with the test
      config's steps and the job's default bars: ``{"storage", "sids"}``;
    - ``concurrent``: two submissions at once (bars 0, few steps) on another registry: ``{"storage", "sids"}``.
    At the end of the module, jobs still running are stopped."""
    from concurrent.futures import ThreadPoolExecutor

    done = False
    running: list[str] = []

    def two_in_a_row(storage: Path) -> dict:
        out = {"storage": storage, "sids": []}
        for name in ("arithmetic", "shout"):
            if done:
                break
            sid, _ = jobs.submit(jobs.args(task_dirs[name], name, storage), wait=False)
            out["sids"].append(sid)
            running.append(sid)
            if jobs.wait(sid) != "SUCCEEDED":
                break
        return out

    executor = ThreadPoolExecutor(1)
    two = executor.submit(two_in_a_row, tmp_path_factory.mktemp("registry"))
    storage = tmp_path_factory.mktemp("registry")
    concurrent = {"storage": storage, "sids": [
        jobs.submit(jobs.args(task_dirs[name], name, storage, steps=20, bars=0), wait=False)[0]
        for name in ("arithmetic", "shout")
    ]}
    running += concurrent["sids"]
    yield {"two_experts": two, "concurrent": concurrent}
    done = True
    for sid in running:
        if jobs.client.get_job_status(sid) in ("PENDING", "RUNNING"):
            jobs.client.stop_job(sid)
    executor.shutdown(wait=True)


# -- bad input ------------------------------------------------------------------------------------------
def test_bad_task_file_fails_and_writes_nothing(jobs, registry_of_two, tmp_path):
    storage = registry_of_two
    before = snapshot(storage)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "1 + 1", "output": "2"}\n{"input": "2 + 2"}\n')
    sid, proc = jobs.submit(jobs.args(bad, "broken", storage, extra=["--definition", "Add."]))
    assert proc.returncode != 0
    assert jobs.wait(sid) == "FAILED" and jobs.exit_code(sid) == 2
    assert "bad.jsonl:2: missing field 'output'" in jobs.logs(sid)
    assert snapshot(storage) == before
    assert not (storage / "adapters" / "broken").exists()


# -- re-submitting a name --------------------------------------------------------------------------------
def test_resubmit_without_replace_is_refused(jobs, registry_of_two, task_dirs):
    storage = registry_of_two
    before = snapshot(storage)
    sid, proc = jobs.submit(jobs.args(task_dirs["arithmetic"], "expert1", storage, steps=10, bars=0,
                                      extra=["--task-name", "arithmetic"]))
    assert proc.returncode != 0 and jobs.exit_code(sid) == 2
    assert "already exists" in jobs.logs(sid) and "--replace" in jobs.logs(sid)
    assert snapshot(storage) == before


# -- faults, then the same job succeeds -------------------------------------------------------------------
def files_of(storage: Path) -> dict[str, bytes]:
    return {str(p.relative_to(storage)): p.read_bytes() for p in sorted(storage.rglob("*"))
            if p.is_file() and p.name != "registry.lock"}


def bind_mounts_allowed(path: Path) -> str | None:
    """None if this process may bind-mount ``path`` onto itself (needs CAP_SYS_ADMIN), else the reason."""
    r = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        return r.stderr.strip() or f"mount exited {r.returncode}"
    subprocess.run(["umount", str(path)], check=True)
    return None


@contextlib.contextmanager
def read_only(path: Path):
    """Make ``path`` a read-only bind mount of itself. The tests run as root, which ignores file modes, but
    not a read-only mount: every write below it fails with EROFS, as on a remounted or full volume."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True, capture_output=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path), str(path)], check=True, capture_output=True)
        with pytest.raises(OSError, match="Read-only file system"):
            (path / "probe").write_text("x")
        yield
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def test_faults_leave_the_registry_whole_then_the_job_succeeds(jobs, registry_of_two, task_dirs):
    """One registry (expert1 on arithmetic, expert2 on shout), one job (``expert1 --replace``), five submissions:

    1. ``ray job stop`` once training logged step 10: registry unchanged, no adapter folder;
    2. SIGKILL at the registry's commit point (the fault hook SEE_RAY_FAULT_PAUSE holds the job there, holding
       the lock): the adapter and rehearsal files are written, the document is not yet swapped: unchanged, not
       half of the new one, and every file of before untouched;
    3. storage read-only from the start: refused before any training (exit 1, a clear message, no file added);
    4. storage made read-only once trained (held at the fault point ``register``): exit 1 with a clear message,
       no traceback, nothing lost;
    5. writable again: the same job succeeds, so the dead job's lock was released (by the kernel) and its orphan
       adapter folder is overwritten (the committed adapter passes the hash check). As a --replace it makes
       version 2 at the front of newest-first routing and retires version 1; warm-started
       (``training.warm_start``), it starts from the newest other expert's adapter, which each Ray Train worker
       reads from the registry's storage.

    One test, not five: each job pays Ray Train's start-up, and step 5 is the re-run that steps 1, 2 and 4 each
    need. Steps 3 and 4 need bind mounts: without them they are skipped (reported at the end) and the rest runs.
    """
    import os
    import re
    import signal

    storage = registry_of_two
    before, files_before = snapshot(storage), files_of(storage)
    names_before = [e.name for e in Registry(str(storage)).list()]
    assert names_before == ["expert1", "expert2"]
    replace = ["--task-name", "arithmetic", "--replace"]
    args = jobs.args(task_dirs["arithmetic"], "expert1", storage, steps=10, bars=0,
                     extra=[*replace, "--set", "training.warm_start=true"])
    new_adapter = storage / "adapters" / "expert1" / "v2"

    def unchanged() -> bool:  # the document byte for byte, and every file of before (runs add run folders)
        now = files_of(storage)
        return snapshot(storage) == before and all(now.get(k) == v for k, v in files_before.items())

    # 1) stopped mid-training
    sid, _ = jobs.submit(jobs.args(task_dirs["arithmetic"], "expert1", storage, steps=400, bars=0, extra=replace),
                         wait=False)
    jobs.wait_for_log(sid, "[train expert1] step 10/")  # training is under way
    jobs.stop(sid)
    assert jobs.wait(sid) == "STOPPED"
    assert unchanged() and not new_adapter.exists()

    # 2) killed during registration
    sid, _ = jobs.submit(args, wait=False, env={"SEE_RAY_FAULT_PAUSE": "commit:600"})
    logs = jobs.wait_for_log(sid, "[fault] paused at commit pid ")
    pid = int(re.search(r"\[fault\] paused at commit pid (\d+)", logs).group(1))
    assert (new_adapter / "adapter_model.safetensors").is_file()  # its files are written
    os.kill(pid, signal.SIGKILL)  # the job driver, holding the registry lock, mid-transaction
    assert jobs.wait(sid) == "FAILED"
    assert unchanged()  # the old document, not half of the new one; nothing of before touched
    assert [e.name for e in Registry(str(storage)).list()] == names_before

    # 3) and 4) storage unwritable
    no_mounts = bind_mounts_allowed(storage)
    figs = {}
    if no_mounts is None:
        files_now = files_of(storage)
        with read_only(storage):  # from the start: refused before any training
            t0 = time.monotonic()
            sid, proc = jobs.submit(args)
            figs["readonly_at_start_fail_s"] = round(time.monotonic() - t0, 1)
            logs = jobs.logs(sid)
            assert proc.returncode != 0 and jobs.exit_code(sid) == 1, logs[-3000:]
            assert f"storage {storage} is not writable (Read-only file system); nothing was trained" in logs
            assert "3_train" not in logs
        assert files_of(storage) == files_now  # not even a run folder: it stopped before training

        # held 20 s: long enough to remount under load, short because the test waits the rest of it out
        sid, _ = jobs.submit(args, wait=False, env={"SEE_RAY_FAULT_PAUSE": "register:20"})
        jobs.wait_for_log(sid, "[fault] paused at register pid ")
        with read_only(storage):  # from the moment it registers, after training
            assert jobs.wait(sid) == "FAILED"
            logs = jobs.logs(sid)
            assert jobs.exit_code(sid) == 1, logs[-3000:]
            assert (f"registering 'expert1' failed: storage {storage} is not writable (Read-only file system); "
                    "nothing was registered, the registry is unchanged") in logs
            assert "Traceback" not in logs.split("[fault] paused at register")[-1]
        assert unchanged()
        print(f"\nFIGURES fault_storage_readonly {json.dumps(figs)}", flush=True)

    # 5) the same job succeeds
    sid, proc = jobs.submit(args)
    logs = jobs.logs(sid)
    assert proc.returncode == 0, logs[-4000:]
    assert "warm start from expert 'expert2' v1" in logs, logs[-4000:]
    reg = Registry(str(storage))
    doc = reg.load()
    # the new version is trained against every other task and goes to the front of newest-first routing
    assert [(e.name, e.version, e.position) for e in doc.experts] == [("expert2", 1, 2), ("expert1", 2, 3)]
    assert doc.experts[-1].trained_against == ["shout"]  # tasks
    assert [(e.name, e.version, e.status) for e in doc.retired] == [("expert1", 1, "replaced")]
    assert (storage / "adapters" / "expert1" / "v1").is_dir() and new_adapter.is_dir()
    assert doc.events[-1].op == "replace"
    reg.adapter_path(reg.get("expert1"))  # hash-checked: the committed adapter is the re-run's, whole
    meta = json.loads((new_adapter / "see_meta.json").read_text())
    assert meta["init_from"] == "expert2 v1", meta
    if no_mounts is not None:
        pytest.skip(f"steps 3 and 4 (storage read-only) need bind mounts (CAP_SYS_ADMIN): {no_mounts}")


# -- concurrency ----------------------------------------------------------------------------------------
def test_concurrent_submissions_land_in_a_defined_order(jobs, background_jobs):
    storage, sids = background_jobs["concurrent"]["storage"], background_jobs["concurrent"]["sids"]
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


# -- acceptance: two experts one after the other --------------------------------------------------------
def test_two_submissions_build_the_sequence(jobs, background_jobs, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    two_experts = background_jobs["two_experts"].result(timeout=800)
    for sid in two_experts["sids"]:
        assert jobs.wait(sid) == "SUCCEEDED", f"{sid} failed:\n{jobs.logs(sid)[-5000:]}"
    assert len(two_experts["sids"]) == 2
    reg = Registry(str(two_experts["storage"]))
    recs = reg.list()
    assert [(r.name, r.version, r.position, r.status) for r in recs] == [
        ("arithmetic", 1, 1, "active"),
        ("shout", 1, 2, "active"),
    ]
    a, s = recs
    assert a.trained_against == [] and s.trained_against == ["arithmetic"]
    assert reg.rehearsal_buffer().tasks() == ["arithmetic", "shout"]
    # the first task's rehearsal samples, but the share held out for calibration (rehearsal.calibration_share)
    share = s.training["config"]["rehearsal"]["calibration_share"]
    kept = [q for q in reg.rehearsal_buffer().samples["arithmetic"]
            if not held_out(Query(q["input"], q["definition"]), share)]
    assert s.training["examples"]["rehearsal_negatives"] == len(kept) and 0 < len(kept) < a.rehearsal_count
    assert s.validation["calibration"]["negatives_by_source"]["arithmetic"] > 0
    assert [h.reason for h in s.threshold_history] == ["registered"] and s.calibration["threshold"] == s.threshold
    assert s.base_model.fingerprint == a.base_model.fingerprint and len(a.base_model.fingerprint) == 64
    assert s.job["submission_id"] == two_experts["sids"][1]
    for r in recs:  # adapters load with plain peft, from where the registry says they are
        base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        PeftModel.from_pretrained(base, str(reg.adapter_path(r)))
        assert r.training["ray_train"]["deepspeed"] == "zero2"
        assert r.training["deepspeed"]["zero_optimization"]["stage"] == 2
        # what Ray Train did with one worker and DeepSpeed (two workers: test_train_ray.py): every step, the
        # whole training set on the one worker, a falling loss, the checkpoint under the registry's storage
        fig = r.training["figures"]
        assert fig["workers"] == 1 and fig["deepspeed"] is True and fig["steps"] == 120, fig
        assert fig["examples"] == sum(r.training["examples"].values()) and fig["final_loss"] < fig["first_loss"]
        assert fig["tokens_per_s"] > 0
        assert r.training["checkpoint_uri"].startswith(str(two_experts["storage"] / "runs"))
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
