"""The expert registry and its storage layer, without Ray or models: fast.

Covers the record fields, ordering and versions, every operation (add, list, show, disable/enable, remove,
purge, replace), crash safety (a write killed before the swap leaves the document byte-for-byte as it was),
serialization of concurrent writers (processes), the generation fence, object-store semantics (pyarrow's
in-memory store), and the ``see-ray registry`` subcommands.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import save_file

from see_ray.registry import (
    REGISTRY_FILE,
    ConcurrentModification,
    ExpertExists,
    FileLock,
    Registry,
    RegistryError,
    RegistryLockTimeout,
    format_sequence,
)
from see_ray.registry.storage import Storage, StorageError
from see_ray.tools.registry_cli import main as registry_cli

from support import REPO, fake_adapter, new_expert


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(str(tmp_path / "store"), lock_timeout_s=10)


def registry_bytes(reg: Registry) -> bytes | None:
    p = reg.storage.local_path(REGISTRY_FILE)
    return p.read_bytes() if p.exists() else None


# -- records and order ------------------------------------------------------------------------------
def test_empty_registry_reads_without_anything(reg):
    assert reg.list() == []
    assert reg.load().generation == 0
    assert reg.rehearsal_buffer().samples == {}


def test_add_records_every_field_and_files(reg, tmp_path):
    a = reg.add(new_expert(tmp_path, "alpha"))
    b = reg.add(new_expert(tmp_path, "beta", trained_against=["alpha"]))
    assert [(e.name, e.version, e.position) for e in reg.list()] == [("alpha", 1, 1), ("beta", 1, 2)]
    rec = reg.get("beta")
    assert rec.task == "beta" and rec.status == "active" and rec.threshold == 0.6
    assert rec.base_model.fingerprint == "abc" and rec.indicators.accept == " accept"
    assert rec.trained_against == ["alpha"] and rec.validation["reject_rate"] == 0.9
    assert rec.training["figures"]["final_loss"] == 0.1 and rec.created_at and rec.job["submission_id"] == "test"
    # files live where the record says, and the adapter hash is checked on the way out
    assert Path(rec.adapter_uri) == reg.storage.local_path("adapters/beta/v1")
    assert (Path(rec.adapter_uri) / "adapter_model.safetensors").exists()
    assert reg.adapter_path(rec) == Path(rec.adapter_uri)
    assert rec.rehearsal_count == 3 and Path(rec.rehearsal_uri).exists()
    buf = reg.rehearsal_buffer()
    assert buf.tasks() == ["alpha", "beta"] and buf.samples["alpha"][0]["input"] == "alpha q0"
    assert reg.rehearsal_buffer(exclude={"alpha"}).tasks() == ["beta"]
    doc = reg.load()
    assert doc.generation == 2 and doc.next_position == 3
    assert [(ev.op, ev.name, ev.position) for ev in doc.events] == [("add", "alpha", 1), ("add", "beta", 2)]
    assert a.position < b.position
    table = format_sequence(doc.experts)
    assert table.index("beta") < table.index("alpha")  # newest first


def test_copied_registry_resolves_its_own_files(reg, tmp_path):
    import shutil

    reg.add(new_expert(tmp_path, "alpha"))
    shutil.copytree(reg.storage.local_path(), tmp_path / "copy")
    shutil.rmtree(reg.storage.local_path())
    copy = Registry(str(tmp_path / "copy"))
    rec = copy.get("alpha")
    assert copy.adapter_path(rec) == tmp_path / "copy" / "adapters" / "alpha" / "v1"
    assert copy.rehearsal_buffer().tasks() == ["alpha"]


def test_tampered_adapter_is_refused(reg, tmp_path):
    from see_ray.core.expert import AdapterError

    rec = reg.add(new_expert(tmp_path, "alpha"))
    save_file({"w": torch.ones(4) * 7}, str(Path(rec.adapter_uri) / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="hash"):
        reg.adapter_path(rec)


def test_same_name_refused_without_replace_and_nothing_written(reg, tmp_path):
    reg.add(new_expert(tmp_path, "alpha"))
    before = registry_bytes(reg)
    with pytest.raises(ExpertExists, match="--replace"):
        reg.add(new_expert(tmp_path, "alpha", seed=1))
    assert registry_bytes(reg) == before
    assert not reg.storage.exists("adapters/alpha/v2")


def test_second_expert_for_same_task_refused(reg, tmp_path):
    reg.add(new_expert(tmp_path, "alpha", task="t1"))
    with pytest.raises(RegistryError, match="already served by expert 'alpha'"):
        reg.add(new_expert(tmp_path, "other", task="t1"))


def test_invalid_names_refused(reg, tmp_path):
    with pytest.raises(ValueError, match="invalid"):
        reg.check_can_add("../evil", "t", False)
    with pytest.raises(Exception):
        new = new_expert(tmp_path, "ok")
        new.name = "bad name"
        reg.add(new)
    assert reg.list() == []


def test_replace_makes_new_version_newest_and_keeps_old_files(reg, tmp_path):
    reg.add(new_expert(tmp_path, "alpha"))
    reg.add(new_expert(tmp_path, "beta"))
    rec = reg.add(new_expert(tmp_path, "alpha", seed=5), replace=True)
    assert (rec.version, rec.position) == (2, 3)
    doc = reg.load()
    assert [(e.name, e.version) for e in doc.experts] == [("beta", 1), ("alpha", 2)]
    assert [(e.name, e.version, e.status) for e in doc.retired] == [("alpha", 1, "replaced")]
    assert reg.storage.exists("adapters/alpha/v1") and reg.storage.exists("adapters/alpha/v2")
    assert doc.events[-1].op == "replace" and "version 1" in doc.events[-1].detail
    # the buffer holds the new version's samples for the task, once
    assert reg.rehearsal_buffer().tasks() == ["beta", "alpha"]


def test_disable_enable_keep_position(reg, tmp_path):
    reg.add(new_expert(tmp_path, "alpha"))
    reg.add(new_expert(tmp_path, "beta"))
    reg.disable("alpha")
    assert [e.name for e in reg.list(include_disabled=False)] == ["beta"]
    assert [(e.name, e.status) for e in reg.list()] == [("alpha", "disabled"), ("beta", "active")]
    assert "alpha" in reg.rehearsal_buffer().tasks()  # still a negative for new experts: it may come back
    reg.enable("alpha")
    assert [(e.name, e.status, e.position) for e in reg.list()] == [("alpha", "active", 1), ("beta", "active", 2)]
    with pytest.raises(RegistryError, match="no expert"):
        reg.disable("nope")


def test_remove_keeps_files_then_readd_continues_versions(reg, tmp_path):
    reg.add(new_expert(tmp_path, "alpha"))
    reg.remove("alpha")
    assert reg.list() == [] and reg.storage.exists("adapters/alpha/v1")
    assert reg.load().retired[0].status == "removed"
    rec = reg.add(new_expert(tmp_path, "alpha", seed=2))  # not in the sequence any more: no --replace needed
    assert (rec.version, rec.position) == (2, 2)


def test_purge_deletes_every_version(reg, tmp_path):
    reg.add(new_expert(tmp_path, "alpha"))
    reg.add(new_expert(tmp_path, "alpha", seed=1), replace=True)
    reg.add(new_expert(tmp_path, "beta"))
    reg.remove("alpha", purge=True)
    doc = reg.load()
    assert [e.name for e in doc.experts] == ["beta"] and doc.retired == []
    assert not reg.storage.exists("adapters/alpha")
    assert reg.storage.list_dir("rehearsal/alpha") == []
    assert reg.storage.exists("adapters/beta/v1")
    assert doc.events[-1].op == "purge"


# -- crash safety ---------------------------------------------------------------------------------------
def test_killed_before_swap_leaves_registry_exactly_as_before(reg, tmp_path, monkeypatch):
    reg.add(new_expert(tmp_path, "alpha"))
    before = registry_bytes(reg)
    real_write = Storage.write_text_atomic

    def dies_at_swap(self, rel, text):
        if rel == REGISTRY_FILE:
            raise KeyboardInterrupt("killed")  # what SIGTERM/SIGKILL would do at the worst moment
        return real_write(self, rel, text)

    monkeypatch.setattr(Storage, "write_text_atomic", dies_at_swap)
    with pytest.raises(KeyboardInterrupt):
        reg.add(new_expert(tmp_path, "beta"))
    assert registry_bytes(reg) == before
    assert reg.storage.exists("adapters/beta/v1")  # an orphan: uploaded first, never referenced
    monkeypatch.setattr(Storage, "write_text_atomic", real_write)
    rec = reg.add(new_expert(tmp_path, "beta", seed=3))  # the re-run overwrites the orphan
    assert (rec.version, rec.position) == (1, 2)
    assert reg.adapter_path(rec)  # hash matches the re-run's adapter, not the orphan's


def test_atomic_write_never_shows_partial_content(tmp_path):
    st = Storage(str(tmp_path))
    st.write_text_atomic("doc.json", "old")
    big = "x" * 2_000_000
    seen = set()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(len(st.read_text("doc.json")))

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(20):
        st.write_text_atomic("doc.json", big)
        st.write_text_atomic("doc.json", "old")
    stop.set()
    t.join()
    assert seen <= {3, len(big)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_check_callback_aborts_without_writing(reg, tmp_path):
    reg.add(new_expert(tmp_path, "alpha"))
    before = registry_bytes(reg)

    def check(doc):
        assert [e.name for e in doc.experts] == ["alpha"]  # sees the current document, under the lock
        raise RuntimeError("stale")

    with pytest.raises(RuntimeError, match="stale"):
        reg.add(new_expert(tmp_path, "beta"), check=check)
    assert registry_bytes(reg) == before and not reg.storage.exists("adapters/beta")


def test_generation_fence_refuses_a_lost_lock(reg, tmp_path):
    reg.add(new_expert(tmp_path, "alpha"))
    with pytest.raises(ConcurrentModification):
        with reg._transaction():
            # another writer that ignored the lock commits in between
            other = Registry(reg.storage)
            doc = other.load()
            doc.generation += 1
            other.storage.write_text_atomic(REGISTRY_FILE, doc.model_dump_json())


# -- concurrency ----------------------------------------------------------------------------------------
def _add_in_process(root: str, tmp: str, name: str, barrier) -> None:
    reg = Registry(root, lock_timeout_s=60)
    new = new_expert(Path(tmp), name)
    barrier.wait()
    reg.add(new)


def test_concurrent_writers_are_serialized(tmp_path):
    root = str(tmp_path / "store")
    names = [f"e{i}" for i in range(6)]
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(len(names))
    procs = [ctx.Process(target=_add_in_process, args=(root, str(tmp_path), n, barrier)) for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    doc = Registry(root).load()
    assert sorted(e.name for e in doc.experts) == names  # nobody's write was lost
    assert [e.position for e in doc.experts] == list(range(1, 7))  # a total, recorded order
    assert [ev.name for ev in doc.events] == [e.name for e in doc.experts]
    assert doc.generation == 6


def test_lock_times_out_with_a_clear_error(tmp_path):
    lock_path = tmp_path / "registry.lock"
    held, release = threading.Event(), threading.Event()

    def holder():
        with FileLock(lock_path, 5).hold():
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    with pytest.raises(RegistryLockTimeout, match="registry lock"):
        with FileLock(lock_path, 0.3).hold():
            pass
    release.set()
    t.join()
    with FileLock(lock_path, 1).hold():  # free again
        pass


# -- storage ----------------------------------------------------------------------------------------
def test_object_store_semantics_with_pyarrow_mock():
    fs = pafs._MockFileSystem()
    st = Storage("mock://bucket/see", filesystem=fs)
    assert not st.is_local
    st.write_text_atomic("registry.json", '{"a": 1}')
    assert json.loads(st.read_text("registry.json")) == {"a": 1}
    with pytest.raises(FileNotFoundError):
        st.read_text("missing.json")


def test_object_store_adapter_roundtrip(tmp_path):
    fs = pafs._MockFileSystem()
    st = Storage("mock://bucket/see", filesystem=fs)
    src = fake_adapter(tmp_path / "a", seed=3)
    uri = st.upload_dir(src, "adapters/x/v1")
    assert uri == "mock://bucket/see/adapters/x/v1"
    assert st.list_dir("adapters/x/v1") == ["adapter_config.json", "adapter_model.safetensors", "see_meta.json"]
    out = st.download_dir("adapters/x/v1", tmp_path / "back")
    assert (out / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()
    st.delete_dir("adapters/x")
    assert not st.exists("adapters/x/v1")


def test_storage_refuses_bad_uris_and_escapes(tmp_path):
    with pytest.raises(StorageError, match="not a URI"):
        Storage("nosuchscheme://x/y")
    st = Storage(str(tmp_path))
    with pytest.raises(StorageError, match="escapes"):
        st.path("../etc/passwd")
    with pytest.raises(StorageError, match="root"):
        st.delete_dir("")


def test_relative_local_root_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    st = Storage("rel/store")
    assert st.uri == str(tmp_path / "rel" / "store") and st.is_local


def test_object_store_registry_needs_ray_for_writes(tmp_path):
    # In a fresh interpreter: the suite's Ray fixtures may have connected this process to a cluster already,
    # and the point is what happens where no Ray session exists.
    code = """
