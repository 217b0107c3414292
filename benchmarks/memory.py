#!/usr/bin/env python
"""Memory (PSS) of expert replicas with the frozen base weights shared between them, vs private copies
(issue 6, "Shared base weights").

    python benchmarks/memory.py [--model real|tiny] [--experts 8] [--out docs/results/memory.json]

On a private local Ray (one node), for each mode (``share_base_weights`` on, then off):
1. deploy one expert replica alone, warm it up (one ask that accepts and generates), and measure the PSS of
   its process — plus, when shared, the node's holder actor, which exists only because of sharing;
2. deploy the other experts and the base (8 experts + base by default), warm every replica up, and measure
   the total PSS of all those replica processes (+ the holder).

PSS, not RSS: a page mapped by n processes counts 1/n in each, so the sum over processes is the memory they
really use together (RSS would count the shared copy once per replica). The numbers are read from
/proc/PID/smaps_rollup of the replica actor processes. Untrained LoRA adapters (memory does not depend on their
values). Writes the JSON (``--out``) and prints a summary. Memory is not timing-sensitive, but the run loads
2 x (1 + experts + 1) model replicas: check free memory first (private copies of the real model: ~1 GB each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_latency import bench_model, bench_registry, make_adapter

QUERY = "The quick brown fox jumps over the lazy dog"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_shared_memory(mapping: dict) -> bool:
    """A file-backed shared mapping (Ray's plasma store lives in /dev/shm), not the process' own heap."""
    path = mapping.get("path", "")
    return bool(mapping.get("inode")) and (path.startswith("/dev/shm") or "plasma" in path)


def warm(handle, is_expert: bool) -> None:
    """One request through the replica: a forward pass, generation from the KV cache, LoRA active."""
    if is_expert:
        handle.ask.remote({"input": QUERY, "threshold": 0.0, "max_tokens": 4, "generate": True}).result(timeout_s=600)
    else:
        handle.generate.remote({"input": QUERY, "max_tokens": 4}).result(timeout_s=600)


def snapshot(replicas: dict) -> dict:
    """PSS of every replica process (read here, from /proc) and where its base weights live."""
    import ray

    from see_ray.serve.shared_weights import HOLDER_NAMESPACE, mapping_of, pss_mib

    time.sleep(2)  # let the replicas finish their requests' bookkeeping before reading /proc
    out, holders = {}, set()
    for name, h in replicas.items():
        info = h.memory.remote().result(timeout_s=120)
        m = mapping_of(info["pid"], info["first_param_ptr"]) or {}
        out[name] = {
            "pid": info["pid"],
            "pss_mib": round(pss_mib(info["pid"]), 1),
            "weights_mapping": m.get("path") or "[anonymous]",
            "weights_in_shared_memory": in_shared_memory(m),
            "weights_mapping_pss_mib": round(m.get("pss_kib", 0) / 1024, 1),
            "object_id": info["object_id"],
            "weights_mib": round(info["weights_bytes"] / 2**20, 1),
        }
        if info["holder"]:
            holders.add(info["holder"])
    holder_pss = 0.0
    for name in holders:
        pid = ray.get(ray.get_actor(name, namespace=HOLDER_NAMESPACE).info.remote())["pid"]
        holder_pss += pss_mib(pid)
    total = sum(r["pss_mib"] for r in out.values()) + holder_pss
    return {"replicas": out, "holder_pss_mib": round(holder_pss, 1), "holders": sorted(holders),
            "total_pss_mib": round(total, 1)}


def run_mode(share: bool, cfg, registry, names: list[str], port: int, log) -> dict:
    from ray import serve
    from ray.serve import RunTarget

    from see_ray.config.constants import BASE_DEPLOYMENT
    from see_ray.serve import base_app, expert_app, start_serve
    from see_ray.config.serve import ServeConfig
    from see_ray.serve.shared_weights import drop_holders

    scfg = ServeConfig.from_yaml(None, [
        f"port={port}", f"share_base_weights={share}",
        "expert.autoscaling.max_replicas=1", "base.autoscaling.max_replicas=1",  # exactly one replica each
    ])
    start_serve(scfg)
    recs = {r.name: r for r in registry.list()}
    uri = registry.storage.uri
    mode = "shared" if share else "private"
    t0 = time.perf_counter()
    first = names[0]
    serve.run(expert_app(recs[first], cfg, scfg, uri), name=scfg.expert_app(first), route_prefix=None)
    replicas = {first: serve.get_deployment_handle(first, scfg.expert_app(first))}
    warm(replicas[first], True)
    one = snapshot(replicas)
    log(f"{mode}: one replica {one['total_pss_mib']:.0f} MiB PSS (+ holder {one['holder_pss_mib']:.0f}) "
        f"after {time.perf_counter() - t0:.0f} s")

    targets = [RunTarget(expert_app(recs[n], cfg, scfg, uri), name=scfg.expert_app(n), route_prefix=None)
               for n in names[1:]]
    targets.append(RunTarget(base_app(cfg, scfg), name=scfg.base_app, route_prefix=None))
    serve.run_many(targets, wait_for_applications_running=True)
    for n in names[1:]:
        replicas[n] = serve.get_deployment_handle(n, scfg.expert_app(n))
    replicas[BASE_DEPLOYMENT] = serve.get_deployment_handle(BASE_DEPLOYMENT, scfg.base_app)
    for n, h in replicas.items():
        warm(h, n != BASE_DEPLOYMENT)
    many = snapshot(replicas)
    log(f"{mode}: {len(names)} experts + base {many['total_pss_mib']:.0f} MiB PSS after {time.perf_counter() - t0:.0f} s")

    for app in [scfg.expert_app(n) for n in names] + [scfg.base_app]:
        serve.delete(app)
    drop_holders()
    time.sleep(3)  # the replica processes exit
    return {"one": one, "many": many, "ratio": round(many["total_pss_mib"] / one["total_pss_mib"], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "real"], default="real")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="model.dtype of the base (float32: the checkpoint's own dtype)")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "memory.json"))
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # the cluster's workers (replicas, the holder) import see_ray from this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    import ray
    import torch
    from ray import serve

    torch.set_num_threads(1)
    log = lambda m: print(f"[memory] {m}", flush=True)
    t_start = time.perf_counter()
    cfg, mp = bench_model(args.model, 4, [f"model.dtype={args.dtype}"])
    work = Path(tempfile.mkdtemp(prefix="see-mem-bench-"))
    adapter = make_adapter(cfg, mp, work / "adapter")
    registry, names = bench_registry(cfg, work, adapter, args.experts)
    # address="local": always a new private cluster, never someone else's; a short temp dir (socket paths)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="srm-", dir="/tmp"))
    port = free_port()
    try:
        shared = run_mode(True, cfg, registry, names, port, log)
        private = run_mode(False, cfg, registry, names, port, log)
    finally:
        serve.shutdown()
        ray.shutdown()

    s_many = shared["many"]["replicas"]
    weights_mib = next(iter(s_many.values()))["weights_mib"]
    # what each replica costs beyond its share of the weights: the process (Python, Ray, Serve, torch, ...)
    overhead = [r["pss_mib"] - r["weights_mapping_pss_mib"] for r in s_many.values()]
    mem = {}
    with open("/proc/meminfo") as f:
        meminfo = f.readlines()
    for line in meminfo:
        k, v = line.split(":")
        if k in ("MemTotal", "MemAvailable"):
            mem[k] = round(int(v.split()[0]) / 2**20, 1)
    res = {
        "pss_mib_one_replica": shared["one"]["total_pss_mib"],
        "pss_mib_8_experts_plus_base" if args.experts == 8 else f"pss_mib_{args.experts}_experts_plus_base":
            shared["many"]["total_pss_mib"],
        "ratio_many_vs_one": shared["ratio"],
        "target": "pss_mib_8_experts_plus_base <= 2 x pss_mib_one_replica",
        "target_met": shared["ratio"] <= 2.0,
        "experts": args.experts,
        "base_weights_mib": weights_mib,
        "per_replica_overhead_mib_mean": round(sum(overhead) / len(overhead), 1),
        "private": {"pss_mib_one_replica": private["one"]["total_pss_mib"],
                    "pss_mib_many": private["many"]["total_pss_mib"], "ratio_many_vs_one": private["ratio"]},
        "shared_detail": shared,
        "private_detail": private,
        "model": args.model,
        "dtype": args.dtype,
        "model_path": mp,
        "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "memory_gib": mem,
                    "load_avg_end": os.getloadavg()},
        "versions": {"ray": ray.__version__, "torch": torch.__version__},
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
