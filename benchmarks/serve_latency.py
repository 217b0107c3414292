#!/usr/bin/env python
"""Serving latency and throughput of SEE on Ray Serve, in one run (issue 4, acceptance 3).

    python benchmarks/serve_latency.py [--model tiny|real|random] [--requests 40] [--out docs/results/serve-latency.json]

``--model random --model-config DIR`` builds SmolLM2-135M's architecture with random weights from a folder holding
its config.json and tokenizer (benchmarks/gpu_path.py's ``random_model``): for machines that cannot install the
real checkpoint (the device machines here reach no package index). Latency does not depend on the weights' values,
only on the architecture, the prompt and the number of generated tokens.

Measures, on a local Ray with one replica per deployment:
1. per-hop Serve overhead: a DeploymentHandle ``ask`` of an expert, minus the model time the replica reports
   for that call (``compute_ms``), p50/p99 — what every hop of the dispatcher's walk costs beyond the model;
2. end-to-end latency through the HTTP endpoint (model forced to one expert: proxy + dispatcher + 1 hop)
   vs a direct in-process call of the same expert (``SEEModel.decide_and_generate``, same query, 1 thread);
3. p50 latency by position of the owning expert with 1/2/4/8 experts in the sequence, sequential vs
   concurrent (width = number of experts). Which expert owns a query is set through the registry thresholds
   (owner 0.0: accepts; every other expert 1.0: rejects), so that decisions are fixed and only the walk varies;
4. throughput (requests/s) at 1/4/16 concurrent clients with batching (max_batch_size 16) and without (1).

Writes the JSON (``--out``) and prints a Markdown table. Adapters are untrained LoRA adapters (latency does not
depend on their values). Run it on a quiet machine: other processes on 2 cores distort every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def make_adapter(cfg, model_path: str, out: Path) -> Path:
    """An untrained LoRA adapter in PEFT format (safetensors)."""
    from peft import LoraConfig, get_peft_model

    from see_ray.core.model import load_base_model

    base, _ = load_base_model(cfg.model, model_path)
    lc = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                    init_lora_weights=False)
    get_peft_model(base, lc).save_pretrained(str(out))
    return out


def bench_model(kind: str, max_tokens: int, overrides: list[str] | None = None, model_config: str | None = None):
    """(SEEConfig, model path) of the tiny random Llama (real tokenizer), the real SmolLM2-135M, or a random-weight
    model with ``model_config``'s architecture and tokenizer."""
    from see_ray.config import SEEConfig
    from see_ray.core.model import build_tiny_model, cache_root, resolve_model_path

    if kind == "tiny":
        mp = str(build_tiny_model(cache_root() / "test-models" / "tiny-llama-v1"))
        cfg = SEEConfig.from_yaml(None, [f"model.name_or_path={mp}", "model.max_prompt_tokens=64", "lora.r=16",
                                         "lora.alpha=32", f"routing.max_new_tokens={max_tokens}", *(overrides or [])])
        return cfg, mp
    if kind == "random":
        from gpu_path import random_model  # benchmarks/ is on sys.path when this script runs

        mp = str(random_model(Path(model_config), Path(tempfile.mkdtemp(prefix="see-random-model-"))))
        cfg = SEEConfig.from_yaml(None, [f"model.name_or_path={mp}", f"routing.max_new_tokens={max_tokens}",
                                         *(overrides or [])])
        return cfg, mp
    cfg = SEEConfig.from_yaml(None, [f"routing.max_new_tokens={max_tokens}", *(overrides or [])])
    return cfg, resolve_model_path(cfg.model)


def bench_registry(cfg, work: Path, adapter: Path, n: int = 8):
    """A registry of experts e1..en sharing one adapter, all rejecting (threshold 1.0). Returns it and the names."""
    from see_ray.core.model import fingerprint, resolve_model_path
    from see_ray.registry import BaseModelIdentity, Indicators, NewExpert, Registry

    registry = Registry(str(work / "registry"))
    names = [f"e{i}" for i in range(1, n + 1)]
    # the real fingerprint: serving refuses adapters of another base
    base = BaseModelIdentity(name_or_path=cfg.model.name_or_path, fingerprint=fingerprint(resolve_model_path(cfg.model)))
    for name in names:
        registry.add(NewExpert(name=name, task=name, adapter_dir=str(adapter), threshold=1.0,
                               base_model=base,
                               indicators=Indicators(accept=cfg.indicators.accept, reject=cfg.indicators.reject)))
    return registry, names


