#!/usr/bin/env python
"""The GPU path once, end to end (issue 5): train an expert on the GPU, serve it with ``num_gpus``, ask it.

    python benchmarks/gpu_path.py --model random --model-config DIR [--steps 100] [--out docs/results/gpu-path.json]
    python benchmarks/gpu_path.py --model ~/.cache/see-ray/test-models/tiny-llama-v1 --steps 5 --requests 3  # CPU smoke

Everything goes through see-ray's own code, the same functions `see-ray demo`, `jobs/add_expert.py` and
`see-ray serve` use:
1. a local Ray on 127.0.0.1 (no dashboard);
2. the model: ``--model random`` builds a randomly initialised model from ``--model-config`` (a folder with a
   Hugging Face ``config.json`` and the tokenizer, e.g. SmolLM2-135M's) and saves it as a checkpoint; weights
   are random, so answers and routing quality mean nothing, and what is measured is the GPU path itself
   (placement, nccl, bf16, throughput, latency). ``--model PATH`` takes an existing checkpoint folder;
3. one expert (the demo's ``arithmetic`` task) added by the add-expert job (``see_ray.training.add_expert``, imported and
   run with its own argument parser: reconstruction, Ray Train + DeepSpeed ZeRO-2 with ``--gpu``, validation,
   registration). On a GPU: one Ray Train worker holding the GPU, nccl, DeepSpeed bf16. DeepSpeed's FusedAdam is
   built once before (JIT, ``--fused-adam-timeout``) into the extensions folder the worker is given; if that
   build fails, the run trains with torch's AdamW inside DeepSpeed (``optimizer.params.torch_adam``) and says so;
4. the registry served by ``serve.deploy_all`` (experts, base, dispatcher) with ``expert.num_gpus`` and
   ``base.num_gpus`` (fractions, so that both replicas share the one GPU);
5. requests over HTTP: ``POST /v1/route`` (decisions only), ``POST /v1/chat/completions`` routed (model
   ``see``) and forced (the expert's name, ``base``), one client at a time, then a few concurrent clients.

Writes one JSON with the figures (environment, training, placement, latency) and prints it. The tests never run
this; on a CPU machine it runs the same path with ``num_gpus`` 0 and gloo (the smoke check above).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:
    import see_ray  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
EXPERT = "arithmetic"


def log(msg: str) -> None:
    print(f"[gpu_path {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- environment ------------------------------------------------------------------------------------------
def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "ray", "deepspeed", "transformers", "peft", "accelerate", "pydantic", "protobuf", "grpcio"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def gpu_facts() -> dict:
    import torch

    facts = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(gpu_name=p.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                     compute_capability=f"{p.major}.{p.minor}", bf16_supported=torch.cuda.is_bf16_supported(),
                     nccl=".".join(map(str, torch.cuda.nccl.version())))
    facts["nvidia_smi"] = nvidia_smi(["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    return facts


def nvidia_smi(args: list[str]) -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"failed: {e}"


# -- model ------------------------------------------------------------------------------------------------
def random_model(config_dir: Path, target: Path, seed: int = 0) -> Path:
    """A randomly initialised model with ``config_dir``'s architecture and tokenizer, saved as a checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(config_dir)
    tok = AutoTokenizer.from_pretrained(config_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return target


# -- DeepSpeed's fused Adam -------------------------------------------------------------------------------
def build_fused_adam(ext_dir: Path, timeout_s: float) -> dict:
    """JIT-build DeepSpeed's FusedAdam (what its GPU AdamW uses) into ``ext_dir`` in a child process, so that a
    hang or a compiler error cannot take this run down; the training worker then loads the built op."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext_dir), "MAX_JOBS": str(os.cpu_count() or 4)}
    code = "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load(); print('FUSED_ADAM_OK')"
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s)
        ok = r.returncode == 0 and "FUSED_ADAM_OK" in r.stdout
        tail = (r.stdout + r.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        ok, tail = False, f"timed out after {timeout_s} s"
    out = {"ok": ok, "build_s": round(time.perf_counter() - t0, 1)}
    if not ok:
        out["error_tail"] = tail
        print(tail, flush=True)
    return out


def plain_arch_list() -> dict | None:
    """DeepSpeed 0.19.8's JIT builder sorts the entries of TORCH_CUDA_ARCH_LIST as numbers and fails on
    arch-specific ones such as '9.0a' (``invalid literal for int() with base 10: '0a'``), which this workplace's
    GPU image sets. Replace such a list with the plain capabilities of the visible GPUs, in this process, so the
    build below and every Ray process started afterwards (the training worker loads the op too) see it."""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    entries = [e for e in arch.replace(" ", ";").split(";") if e]
    if not entries or all(re.fullmatch(r"\d+\.\d+(\+PTX)?", e) for e in entries):
        return None
    import torch

    caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(caps)
    return {"was": arch, "now": os.environ["TORCH_CUDA_ARCH_LIST"]}


def torch_adam_deepspeed(path: Path) -> Path:
    """The shipped ZeRO-2 config with torch's AdamW as DeepSpeed's optimizer (no compiled op needed)."""
    from see_ray.config.train import SHIPPED_DEEPSPEED

    ds = json.loads(SHIPPED_DEEPSPEED["zero2"].read_text())
    ds["optimizer"]["params"]["torch_adam"] = True
    path.write_text(json.dumps(ds, indent=2))
    return path


# -- HTTP -------------------------------------------------------------------------------------------------
def post(url: str, body: dict, timeout: float = 120) -> tuple[float, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url} -> {e.code}: {e.read().decode(errors='replace')[:500]}") from None
    return (time.perf_counter() - t0) * 1000, data


def stats(ms: list[float]) -> dict:
    if not ms:
        return {}
    s = sorted(ms)
    return {"n": len(s), "p50_ms": round(statistics.median(s), 2), "p90_ms": round(s[min(len(s) - 1, int(0.9 * len(s)))], 2),
            "mean_ms": round(statistics.fmean(s), 2), "min_ms": round(s[0], 2), "max_ms": round(s[-1], 2)}


def chat(model: str, text: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}


def ask_cells(url: str, expert_queries: list[str], other_queries: list[str], n: int, max_tokens: int,
              clients: int) -> dict:
    """Latency per kind of request, one client at a time (after a warm-up), plus a concurrent cell."""
    qs = (expert_queries * n)[:n]
    # every 4th query belongs to no expert (expected: the base), whatever n is
    mixed = [other_queries[(i // 4) % len(other_queries)] if i % 4 == 3 else expert_queries[i % len(expert_queries)]
             for i in range(n)]
    expected = {**{q: EXPERT for q in expert_queries}, **{q: "base" for q in other_queries}}
    for q in mixed[:2]:  # warm-up: first CUDA kernels, first batches
        post(f"{url}/v1/route", {"prompt": q})
        post(f"{url}/v1/chat/completions", chat("see", q, max_tokens))
        post(f"{url}/v1/chat/completions", chat("base", q, max_tokens))
    cells: dict[str, dict] = {}

    def run(name: str, make, queries: list[str]):
        ms, routed, hop_ms, samples, as_expected = [], {}, [], [], 0
        for q in queries:
            t, data = post(f"{url}{make(q)[0]}", make(q)[1])
            ms.append(t)
            tr = data.get("see_routing") or data
            routed[tr.get("expert")] = routed.get(tr.get("expert"), 0) + 1
            as_expected += tr.get("expert") == expected.get(q)
            hop_ms += tr.get("hop_ms") or []
            if len(samples) < 3:
                answer = (data.get("choices") or [{}])[0].get("message", {}).get("content")
                samples.append({"query": q, "expert": tr.get("expert"), "answer": answer,
                                "p_accept": [round(a["p_accept"], 4) for a in tr.get("asks", [])]})
        routed_cell = not name.startswith("chat_forced")  # forced requests name their answerer
        cells[name] = {**stats(ms), "answered_by": routed, "routed_as_expected": as_expected if routed_cell else None,
                       "replica_hop": stats(hop_ms), "samples": samples}
        log(f"{name}: p50 {cells[name]['p50_ms']} ms over {len(ms)}; answered by {routed}")

    run("route_decide_only", lambda q: ("/v1/route", {"prompt": q}), qs)
    run("chat_routed_task_queries", lambda q: ("/v1/chat/completions", chat("see", q, max_tokens)), qs)
    run("chat_routed_mixed_queries", lambda q: ("/v1/chat/completions", chat("see", q, max_tokens)), mixed)
    run("chat_forced_expert", lambda q: ("/v1/chat/completions", chat(EXPERT, q, max_tokens)), qs)
    run("chat_forced_base", lambda q: ("/v1/chat/completions", chat("base", q, max_tokens)), qs)

    total = max(n, 4 * clients)
    queries = (mixed * total)[:total]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(lambda q: post(f"{url}/v1/chat/completions", chat("see", q, max_tokens)), queries))
    wall = time.perf_counter() - t0
    ms = [t for t, _ in res]
    who = [d["see_routing"]["expert"] for _, d in res]
    cells[f"chat_routed_{clients}_clients"] = {
        **stats(ms), "requests_per_s": round(len(ms) / wall, 2), "wall_s": round(wall, 2),
        "answered_by": {w: who.count(w) for w in sorted(set(who))},
        "routed_as_expected": sum(w == expected.get(q) for q, w in zip(queries, who))}
    log(f"{clients} concurrent clients: {len(ms) / wall:.1f} requests/s, p50 {statistics.median(ms):.1f} ms")
    return cells


# -- the run ----------------------------------------------------------------------------------------------
class _Tee(io.TextIOBase):
    """stdout that also keeps the add-expert job's machine-readable result line."""

    def __init__(self, out, prefix: str):
        self.out, self.prefix, self.buf, self.result = out, prefix, "", None

    def write(self, s: str) -> int:
        self.out.write(s)
        self.buf += s
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            if line.startswith(self.prefix):
                self.result = json.loads(line[len(self.prefix):])
        return len(s)

    def flush(self) -> None:
        self.out.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random", help="'random' (built from --model-config) or a checkpoint folder")
    ap.add_argument("--model-config", help="folder with config.json and the tokenizer (for --model random)")
    ap.add_argument("--gpu", choices=["auto", "on", "off"], default="auto", help="auto: on when torch sees a GPU")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps of the expert")
    ap.add_argument("--batch", type=int, default=16, help="global batch size")
    ap.add_argument("--train-per-task", type=int, default=96, help="training instances of the demo task")
    ap.add_argument("--expert-gpus", type=float, default=0.4, help="expert.num_gpus (on a GPU)")
    ap.add_argument("--base-gpus", type=float, default=0.4, help="base.num_gpus (on a GPU)")
    ap.add_argument("--requests", type=int, default=20, help="requests per latency cell")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients of the last cell")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--address", help="a running Ray cluster to use (default: start a local one on 127.0.0.1)")
    ap.add_argument("--threads", type=int, default=4, help="torch threads of this process (the job's validation)")
    ap.add_argument("--fused-adam-timeout", type=float, default=300.0)
    ap.add_argument("--set", action="append", default=[], help="extra SEE/ray_train overrides for the job")
    ap.add_argument("--serve-set", action="append", default=[], help="extra Serve config overrides")
    ap.add_argument("--work", help="working folder (default: a new temporary one)")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "gpu-path.json"))
    args = ap.parse_args(argv)

    t_all = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="see-gpu-path-"))
    work.mkdir(parents=True, exist_ok=True)
    # as the project's local clusters: else Ray's token auth switches itself on and `ray job submit` fails
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import torch

    torch.set_num_threads(args.threads)
    use_gpu = {"on": True, "off": False, "auto": torch.cuda.is_available()}[args.gpu]
    out: dict = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "use_gpu": use_gpu, "versions": versions(),
                 "gpu": gpu_facts(), "cpus": os.cpu_count(), "timings_s": {}}
    tim = out["timings_s"]
    log(f"versions {out['versions']}; gpu {out['gpu']}")

    # 1. the model
    t0 = time.perf_counter()
    if args.model == "random":
        if not args.model_config:
            ap.error("--model random needs --model-config")
        model_path = random_model(Path(args.model_config), work / "model")
        out["model"] = {"kind": "random-init", "config_from": args.model_config, "weights": "random (seed 0)"}
    else:
        model_path = Path(args.model).expanduser()
        out["model"] = {"kind": "checkpoint", "path": str(model_path)}
    cfg = json.loads((model_path / "config.json").read_text())
    out["model"].update({k: cfg.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "intermediate_size", "vocab_size")})
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # shapes only
        out["model"]["parameters"] = sum(
            p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path)).parameters())
    tim["model"] = round(time.perf_counter() - t0, 1)
    log(f"model {out['model']} ready in {tim['model']} s at {model_path}")

    # 2. DeepSpeed's optimizer op
    ext_dir = work / "torch_extensions"
    overrides = [f"model.name_or_path={model_path}", f"training.steps={args.steps}", f"training.batch_size={args.batch}",
                 f"training.log_every={max(1, args.steps // 5)}", f"ray_train.torch_extensions_dir={ext_dir}",
                 "ray_train.start_timeout_s=180"]
    out["optimizer_build"] = None
    if use_gpu:
        out["torch_cuda_arch_list"] = plain_arch_list() or os.environ.get("TORCH_CUDA_ARCH_LIST")
        log(f"TORCH_CUDA_ARCH_LIST: {out['torch_cuda_arch_list']}; building DeepSpeed's FusedAdam (JIT) ...")
        out["optimizer_build"] = build_fused_adam(ext_dir, args.fused_adam_timeout)
        tim["fused_adam_build"] = out["optimizer_build"]["build_s"]
        log(f"FusedAdam build: {out['optimizer_build']['ok']} in {tim['fused_adam_build']} s")
        if not out["optimizer_build"]["ok"]:
            overrides.append(f"ray_train.deepspeed={torch_adam_deepspeed(work / 'zero2_torch_adam.json')}")
    overrides += args.set

    # 3. Ray
    import ray

    t0 = time.perf_counter()
    if args.address:
        ray.init(address=args.address, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
    tim["ray_start"] = round(time.perf_counter() - t0, 1)
    out["ray_resources"] = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
    log(f"Ray up in {tim['ray_start']} s: {out['ray_resources']}")
    try:
        run_path(args, out, work, overrides, use_gpu)
    finally:
        with contextlib.suppress(Exception):
            from ray import serve

            serve.shutdown()
        ray.shutdown()
        tim["total"] = round(time.perf_counter() - t_all, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2), flush=True)
        log(f"wrote {args.out}; {tim['total']} s in all")
    return 0 if out.get("ok") else 1


