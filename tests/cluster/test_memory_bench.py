"""benchmarks/memory.py runs end to end in one command (tiny model, 2 experts + base, a Ray of its own) and
tells shared from private replicas by where their weights live, read from /proc. The command runs beside the
other cluster tests (the ``memory_benchmark`` fixture); this test waits for it and checks what it wrote."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def test_memory_benchmark_tiny(memory_benchmark):
    proc, out = memory_benchmark["proc"], memory_benchmark["out"]
    proc.wait(timeout=840)
    assert proc.returncode == 0, memory_benchmark["log"].read_text()[-6000:]
    res = json.loads(out.read_text())
    assert res["experts"] == 2 and res["model"] == "tiny" and res["command"].startswith("python benchmarks/memory.py")
    for key in ("pss_mib_one_replica", "pss_mib_2_experts_plus_base", "ratio_many_vs_one", "base_weights_mib"):
        assert res[key] > 0, key

    shared = res["shared_detail"]["many"]["replicas"]
    assert set(shared) == {"e1", "e2", "base"}
    assert len({r["pid"] for r in shared.values()}) == 3
    assert all(r["weights_in_shared_memory"] for r in shared.values()), shared
    assert len({r["object_id"] for r in shared.values()}) == 1
    assert res["shared_detail"]["many"]["holder_pss_mib"] > 0  # the holder is counted, not hidden

    private = res["private_detail"]["many"]["replicas"]
    assert not any(r["weights_in_shared_memory"] or r["object_id"] for r in private.values()), private
    # a replica's share of the weights: a third of them when shared by three, all of them when private
    w = res["base_weights_mib"]
    assert all(r["weights_mapping_pss_mib"] < 0.6 * w for r in shared.values()), shared
    one = res["shared_detail"]["one"]["replicas"]["e1"]
    assert one["weights_in_shared_memory"] and one["weights_mapping_pss_mib"] >= 0.9 * w, one
