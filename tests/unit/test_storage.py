"""One storage URI for the registry, rehearsal buffers, adapters and training runs: a local folder by default,
a ``file://`` URI, any pyarrow file system, and fsspec-only file systems through pyarrow's FSSpecHandler."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from see_ray.registry import REGISTRY_FILE, Registry
from see_ray.registry.storage import Storage, StorageError

from support import new_expert


def _adapter(tmp_path: Path) -> Path:
    d = tmp_path / "adapter"
    (d / "sub").mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"\x00weights" * 100)
    (d / "sub" / "extra.json").write_text("{}")
    return d


def test_file_uri_is_the_same_root_as_the_plain_path(tmp_path):
    root = tmp_path / "store"
    by_uri, by_path = Storage(f"file://{root}"), Storage(str(root))
    assert by_uri.is_local and by_uri.native and by_uri.uri == f"file://{root}"
    by_uri.write_text_atomic("registry.json", '{"x": 1}')
    assert by_path.read_text("registry.json") == '{"x": 1}'
    assert (root / "registry.json").is_file()
    # Ray Train gets the URI itself (each node resolves it again)
    assert by_uri.for_ray_train("runs") == (f"file://{root}/runs", None)


def test_registry_under_a_file_uri_keeps_everything_under_that_root(tmp_path):
    root = tmp_path / "store"
    reg = Registry(f"file://{root}")
    rec = reg.add(new_expert(tmp_path, "expert1", task="arith"))
    assert rec.adapter_uri == f"file://{root}/adapters/expert1/v1"
    assert rec.rehearsal_uri.startswith(f"file://{root}/rehearsal/")
    assert sorted(p.name for p in root.iterdir()) == ["adapters", "registry.json", "registry.lock", "rehearsal"]
    # a replica resolves the adapter through the storage URI (hash-checked), here the folder itself
    assert reg.adapter_path(rec) == root / "adapters" / "expert1" / "v1"
    # the same registry read through the plain path
    assert [r.name for r in Registry(str(root)).list()] == ["expert1"]


def test_fsspec_only_filesystem_works_through_pyarrow(tmp_path):
    """``memory://`` is known to fsspec, not to pyarrow: it is wrapped, and behaves like an object store
    (no rename, downloads for local use)."""
    st = Storage("memory://see-test-bucket/root")
    assert isinstance(st.fs, pafs.PyFileSystem) and not st.is_local and not st.native
    st.write_text_atomic(REGISTRY_FILE, json.dumps({"format": 1}))
    assert json.loads(st.read_text(REGISTRY_FILE)) == {"format": 1}
    uri = st.upload_dir(_adapter(tmp_path), "adapters/x/v1")
    assert uri == "memory://see-test-bucket/root/adapters/x/v1"
    assert st.list_dir("adapters/x") == ["v1"]
    local = st.local_dir("adapters/x/v1", cache_dir=tmp_path / "cache")
    assert local.is_relative_to(tmp_path / "cache")
    assert (local / "adapter_model.safetensors").read_bytes() == b"\x00weights" * 100
    assert (local / "sub" / "extra.json").read_text() == "{}"
    # Ray Train gets the path inside the wrapped file system and the file system object
    path, fs = st.for_ray_train("runs")
    assert path == "/see-test-bucket/root/runs" and fs is st.fs
    # a reader opening the same URI sees the same files (fsspec's memory store is per process)
    assert Storage("memory://see-test-bucket/root").exists("adapters/x/v1/sub/extra.json")
    st.delete_dir("adapters/x")
    assert not st.exists("adapters/x/v1")


def test_object_store_registry_reads_and_downloads_hash_checked(tmp_path):
    """A registry on a non-local file system: records written there, the adapter downloaded and hash-checked."""
    from see_ray.core.expert import ADAPTER_WEIGHTS, AdapterError

    st = Storage("memory://see-test-registry/r")
    reg = Registry(st)
    assert reg.lock_kind == "actor"  # object stores are locked through a Ray actor (needs a cluster)

    class _NoLock:  # writes here are single-threaded; the actor lock is exercised by the Ray suites
        def hold(self):
            import contextlib

            return contextlib.nullcontext()

    reg._lock = _NoLock()
    rec = reg.add(new_expert(tmp_path, "expert1", task="arith"))
    assert rec.adapter_uri == "memory://see-test-registry/r/adapters/expert1/v1"
    path = Registry(Storage("memory://see-test-registry/r")).adapter_path(rec, cache_dir=tmp_path / "dl")
    assert path.is_relative_to(tmp_path / "dl") and (path / ADAPTER_WEIGHTS).is_file()
    # a corrupted upload is refused, naming the adapter
    with st.fs.open_output_stream(st.path("adapters/expert1/v1/" + ADAPTER_WEIGHTS)) as f:
        f.write(b"tampered")
    with pytest.raises(AdapterError, match="adapters/expert1/v1"):
        reg.adapter_path(rec, cache_dir=tmp_path / "dl2")


def test_unknown_scheme_names_the_uri():
    with pytest.raises(StorageError, match=r"nosuchfs://x.*pyarrow.*fsspec"):
        Storage("nosuchfs://x/y")