def run_path(args, out: dict, work: Path, overrides: list[str], use_gpu: bool) -> None:
    import ray
    from ray import serve

    from see_ray.tools.builtin import arithmetic_task, unrelated_queries
    from see_ray.tools.demo import write_task_folder
    from see_ray.registry import Registry
    from see_ray.serve import deploy_all, url_of
    from see_ray.config.serve import ServeConfig
    from see_ray.config.train import JobConfig

    tim = out["timings_s"]
    storage = work / "storage"
    task = arithmetic_task(n=args.train_per_task)
    from see_ray.training import add_expert as job


    # 4. train + validate + register, by the add-expert job
    argv = ["--task", str(write_task_folder(task, work / "tasks" / task.name)), "--name", EXPERT,
            "--storage", str(storage), "--workers", "1", "--threads", str(args.threads),
            "--min-accept", "0", "--min-reject", "0", *(["--gpu"] if use_gpu else [])]
    for o in overrides:
        argv += ["--set", o]
    out["job_argv"] = argv
    log(f"add-expert job: {' '.join(argv)}")
    t0 = time.perf_counter()
    tee = _Tee(sys.stdout, job.RESULT_PREFIX)
    with contextlib.redirect_stdout(tee):
        rc = job.main(argv)
    tim["add_expert_job"] = round(time.perf_counter() - t0, 1)
    out["job_rc"] = rc
    if rc != 0:
        raise RuntimeError(f"the add-expert job failed (exit code {rc})")
    res = tee.result or {}
    rec = Registry(str(storage)).get(EXPERT)
    fig = dict(rec.training.get("figures") or {})
    steps, train_s = fig.get("steps") or args.steps, fig.get("train_s") or 0.0
    out["training"] = {
        **{k: fig.get(k) for k in ("device", "backend", "bf16", "optimizer", "gpu_name", "gpu_peak_mib", "workers",
                                   "deepspeed", "steps", "examples", "tokens", "first_loss", "final_loss")},
        "loop_s": round(train_s, 2),
        "steps_per_s": round(steps / train_s, 2) if train_s else None,
        "tokens_per_s": round(fig.get("tokens_per_s") or 0.0, 1),
        "worker_wall_s": round(fig.get("wall_s") or 0.0, 1),
        "fit_s": round(rec.training.get("fit_s") or 0.0, 1),
        "job_steps_s": {k: round(v, 1) for k, v in (res.get("timings") or {}).items()},
        "job_total_s": round(res.get("total_s") or 0.0, 1),
        "ray_train": {k: rec.training.get("ray_train", {}).get(k) for k in ("use_gpu", "backend", "gpus_per_worker",
                                                                           "cpus_per_worker", "num_workers", "deepspeed")},
        "deepspeed_config": {"zero_stage": (rec.training.get("deepspeed") or {}).get("zero_optimization", {}).get("stage"),
                             "bf16": (rec.training.get("deepspeed") or {}).get("bf16"),
                             "optimizer": (rec.training.get("deepspeed") or {}).get("optimizer")},
        "validation": {k: rec.validation.get(k) for k in ("accept_rate", "threshold", "p_own_mean", "n_own",
                                                          "reject_rate_general_pool")},
    }
    log(f"training: {out['training']}")

    # 5. serve with num_gpus
    see, _ = JobConfig.from_yaml(None, [o for o in overrides if not o.startswith("ray_train.")]).split()
    serve_sets = [f"port={args.port}", *args.serve_set]
    if use_gpu:
        serve_sets += [f"expert.num_gpus={args.expert_gpus}", f"base.num_gpus={args.base_gpus}"]
    scfg = ServeConfig.from_yaml(None, serve_sets)
    out["serve_config"] = {"expert": scfg.expert.actor_options(), "base": scfg.base.actor_options(),
                           "dispatcher_num_cpus": scfg.dispatcher_num_cpus, "batch": scfg.batch.model_dump(),
                           "dispatch_mode": scfg.dispatch.mode, "model_dtype": see.model.dtype,
                           "model_device": see.model.device}
    t0 = time.perf_counter()
    info = deploy_all(see, scfg, str(storage), progress=log)
    tim["serve_deploy"] = round(time.perf_counter() - t0, 1)
    url = url_of(scfg)

    # 6. placement: what each replica reports, what Ray accounts, what the driver shows
    placement = {
        "expert": serve.get_deployment_handle(EXPERT, scfg.expert_app(EXPERT)).info.remote().result(timeout_s=60),
        "base": serve.get_deployment_handle("base", scfg.base_app).info.remote().result(timeout_s=60),
    }
    for p in placement.values():
        p.pop("fingerprint", None)
    gpus = ray.cluster_resources().get("GPU", 0.0)
    placement["ray_gpu"] = {"total": gpus, "available": ray.available_resources().get("GPU", 0.0)}
    placement["ray_gpu"]["held"] = round(gpus - placement["ray_gpu"]["available"], 3)
    placement["serve_status"] = {name: a.status.value if hasattr(a.status, "value") else str(a.status)
                                 for name, a in serve.status().applications.items()}
    placement["nvidia_smi_apps"] = nvidia_smi(["--query-compute-apps=pid,used_memory", "--format=csv,noheader"])
    placement["nvidia_smi_memory_used"] = nvidia_smi(["--query-gpu=memory.used", "--format=csv,noheader"])
    out["serving"] = {"url": url, "sequence": [e["name"] for e in info["sequence"]], "placement": placement}
    log(f"placement: {placement}")

    # 7. requests over HTTP
    expert_queries = [x.input for x in task.test]
    other_queries = [q.input for q in unrelated_queries()]
    t0 = time.perf_counter()
    out["serving"]["latency"] = ask_cells(url, expert_queries, other_queries, args.requests, args.max_tokens, args.clients)
    tim["requests"] = round(time.perf_counter() - t0, 1)
    out["ok"] = True


if __name__ == "__main__":
    sys.exit(main())