def set_owner(registry, owner: str | None, active: list[str]) -> None:
    """Thresholds that make ``owner`` accept everything and the other experts reject everything; only the
    experts in ``active`` stay enabled. Benchmark-only: writes the registry document directly."""
    with registry._transaction() as doc:  # noqa: SLF001 - the registry has no public threshold setter
        for e in doc.experts:
            e.threshold = 0.0 if e.name == owner else 1.0
            e.status = "active" if e.name in active else "disabled"


def noop_round_trip(n: int) -> float:
    """p50 ms of a DeploymentHandle call to a deployment whose method does nothing (same call pattern as the hop
    measurement): what Serve itself costs per hop on this machine, with no model, batching or thread behind it."""
    from ray import serve

    @serve.deployment(name="noop", max_ongoing_requests=16)
    class Noop:
        async def ask(self, req: dict) -> dict:
            return req

    h = serve.run(Noop.bind(), name="see-bench-noop", route_prefix=None)
    req = {"input": "x", "threshold": 1.0, "max_tokens": 1, "generate": False}
    for _ in range(5):
        h.ask.remote(req).result()
    ms = []
    for _ in range(n):
        t0 = time.perf_counter()
        h.ask.remote(req).result()
        ms.append((time.perf_counter() - t0) * 1000)
    serve.delete("see-bench-noop")
    return pct(ms, 50)


