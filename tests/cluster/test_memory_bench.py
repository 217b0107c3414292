"""benchmarks/memory.py runs end to end in one command (tiny model, 2 experts + base, its own local Ray) and
tells shared from private replicas by where their weights live, read from /proc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]


def test_memory_benchmark_tiny(tmp_path):
    out = tmp_path / "memory.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "memory.py"), "--model", "tiny", "--experts", "2", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=840, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
