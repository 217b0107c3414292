#!/usr/bin/env python
"""Training throughput of one expert: in-process loop vs Ray Train + DeepSpeed (1 and 2 workers).

    python benchmarks/train_throughput.py [--steps 16] [--out docs/results/train-throughput.json]

The same expert (the real default model, SmolLM2-135M-Instruct; the demo ``arithmetic`` task reconstructed
with the general pool as negatives; the same config, seed and global batch) is trained three times:
  (a) ``inprocess``: ``trainer.train_adapter`` in this process, plain torch AdamW, ``--threads`` torch threads;
  (b) ``ray_ds_1``: Ray Train, DeepSpeed ZeRO-2, 1 worker with the same thread count and CPU reservation;
  (c) ``ray_ds_2``: Ray Train, DeepSpeed ZeRO-2, 2 workers, threads split between them (global batch kept).
For each, ``wall_s`` is the training part (the loop: every optimizer step, as the loop times it) and
``tokens_per_s`` the tokens trained per second of it; ``end_to_end_s`` adds model loading and, for Ray,
worker-group start-up, data sharding and checkpoint reporting. (a) runs before Ray starts, so that the Ray
processes do not share the cores with it; Ray is started locally without the dashboard.

Diagnosis (skip with ``--no-diagnose``): the same in-process and 1-worker Ray runs with ONE thread each. On a
2-core machine they separate the cost of Ray and DeepSpeed themselves from the cost of Ray's background
processes interrupting a 2-thread OpenMP team (see docs/results.md).

Writes the JSON (``{"inprocess": {"wall_s", "tokens_per_s", ...}, "ray_ds_1": {...}, "ray_ds_2": {...},
"meta": {...}}``) and prints a Markdown table for docs/results.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:
    import see_ray  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    ap.add_argument("--batch", type=int, default=8, help="global batch size")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in total (the machine has 2 cores)")
    ap.add_argument("--set", action="append", default=[], help="extra SEE config overrides")
    ap.add_argument("--out", default="docs/results/train-throughput.json")
    ap.add_argument("--no-diagnose", dest="diagnose", action="store_false",
                    help="skip the 1-thread pair (in-process and Ray) that isolates the cost of Ray's processes")
    args = ap.parse_args(argv)

    import torch

    from see_ray.config import SEEConfig
    from see_ray.tools.builtin import arithmetic_task, general_pool
    from see_ray.core.model import resolve_model_path
    from see_ray.core.rehearsal import RehearsalBuffer, reconstruct
    from see_ray.core.trainer import train_adapter, use_bf16
    from see_ray.training.ray_train import RayTrainConfig, ensure_ray, train_on_ray

    overrides = [
        f"training.steps={args.steps}",
        f"training.batch_size={args.batch}",
        f"training.log_every={max(1, args.steps // 4)}",
        "training.progress=false",
        *args.set,
    ]
    cfg = SEEConfig.from_yaml(None, overrides)
    model_path = resolve_model_path(cfg.model)
    task = arithmetic_task()
    examples = reconstruct(task, RehearsalBuffer.empty(), general_pool(), cfg.rehearsal)
    bf16 = use_bf16(cfg.training, torch.device("cpu"))
    print(f"model {cfg.model.name_or_path} ({model_path}); {len(examples)} examples; {args.steps} steps of batch "
          f"{args.batch}; bf16 autocast {bf16}; load {load_avg()}", flush=True)
    results: dict[str, dict] = {}
    work = Path(tempfile.mkdtemp(prefix="see-bench-train-"))
    try:
        # (a) in-process, before any Ray process exists; also with 1 thread, for the diagnosis in the doc
        for key, threads in (("inprocess", args.threads), ("inprocess_1thread", 1)):
            if key == "inprocess_1thread" and not args.diagnose:
                continue
            torch.set_num_threads(threads)
            a_cfg = cfg.model_copy(deep=True)
            a_cfg.model.num_threads = threads
            t0 = time.perf_counter()
            r = train_adapter(examples, a_cfg, model_path, work / key, meta={"name": "bench"})
            results[key] = {
                "wall_s": r["train_s"], "tokens_per_s": r["tokens_per_s"], "end_to_end_s": time.perf_counter() - t0,
                "tokens": r["tokens"], "final_loss": r["final_loss"], "workers": 1, "threads_per_worker": threads,
                "deepspeed": False, "load_avg_after": load_avg(),
            }
            print(key, json.dumps(results[key]), flush=True)
            gc.collect()

        # A minimal local Ray (no dashboard: ten fewer background processes on two cores).
        ensure_ray(num_cpus=args.threads, include_dashboard=False)
        runs = [("ray_ds_1", 1, args.threads), ("ray_ds_2", 2, max(1, args.threads // 2))]
        if args.diagnose:
            runs.append(("ray_ds_1_1thread", 1, 1))
        for key, workers, threads in runs:
            rt = RayTrainConfig(
                num_workers=workers, deepspeed="zero2", cpus_per_worker=args.threads / workers, threads_per_worker=threads,
                start_timeout_s=120,
            )
            out = train_on_ray(
                examples, cfg, rt, name=key, storage=str(work / "storage"), output_dir=work / key,
                model_path=model_path,
            )
            m = out.metrics
            results[key] = {
                "wall_s": m["train_s"], "tokens_per_s": m["tokens_per_s"], "end_to_end_s": out.fit_s,
                "tokens": m["tokens"], "final_loss": m["final_loss"], "workers": workers,
                "threads_per_worker": threads, "deepspeed": "zero2", "load_avg_after": load_avg(),
            }
            print(key, json.dumps(results[key]), flush=True)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    a, b, c = results["inprocess"], results["ray_ds_1"], results["ray_ds_2"]
    results["meta"] = {
        "model": cfg.model.name_or_path,
        "steps": args.steps,
        "global_batch": args.batch,
        "examples": len(examples),
        "bf16_autocast": bf16,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "ray_ds_1_over_inprocess_wall": b["wall_s"] / a["wall_s"],
        "ray_ds_2_over_inprocess_wall": c["wall_s"] / a["wall_s"],
        **(
            {"ray_ds_1_1thread_over_inprocess_1thread_wall": results["ray_ds_1_1thread"]["wall_s"]
             / results["inprocess_1thread"]["wall_s"]}
            if args.diagnose else {}
        ),
        "ray_dashboard": False,
        "target_ray_ds_1_over_inprocess_wall": 1.15,
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}\n")
    print("| run | workers x threads | training wall (s) | tokens/s | end to end (s) | vs in-process |")
    print("|---|---|---|---|---|---|")
    labels = (("inprocess", "(a) in-process loop"), ("ray_ds_1", "(b) Ray Train + DeepSpeed ZeRO-2"),
              ("ray_ds_2", "(c) Ray Train + DeepSpeed ZeRO-2"), ("inprocess_1thread", "diagnosis: in-process loop"),
              ("ray_ds_1_1thread", "diagnosis: Ray Train + DeepSpeed ZeRO-2"))
    for key, label in labels:
        if key not in results:
            continue
        r = results[key]
        ref = results["inprocess_1thread"] if key == "ray_ds_1_1thread" else a
        print(f"| {label} | {r['workers']} x {r['threads_per_worker']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['end_to_end_s']:.1f} | {r['wall_s'] / ref['wall_s']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
