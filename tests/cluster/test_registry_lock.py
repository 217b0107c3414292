"""The registry's lock on object-store roots, where no file lock exists: a named Ray actor serializes the
writers of every process connected to the cluster (the session's Ray head here)."""

from __future__ import annotations

import threading

import pyarrow.fs as pafs
import pytest

from see_ray.registry import Registry, RegistryLockTimeout
from see_ray.registry.storage import Storage

from support import new_expert

pytestmark = [pytest.mark.ray]


def test_actor_lock_serializes_object_store_writers(ray_head, tmp_path):
    fs = pafs._MockFileSystem()
    uri = f"mock://bucket/{tmp_path.name}"
    regs = [Registry(Storage(uri, filesystem=fs), lock_timeout_s=60) for _ in range(3)]
    assert regs[0].lock_kind == "actor"
    errors = []

    def add(i):
        try:
            regs[i].add(new_expert(tmp_path, f"e{i}"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    doc = regs[0].load()
    assert sorted(e.name for e in doc.experts) == ["e0", "e1", "e2"]
    assert [e.position for e in doc.experts] == [1, 2, 3] and doc.generation == 3
    # a held lock makes another writer wait, then time out with a clear error
    short = Registry(Storage(uri, filesystem=fs), lock_timeout_s=0.5)
    with regs[0]._get_lock().hold():
        with pytest.raises(RegistryLockTimeout, match="held by"):
            short.disable("e0")