def profile_direct(model, adapter: str, query: str, max_tokens: int, rows: int, repeats: int) -> dict:
    """Where one replica's time goes, in-process, with the replica's own code path split into its phases:
    tokenization (prompt template + tokenizer), prefill (the decide pass, which keeps the KV cache) and decode
    (the greedy loop from that cache), for a batch of ``rows`` copies of ``query``. p50 over ``repeats`` runs."""
    import torch

    from see_ray.core.prompts import Query

    phases: dict[str, list[float]] = {"tokenize_ms": [], "prefill_ms": [], "decode_ms": []}
    tokens = 0
    with torch.inference_mode(), model._use(adapter) as m:  # noqa: SLF001 - the benchmark times the internals
        for _ in range(repeats):
            t0 = time.perf_counter()
            seqs = model.encode([Query(query)] * rows)
            ids, mask = model._left_pad(seqs)  # noqa: SLF001
            t1 = time.perf_counter()
            _, cache = model._decide_pass(m, ids, mask, keep_cache=True)  # noqa: SLF001
            t2 = time.perf_counter()
            gen_ids, gen_mask, cache = model._after_accept(ids, mask, cache, list(range(rows)))  # noqa: SLF001
            steps = list(model._decode(m, gen_ids, gen_mask, max_tokens, cache, True))  # noqa: SLF001
            t3 = time.perf_counter()
            tokens = len(steps)
            for k, v in zip(phases, ((t1 - t0), (t2 - t1), (t3 - t2))):
                phases[k].append(v * 1000)
    out = {k: pct(v, 50) for k, v in phases.items()}
    out["decode_ms_per_step"] = out["decode_ms"] / max(1, tokens)
    out["rows"], out["decode_steps"] = rows, tokens
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "real", "random"], default="tiny")
    ap.add_argument("--model-config", help="folder with config.json and the tokenizer (for --model random)")
    ap.add_argument("--requests", type=int, default=40, help="requests per latency cell")
    ap.add_argument("--hop-requests", type=int, default=60,
                    help="handle asks for the per-hop overhead (cheap: one prefill each; its p50 is the figure "
                         "closest to a target, so it gets more samples than the other cells)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "serve-latency.json"))
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import httpx
    import ray
    import torch
    from ray import serve

    from see_ray.core.expert import SEEModel
    from see_ray.core.prompts import Query
    from see_ray.serve import deploy_all
    from see_ray.config.serve import ServeConfig

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    if args.model == "random" and not args.model_config:
        ap.error("--model random needs --model-config")
    # model.device=cpu: the replicas here reserve no GPU and so compute on the CPU (the Serve replica's model.device=auto), and the direct call
    # they are compared with must too; on a GPU machine "auto" would put the direct call alone on the GPU.
    cfg, mp = bench_model(args.model, args.max_tokens, overrides=["model.device=cpu"], model_config=args.model_config)
    work = Path(tempfile.mkdtemp(prefix="see-serve-bench-"))
    adapter = make_adapter(cfg, mp, work / "adapter")
    registry, names = bench_registry(cfg, work, adapter)
    scfg = ServeConfig.from_yaml(None, [
        f"port={args.port}", "dispatch.registry_poll_s=1", "expert.autoscaling.max_replicas=1",
        "base.autoscaling.max_replicas=1", "expert.num_cpus=0.2", "batch.max_batch_size=16",
    ])
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    print(f"[bench] deploying 8 experts + base + dispatcher ({args.model} model) ...", flush=True)
    deploy_all(cfg, scfg, registry.storage.uri, progress=lambda m: print(f"[bench] {m}", flush=True))
    d = serve.get_app_handle(scfg.app_name)
    url = f"http://{scfg.host}:{scfg.port}"
    query = "The quick brown fox jumps over the lazy dog"
    http = httpx.Client(timeout=120)

    def post(model: str) -> tuple[float, dict]:
        t0 = time.perf_counter()
        r = http.post(url + "/v1/completions", json={"model": model, "prompt": query, "max_tokens": args.max_tokens})
        ms = (time.perf_counter() - t0) * 1000
        assert r.status_code == 200, r.text
        return ms, r.json()

    for _ in range(3):  # warm-up
        post("e1")
    res: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "load_avg_start": os.getloadavg()}, "model": args.model, "requests": args.requests,
                 "hop_requests": args.hop_requests, "max_tokens": args.max_tokens}

    # 1) per-hop overhead: handle ask minus the replica's model time, split into Serve's transport (handle,
    # router, RPC; outside the replica's method) and the replica's own queueing (gate, batch queue, worker
    # thread); and, for scale, the same round trip to a no-op deployment: Serve's floor on this machine
    h = serve.get_deployment_handle("e1", scfg.expert_app("e1"))
    over, hop, transport, in_replica = [], [], [], []
    for _ in range(args.hop_requests):
        t0 = time.perf_counter()
        r = h.ask.remote({"input": query, "threshold": 1.0, "max_tokens": 1, "generate": False}).result()
        ms = (time.perf_counter() - t0) * 1000
        hop.append(ms)
        over.append(ms - r["compute_ms"])
        transport.append(ms - r["replica_ms"])
        in_replica.append(r["replica_ms"] - r["compute_ms"])
    res["hop_overhead_ms_p50"], res["hop_overhead_ms_p99"] = pct(over, 50), pct(over, 99)
    res["hop_ms_p50"] = pct(hop, 50)
    res["hop_overhead_split_ms_p50"] = {"serve_transport": pct(transport, 50), "replica_queueing": pct(in_replica, 50),
                                        "noop_deployment_round_trip": noop_round_trip(args.hop_requests)}
    print(f"[bench] hop overhead p50 {res['hop_overhead_ms_p50']:.2f} ms p99 {res['hop_overhead_ms_p99']:.2f} ms "
          f"{res['hop_overhead_split_ms_p50']}", flush=True)

    # 2) end to end vs direct in-process
    direct_model = SEEModel(cfg, mp, batch_size=1)
    direct_model.load_adapter("e1", adapter)
    direct = []
    for _ in range(args.requests):
        t0 = time.perf_counter()
        direct_model.decide_and_generate([Query(query)], "e1", 0.0, args.max_tokens)
        direct.append((time.perf_counter() - t0) * 1000)
    # where a replica's time goes (same code path, phases timed): batch of 1 and a full batch of 16
    res["profile_direct"] = {f"batch_{b}": profile_direct(direct_model, "e1", query, args.max_tokens, b, 10)
                             for b in (1, 16)}
    del direct_model
    e2e, proxy_http, dispatcher_own, hop_e2e = [], [], [], []
    for _ in range(args.requests):
        ms, body = post("e1")
        tr = body["see_routing"]
        e2e.append(ms)
        proxy_http.append(ms - tr["total_ms"])  # client, HTTP and Serve's proxy, outside the dispatcher
        dispatcher_own.append(tr["total_ms"] - tr["asks"][0]["ms"])  # the dispatcher's own code
        hop_e2e.append(tr["asks"][0]["ms"])  # the hop to the expert, model time included
    res["direct_ms_p50"], res["e2e_ms_p50"] = pct(direct, 50), pct(e2e, 50)
    res["e2e_breakdown_ms_p50"] = {"client_http_proxy": pct(proxy_http, 50), "dispatcher": pct(dispatcher_own, 50),
                                   "hop_to_expert_incl_model": pct(hop_e2e, 50)}
    res["e2e_vs_direct_ratio"] = res["e2e_ms_p50"] / res["direct_ms_p50"]
    print(f"[bench] e2e p50 {res['e2e_ms_p50']:.1f} ms vs direct {res['direct_ms_p50']:.1f} ms "
          f"(x{res['e2e_vs_direct_ratio']:.2f})", flush=True)

    # 3) p50 by position of the owner, 1/2/4/8 experts, sequential vs concurrent
    pos: dict = {}
    for n in (1, 2, 4, 8):
        active = names[:n]
        seq_order = list(reversed(active))  # newest first
        for position in sorted({1, n}):
            owner = seq_order[position - 1]
            set_owner(registry, owner, active)
            info = d.refresh.remote().result()
            assert [e["name"] for e in info["sequence"]] == seq_order, info
            for mode in ("sequential", "concurrent"):
                d.set_dispatch.remote(mode, n).result()
                lat = []
                for _ in range(args.requests):
                    ms, body = post("see")
                    assert body["see_routing"]["expert"] == owner, body["see_routing"]
                    lat.append(ms)
                pos[f"{n}x{position}x{mode}"] = pct(lat, 50)
                print(f"[bench] {n} experts, owner at position {position}, {mode}: p50 {pct(lat, 50):.1f} ms", flush=True)
    res["p50_ms_by_experts_position_mode"] = pos
    res["last_vs_first_p50_ratio_8_experts_concurrent"] = pos["8x8xconcurrent"] / pos["8x1xconcurrent"]
    res["last_vs_first_p50_ratio_8_experts_sequential"] = pos["8x8xsequential"] / pos["8x1xsequential"]

    # 4) throughput at 1/4/16 clients, batching on/off (forced expert e1: one replica does all the work)
    set_owner(registry, "e1", names)
    d.refresh.remote().result()
    d.set_dispatch.remote(scfg.dispatch.mode, scfg.dispatch.width).result()
    tput: dict = {}
    tok_s: dict = {}
    for batching, size in (("batched", 16), ("unbatched", 1)):
        h.configure_batch.remote(size, scfg.batch.wait_s if size > 1 else 0.0).result()
        for clients in (1, 4, 16):
            per_client = max(2, args.requests // 2 if clients == 1 else args.requests // 4)
            errors: list = []
            completion_tokens: list[int] = []

            def client():
                with httpx.Client(timeout=300) as c:
                    for _ in range(per_client):
                        r = c.post(url + "/v1/completions",
                                   json={"model": "e1", "prompt": query, "max_tokens": args.max_tokens})
                        if r.status_code != 200:
                            errors.append(r.status_code)
                        else:
                            completion_tokens.append(r.json()["usage"]["completion_tokens"])

            threads = [threading.Thread(target=client) for _ in range(clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            rps = clients * per_client / wall
            tput[f"{batching}_{clients}"] = rps
            tok_s[f"{batching}_{clients}"] = sum(completion_tokens) / wall
            print(f"[bench] {batching}, {clients} clients: {rps:.1f} req/s, {sum(completion_tokens) / wall:.0f} "
                  f"generated tokens/s ({len(errors)} errors)", flush=True)
    h.configure_batch.remote(scfg.batch.max_batch_size, scfg.batch.wait_s).result()
    res["throughput_rps"] = tput
    res["throughput_generated_tokens_per_s"] = tok_s
    res["batching_throughput_ratio_16_clients"] = tput["batched_16"] / tput["unbatched_16"]
    res["load_avg_end"] = os.getloadavg()
    res["total_s"] = time.perf_counter() - t_start
    res["targets"] = {"hop_overhead_ms_p50": "<= 5", "e2e_vs_direct_ratio": "<= 1.15",
                      "last_vs_first_p50_ratio_8_experts_concurrent": "<= 1.3",
                      "batching_throughput_ratio_16_clients": ">= 3"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=2))
    print(f"wrote {args.out}")
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