import pyarrow.fs as pafs
from see_ray.registry import Registry, RegistryError
from see_ray.registry.storage import Storage
reg = Registry(Storage("mock://bucket/see", filesystem=pafs._MockFileSystem()))
assert reg.list() == []  # reading needs nothing
try:
    reg.disable("x")
except RegistryError as e:
    assert "Ray" in str(e), e
    print("refused:", e)
else:
    raise SystemExit("a write without Ray was not refused")
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)  # the checkout under test
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "refused:" in r.stdout, r.stdout + r.stderr


# -- CLI --------------------------------------------------------------------------------------------
def test_registry_cli(reg, tmp_path, capsys):
    reg.add(new_expert(tmp_path, "alpha"))
    reg.add(new_expert(tmp_path, "beta"))
    root = reg.storage.uri
    assert registry_cli(["--storage", root, "list"]) == 0
    out = capsys.readouterr().out
    assert out.index("beta") < out.index("alpha")
    assert registry_cli(["--storage", root, "show", "alpha"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "alpha"
    assert registry_cli(["--storage", root, "disable", "alpha"]) == 0
    assert reg.get("alpha").status == "disabled"
    assert registry_cli(["--storage", root, "enable", "alpha"]) == 0
    assert registry_cli(["--storage", root, "remove", "beta"]) == 0
    assert registry_cli(["--storage", root, "list", "--json", "--retired"]) == 0
    capsys.readouterr()
    assert registry_cli(["--storage", root, "remove", "beta", "--purge"]) == 0
    assert not reg.storage.exists("adapters/beta")
    assert registry_cli(["--storage", root, "show", "nope"]) == 2
    assert "no expert named 'nope'" in capsys.readouterr().err


def test_registry_subcommands_in_main_cli(reg, tmp_path, capsys):
    from see_ray.tools.cli import main

    reg.add(new_expert(tmp_path, "alpha"))
    assert main(["registry", "--storage", reg.storage.uri, "list"]) == 0
    assert "alpha" in capsys.readouterr().out


def test_threshold_history_starts_at_registration_and_grows_with_recalibration(reg, tmp_path):
    """The record keeps the operating point its threshold was chosen at, and every threshold it has had: a
    re-calibration changes the scalar only (the adapter is untouched)."""
    cal = {"threshold": 0.6, "false_rejection": 0.0, "false_acceptance": 0.05, "n_positives": 20, "n_negatives": 40,
           "negatives_by_source": {"general": 40}}
    reg.add(new_expert(tmp_path, "alpha", calibration=cal))
    rec = reg.get("alpha")
    assert rec.calibration == cal
    assert [(h.threshold, h.reason, h.calibration) for h in rec.threshold_history] == [(0.6, "registered", cal)]
    sha = rec.adapter_sha256
    new_cal = {**cal, "threshold": 0.8, "false_acceptance": 0.01}
    reg.set_threshold("alpha", 0.8, "re-calibrated with task beta's held-out queries", new_cal)
    rec = reg.get("alpha")
    assert rec.threshold == 0.8 and rec.calibration == new_cal and rec.adapter_sha256 == sha and rec.version == 1
    assert [h.threshold for h in rec.threshold_history] == [0.6, 0.8]
    assert rec.threshold_history[1].reason.startswith("re-calibrated") and rec.threshold_history[1].at
    with pytest.raises(ValueError, match="must lie in"):
        reg.set_threshold("alpha", 1.0, "bad")
    with pytest.raises(RegistryError, match="no expert named"):
        reg.set_threshold("nobody", 0.7, "bad")
